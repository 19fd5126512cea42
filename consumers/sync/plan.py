"""What a configuration sync would change, per table and per schema object (pure: rows and definitions in, actions out).

The scope of a table is its rows matching the sync's `where` predicate and not its `exclude` predicate, on each side.
Rows are matched by primary key, except in tables matched by a natural key (`match_by`): there a source row takes the
id of the destination row with the same key, and every foreign key referencing such a table follows that id, so that
the destination's own rows that reference it (outside the scope) keep pointing at the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]
Key = tuple[Any, ...]


class PlanError(ValueError):
    """The data cannot be synced as defined (two destination rows share a natural key, a row has no key...)."""


@dataclass(frozen=True)
class ForeignKey:
    columns: tuple[str, ...]
    referred_table: str
    referred_columns: tuple[str, ...]


@dataclass
class TableInput:
    """One table of the scope as read: `columns` are the source's (what a synced row holds), `destination_rows` the
    destination's rows in scope plus, for a `match_by` table, its rows whose natural key a source row has."""

    name: str
    primary_key: tuple[str, ...]
    columns: tuple[str, ...]
    source_rows: list[Row]
    destination_rows: list[Row]
    match_by: tuple[str, ...] = ()
    foreign_keys: tuple[ForeignKey, ...] = ()


@dataclass
class TablePlan:
    name: str
    primary_key: tuple[str, ...] = ()
    deletes: list[Key] = field(default_factory=list)
    inserts: list[Row] = field(default_factory=list)
    # (row as it will be, the columns that change)
    updates: list[tuple[Row, list[str]]] = field(default_factory=list)
    # natural key -> (source id, destination id) for the rows matched by `match_by`
    matched: list[tuple[Key, Key, Key]] = field(default_factory=list)
    unchanged: int = 0
    # The rows the scope holds after the sync (the source's, ids remapped), for the digest recorded in the history.
    final_rows: list[Row] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return len(self.deletes) + len(self.inserts) + len(self.updates)

    def counts(self) -> dict[str, int]:
        return {"deleted": len(self.deletes), "inserted": len(self.inserts), "updated": len(self.updates),
                "unchanged": self.unchanged, "matched": len(self.matched)}


@dataclass(frozen=True)
class ObjectAction:
    kind: str  # table, column, view, function, procedure
    name: str  # schema-qualified; a column: schema.table.column; a routine: with its argument types
    action: str  # create, replace, drop
    ddl: str
    # What restores the destination's object as it was before (None: it did not exist, so drop it).
    before: str | None = None
    undo: str | None = None


def _key(row: Mapping[str, Any], columns: Sequence[str], table: str) -> Key:
    try:
        return tuple(row[c] for c in columns)
    except KeyError as exc:
        raise PlanError(f"{table}: a row has no column {exc.args[0]!r}") from None


def id_mappings(tables: Mapping[str, TableInput]) -> dict[str, dict[Key, Key]]:
    """Per `match_by` table: source id -> destination id of the row with the same natural key."""
    mappings: dict[str, dict[Key, Key]] = {}
    for name, t in tables.items():
        if not t.match_by:
            continue
        by_natural: dict[Key, Key] = {}
        for row in t.destination_rows:
            natural = _key(row, t.match_by, name)
            pk = _key(row, t.primary_key, name)
            if natural in by_natural and by_natural[natural] != pk:
                raise PlanError(f"{name}: the destination holds two rows with {', '.join(t.match_by)} = "
                                f"{_shown(natural)} (ids {_shown(by_natural[natural])} and {_shown(pk)}); rows "
                                "matched by name need unique names")
            by_natural[natural] = pk
        seen: dict[Key, Key] = {}
        mapping: dict[Key, Key] = {}
        for row in t.source_rows:
            natural = _key(row, t.match_by, name)
            pk = _key(row, t.primary_key, name)
            if natural in seen:
                raise PlanError(f"{name}: the source holds two rows with {', '.join(t.match_by)} = {_shown(natural)} "
                                f"(ids {_shown(seen[natural])} and {_shown(pk)}); rows matched by name need unique "
                                "names")
            seen[natural] = pk
            if natural in by_natural:
                mapping[pk] = by_natural[natural]
        mappings[name] = mapping
    return mappings


def _shown(key: Key) -> str:
    return ", ".join(repr(v) for v in key) if len(key) != 1 else repr(key[0])


