"""Runs of changes: cutting a poll into them, the assembler taking them, and the columnar write's order of them."""

import numpy as np
import polars as pl
import pyarrow as pa

from consumers.apply import columnar, runs
from consumers.apply.events import TransactionMarker
from consumers.apply.transactions import TransactionAssembler, positions_after


def envelope(i, op="c", xid=None, order=None, table="person", lsn=None):
    return {"op": op, "before": None, "after": {"id": i, "name": f"n{i}"},
            "source": {"schema": "public", "table": table, "lsn": lsn if lsn is not None else 100 + i,
                       "ts_ms": 1_000 + i, "snapshot": "false" if xid else "true"},
            "transaction": {"id": f"{xid}:{900 + i}", "total_order": order} if xid else None}


def frame(*envelopes):
    return pl.DataFrame(list(envelopes))


def test_a_poll_is_cut_where_partition_decode_or_transaction_changes():
    partitions = np.array([0, 1, 0, 0, 1, 0, 0])
    groups = np.array([0, 0, 0, -4, 0, 0, 0])  # message 3 stands on its own (another schema's event, say)
    transactions = np.array([5, 5, 5, 5, 5, 6, 6])
    starts, ends, order = runs.split(partitions, groups, transactions)
    cut = [order[s:e].tolist() for s, e in zip(starts, ends)]
    # Partition 0: 0, 2 | 3 (alone) | 5, 6 (next transaction); partition 1: 1, 4.
    assert cut == [[0, 2], [3], [5, 6], [1, 4]]
    # Changes read past (replay --from TIME) are cut apart too, snapshot reads (no transaction) included.
    skipped = np.array([True, False, False, False, False, False, False])
    starts, ends, order = runs.split(partitions, groups, np.full(7, -1), skipped)
    assert [order[s:e].tolist() for s, e in zip(starts, ends)] == [[0], [2], [3], [5, 6], [1, 4]]


def test_messages_are_grouped_by_the_schema_id_of_their_framing():
    framed = [b"\x00\x00\x00\x00\x07abc", None, b"\x01\x00\x00\x00\x07abc", b"\x00\x00\x00\x01\x00x",
              b"\x00\x00", b"\x00\x00\x00\x00\x07z"]
    data = np.array([True, True, True, True, True, False])
    # None (a tombstone), a wrong magic byte, too short, and a message of the transaction topic: in no group.
    groups = runs.schema_groups(pa.array(framed, pa.binary()), data)
    assert {k: v.tolist() for k, v in groups.items()} == {7: [0], 256: [3]}
    codes, data = runs.partition_codes(["a", "tx", "a", "b"], [0, 0, 3, 0], "tx")
    assert len(set(codes.tolist())) == 4 and data.tolist() == [True, False, True, True]


def test_envelope_table_refuses_two_tables_and_truncates():
    assert runs.envelope_table(frame(envelope(1, xid=5, order=1), envelope(2, xid=5, order=2, table="other"))) is None
    truncate = envelope(3, op="t", xid=5, order=1)
    truncate["after"] = None
    assert runs.envelope_table(frame(envelope(1, xid=5, order=1), truncate)) is None
    table, arrow = runs.envelope_table(frame(envelope(1, xid=5, order=1), envelope(2)))
    assert table == "public.person"
    assert arrow.column("_xid").to_pylist() == ["5", None] and arrow.column("_txid").to_pylist() == ["5:901", None]


def make_run(arrow, rows, partition=0, xid="5", first_offset=10):
    rows = np.asarray(rows)
    offsets = np.arange(first_offset, first_offset + len(rows))
    return runs.ChangeRun("p.person", partition, int(offsets[0]), int(offsets[-1]), "public.person", xid, 3, arrow,
                          rows, offsets)


