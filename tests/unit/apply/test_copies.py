"""Copies of applied source transactions skipped whole, new transactions never (consumers/apply/copies.py, pure)."""

from __future__ import annotations

from consumers.apply.copies import CommitMark, describe, pg_lsn, split_copies
from consumers.apply.events import marker_from_record
from consumers.apply.transactions import SourceUnit


def tx(xid: int, lsn: int, end_offset: int, ts: int | None = None) -> SourceUnit:
    return SourceUnit([], str(xid), 1_000 + lsn if ts is None else ts, end_offset, lsn)


def test_an_end_record_gives_the_commit_lsn_of_its_id():
    marker = marker_from_record({"status": "END", "id": "644872:15424645008", "ts_ms": 5,
                                 "data_collections": [{"data_collection": "public.t", "event_count": 1}]}, 7)
    assert (marker.xid, marker.commit_lsn, marker.offset) == ("644872", 15424645008, 7)
    assert marker_from_record({"status": "END", "id": "644872", "ts_ms": 5}, 7).commit_lsn is None


def test_after_a_worker_restart_the_re_sent_transactions_are_skipped_and_the_new_ones_applied():
    # Applied: commits at LSN 10, 20, 30 (END records at offsets 1, 3, 5). Debezium restarts from before 20 and
    # re-sends 20 and 30 (END at 7 and 9), then goes on with 40.
    applied, skipped, mark = split_copies([tx(1, 10, 1), tx(2, 20, 3), tx(3, 30, 5)], None)
    assert len(applied) == 3 and skipped == [] and mark == CommitMark(30, 1030, 5)
    kept, copies, mark = split_copies([tx(2, 20, 7), tx(3, 30, 9), tx(4, 40, 11)], mark)
    assert [s.xid for s in copies] == ["2", "3"]
    assert [s.xid for s in kept] == ["4"]
    assert mark == CommitMark(40, 1040, 11)


def test_a_copy_run_leaves_the_mark_where_it_was():
    mark = CommitMark(30, 1030, 5)
    kept, copies, after = split_copies([tx(2, 20, 7)], mark)
    assert kept == [] and len(copies) == 1 and after == mark


def test_snapshot_rows_and_ends_without_a_commit_lsn_are_always_applied():
    mark = CommitMark(30, 1030, 5)
    snapshot = SourceUnit([])
    no_lsn = SourceUnit([], "9", 900, 8, None)
    kept, copies, after = split_copies([snapshot, no_lsn], mark)
    assert kept == [snapshot, no_lsn] and copies == [] and after == mark


def test_a_transaction_read_again_before_the_end_that_set_the_mark_is_not_a_copy():
    # The same END record read again (offset 5 itself, or before it): a replay re-reading, not a re-send.
    mark = CommitMark(30, 1030, 5)
    assert not mark.covers(tx(3, 30, 5))
    assert not mark.covers(tx(2, 20, 3))


def test_the_mark_holds_only_while_the_stored_offsets_are_past_its_end_record():
    mark = CommitMark(30, 1030, 5)
    assert mark.counts(6)
    assert not mark.counts(5)  # replayed or restored to the END record itself: read again
    assert not mark.counts(0)
    assert not mark.counts(None)  # nothing stored for the transaction topic


def test_a_source_whose_lsns_start_lower_but_commit_later_is_applied_and_moves_the_mark():
    # A new cluster behind the same pipeline: LSN 5 < 30, but committed after the mark's commit time.
    mark = CommitMark(30, 1030, 5)
    kept, copies, after = split_copies([tx(7, 5, 12, ts=5000), tx(8, 6, 14, ts=5001)], mark)
    assert [s.xid for s in kept] == ["7", "8"] and copies == []
    assert after == CommitMark(6, 5001, 14)


def test_the_line_names_the_count_and_the_lsns_as_postgresql_writes_them():
    assert pg_lsn(15424645008) == "3/97616790"
    assert describe([tx(2, 20, 7), tx(3, 0x1_0000_0030, 9)]) == (
        "2 re-sent copies of source transactions already applied (commit LSN 0/14 to 1/30)")
    assert describe([tx(2, 20, 7)]) == "1 re-sent copy of source transactions already applied (commit LSN 0/14)"
    # A copy taken as its events and then its END record (two steps) is one copy.
    assert describe([tx(2, 20, 7), tx(2, 20, 8)]) == (
        "1 re-sent copy of source transactions already applied (commit LSN 0/14)")