def remapped(t: TableInput, mappings: Mapping[str, Mapping[Key, Key]],
             keys: Mapping[str, tuple[str, ...]] | None = None) -> list[Row]:
    """The table's source rows as the destination will hold them: its own id and the ids it references remapped.
    `keys` holds the primary key of each name-matched table: only a foreign key to it follows the new id (one that
    references the natural key itself needs nothing)."""
    rewrites: list[tuple[tuple[str, ...], Mapping[Key, Key]]] = []
    if t.name in mappings:
        rewrites.append((t.primary_key, mappings[t.name]))
    for fk in t.foreign_keys:
        referred_key = (keys or {}).get(fk.referred_table, fk.referred_columns)
        if fk.referred_table in mappings and mappings[fk.referred_table] and fk.referred_columns == referred_key:
            rewrites.append((fk.columns, mappings[fk.referred_table]))
    rows = []
    for row in t.source_rows:
        new = {c: row.get(c) for c in t.columns}
        for columns, mapping in rewrites:
            value = tuple(row[c] for c in columns)
            if value in mapping:
                new.update(zip(columns, mapping[value]))
        rows.append(new)
    return rows


def plan_rows(tables: Mapping[str, TableInput]) -> dict[str, TablePlan]:
    """Per table: the destination rows to delete, the rows to insert and to update, and the name-matched ids."""
    mappings = id_mappings(tables)
    keys = {name: t.primary_key for name, t in tables.items()}
    plans: dict[str, TablePlan] = {}
    for name, t in tables.items():
        plan = TablePlan(name, t.primary_key)
        if not t.primary_key:
            raise PlanError(f"{name}: the table has no primary key; a sync matches rows by key")
        final = remapped(t, mappings, keys)
        wanted: dict[Key, Row] = {}
        for row in final:
            pk = _key(row, t.primary_key, name)
            if pk in wanted:
                raise PlanError(f"{name}: two source rows become id {_shown(pk)} at the destination (a row matched "
                                "by name takes the id of another source row)")
            wanted[pk] = row
        present = {_key(row, t.primary_key, name): row for row in t.destination_rows}
        for pk in present:
            if pk not in wanted:
                plan.deletes.append(pk)
        for pk, row in wanted.items():
            old = present.get(pk)
            if old is None:
                plan.inserts.append(row)
                continue
            changed = [c for c in t.columns if c not in old or old[c] != row[c]]
            if changed:
                plan.updates.append((row, changed))
            else:
                plan.unchanged += 1
        if t.match_by:
            by_pk = {_key(r, t.primary_key, name): r for r in t.source_rows}
            plan.matched = sorted(((_key(by_pk[s], t.match_by, name), s, d) for s, d in mappings[name].items()),
                                  key=lambda m: repr(m[0]))
        plan.deletes.sort(key=repr)
        plan.final_rows = final
        plans[name] = plan
    return plans


# -- schema objects ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Definition:
    """A schema object as a catalog describes it: its DDL (what creates it) and what drops it."""

    kind: str
    name: str
    ddl: str
    drop: str
    # For comparing: the definition without what differs harmlessly (the DDL itself by default).
    body: str | None = None

    @property
    def compared(self) -> str:
        return self.body if self.body is not None else self.ddl


def plan_objects(source: Sequence[Definition], destination: Sequence[Definition]) -> list[ObjectAction]:
    """Objects to create (at the source only), replace (different) and drop (at the destination only), in an order
    that works: tables and columns first, then functions and procedures, then views; drops of views first."""
    src = {(d.kind, d.name): d for d in source}
    dst = {(d.kind, d.name): d for d in destination}
    actions: list[ObjectAction] = []
    for key in sorted(dst.keys() - src.keys(), key=lambda k: (_DROP_ORDER.index(k[0]), k[1])):
        gone = dst[key]
        if gone.kind in ("table", "column"):
            continue  # never dropped: a table or column at the destination holds data the sync does not own
        actions.append(ObjectAction(gone.kind, gone.name, "drop", gone.drop, before=gone.ddl, undo=gone.ddl))
    for key in sorted(src.keys(), key=lambda k: (_CREATE_ORDER.index(k[0]), k[1])):
        s, d = src[key], dst.get(key)
        if d is None:
            actions.append(ObjectAction(s.kind, s.name, "create", s.ddl, before=None, undo=s.drop))
        elif s.compared != d.compared:
            if s.kind in ("table", "column"):
                continue  # a different table shape is not rebuilt (data); missing columns arrive as `column`s
            if s.kind == "view":
                # `create or replace view` cannot drop or rename a view's columns: the view is made anew.
                actions.append(ObjectAction(s.kind, s.name, "replace", f"{d.drop};\n{s.ddl}", before=d.ddl,
                                            undo=f"{s.drop};\n{d.ddl}"))
            else:
                actions.append(ObjectAction(s.kind, s.name, "replace", s.ddl, before=d.ddl, undo=d.ddl))
    return actions


_CREATE_ORDER = ["table", "column", "function", "procedure", "view"]
_DROP_ORDER = ["view", "procedure", "function", "column", "table"]
