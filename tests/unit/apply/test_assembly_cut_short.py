"""A delivery cut short by a crash whose copy's END record was read already (consumers/apply/transactions.py): set
aside when the transaction it stands in front of is a re-sent copy of one the destination applied, a contradiction
otherwise (pure)."""

import pytest

from consumers.apply.copies import CommitMark
from consumers.apply.events import ChangeEvent, TransactionMarker
from consumers.apply.transactions import AssemblyError, TransactionAssembler

TABLES = frozenset({"public.person"})


def ev(partition: int, offset: int, xid: int, key: int = 1) -> ChangeEvent:
    return ChangeEvent(topic="p.person", partition=partition, offset=offset, table="public.person", op="u",
                       key={"id": key}, before=None, after={"id": key}, lsn=100 * xid + key, tx_id=f"{xid}:{offset}",
                       tx_order=key, commit_ts_ms=1000 + xid, snapshot=False)


def end(xid: int, offset: int, events: int) -> TransactionMarker:
    # Commit LSN and time grow with the transaction id here, as they do with commit order at the source.
    return TransactionMarker("END", str(xid), {"public.person": events}, 1000 + xid, offset, commit_lsn=10_000 + xid)


def crash_replay(a: TransactionAssembler) -> None:
    """Partition 0: 5 | 7 (cut short: Connect died after writing it, before 7's END) | then, re-sent from before 5:
    5' 6' 7'. The transaction topic: E5 | E5' E6' E7', all read before the copies' events are taken."""
    a.add_event(ev(0, 0, xid=5))
    a.add_marker(end(5, 0, 1))
    assert [s.xid for s in a.ready()] == ["5"]
    a.add_event(ev(0, 1, xid=7, key=7))  # the delivery cut short
    for offset, xid in ((2, 5), (3, 6), (4, 7)):
        a.add_event(ev(0, offset, xid=xid, key=7 if xid == 7 else 1))
    for offset, xid in ((1, 5), (2, 6), (3, 7)):
        a.add_marker(end(xid, offset, 1))


def test_behind_a_copy_of_an_applied_transaction_a_cut_short_delivery_is_set_aside_though_its_end_is_known():
    a = TransactionAssembler(TABLES)
    a.mark = CommitMark(10_005, 1005, 0)  # 5 applied, its END record at offset 0
    crash_replay(a)
    steps = a.ready()
    assert [(s.xid, [e.offset for e in s.events]) for s in steps] == [("5", [2]), ("6", [3]), ("7", [4])]
    assert a.superseded == {"7": 1}
    assert a.buffered == 0 and a.waiting_for is None and a.late == [] and a.orphaned == set()


def test_without_the_mark_the_same_streams_are_a_contradiction():
    # Nothing says 5' is a copy of an applied transaction: 7's events in front of it, with 7's END read after 5's,
    # contradict the commit order, and the applier stops rather than guess.
    a = TransactionAssembler(TABLES)
    crash_replay(a)
    with pytest.raises(AssemblyError, match="source transaction 5"):
        a.ready()


def test_a_later_transaction_is_set_aside_only_in_a_partition_that_gave_the_copy_none_of_its_events():
    # Partition 1: 6, then the copy 5' (6 was written before the re-send began, and 6's END comes after 5''s: a
    # delivery cut short). Partition 0: 5'a, 6, 5'b -- 6 stands between events of the copy that partition already
    # gave: no crash leaves that shape, and the assembler does not guess there.
    a = TransactionAssembler(TABLES)
    a.mark = CommitMark(10_005, 1005, 0)
    a.add_event(ev(1, 0, xid=6, key=6))
    a.add_event(ev(1, 1, xid=5, key=2))
    a.add_event(ev(0, 0, xid=5))
    a.add_marker(end(5, 1, 2))
    a.add_marker(end(6, 2, 1))
    [step] = a.ready()
    assert sorted((e.partition, e.offset) for e in step.events) == [(0, 0), (1, 1)]
    assert a.superseded == {"6": 1}

    b = TransactionAssembler(TABLES)
    b.mark = CommitMark(10_005, 1005, 0)
    for offset, xid, key in ((0, 5, 1), (1, 6, 6), (2, 5, 2)):
        b.add_event(ev(0, offset, xid=xid, key=key))
    b.add_marker(end(5, 1, 2))
    b.add_marker(end(6, 2, 1))
    with pytest.raises(AssemblyError, match="source transaction 5"):
        b.ready()
    assert b.superseded == {}
