"""Turning a run of source transactions into per-table bulk work in foreign-key order (pure: no I/O).

A destination transaction may hold many source transactions (group commit) because it ends only between them:
nobody sees the states in between, so each row's last change within the batch is all that needs writing (its
net change). The final state satisfied the source's foreign keys, so writing upserts parents first and then
deletes children first never needs a row that is not there:
- an upserted child references a parent that exists at the end, so it is either already there or upserted before;
- a deleted parent has, at the end, no children: they were deleted (children first) or re-pointed (upserted before).
Truncates split the batch into phases, because they must happen between the changes before and after them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cdc.source_tables import LSN_COLUMN, TableShape
from consumers.apply import runs
from consumers.apply.events import ChangeEvent
from consumers.apply.shapes import SNAPSHOT_LSN
from consumers.apply.values import UNAVAILABLE

if TYPE_CHECKING:
    from consumers.apply.transactions import SourceUnit

Row = dict[str, Any]
Converter = Callable[[ChangeEvent, Mapping[str, Any] | None], Row | None]
Positions = Mapping[tuple[str, int], int]


@dataclass(frozen=True)
class ReplayScope:
    """What a replay asks of the applier it runs, fixed when the applier is made (consumers.ops.replay).

    - `tables`, `applied_before` (a partial replay): events before the offsets the destination had applied before it
      (`applied_before`) are applied only to the replayed `tables`; the others already hold them.
    - `only_tables` (a shadow replay of some tables): the other tables' events are not this applier's to write.
    - `skip_before_ms`, `skip_applied` (`cdc replay --from TIME`): changes committed before it (epoch ms) that the
      destination had applied (before `skip_applied`, its stored offsets then) are read past, not applied; those it
      had not, are. All the events of a source transaction, and its END record, carry its commit time, and stored
      offsets fall between transactions, so a transaction is kept or skipped whole."""

    tables: frozenset[str] | None = None
    applied_before: Positions = field(default_factory=dict)
    only_tables: frozenset[str] | None = None
    skip_before_ms: int | None = None
    skip_applied: Positions = field(default_factory=dict)

    def skipped(self, topic: str, partition: int, offset: int, commit_ts_ms: int | None) -> bool:
        """Whether `cdc replay --from TIME` reads past this change."""
        return (self.skip_before_ms is not None and (commit_ts_ms or 0) < self.skip_before_ms
                and offset < self.skip_applied.get((topic, partition), 0))

    def applied_position(self, table: str, transaction_topic: str, stored: int) -> int:
        """The transaction topic's offset up to which the destination holds `table`'s changes, given its `stored`
        one: more where a replay left the table as it was (outside a partial replay's scope, and in a replay
        `--from TIME`, which empties nothing: the offsets applied before it)."""
        tx = (transaction_topic, 0)
        if self.tables is not None and table not in self.tables:
            stored = max(stored, self.applied_before.get(tx, 0))
        if self.skip_before_ms is not None:
            stored = max(stored, self.skip_applied.get(tx, 0))
        return stored


NO_SCOPE = ReplayScope()


def scoped_entries(steps: list[SourceUnit], scope: ReplayScope) -> list[tuple[int, Any]]:
    """The changes (events or runs) of `steps` this applier writes, each with the number of its step: all of them,
    but in a shadow replay of some tables only theirs, and in a partial replay the other tables' changes only from
    the offsets the destination had applied before it."""
    entries = [(n, item) for n, step in enumerate(steps) for item in step.events]
    if scope.only_tables is not None:
        entries = [(n, item) for n, item in entries if item.table in scope.only_tables]
    if scope.tables is not None:
        tables, applied_before = scope.tables, scope.applied_before
        kept = []
        for n, item in entries:
            since = applied_before.get((item.topic, item.partition), 0)
            # A run keeps its changes from `since` on; an event (decoded one by one) is kept or not.
            part = item if item.table in tables else item.since(since) if isinstance(item, runs.ChangeRun) else \
                item if item.offset >= since else None
            if part is not None:
                kept.append((n, part))
        entries = kept
    return entries


def ordered_events(entries: list[tuple[int, Any]], steps: list[SourceUnit]) -> list[ChangeEvent]:
    """The general path's changes in apply order: runs become events, and a source transaction's events are
    ordered as the assembler orders them (it cannot order what is inside a run)."""
    events: list[ChangeEvent] = []
    for n, group in itertools.groupby(entries, key=lambda entry: entry[0]):
        items = [item for _, item in group]
        taken = runs.expand(items)
        # Any run, even of one change, was placed first by the assembler (a run has no order of its own): a
        # member's root-id change (a delete under the old root, a create under the new one, in two
        # partitions) must not be applied create first.
        if steps[n].xid is not None and any(isinstance(item, runs.ChangeRun) for item in items):
            taken.sort(key=lambda e: (e.tx_order or 0, e.lsn or 0))
        events.extend(taken)
    return events


def history_rows(events: Iterable[ChangeEvent], shapes: Mapping[str, TableShape],
                 convert: Converter) -> dict[str, list[tuple[ChangeEvent, Row]]]:
    """Per table, the (change, row) pairs a destination that keeps history appends: every change, a delete with its
    old row; a primary-key update sent as one update (a member whose root id did not change) also ends the old key,
    as a delete would have said."""
    history: dict[str, list[tuple[ChangeEvent, Row]]] = {}
    for event in events:
        shape = shapes.get(event.table)
        if shape is None:
            continue
        row = convert(event, event.before if event.op == "d" else event.after)
        if event.op == "u" and event.before is not None and row is not None:
            before = convert(event, event.before)
            if before is not None and primary_key(shape, before) != primary_key(shape, row):
                history.setdefault(event.table, []).append((dataclasses.replace(event, op="d"), before))
        if row is not None:
            history.setdefault(event.table, []).append((event, row))
    return history


def end_record_offsets(steps: Iterable[SourceUnit]) -> dict[str, int]:
    """Each source transaction's END record offset in the transaction topic (the first, for a re-sent one)."""
    offsets: dict[str, int] = {}
    for step in steps:
        if step.xid is not None and step.marker_offset is not None:
            offsets[step.xid] = min(step.marker_offset, offsets.get(step.xid, step.marker_offset))
    return offsets


