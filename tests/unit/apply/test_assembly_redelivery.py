"""Transaction assembly under Debezium's at-least-once delivery (copies of whole transactions, read before or after
their originals were taken) and with a record of the transaction topic lost (dead-lettered as undecodable)."""

import pytest

from consumers.apply.copies import split_copies
from consumers.apply.events import TransactionMarker
from consumers.apply.transactions import AssemblyError, TransactionAssembler, positions_after
from tests.unit.samples import TRANSACTION_TABLES as TABLES
from tests.unit.samples import end_marker as end
from tests.unit.samples import event as ev


def test_a_copy_read_after_its_original_was_taken_is_skipped_as_a_repeat():
    a = TransactionAssembler(TABLES)
    a.add_marker(end(5, 1, person=2))
    a.add_event(ev(0, 0, xid=5, order=1))
    a.add_event(ev(0, 1, xid=5, order=2))
    assert [len(s.events) for s in a.ready()] == [2]
    a.add_event(ev(0, 2, xid=5, order=1))
    a.add_event(ev(0, 3, xid=5, order=2))
    a.add_marker(end(5, 2, person=2))
    steps = a.ready()
    # Its events first (at the front of their partition), then its END record: both skipped, the offsets stored.
    assert [(s.xid, s.repeat, [e.offset for e in s.events]) for s in steps] == [("5", True, [2, 3]), ("5", True, [])]
    assert steps[-1].marker_offset == 2 and positions_after(steps) == {("p.person", 0): 4}
    assert split_copies(steps, None)[0] == []  # nothing to apply, with or without the destination's mark
    assert a.buffered == 0 and a.waiting_for is None


def test_events_read_again_after_their_transaction_was_taken_are_repeats_even_without_their_end_record():
    # Debezium re-sent transaction 5's event but not its END record, and nothing follows in the partition (an idle
    # source): waiting for that END held the partition for good, and the lag never came back to zero.
    a = TransactionAssembler(TABLES)
    a.add_marker(end(5, 1, person=2))
    a.add_event(ev(0, 0, xid=5, order=1))
    a.add_event(ev(0, 1, xid=5, order=2))
    assert [s.xid for s in a.ready()] == ["5"]
    a.add_event(ev(0, 2, xid=5, order=1))
    [step] = a.ready()
    assert step.repeat and step.xid == "5" and [e.offset for e in step.events] == [2]
    assert positions_after([step]) == {("p.person", 0): 3} and a.buffered == 0 and a.waiting_for is None
    assert split_copies([step], None)[:2] == ([], [step])
    # No END record offset: the transaction topic's stored offset never goes back to the original's END.
    assert step.marker_offset is None


def test_events_of_transactions_taken_by_an_earlier_run_are_repeats_once_their_end_records_are_read_back():
    # A new run (the stored offsets past transaction 5's END record) reads 5's re-sent event and nothing else.
    a = TransactionAssembler(TABLES)
    a.add_event(ev(0, 2, xid=5, order=1))
    assert a.ready() == [] and a.stranded and a.waiting_for is None
    a.taken_before([end(4, 0, person=1), end(5, 1, person=1)])  # the END records in front of where it started
    [step] = a.ready()
    assert step.repeat and step.xid == "5" and step.marker_offset is None and not a.stranded and a.buffered == 0
    # An event of a transaction whose END record is still to come is no repeat: it waits.
    a.add_event(ev(0, 3, xid=6, order=1))
    assert a.ready() == [] and a.stranded
    a.add_marker(end(6, 2, person=1))
    [step] = a.ready()
    assert step.xid == "6" and not step.repeat


def test_an_end_record_whose_id_comes_again_with_another_commit_lsn_is_a_new_transaction():
    # A transaction id (PostgreSQL's txid) used again by another commit, as by a new source cluster behind the same
    # pipeline: not a copy of the one taken before, so its events are waited for and applied.
    a = TransactionAssembler(TABLES)
    a.add_marker(TransactionMarker("END", "5", {"public.person": 1}, 1000, 1, commit_lsn=500))
    a.add_event(ev(0, 0, xid=5, order=1))
    assert [s.xid for s in a.ready()] == ["5"]
    a.add_marker(TransactionMarker("END", "5", {"public.person": 1}, 1000, 2, commit_lsn=90))
    assert a.ready() == [] and a.waiting_for == "5"
    a.add_event(ev(0, 1, xid=5, order=1, key=2))
    [step] = a.ready()
    assert not step.repeat and [e.offset for e in step.events] == [1]


