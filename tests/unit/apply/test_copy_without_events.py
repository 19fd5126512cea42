"""A copy of an applied transaction whose END record came again without all its events (seen after a broker SIGKILL:
BEGIN and END records re-sent, the changes not): taken at once and skipped, never waited for; its events read later
are repeats, skipped too, with their offsets stored (consumers/apply/transactions.py, `_take_copy`)."""

from __future__ import annotations

from consumers.apply.copies import CommitMark, split_copies
from consumers.apply.events import TransactionMarker
from consumers.apply.transactions import TransactionAssembler, positions_after
from tests.unit.samples import TRANSACTION_TABLES as TABLES
from tests.unit.samples import event as ev


def end(xid: int, offset: int, lsn: int, person: int) -> TransactionMarker:
    return TransactionMarker("END", str(xid), {"public.person": person}, 1000, offset, commit_lsn=lsn)


def test_an_end_record_re_sent_without_its_events_is_skipped_and_what_follows_is_applied():
    a = TransactionAssembler(TABLES)
    # Transaction 5 (commit LSN 500, END at offset 1) was applied: the destination's mark.
    a.mark = CommitMark(500, 1000, 1)
    # Its END record again (offset 3), its change not; then transaction 6, whole.
    a.add_marker(end(5, 3, 500, person=1))
    a.add_marker(end(6, 5, 600, person=1))
    a.add_event(ev(0, 10, xid=6, order=1, key=2))
    steps = a.ready()
    assert [(s.xid, s.repeat, len(s.events)) for s in steps] == [("5", True, 0), ("6", False, 1)]
    kept, copies, mark = split_copies(steps, a.mark)
    assert [s.xid for s in kept] == ["6"] and [s.xid for s in copies] == ["5"] and mark.lsn == 600
    # The copy's change comes after all: a repeat, taken at the front of its partition, skipped, its offset stored.
    a.mark = mark
    a.add_event(ev(0, 11, xid=5, order=1, key=1))
    [repeat] = a.ready()
    assert repeat.repeat and repeat.xid == "5" and len(repeat.events) == 1 and a.buffered == 0
    assert positions_after([repeat]) == {("p.person", 0): 12}
    kept, copies, _ = split_copies([repeat], a.mark)
    assert kept == [] and copies == [repeat]


def test_an_incomplete_transaction_that_is_no_copy_is_still_waited_for():
    a = TransactionAssembler(TABLES)
    a.mark = CommitMark(500, 1000, 1)
    a.add_marker(end(7, 3, 700, person=2))  # committed after the mark: new
    a.add_event(ev(0, 10, xid=7, order=1, key=1))
    assert a.ready() == [] and a.waiting_for == "7"
    a.mark = None  # no mark (a fresh destination): nothing is a copy
    a.add_marker(end(5, 4, 500, person=1))
    assert a.ready() == [] and a.waiting_for == "7"