@dataclass
class TableChanges:
    upserts: dict[tuple, Row] = field(default_factory=dict)
    deletes: dict[tuple, Row] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes)


@dataclass(frozen=True)
class KeylessChange:
    """A change of a table without a primary key, kept as it came: such rows have no identity to collapse changes
    by. `before` is the whole old row (REPLICA IDENTITY FULL), `after` the new one with `_cdc_lsn`."""

    op: str  # "insert", "update" or "delete"
    before: Row | None
    after: Row | None


@dataclass
class Phase:
    """Net changes per table; `truncate_first` tables are emptied before the phase's changes. Tables without a
    primary key have their changes in `keyless`, each one, in source order."""

    changes: dict[str, TableChanges] = field(default_factory=dict)
    truncate_first: list[str] = field(default_factory=list)
    keyless: dict[str, list[KeylessChange]] = field(default_factory=dict)


def primary_key(shape: TableShape, row: Mapping[str, Any]) -> tuple:
    return tuple(row[c] for c in shape.primary_key)


def net_changes(events: Iterable[ChangeEvent], shapes: Mapping[str, TableShape], convert: Converter) -> list[Phase]:
    """Collapse events (in source commit order) into the last change per row, in phases split by truncates.

    An unchanged TOASTed column (Debezium did not send it) takes the value from an earlier change of the same row
    in this batch, or from the before image (REPLICA IDENTITY FULL); otherwise it stays UNAVAILABLE and the
    dialect leaves the stored value alone.
    """
    phases = [Phase()]
    for event in events:
        shape = shapes.get(event.table)
        if shape is None:
            continue
        if event.op == "t":
            phases.append(Phase(truncate_first=[event.table]))
            continue
        if not shape.primary_key:
            change = _keyless_change(event, convert)
            if change is not None:
                phases[-1].keyless.setdefault(event.table, []).append(change)
            continue
        changes = phases[-1].changes.setdefault(event.table, TableChanges())
        if event.op == "d":
            before = convert(event, event.before)
            if before is None:
                continue
            key = primary_key(shape, before)
            changes.upserts.pop(key, None)
            changes.deletes[key] = {**{c: before[c] for c in shape.primary_key}, LSN_COLUMN: event.lsn}
            continue
        row = convert(event, event.after)
        if row is None:
            continue
        key = primary_key(shape, row)
        before = convert(event, event.before) if event.before else None
        if before is not None and event.op == "u":
            old_key = primary_key(shape, before)
            if old_key != key:
                # A primary-key update: Debezium sends it as one update when the record key (a member's root
                # id) did not change; the row under the old key is gone.
                changes.upserts.pop(old_key, None)
                changes.deletes[old_key] = {**{c: before[c] for c in shape.primary_key}, LSN_COLUMN: event.lsn}
        if UNAVAILABLE in row.values():  # a C-speed scan; identity is tried first
            earlier = changes.upserts.get(key)
            for column, value in row.items():
                if value is UNAVAILABLE:
                    if earlier is not None and earlier.get(column, UNAVAILABLE) is not UNAVAILABLE:
                        row[column] = earlier[column]
                    elif before is not None and before.get(column, UNAVAILABLE) is not UNAVAILABLE:
                        row[column] = before[column]
        row[LSN_COLUMN] = event.lsn if event.lsn is not None else SNAPSHOT_LSN
        changes.deletes.pop(key, None)
        changes.upserts[key] = row
    return [p for p in phases if p.changes or p.truncate_first or p.keyless]


