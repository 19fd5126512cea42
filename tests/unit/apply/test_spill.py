"""A large source transaction's runs set aside on disk until its END, and written back in parts (issue 15 item 8)."""

import numpy as np
import polars as pl

from consumers.apply import columnar, runs
from consumers.apply.events import TransactionMarker
from consumers.apply.transactions import TransactionAssembler


def envelope(i, xid="5"):
    return {"op": "c", "before": None, "after": {"id": i, "name": f"n{i}"},
            "source": {"schema": "public", "table": "person", "lsn": 100 + i, "ts_ms": 1_000 + i, "snapshot": "false"},
            "transaction": {"id": f"{xid}:{900 + i}", "total_order": i + 1}}


def poll(first, n, xid="5"):
    """A decoded poll of n changes of one transaction, as the applier's runs point into it."""
    _, arrow = runs.envelope_table(pl.DataFrame([envelope(i, xid) for i in range(first, first + n)]))
    return arrow


def run_of(arrow, rows, partition, first_offset, xid="5"):
    rows = np.asarray(rows)
    offsets = np.arange(first_offset, first_offset + len(rows))
    return runs.ChangeRun("p.person", partition, int(offsets[0]), int(offsets[-1]), "public.person", xid, 3, arrow,
                          rows, offsets)


def ids(items):
    return [e.after["id"] for item in items for e in item.events()]


def test_a_spilled_run_reads_back_the_same_changes_and_leaves_its_poll():
    arrow = poll(0, 6)
    run = run_of(arrow, [1, 3, 5], partition=0, first_offset=10)
    before = [(e.offset, e.after, e.lsn, e.tx_order, e.commit_ts_ms) for e in run.events()]
    run.spill(runs.SpillFile())
    assert run.frame is None and run.spilled is not None  # the poll's table is no longer referenced by it
    assert [(e.offset, e.after, e.lsn, e.tx_order, e.commit_ts_ms) for e in run.events()] == before
    tail = run.since(11)
    assert [e.after["id"] for e in tail.events()] == [3, 5] and tail.spilled is run.spilled


def test_the_assembler_spills_a_transaction_past_its_limit_and_gives_it_whole_at_its_end():
    a = TransactionAssembler(frozenset({"public.person"}), spill_at=5)
    small = poll(100, 2, xid="4")
    a.add_marker(TransactionMarker("END", "4", {"public.person": 2}, 900, 0))
    a.add_event(run_of(small, [0, 1], partition=1, first_offset=0, xid="4"))  # a small transaction: held as it is
    first, second, third = poll(0, 3), poll(3, 3), poll(6, 3)
    a.add_event(run_of(first, [0, 1, 2], partition=0, first_offset=0))
    assert all(item.spilled is None for q in a._partitions.values() for item in q)
    a.add_event(run_of(second, [0, 1, 2], partition=2, first_offset=0))  # 6 changes: past the limit
    a.add_event(run_of(third, [0, 1, 2], partition=0, first_offset=3))
    held = [item for q in a._partitions.values() for item in q]
    assert {item.xid: item.spilled is not None for item in held} == {"4": False, "5": True}
    assert a.buffered == 11
    small_step, = a.ready()  # the small transaction; the large one has no END yet: nothing more, nothing lost
    assert small_step.xid == "4" and ids(small_step.events) == [100, 101] and a.ready() == []
    a.add_marker(TransactionMarker("END", "5", {"public.person": 9}, 1000, 1))
    step, = a.ready()
    assert step.xid == "5" and sorted(ids(step.events)) == list(range(9))
    assert a.buffered == 0 and a._spill is None  # the file goes with the runs still pointing into it


def test_a_table_s_runs_are_written_in_parts_of_about_the_limit_in_their_order():
    arrow = poll(0, 10)
    items = [(0, run_of(arrow, [i, i + 1], partition=0, first_offset=i)) for i in range(0, 10, 2)]
    parts = columnar.chunks(items, limit=3)
    assert [[run.offset for _, run in part] for part in parts] == [[0, 2], [4, 6], [8]]
    assert columnar.chunks(items) == [items]  # a batch of ordinary size: one part
    # A part gathers its runs, spilled or not, into the rows the columnar write takes.
    spill = runs.SpillFile()
    items[2][1].spill(spill)
    batch = columnar.runs_table(parts[1], set())
    assert sorted(batch.column("after").to_pylist(), key=lambda r: r["id"]) == [
        {"id": i, "name": f"n{i}"} for i in range(4, 8)]
