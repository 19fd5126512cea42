"""Keyless changes applied once under Debezium's redelivery, the pure part (apply/plan.py): repeats within a batch,
records of applied transactions, and what a record must not swallow (pure)."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import BigInteger, Integer, Text

from cdc.source_tables import ColumnShape, TableShape
from consumers.apply.events import ChangeEvent
from consumers.apply.plan import (
    APPLIED_RETENTION,
    AppliedRecord,
    already_applied,
    applied_cutoff,
    applied_records,
    has_keyless,
    keyless_repeats,
    keyless_xids,
    net_changes,
)

LEDGER = TableShape("public.ledger", (ColumnShape("who", Text(), True), ColumnShape("amount", Integer(), True)), ())
ACCOUNT = TableShape("public.account", (ColumnShape("id", BigInteger(), False),), ("id",))
SHAPES = {"public.ledger": LEDGER, "public.account": ACCOUNT}


def ev(xid, order, lsn, op="c", after=None, before=None, table="public.ledger", offset=0, commit=1_700_000_000_000):
    return ChangeEvent(topic="t", partition=0, offset=offset, table=table, op=op, key=None, before=before,
                       after=after if after is not None or op in ("d", "t") else {"who": "a", "amount": 1},
                       lsn=lsn, tx_id=f"{xid}:{lsn}" if xid else None, tx_order=order, commit_ts_ms=commit,
                       snapshot=False)


def identity(event, image):
    return dict(image) if image is not None else None


def test_a_copy_taken_along_with_its_original_is_dropped_once_per_change():
    original = [ev("7", 1, 100), ev("7", 2, 100), ev("7", 3, 120, op="d", before={"who": "a", "amount": 1})]
    copy = [ev("7", 1, 100, offset=9), ev("7", 2, 100, offset=10), ev("7", 3, 120, op="d", offset=11,
                                                                          before={"who": "a", "amount": 1})]
    kept, dropped = keyless_repeats([*original, *copy], SHAPES)
    assert kept == original and dropped == copy
    # The two equal inserts at one LSN (one COPY statement) are two rows, not a change and its copy.
    [phase] = net_changes(kept, SHAPES, identity)
    assert [c.op for c in phase.keyless["public.ledger"]] == ["insert", "insert", "delete"]


def test_keyed_changes_and_snapshot_reads_are_left_alone():
    keyed = [ev("7", 1, 100, table="public.account", after={"id": 1}),
             ev("7", 1, 100, table="public.account", after={"id": 1})]
    reads = [ev(None, None, None, op="r"), ev(None, None, None, op="r")]  # equal snapshot rows: two rows
    events = [*keyed, *reads]
    assert keyless_repeats(events, SHAPES) == (events, [])
    assert not has_keyless(events, SHAPES) and keyless_xids(events, SHAPES) == []


def test_a_change_without_its_place_in_the_transaction_is_kept():
    events = [ev("7", None, 100), ev("7", None, 100)]
    assert keyless_repeats(events, SHAPES) == (events, [])


def test_a_record_skips_the_copies_of_its_transaction_while_the_stored_offsets_are_past_its_end():
    record = AppliedRecord("public.ledger", "7", 100, 120, end_offset=5)
    copy = [ev("7", 1, 100), ev("7", 3, 120, op="d", before={"who": "a", "amount": 1})]
    other = [ev("8", 1, 130), ev("7", 1, 100, table="public.account", after={"id": 1})]
    kept, skipped = already_applied([*copy, *other], SHAPES, [record], lambda table: 6)
    assert skipped == copy and kept == other
    # A replay (or a restore) moved the offsets back before the END record: the table is rebuilt, the record void.
    assert already_applied(copy, SHAPES, [record], lambda table: 5) == (copy, [])


def test_a_transaction_id_used_again_is_not_taken_for_a_copy():
    record = AppliedRecord("public.ledger", "7", 100, 120, end_offset=5)
    wrapped = [ev("7", 1, 9_000_000)]  # the same 32-bit id after wrap-around: other LSNs
    assert already_applied(wrapped, SHAPES, [record], lambda table: 6) == (wrapped, [])
    elsewhere = [ev("7", 1, 100, table="public.other")]  # a table the record is not about (not captured here)
    assert already_applied(elsewhere, SHAPES, [record], lambda table: 6) == (elsewhere, [])


def test_records_span_each_transactions_keyless_changes_per_table():
    events = [ev("7", 1, 100), ev("7", 2, 100), ev("7", 3, 140), ev("8", 1, 150, commit=1_700_000_001_000),
              ev("7", 4, 160, table="public.account", after={"id": 1}), ev(None, None, None, op="r")]
    records = applied_records(events, SHAPES, {"7": 3, "8": 4})
    assert sorted(records, key=lambda r: r.xid) == [
        AppliedRecord("public.ledger", "7", 100, 140, 3, 1_700_000_000_000),
        AppliedRecord("public.ledger", "8", 150, 150, 4, 1_700_000_001_000)]
    assert keyless_xids(events, SHAPES) == ["7", "8"]


def test_records_are_pruned_a_retention_before_the_newest_commit():
    newest = 1_700_000_000_000
    cutoff = applied_cutoff([ev("7", 1, 100, commit=newest - 5000), ev("8", 1, 110, commit=newest)])
    assert cutoff == datetime.fromtimestamp(newest / 1000, tz=UTC) - APPLIED_RETENTION
    assert APPLIED_RETENTION >= timedelta(days=1)
    assert applied_cutoff([ev(None, None, None, op="r", commit=None)]) is None