def test_copies_read_before_their_originals_were_taken_are_repeats_once_they_are():
    # Partition: T5 T6 | T5' T6' (Debezium re-sent both after a crash); the transaction topic: E5 E6 E5' E6'.
    a = TransactionAssembler(TABLES)
    for offset, xid in enumerate([5, 6, 5, 6]):
        a.add_event(ev(0, offset, xid=xid, order=1, key=xid))
    for offset, xid in enumerate([5, 6, 5, 6]):
        a.add_marker(end(xid, offset, person=1))
    steps = a.ready()
    assert [(s.xid, s.repeat, [e.offset for e in s.events]) for s in steps] == [
        ("5", False, [0]), ("6", False, [1]), ("5", True, [2]), ("6", True, [3]), ("5", True, []), ("6", True, [])]
    assert a.buffered == 0 and a.waiting_for is None
    assert positions_after(steps) == {("p.person", 0): 4}


def test_a_copy_right_behind_its_original_is_taken_along_and_its_end_record_completes_empty():
    a = TransactionAssembler(TABLES)
    a.add_event(ev(0, 0, xid=5, order=1))
    a.add_event(ev(0, 1, xid=5, order=1))  # the copy
    a.add_marker(end(5, 1, person=1))
    a.add_marker(end(5, 2, person=1))
    a.add_event(ev(0, 2, xid=6, order=1, key=2))
    a.add_marker(end(6, 3, person=1))
    steps = a.ready()
    assert [(s.xid, len(s.events)) for s in steps] == [("5", 2), ("5", 0), ("6", 1)]
    assert a.waiting_for is None and a.buffered == 0


def test_events_of_a_transaction_whose_end_record_is_known_in_the_way_are_a_contradiction():
    # 6's END comes after 5's, so 6 committed after 5: its events cannot stand in front of 5's.
    a = TransactionAssembler(TABLES)
    a.add_event(ev(0, 0, xid=6, order=1))
    a.add_event(ev(0, 1, xid=5, order=1, key=2))
    a.add_marker(end(5, 2, person=1))
    a.add_marker(end(6, 3, person=1))
    with pytest.raises(AssemblyError, match="source transaction 5"):
        a.ready()


def test_a_delivery_cut_short_is_set_aside_and_its_copy_applied_behind_the_copies_before_it():
    # Partitions: 5 | 7 (cut short: Connect died before 7's END) | 5' 6' 7' (Debezium re-sent from before 5).
    # The transaction topic: E5 E5' E6' E7'. Seen under a SIGKILL of Connect (tests/integration/apply/test_faults.py).
    a = TransactionAssembler(TABLES)
    a.add_event(ev(0, 0, xid=5, order=1))
    a.add_event(ev(0, 1, xid=7, order=1, key=7))
    a.add_event(ev(1, 0, xid=7, order=2, key=8))  # the cut-short delivery's event in the other partition
    a.add_marker(end(5, 0, person=1))
    assert [s.xid for s in a.ready()] == ["5"]
    a.add_event(ev(0, 2, xid=5, order=1))
    a.add_event(ev(0, 3, xid=6, order=1, key=6))
    a.add_marker(end(5, 1, person=1))
    a.add_marker(end(6, 2, person=1))
    steps = a.ready()
    assert [(s.xid, [e.offset for e in s.events]) for s in steps] == [("5", [2]), ("6", [3])]
    assert a.superseded == {"7": 1} and a.late == [] and a.orphaned == set()
    # 7's END record (the copy's) completes with the copy's event here and the cut-short one still in partition 1,
    # the same change (the destination absorbs its copy, which arrives later).
    a.add_marker(end(7, 3, person=2))
    a.add_event(ev(0, 4, xid=7, order=1, key=7))
    [step] = a.ready()
    assert step.xid == "7" and sorted((e.partition, e.offset) for e in step.events) == [(0, 4), (1, 0)]
    a.add_event(ev(1, 1, xid=7, order=2, key=8))  # that copy: a repeat, 7 was taken
    a.add_event(ev(1, 2, xid=8, order=1, key=9))
    a.add_marker(end(8, 4, person=1))
    repeat, step = a.ready()
    assert repeat.repeat and repeat.xid == "7" and [e.offset for e in repeat.events] == [1]
    assert step.xid == "8" and [e.offset for e in step.events] == [2] and a.superseded == {"7": 1}
    assert a.buffered == 0 and a.waiting_for is None
    assert positions_after([repeat, step]) == {("p.person", 1): 3}


def test_events_whose_end_record_was_lost_are_given_up_when_they_stand_in_the_way():
    a = TransactionAssembler(TABLES)
    a.add_event(ev(0, 0, xid=4, order=1))  # its END record did not decode
    a.add_event(ev(1, 0, xid=4, order=2))
    a.add_event(ev(0, 1, xid=5, order=1, key=2))
    a.add_lost_marker(1)
    a.add_marker(end(5, 2, person=1))
    [step] = a.ready()
    assert step.xid == "5" and [e.offset for e in step.events] == [1]
    # Once given up, in every partition: its event where transaction 5 has none went too.
    assert [(e.partition, e.offset) for e in a.late] == [(0, 0), (1, 0)] and a.orphaned == {"4"}
    late = ev(2, 0, xid=4, order=3)
    a.add_event(late)  # and one arriving later still is set aside
    assert a.late[-1] is late and a.buffered == 0