def _keyless_change(event: ChangeEvent, convert: Converter) -> KeylessChange | None:
    """A change of a table without a primary key. Its rows are told apart only by their values, so an update or a
    delete names the one row it changes by its whole before image (Debezium sends it: REPLICA IDENTITY FULL)."""
    before = convert(event, event.before) if event.before else None
    if event.op == "d":
        return KeylessChange("delete", before, None) if before is not None else None
    after = convert(event, event.after)
    if after is None:
        return None
    after[LSN_COLUMN] = event.lsn if event.lsn is not None else SNAPSHOT_LSN
    if event.op != "u":
        return KeylessChange("insert", None, after)
    if before is None:
        raise ValueError(f"{event.table}: an update without its before image; a table without a primary key needs "
                         "REPLICA IDENTITY FULL")
    for column, value in after.items():
        if value is UNAVAILABLE and before.get(column, UNAVAILABLE) is not UNAVAILABLE:
            after[column] = before[column]  # an unchanged TOASTed value: the old row holds it
    return KeylessChange("update", before, after)


# -- tables without a primary key under redelivery ------------------------------------------------------------------
# Debezium delivers at least once: after a crash of Connect or of the broker, whole source transactions arrive again.
# A table with a key absorbs the copies (the `_cdc_lsn` guard); a table without one would take a re-sent insert as a
# second row, and a re-sent update or delete of a row already gone would stop the applier. So a keyless change is
# applied once per destination: a repeat within a batch (a copy taken along with its original) is dropped here, and
# a transaction the destination recorded as applied (shapes.APPLIED_TABLE) has its keyless changes skipped.


