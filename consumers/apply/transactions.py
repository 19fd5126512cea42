"""Reassembling whole source transactions, in source commit order, from the data topics and the transaction topic.

Pure logic, no I/O. Why this order is sound:
- The transaction topic has one partition, so its END records arrive in source commit order.
- Within a data partition, events are in source commit order too (one Debezium task produces them in WAL commit
  order, and a partition keeps the order of its writes). So when the next transaction to apply is T, every event
  before T's events in any partition belongs to a transaction committed before T, already applied, or is an event
  outside transactions (a snapshot read), which is taken first.
- Consequently the events taken from each partition always form a prefix of it, and "last taken offset + 1" per
  partition is a correct resume point: it is what the applier stores with the rows.

A transaction is complete when its END record is known and, for each captured table, the events it counts have
arrived (Debezium also counts the signalling table's rows, which the connector filters out of Kafka). Table by table:
copies of one table's events (a broker SIGKILL leaves some in a partition twice) never make up for another's.

The assembler takes change events one at a time, or runs of them (consumers.apply.runs.ChangeRun: consecutive changes of
one partition and one transaction), which it treats alike: each counts for `count` changes.

Redelivery. Debezium delivers at least once: after a crash of Connect or of the broker, whole transactions arrive
again, as new messages (the same events, and their END records again). A copy read before its original was taken
is counted with it, and the copy's END finds those events waiting (counts are taken off as events are taken, not
forgotten); copies right behind their originals in a partition are taken with them, and the surplus is credited to
the copy's END, which then completes with what is left. Once a transaction is taken, its events read again are
repeats, skipped when they reach the front of their partition, and an END record of it read again is a copy's, taken at
once with whatever events of it have arrived: a transaction id names one source transaction, and waiting for a copy's
END that never comes (Debezium's re-sending cut short again, then an idle source) would hold the partition for good.
The destination absorbs what copies are applied (the LSN guard of the current state, and histories that do not store a
change twice), and recognises most of them (consumers/apply/copies.py).

A delivery cut short: when Connect or the broker dies after some of a transaction's events were written but before
its END record was, those events stay in their partitions, and Debezium re-sends that transaction whole behind the
earlier ones it re-sends. Such events then stand in front of a complete transaction's events with no END record known
(the ordering argument says whatever stands there committed before, so its END would have been read): they are set
aside (`superseded`), no longer counted, and the copy is applied when its own END record comes.

When the END record of the cut-short transaction's copy was read already, its events in front are no contradiction
either, provided the transaction they stand in front of is itself a copy of one the destination applied (`mark`,
consumers/apply/copies.py): Debezium is then re-sending, and what stands in front of a re-sent transaction's events
in a partition that gave none of them yet is what was written before the crash. They are set aside the same way.
Without the mark (a transaction never applied) such events are a contradiction still (AssemblyError).

A record of the transaction topic that does not decode (dead-lettered, `add_lost_marker`) may have been an END
record: its transaction's events then never complete. Since the transaction topic is in commit order, an event
that stands in front of a complete transaction's events in a partition, and whose transaction has no END record
known, can only belong to such a lost END (only ever assumed once a record was lost): its transaction is given up,
like one dead-lettered as incomplete (`late`, for the applier to dead-letter; `orphaned` says why).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from cdc.errors import CdcError, Terminal
from consumers.apply.copies import CommitMark, is_copy_end
from consumers.apply.events import ChangeEvent, TransactionMarker
from consumers.apply.runs import ChangeRun, SpillFile
from consumers.apply.runs import count as changes

Item = ChangeEvent | ChangeRun

# Changes of one source transaction held in memory: past this many, its runs go to disk (ChangeRun.spill) until its
# END, so that what the applier holds does not grow with the size of a transaction (the write reads them back in
# parts, consumers.apply.columnar.chunks). Runs only: events (the general path's) stay in memory.
SPILL_AT = 50_000
# Transactions taken remembered, the latest, so that their events and END records read again later are known as repeats.
COPIES_REMEMBERED = 10_000


class AssemblyError(CdcError, Terminal):
    """The streams contradict the ordering argument above (a bug, or topics written by something else)."""


@dataclass
class SourceUnit:
    """A unit of the source's history that the applier applies whole, in one destination transaction with others:
    one source transaction (`xid`), or snapshot reads, which belong to none."""

    events: list[Item]
    xid: str | None = None  # None for snapshot rows
    commit_ts_ms: int | None = None
    marker_offset: int | None = None  # the END record's offset in the transaction topic
    commit_lsn: int | None = None  # the source's commit LSN (TransactionMarker.commit_lsn)
    # A copy of a transaction the destination applied, taken without all its events, or events of such a copy that
    # came after it (TransactionAssembler._take_copy): skipped whole, its offsets stored (copies.split_copies).
    repeat: bool = False


@dataclass
class _Hole:
    """A message that could not be decoded and was dead-lettered: it stands in for the event it was."""

    topic: str
    partition: int
    offset: int


@dataclass
class TransactionAssembler:
    tables: frozenset[str]  # the captured tables whose events this applier receives
    _partitions: dict[tuple[str, int], deque] = field(default_factory=dict)
    _pending_by_xid: dict[str, int] = field(default_factory=dict)
    _arrived_by_xid: dict[str, dict[str, int]] = field(default_factory=dict)  # xid -> table -> changes held
    _ends: deque = field(default_factory=deque)
    _holes: int = 0
    # Transactions taken without all their events (force_next): events of theirs that arrive later are set aside in
    # `late` (for the applier to dead-letter), not held: nothing would ever take them, and they would block their
    # partition.
    _abandoned: set[str] = field(default_factory=set)
    late: list[Item] = field(default_factory=list)
    _buffered: int = 0  # changes and holes held
    # Events taken beyond what their transaction's END counted (a redelivered copy right behind its original), per
    # transaction id and table: the copy's END record completes with that many fewer of the table.
    _credit: dict[str, dict[str, int]] = field(default_factory=dict)
    _lost_markers: int = 0  # records of the transaction topic that did not decode (dead-lettered)
    orphaned: set[str] = field(default_factory=set)  # transactions given up because their END record was lost
    # Events of deliveries cut short, set aside because a copy of their transaction follows: xid -> changes (the
    # applier says so and clears it).
    superseded: dict[str, int] = field(default_factory=dict)
    spill_at: int = SPILL_AT
    # The destination's last applied source commit (consumers/apply/copies.py), kept current by the applier: tells
    # a re-sent transaction from a new one (see the module's docstring on deliveries cut short).
    mark: CommitMark | None = None
    _spilling: set[str] = field(default_factory=set)  # transactions whose runs go to disk as they arrive
    # Transactions taken, whole or as copies without all their events (`_take_copy`): their END records, by
    # transaction id, the latest COPIES_REMEMBERED. Events of theirs read afterwards are repeats, taken as such when
    # they reach the front of their partition (`_take_repeats`): waiting for an END record that may never come again
    # would hold their partition for good. A second END record of one of them is a copy's (`ready`).
    _taken: dict[str, TransactionMarker] = field(default_factory=dict)
    _spill: SpillFile | None = None  # where they go (it lives as long as a run points into it)

    # -- input
    def add_event(self, event: Item) -> None:
        if event.xid is not None and event.xid in self._abandoned:
            self.late.append(event)
            return
        self._partitions.setdefault((event.topic, event.partition), deque()).append(event)
        self._buffered += event.count
        if event.xid is not None:
            self._pending_by_xid[event.xid] = self._pending_by_xid.get(event.xid, 0) + event.count
            arrived = self._arrived_by_xid.setdefault(event.xid, {})
            arrived[event.table] = arrived.get(event.table, 0) + event.count
            if isinstance(event, ChangeRun):
                self._spill_runs(event)

    def _spill_runs(self, run: ChangeRun) -> None:
        """Runs of a transaction holding more than `spill_at` changes go to disk: the one that crosses the line
        takes the ones held before it along, later ones go as they arrive."""
        xid = run.xid
        if xid not in self._spilling:
            if self._pending_by_xid.get(xid, 0) < self.spill_at:
                return
            self._spilling.add(xid)
            if self._spill is None:
                self._spill = SpillFile()
            for queue in self._partitions.values():
                for item in queue:
                    if isinstance(item, ChangeRun) and item.xid == xid:
                        item.spill(self._spill)
            return
        assert self._spill is not None
        run.spill(self._spill)

    def _spilled(self, xid: str) -> None:
        """A transaction taken or given up: no more of its runs go to disk; the file is let go once none does."""
        self._spilling.discard(xid)
        if not self._spilling:
            self._spill = None  # its runs still hold it until they are written

    def add_hole(self, topic: str, partition: int, offset: int) -> None:
        self._partitions.setdefault((topic, partition), deque()).append(_Hole(topic, partition, offset))
        self._holes += 1
        self._buffered += 1

    def add_marker(self, marker: TransactionMarker) -> None:
        if marker.status == "END":
            taken = self._taken.get(marker.xid)
            if taken is not None and None not in (taken.commit_lsn, marker.commit_lsn) \
                    and taken.commit_lsn != marker.commit_lsn:
                del self._taken[marker.xid]  # the id used again by another commit (a new source cluster): no copy
            self._ends.append(marker)

    def add_lost_marker(self, offset: int) -> None:
        """A record of the transaction topic did not decode (it was dead-lettered): it may have been an END record,
        whose transaction's events are then given up when they stand in the way (see the module's docstring)."""
        self._lost_markers += 1

    @property
    def buffered(self) -> int:
        """Changes (and holes) held, not yet taken."""
        return self._buffered

    @property
    def held_in_memory(self) -> int:
        """Changes held in memory: `buffered`, less those of transactions whose runs go to disk."""
        return self._buffered - sum(self._pending_by_xid.get(xid, 0) for xid in self._spilling)

    def read_beyond_head(self) -> set[tuple[str, int]]:
        """The partitions whose last change held belongs to a source transaction other than the next one to apply
        (to any transaction, while no END record is known): within a partition changes come in commit order, so
        reading more of these cannot complete the next transaction."""
        head = self._ends[0].xid if self._ends else None
        beyond = set()
        for tp, queue in self._partitions.items():
            xid = getattr(queue[-1], "xid", None) if queue else None
            if xid is not None and xid != head:
                beyond.add(tp)
        return beyond

    @property
    def waiting_for(self) -> str | None:
        """The transaction at the head of the commit order that is still missing events, if any."""
        if self._ends and not self._complete(self._ends[0]):
            return self._ends[0].xid
        return None

    @property
    def head(self) -> TransactionMarker | None:
        """The END record of the next transaction to apply, if known."""
        return self._ends[0] if self._ends else None

    def missing(self, marker: TransactionMarker) -> dict[str, tuple[int, int]]:
        """For a transaction still missing events: table -> (events its END record counts, events that arrived),
        for the captured tables where fewer arrived than were counted. What an incomplete transaction is reported
        with (the applier decides when waiting longer is pointless)."""
        arrived = dict(self._arrived_by_xid.get(marker.xid, {}))
        for table, n in self._credit.get(marker.xid, {}).items():
            arrived[table] = arrived.get(table, 0) + n
        return {table: (n, arrived.get(table, 0)) for table, n in sorted(marker.event_counts.items())
                if table in self.tables and arrived.get(table, 0) < n}

    def _needed(self, marker: TransactionMarker) -> dict[str, int]:
        """The events its END record counts, per captured table."""
        return {table: n for table, n in marker.event_counts.items() if table in self.tables and n > 0}

    @staticmethod
    def _short(needed: dict[str, int], have: dict[str, int], credit: dict[str, int]) -> bool:
        """Whether some table has fewer events than counted. Per table, not in all: after a broker SIGKILL a
        partition may hold copies of some of a transaction's events, and two copies of one table's events must not
        stand in for another table's events that have not arrived."""
        return any(have.get(table, 0) + credit.get(table, 0) < n for table, n in needed.items())

    def _complete(self, marker: TransactionMarker) -> bool:
        return not self._short(self._needed(marker), self._arrived_by_xid.get(marker.xid, {}),
                               self._credit.get(marker.xid, {}))

    @property
    def holes(self) -> int:
        return self._holes

    def force_next(self) -> list[SourceUnit]:
        """Take the transaction at the head of the commit order with the events it has: used only when messages
        of it were dead-lettered (undecodable), or when its missing events will never come and the destination's
        policy is to dead-letter it, so that the rest of the stream goes on without them."""
        if not self._ends:
            return []
        marker, units = self._take_head_as_it_is(repeat=False)
        self._abandoned.add(marker.xid)
        return units

    def _take_head_as_it_is(self, *, repeat: bool) -> tuple[TransactionMarker, list[SourceUnit]]:
        """The head transaction taken with the events it has (`force_next`, `_take_copy`)."""
        marker = self._ends.popleft()
        before, events = self._take_transaction(marker, forced=True)
        step = SourceUnit(events, marker.xid, marker.commit_ts_ms, marker.offset, marker.commit_lsn, repeat=repeat)
        return marker, ([SourceUnit(before)] if before else []) + [step]

    # -- output
    def _take_copy(self) -> list[SourceUnit]:
        """The head transaction, a copy of one the destination applied (`mark`) or of one taken already, taken with
        the events it has. Its END record came again without all its events: after a broker SIGKILL the transaction
        topic was seen holding 99 transactions' BEGIN and END records twice and their changes once. Waiting for the
        rest would stop the applier ('cannot complete'), and the copy is skipped whole anyway; its events read later
        are repeats (`_take_repeats`)."""
        marker, units = self._take_head_as_it_is(repeat=True)
        self._remember(marker)
        return units

    def _remember(self, marker: TransactionMarker) -> None:
        self._taken.pop(marker.xid, None)  # the latest last
        self._taken[marker.xid] = marker
        self._forget_oldest_taken()

    def _forget_oldest_taken(self) -> None:
        while len(self._taken) > COPIES_REMEMBERED:  # repeats come soon after their original, if at all
            del self._taken[next(iter(self._taken))]

    def taken_before(self, markers: list[TransactionMarker]) -> None:
        """END records of transactions the destination took before this process read anything (the ones in front
        of its stored offset of the transaction topic, oldest first): their events still at the front of a
        partition are repeats too. Called when events wait there with no END record to come (ReplicaApplier)."""
        earlier = {m.xid: m for m in markers[-COPIES_REMEMBERED:] if m.xid not in self._taken}
        self._taken = {**earlier, **self._taken}  # the oldest first, the first to go
        self._forget_oldest_taken()

    @property
    def stranded(self) -> bool:
        """Whether changes wait with no END record known to take them: every END read is taken, yet events of
        transactions (not snapshot reads) are held."""
        return not self._ends and any(q and getattr(q[0], "xid", None) is not None for q in self._partitions.values())

    def _take_repeats(self) -> list[SourceUnit]:
        """Events at the front of their partitions of transactions taken before them (`_taken`), as steps to skip:
        their offsets are stored like any other's."""
        if not self._taken:
            return []
        found: dict[str, list[Item]] = {}
        for queue in self._partitions.values():
            while queue and getattr(queue[0], "xid", None) in self._taken:
                item = queue.popleft()
                found.setdefault(item.xid, []).append(item)
                self._forget(item)
        steps = []
        for xid, items in found.items():
            marker = self._taken[xid]
            # No END record offset: theirs was taken before, and the transaction topic's stored offset must not go
            # back to it (the destination's mark counts only while that offset is past it, consumers/apply/copies.py).
            steps.append(SourceUnit(items, xid, marker.commit_ts_ms, None, marker.commit_lsn, repeat=True))
        return steps

    def _take_snapshot_heads(self) -> list[Item]:
        taken = []
        for queue in self._partitions.values():
            while queue and (isinstance(queue[0], _Hole) or queue[0].xid is None):
                item = queue.popleft()
                if isinstance(item, _Hole):
                    self._holes -= 1
                    self._buffered -= 1
                else:
                    taken.append(item)
                    self._buffered -= item.count
        return taken

    def _take_transaction(self, marker: TransactionMarker,
                          forced: bool = False) -> tuple[list[Item], list[Item]]:
        """The snapshot reads that come before the transaction in its partitions, and the transaction's events."""
        needed = self._needed(marker)
        credit = self._credit.pop(marker.xid, {})
        known = {m.xid for m in self._ends}  # END records read behind this one's: transactions committed after it
        resent = is_copy_end(self.mark, marker.commit_lsn, marker.commit_ts_ms, marker.offset)
        gave: set[tuple[str, int]] = set()  # partitions that gave this transaction events in the first sweep
        before: list[Item] = []
        events: list[Item] = []
        took: dict[str, int] = {}  # events taken, per table
        # Two sweeps: the first takes what is at the front; only when this transaction still misses events does the
        # second set aside deliveries cut short that stand in front of them (a copy of this transaction behind
        # another's events in one partition is no reason, when its own events are at the front of another).
        for superseding in (False, True):
            if superseding and not self._short(needed, took, credit):
                break
            for key, queue in self._partitions.items():
                while queue:
                    head = queue[0]
                    if isinstance(head, _Hole):
                        queue.popleft()
                        self._holes -= 1
                        self._buffered -= 1
                    elif head.xid == marker.xid:
                        events.append(queue.popleft())
                        took[head.table] = took.get(head.table, 0) + head.count
                        self._buffered -= head.count
                        if not superseding:
                            gave.add(key)
                    elif head.xid is None:
                        before.append(queue.popleft())  # read before the transaction was written: applied first
                        self._buffered -= head.count
                    elif (superseding and head.xid not in self._abandoned and not self._lost_markers
                            and (head.xid not in known or (resent and key not in gave))
                            and self._short(needed, took, credit)
                            and any(getattr(item, "xid", None) == marker.xid for item in queue)):
                        # A delivery cut short (Connect or the broker crashed after some of its events, before its END
                        # record): Debezium re-sends the transaction whole, behind the ones it re-sends first, this one
                        # among them. Set aside, not given up: its copy is applied when its END record comes.
                        queue.popleft()
                        self._supersede(head)
                    elif head.xid in self._abandoned or (
                            self._lost_markers and head.xid not in known
                            and any(getattr(item, "xid", None) == marker.xid for item in queue)):
                        # A transaction given up, or one whose END record was lost: it stands in front of this
                        # transaction's events (so it committed before it), and no END of it is known. Never applied.
                        # (Only in front of them: at the head of another partition may be a later transaction whose END
                        # is not read yet.)
                        if head.xid not in self._abandoned:
                            self._abandoned.add(head.xid)
                            self.orphaned.add(head.xid)
                            self._pending_by_xid.pop(head.xid, None)
                            self._arrived_by_xid.pop(head.xid, None)
                            if self._spilling:
                                self._spilled(head.xid)
                        self.late.append(queue.popleft())
                        self._buffered -= head.count
                    else:
                        break
        if self._spilling:
            self._spilled(marker.xid)
        taken = sum(took.values())
        if self._short(needed, took, credit) and not forced:
            later = [(k, q[0]) for k, q in self._partitions.items() if q and not isinstance(q[0], _Hole)]
            raise AssemblyError(
                f"source transaction {marker.xid} has {self._pending_by_xid.get(marker.xid, 0)} events buffered "
                f"but only {taken} are at the front of their partitions ("
                + ", ".join(f"{table}: {took.get(table, 0) + credit.get(table, 0)} of {n}"
                            for table, n in sorted(needed.items())) + "); other transactions come first in "
                f"{', '.join(f'{k[0]}[{k[1]}]@{e.offset} (tx {e.xid})' for k, e in later[:3])}")
        if forced:
            self._pending_by_xid.pop(marker.xid, None)
            self._arrived_by_xid.pop(marker.xid, None)
        else:
            # Taken off, not forgotten: a redelivered copy of this transaction read already is counted there too.
            left = self._pending_by_xid.get(marker.xid, 0) - taken
            if left > 0:
                self._pending_by_xid[marker.xid] = left
                arrived = self._arrived_by_xid.get(marker.xid, {})
                for event in events:
                    arrived[event.table] = arrived.get(event.table, 0) - event.count
                    if arrived[event.table] <= 0:
                        del arrived[event.table]
            else:
                self._pending_by_xid.pop(marker.xid, None)
                self._arrived_by_xid.pop(marker.xid, None)
            surplus = {table: took.get(table, 0) + credit.get(table, 0) - needed.get(table, 0)
                       for table in took.keys() | credit.keys()}
            surplus = {table: n for table, n in surplus.items() if n > 0}
            if surplus:
                self._credit[marker.xid] = surplus  # a copy right behind its original: taken along
        # Runs sort first (they have neither): their changes are ordered where they are written (consumers.apply.runs).
        events.sort(key=lambda e: (e.tx_order or 0, e.lsn or 0))
        return before, events

    def _forget(self, item: Item) -> None:
        """An event taken off its partition's queue that does not count for its transaction any more."""
        xid = item.xid
        assert xid is not None
        self._buffered -= item.count
        left = self._pending_by_xid.get(xid, 0) - item.count
        if left > 0:
            self._pending_by_xid[xid] = left
        else:
            self._pending_by_xid.pop(xid, None)
        arrived = self._arrived_by_xid.get(xid, {})
        if arrived.get(item.table, 0) > item.count:
            arrived[item.table] -= item.count
        else:
            arrived.pop(item.table, None)
        if not arrived:
            self._arrived_by_xid.pop(xid, None)

    def _supersede(self, item: Item) -> None:
        """An event of an earlier, cut-short delivery of its transaction: no longer counted for it (its copy's
        END record waits for the copy's events), and noted in `superseded` for the applier to say so."""
        self._forget(item)
        assert item.xid is not None
        self.superseded[item.xid] = self.superseded.get(item.xid, 0) + item.count

    def ready(self, max_events: int | None = None) -> list[SourceUnit]:
        """The steps that can be applied now, in order; at least one whole transaction even past `max_events`."""
        steps: list[SourceUnit] = []
        count = 0
        while max_events is None or count < max_events:
            repeats = self._take_repeats()  # events of copies taken before them, at the front: skipped
            steps.extend(repeats)
            count += sum(changes(step.events) for step in repeats)
            # Snapshot reads go first only once every known transaction is applied: they carry no commit
            # position, so that is the only place we can be sure they do not jump ahead of anything.
            if not self._ends:
                snapshot = self._take_snapshot_heads()
                if snapshot:
                    steps.append(SourceUnit(snapshot))
                    count += changes(snapshot)
                break
            marker = self._ends[0]
            if not self._complete(marker):
                # A transaction id names one source transaction: an END record of one taken already is a copy's, even
                # where the destination's mark cannot tell (its original not written yet, or dead-lettered).
                if not (marker.xid in self._taken
                        or is_copy_end(self.mark, marker.commit_lsn, marker.commit_ts_ms, marker.offset)):
                    break
                steps.extend(self._take_copy())
                continue
            self._ends.popleft()
            repeat = marker.xid in self._taken  # a whole copy: skipped like one cut short
            before, events = self._take_transaction(marker)
            self._remember(marker)
            if before:
                steps.append(SourceUnit(before))
            steps.append(SourceUnit(events, marker.xid, marker.commit_ts_ms, marker.offset, marker.commit_lsn,
                                    repeat=repeat))
            count += changes(before) + changes(events)
        return steps

    def oldest_commit_ts(self) -> int | None:
        """Commit time of the oldest transaction known but not yet taken (for lag in seconds)."""
        return self._ends[0].commit_ts_ms if self._ends else None


def positions_after(steps: Iterable[SourceUnit]) -> dict[tuple[str, int], int]:
    """The next offset to read per data partition after these steps (they took a prefix of each partition)."""
    positions: dict[tuple[str, int], int] = {}
    for step in steps:
        for event in step.events:
            key = (event.topic, event.partition)
            positions[key] = max(positions.get(key, 0), event.last_offset + 1)
    return positions