def test_a_transaction_whose_end_record_is_known_is_never_taken_for_an_orphan():
    a = TransactionAssembler(TABLES)
    a.add_lost_marker(0)
    a.add_event(ev(0, 0, xid=4, order=1))
    a.add_marker(end(4, 1, person=2))  # two events, one arrived: incomplete, not lost
    a.add_event(ev(0, 1, xid=5, order=1, key=2))
    a.add_marker(end(5, 2, person=1))
    assert a.ready() == [] and a.waiting_for == "4" and a.late == []


def test_a_later_transaction_at_the_front_of_another_partition_is_not_taken_for_an_orphan():
    a = TransactionAssembler(TABLES)
    a.add_lost_marker(0)
    a.add_event(ev(0, 0, xid=5, order=1))
    a.add_event(ev(1, 0, xid=6, order=1, key=2))  # committed after 5; its END record is not read yet
    a.add_marker(end(5, 1, person=1))
    assert [s.xid for s in a.ready()] == ["5"] and a.late == [] and a.orphaned == set()
    a.add_marker(end(6, 2, person=1))
    assert [s.xid for s in a.ready()] == ["6"]


def test_a_copy_behind_a_later_transaction_is_no_reason_to_set_that_one_aside():
    # Partition 0: 5, 6, 5' (a copy); partition 1: 5's other event. 6's END is not read yet. 5 is taken from the
    # fronts of both partitions; 6 stays, for its own END record; then 5' is a repeat.
    a = TransactionAssembler(TABLES)
    a.add_event(ev(0, 0, xid=5, order=1))
    a.add_event(ev(0, 1, xid=6, order=1, key=6))
    a.add_event(ev(0, 2, xid=5, order=1))
    a.add_event(ev(1, 0, xid=5, order=2, key=2))
    a.add_marker(end(5, 0, person=2))
    [step] = a.ready()
    assert step.xid == "5" and sorted((e.partition, e.offset) for e in step.events) == [(0, 0), (1, 0)]
    assert a.superseded == {}
    a.add_marker(end(6, 1, person=1))
    assert [(s.xid, s.repeat, [e.offset for e in s.events]) for s in a.ready()] == [("6", False, [1]), ("5", True, [2])]
    assert a.buffered == 0 and a.waiting_for is None


def test_copies_of_one_tables_events_never_stand_in_for_another_tables_events_not_arrived():
    # Seen after a broker SIGKILL: the person topic held some of a transaction's events twice (the Connect worker's
    # producer sent again what the broker had written), the school topic its events once, and later. Counted in
    # all, the copies made up for the missing events: the transaction was applied without them, and they stood in
    # front of the next one's for good (AssemblyError), or would have been set aside and lost.
    a = TransactionAssembler(TABLES)
    a.add_marker(end(5, 0, person=2, enrollment=1))
    a.add_event(ev(0, 0, xid=5, order=1, key=1))
    a.add_event(ev(0, 1, xid=5, order=1, key=1))  # the copy, right behind
    a.add_event(ev(1, 0, xid=5, order=2, key=2))
    a.add_event(ev(1, 1, xid=6, order=1, key=3))
    a.add_marker(end(6, 1, person=1))
    assert a.ready() == [] and a.waiting_for == "5"
    assert a.missing(a.head) == {"public.enrollment": (1, 0)}
    a.add_event(ev(3, 0, xid=5, order=3, key=1, table="public.enrollment"))
    steps = a.ready()
    assert [(s.xid, sorted((e.partition, e.offset) for e in s.events)) for s in steps] == [
        ("5", [(0, 0), (0, 1), (1, 0), (3, 0)]), ("6", [(1, 1)])]
    assert positions_after(steps) == {("p.person", 0): 2, ("p.person", 1): 2, ("p.person", 3): 1}
    assert a.buffered == 0 and a.waiting_for is None
    # A copy of 5's END record after that is a copy's: taken at once with the events it has, and its events read
    # later are repeats.
    a.add_marker(end(5, 2, person=2, enrollment=1))
    a.add_event(ev(0, 2, xid=5, order=1, key=1))
    steps = a.ready()
    assert [(s.xid, s.repeat, len(s.events)) for s in steps] == [("5", True, 1), ("5", True, 0)]
    a.add_event(ev(3, 1, xid=5, order=3, key=1, table="public.enrollment"))
    [step] = a.ready()
    assert step.repeat and a.buffered == 0 and a.waiting_for is None