# How long a destination keeps the record of a transaction whose keyless changes it applied, in source commit time (the
# newest applied commit time minus this). A copy stands in Kafka right behind the transactions committed shortly after
# its original: Debezium re-sends from the last source offset Connect committed (offset.flush.interval.ms, 60 s by
# default) and the transactions it had not yet sent. So when an applier reads a copy, the newest commit it has applied
# is minutes, at worst hours (Connect far behind the source when it crashed), after the original's commit, however
# long the applier itself was stopped: measured in source time, not wall-clock time, a week is a wide margin. Pruned
# at most every APPLIED_PRUNE_EVERY_S seconds, within a batch with keyless changes.
APPLIED_RETENTION = timedelta(days=7)
APPLIED_PRUNE_EVERY_S = 600.0


@dataclass(frozen=True)
class AppliedRecord:
    """A source transaction whose changes of one keyless table a destination applied: its xid, the LSNs of those
    changes (a re-sent copy has the same ones), and `end_offset`, where its END record is in the transaction topic:
    the record holds only while the destination's stored offsets are past it (a replay or a restore that moves them
    back voids it, and the transaction is applied again)."""

    table: str
    xid: str
    first_lsn: int
    last_lsn: int
    end_offset: int
    commit_ts_ms: int | None = None


def _keyless(event: ChangeEvent, shapes: Mapping[str, TableShape]) -> bool:
    """A change (or truncate) of a table without a primary key, inside a source transaction."""
    shape = shapes.get(event.table)
    return shape is not None and not shape.primary_key and event.xid is not None


def has_keyless(events: Iterable[ChangeEvent], shapes: Mapping[str, TableShape]) -> bool:
    """Whether the batch has keyless changes in transactions (without looking at its events when no table lacks a
    key: the common pipeline pays nothing)."""
    keyless = {name for name, shape in shapes.items() if not shape.primary_key}
    return bool(keyless) and any(e.table in keyless and e.xid is not None for e in events)


def keyless_repeats(events: list[ChangeEvent],
                    shapes: Mapping[str, TableShape]) -> tuple[list[ChangeEvent], list[ChangeEvent]]:
    """(kept, dropped): the events with each keyless change once. A change is (transaction, table, its place in the
    transaction, LSN): Debezium's `total_order` tells apart the changes one statement made at one LSN (a COPY, a
    multi-row insert of equal rows), which are several real changes; a re-sent copy has the same four. A change
    without a place (no transaction metadata) is kept: nothing could tell its copy from a second equal change."""
    seen: set[tuple] = set()
    kept: list[ChangeEvent] = []
    dropped: list[ChangeEvent] = []
    for event in events:
        if event.tx_order is not None and _keyless(event, shapes):
            identity = (event.xid, event.table, event.tx_order, event.lsn)
            if identity in seen:
                dropped.append(event)
                continue
            seen.add(identity)
        kept.append(event)
    return kept, dropped


def keyless_xids(events: Iterable[ChangeEvent], shapes: Mapping[str, TableShape]) -> list[str]:
    """The transactions of the batch with keyless changes: those whose records are looked up."""
    return sorted({e.xid for e in events if _keyless(e, shapes)})


def applied_cutoff(events: Iterable[ChangeEvent]) -> datetime | None:
    """Records of transactions committed before this are pruned (APPLIED_RETENTION before the newest commit)."""
    newest = max((e.commit_ts_ms for e in events if e.commit_ts_ms), default=None)
    return None if newest is None else datetime.fromtimestamp(newest / 1000, tz=UTC) - APPLIED_RETENTION


def already_applied(events: list[ChangeEvent], shapes: Mapping[str, TableShape], records: Iterable[AppliedRecord],
                    position: Callable[[str], int]) -> tuple[list[ChangeEvent], list[ChangeEvent]]:
    """(to apply, skipped): a keyless change is skipped when a record of its transaction and table holds (its END
    record is before `position(table)`, the destination's stored offset of the transaction topic) and covers its
    LSN. The LSN check keeps a transaction id used again (32-bit ids wrap around) from passing for a copy."""
    covered: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for r in records:
        if r.end_offset < position(r.table):
            covered.setdefault((r.xid, r.table), []).append((r.first_lsn, r.last_lsn))
    if not covered:
        return events, []
    kept: list[ChangeEvent] = []
    skipped: list[ChangeEvent] = []
    for event in events:
        ranges = covered.get((event.xid, event.table)) if _keyless(event, shapes) and event.lsn is not None else None
        if ranges and any(low <= event.lsn <= high for low, high in ranges):
            skipped.append(event)
        else:
            kept.append(event)
    return kept, skipped


