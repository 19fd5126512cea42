"""Transaction assembly: whole transactions, commit order, snapshot reads, prefixes of partitions."""

from consumers.apply.transactions import TransactionAssembler, positions_after
from tests.unit.samples import TRANSACTION_TABLES as TABLES
from tests.unit.samples import end_marker as end
from tests.unit.samples import event as ev


def test_a_transaction_is_taken_only_when_all_its_events_arrived():
    a = TransactionAssembler(TABLES)
    a.add_marker(end(7, 1, person=1, enrollment=1))
    a.add_event(ev(0, 0, xid=7, order=1))
    assert a.ready() == [] and a.waiting_for == "7"
    a.add_event(ev(3, 0, xid=7, order=2, table="public.enrollment"))
    [step] = a.ready()
    assert step.xid == "7" and [e.tx_order for e in step.events] == [1, 2] and step.marker_offset == 1


def test_transactions_come_out_in_commit_order_even_when_a_later_one_completes_first():
    a = TransactionAssembler(TABLES)
    a.add_marker(end(5, 1, person=1))
    a.add_marker(end(6, 3, person=1))
    a.add_event(ev(1, 0, xid=6, order=1, key=2))
    assert a.ready() == []
    a.add_event(ev(0, 0, xid=5, order=1, key=1))
    assert [s.xid for s in a.ready()] == ["5", "6"]


def test_signal_table_events_filtered_out_of_kafka_do_not_hold_a_transaction_back():
    a = TransactionAssembler(TABLES)
    a.add_marker(end(9, 1, signal=1))
    [step] = a.ready()
    assert step.xid == "9" and step.events == []


def test_snapshot_reads_go_first_and_positions_are_partition_prefixes():
    a = TransactionAssembler(TABLES)
    for i in range(3):
        a.add_event(ev(i % 2, i // 2))
    steps = a.ready()
    assert len(steps) == 1 and steps[0].xid is None and len(steps[0].events) == 3
    a.add_event(ev(0, 2, xid=11, order=1))
    a.add_marker(end(11, 1, person=1))
    steps += a.ready()
    assert positions_after(steps) == {("p.person", 0): 3, ("p.person", 1): 1}


def test_a_dead_lettered_message_is_skipped_and_its_transaction_can_be_forced_through():
    a = TransactionAssembler(TABLES)
    a.add_marker(end(4, 1, person=2))
    a.add_event(ev(0, 0, xid=4, order=1))
    a.add_hole("p.person", 0, 1)
    assert a.ready() == [] and a.waiting_for == "4" and a.holes == 1
    [step] = a.force_next()
    assert step.xid == "4" and len(step.events) == 1 and a.holes == 0


def test_group_commit_stops_between_transactions_never_inside_one():
    a = TransactionAssembler(TABLES)
    for xid in range(1, 5):
        a.add_marker(end(xid, xid, person=3))
        for order in range(1, 4):
            a.add_event(ev(0, xid * 10 + order, xid=xid, order=order))
    first = a.ready(max_events=4)
    assert [len(s.events) for s in first] == [3, 3]
    assert [s.xid for s in a.ready()] == ["3", "4"]


def test_an_incomplete_transaction_names_the_tables_it_misses_and_how_many():
    a = TransactionAssembler(TABLES)
    a.add_marker(end(7, 1, person=2, enrollment=3, signal=1))
    a.add_event(ev(0, 0, xid=7, order=1))
    a.add_event(ev(1, 0, xid=7, order=2, table="public.enrollment"))
    assert a.ready() == [] and a.waiting_for == "7"
    # The signalling table is not this applier's (filtered out of Kafka): it is never reported missing.
    assert a.missing(a.head) == {"public.enrollment": (3, 1), "public.person": (2, 1)}
    a.add_event(ev(0, 1, xid=7, order=3))
    assert a.missing(a.head) == {"public.enrollment": (3, 1)}


def test_a_transaction_given_up_goes_on_and_its_late_events_are_set_aside():
    a = TransactionAssembler(TABLES)
    a.add_marker(end(7, 1, person=1, enrollment=1))
    a.add_marker(end(8, 2, person=1))
    a.add_event(ev(0, 0, xid=7, order=1))
    a.add_event(ev(0, 1, xid=8, order=1, key=2))
    assert a.ready() == []
    [step] = a.force_next()
    assert step.xid == "7" and [e.offset for e in step.events] == [0]
    assert [s.xid for s in a.ready()] == ["8"]
    late = ev(3, 0, xid=7, order=2, table="public.enrollment")
    a.add_event(late)  # the missing event shows up after all: not held (nothing would take it), but reported
    assert a.late == [late] and a.buffered == 0 and a.waiting_for is None