def test_a_run_becomes_the_events_it_stands_for_and_can_be_cut_at_an_offset():
    _, arrow = runs.envelope_table(frame(*(envelope(i, xid=5, order=i + 1) for i in range(4))))
    run = make_run(arrow, [1, 2, 3])
    events = run.events()
    assert [(e.offset, e.after["id"], e.xid, e.tx_order, e.lsn, e.commit_ts_ms, e.snapshot) for e in events] == [
        (10, 1, "5", 2, 101, 1001, False), (11, 2, "5", 3, 102, 1002, False), (12, 3, "5", 4, 103, 1003, False)]
    assert events[0].tx_id == "5:901"
    tail = run.since(11)
    assert (tail.offset, tail.count, [e.after["id"] for e in tail.events()]) == (11, 2, [2, 3])
    assert run.since(10) is run and run.since(13) is None


def test_the_assembler_counts_a_run_as_its_changes():
    _, arrow = runs.envelope_table(frame(*(envelope(i, xid=5, order=i + 1) for i in range(5))))
    a = TransactionAssembler(frozenset({"public.person"}))
    a.add_marker(TransactionMarker("END", "5", {"public.person": 5}, 1000, 0))
    a.add_event(make_run(arrow, [0, 2, 4], partition=0))
    assert a.ready() == [] and a.buffered == 3 and a.waiting_for == "5"
    a.add_event(make_run(arrow, [1, 3], partition=1, first_offset=40))
    [step] = a.ready()
    assert sum(r.count for r in step.events) == 5 and a.buffered == 0
    assert positions_after([step]) == {("p.person", 0): 13, ("p.person", 1): 42}


def test_runs_of_several_partitions_are_written_in_the_transactions_order():
    # Transaction 5 touched id 1 twice, from two partitions; snapshot reads (step 0) keep their arrival order.
    _, arrow = runs.envelope_table(frame(
        envelope(1, xid=5, order=2, lsn=300), envelope(1, xid=5, order=1, lsn=200), envelope(7, lsn=50),
        envelope(8, lsn=10)))
    batch = columnar.runs_table([(0, make_run(arrow, [2, 3], xid=None)), (1, make_run(arrow, [0], partition=1)),
                                 (1, make_run(arrow, [1], partition=2))], snapshot_steps={0})
    order = sorted(range(batch.num_rows), key=lambda i: batch.column("_seq")[i].as_py())
    assert [batch.column("_lsn")[i].as_py() for i in order] == [50, 10, 200, 300]
    flat = pa.table({columnar.SEQ: batch.column("_seq"), "id": pa.array([7, 8, 1, 1])})
    assert columnar.last_changes(flat, ["id"]).column(columnar.SEQ).to_pylist() == [0, 1, 3]


def test_the_first_and_last_change_of_each_group_are_found_as_group_by_would_find_them():
    # Keys with nulls (equal to each other, as GROUP BY has them), NaN (one group), text; changes out of order.
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(0, 40))
        k = [None if v == 3 else int(v) for v in rng.integers(0, 4, n)]
        s = [None if v == 2 else "ab"[int(v)] for v in rng.integers(0, 3, n)]
        f = [float("nan") if v == 2 else None if v == 3 else float(v) for v in rng.integers(0, 4, n)]
        seq = [int(v) for v in rng.permutation(1_000)[:n]]
        identity = pa.table({"k": pa.array(k, pa.int64()), "s": pa.array(s, pa.string()),
                             "f": pa.array(f, pa.float64())})

        expected_first, expected_last = {}, {}
        for i in range(n):
            g = (k[i], s[i], "nan" if f[i] != f[i] else f[i])
            if g not in expected_first or seq[i] < seq[expected_first[g]]:
                expected_first[g] = i
            if g not in expected_last or seq[i] > seq[expected_last[g]]:
                expected_last[g] = i
        seqs = pa.array(seq, pa.int64())
        assert columnar.group_ends(identity, seqs, last=False).tolist() == sorted(expected_first.values())
        assert columnar.group_ends(identity, seqs, last=True).tolist() == sorted(expected_last.values())