def applied_records(events: Iterable[ChangeEvent], shapes: Mapping[str, TableShape],
                    end_offsets: Mapping[str, int]) -> list[AppliedRecord]:
    """One record per (transaction, keyless table) of the changes about to be applied; `end_offsets`: each
    transaction's END record offset in the transaction topic."""
    spans: dict[tuple[str, str], list[Any]] = {}
    for event in events:
        if not _keyless(event, shapes) or event.lsn is None or event.xid not in end_offsets:
            continue
        span = spans.get((event.xid, event.table))
        if span is None:
            spans[event.xid, event.table] = [event.lsn, event.lsn, event.commit_ts_ms]
        else:
            span[0], span[1] = min(span[0], event.lsn), max(span[1], event.lsn)
    return [AppliedRecord(table, xid, low, high, end_offsets[xid], commit)
            for (xid, table), (low, high, commit) in spans.items()]


def dependency_order(shapes: Mapping[str, TableShape], edges: Mapping[str, set[str]] | None = None) -> list[str]:
    """Tables parents first: `edges[child]` holds the tables it references (default: the shapes' foreign keys).

    Self-references are left out (one statement writes such a table, and the dialect orders rows inside it).
    Cycles between tables are condensed (Tarjan's strongly connected components): the tables of one cycle keep
    name order among themselves, and only constraints the destination can check at commit make that safe.
    """
    names = sorted(shapes)
    if edges is None:
        edges = {n: {fk.referred_table for fk in shapes[n].foreign_keys} for n in names}
    graph = {n: sorted(t for t in edges.get(n, ()) if t in shapes and t != n) for n in names}

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []  # emitted in reverse topological order of the "references" relation

    def visit(node: str) -> None:
        # Iterative Tarjan: a recursive one would hit Python's recursion limit on long reference chains.
        work = [(node, iter(graph[node]))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[current] = min(low[current], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[current])
            if low[current] == index[current]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                components.append(sorted(component))

    for name in names:
        if name not in index:
            visit(name)
    # Tarjan emits a component after everything it references: that already is parents first.
    return [table for component in components for table in component]


def self_referencing_order(shape: TableShape, rows: list[Row]) -> list[Row]:
    """Rows of a self-referencing table with each row after the row of this batch it references.

    Needed where foreign keys are checked row by row (MariaDB); rows referencing rows outside the batch, or
    caught in a cycle of references, keep their place at the end.
    """
    self_fks = [fk for fk in shape.foreign_keys if fk.referred_table == shape.name]
    if not self_fks or len(rows) < 2:
        return rows
    by_key = {tuple(r[c] for c in shape.primary_key): r for r in rows}
    placed: set[tuple] = set()
    ordered: list[Row] = []
    for start in by_key:
        # Walk up to the first ancestor that is placed, outside the batch, or already on this walk (a cycle),
        # then place the walk from the top down. Iterative: reference chains can be long.
        trail: list[tuple] = []
        on_trail: set[tuple] = set()
        key: tuple | None = start
        while key is not None and key not in placed and key not in on_trail:
            trail.append(key)
            on_trail.add(key)
            row = by_key[key]
            key = next((parent for fk in self_fks
                        if (parent := tuple(row.get(c) for c in fk.columns)) in by_key and parent != trail[-1]),
                       None)
        for key in reversed(trail):
            placed.add(key)
            ordered.append(by_key[key])
    return ordered
