"""What the applier reads ahead of what it can apply is bounded: the partitions read beyond the next transaction
are paused past the bound, never the ones it still needs, and all resume when nothing else comes."""

from consumers.apply.reader import HOLD_BACK_PATIENCE_S, partitions_to_pause
from consumers.apply.transactions import TransactionAssembler
from tests.unit.samples import TRANSACTION_TABLES as TABLES
from tests.unit.samples import end_marker as end
from tests.unit.samples import event as ev

P0, P1, P2 = ("p.person", 0), ("p.person", 1), ("p.person", 2)


def test_partitions_read_beyond_the_next_transaction_are_told_apart_from_those_it_still_needs():
    a = TransactionAssembler(TABLES)
    a.add_event(ev(0, 0, xid=7, order=1, key=1))
    a.add_event(ev(0, 1, xid=8, order=1, key=2))  # partition 0 went on to transaction 8
    a.add_event(ev(1, 0, xid=7, order=2, key=3))  # partition 1 is still at transaction 7
    a.add_event(ev(2, 0, order=None, key=4))  # partition 2: a snapshot read, of no transaction
    # No END record read yet: every partition holding a change of some transaction is beyond the next one.
    assert a.read_beyond_head() == {P0, P1}
    a.add_marker(end(7, 1, person=3))
    assert a.read_beyond_head() == {P0}  # partition 1 may hold the rest of transaction 7
    assert a.held_in_memory == a.buffered == 4


def test_changes_of_a_transaction_spilled_to_disk_are_not_counted_as_held_in_memory(tmp_path):
    a = TransactionAssembler(TABLES)
    a.add_event(ev(0, 0, xid=7, order=1))
    a._spilling.add("7")  # its runs go to disk (the spill itself is tested in test_spill.py)
    a.add_event(ev(0, 1, xid=8, order=1))
    assert a.buffered == 2 and a.held_in_memory == 1


def test_under_the_bound_nothing_is_paused_and_over_it_only_what_was_read_beyond():
    beyond = {P0, P2}

    def plan(held, paused=frozenset(), idle_s=0.0, hold_off=False):
        return partitions_to_pause(held=held, read_ahead=1_000, beyond=lambda: set(beyond), paused=set(paused),
                                   idle_s=idle_s, hold_off=hold_off)

    assert plan(999) == (set(), False)
    assert plan(1_000) == ({P0, P2}, False)
    assert plan(5_000, paused={P0, P2}, idle_s=0.2) == ({P0, P2}, False)  # a short lull: still paused
    # Nothing came for a while from what is still read: everything resumes, and stays so until under the bound.
    assert plan(5_000, paused={P0, P2}, idle_s=HOLD_BACK_PATIENCE_S) == (set(), True)
    assert plan(5_000, hold_off=True) == (set(), True)
    assert plan(999, hold_off=True) == (set(), False)
    assert partitions_to_pause(held=10**9, read_ahead=None, beyond=lambda: {P0}, paused=set(), idle_s=0,
                               hold_off=False) == (set(), False)  # no bound asked for


def test_a_complete_next_transaction_keeps_the_partitions_paused_however_long_nothing_comes():
    # The writer has what it needs (a long write, say): reading on would only hold more, so the bound holds.
    assert partitions_to_pause(held=5_000, read_ahead=1_000, beyond=lambda: {P0, P2}, paused={P0, P2},
                               idle_s=60.0, hold_off=False, waiting=False) == ({P0, P2}, False)
    assert partitions_to_pause(held=5_000, read_ahead=1_000, beyond=lambda: {P0, P2}, paused={P0, P2},
                               idle_s=60.0, hold_off=False, waiting=True) == (set(), True)
