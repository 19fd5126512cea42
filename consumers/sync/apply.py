"""Running a configuration sync: read the scope of the source in one snapshot, plan it against the destination, and
apply it in ONE destination transaction (backup, schema objects, rows in foreign-key order, history entry); restore a
past sync from its backup. Nothing is changed when anything fails."""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg import Error as DriverError
from sqlalchemy import Connection, create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

from cdc.config import Pipeline, Sync, SyncTable, masked_url
from cdc.errors import CdcError, first_line
from cdc.source_tables import ForeignKeyShape, TableShape
from consumers.apply.plan import dependency_order, self_referencing_order
from consumers.ops.backups import ScopeBackups
from consumers.sync import objects as objects_mod
from consumers.sync.plan import (
    Definition,
    ForeignKey,
    ObjectAction,
    PlanError,
    TableInput,
    TablePlan,
    plan_objects,
    plan_rows,
)

HISTORY_TABLE = "_cdc_sync_history"
CHUNK = 5_000
Progress = Callable[[str, int, int], None]  # (what, done, total)


class SyncDrift(CdcError):
    """The destination changed the scope since the last sync: refused unless forced."""


@dataclass(frozen=True)
class TableMeta:
    """What a sync needs to know of a table: its columns (in order), primary key and foreign keys."""

    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    foreign_keys: tuple[ForeignKey, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "columns": list(self.columns), "primary_key": list(self.primary_key),
                "foreign_keys": [[list(fk.columns), fk.referred_table, list(fk.referred_columns)]
                                 for fk in self.foreign_keys]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableMeta:
        return cls(data["name"], tuple(data["columns"]), tuple(data["primary_key"]),
                   tuple(ForeignKey(tuple(c), t, tuple(r)) for c, t, r in data["foreign_keys"]))


@dataclass
class SourceScope:
    """What the source holds in scope, read in one REPEATABLE READ snapshot. Rows are as PostgreSQL's `to_jsonb`
    writes them (every type in its JSON or text form), so that they travel through Kafka unchanged and are written
    back by `jsonb_populate_recordset`, which reads each value as its column's type."""

    tables: dict[str, TableMeta]
    rows: dict[str, list[dict[str, Any]]]
    definitions: list[Definition]
    read_at: datetime
    sync_id: str | None = None  # set when the scope came through the sync's topic


@dataclass
class SyncPlan:
    name: str
    order: list[str]  # the tables, parents first
    tables: dict[str, TablePlan]
    objects: list[ObjectAction]
    drift: list[str] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return sum(p.changes for p in self.tables.values()) + len(self.objects)

    def as_json(self) -> dict[str, Any]:
        return {
            "sync": self.name,
            "changes": self.changes,
            "tables": [{"table": t, **self.tables[t].counts(),
                        "delete": [list(k) for k in self.tables[t].deletes],
                        "insert": [_pk(self.tables[t], r) for r in self.tables[t].inserts],
                        "update": [{"key": _pk(self.tables[t], r), "columns": cols}
                                   for r, cols in self.tables[t].updates],
                        "matched": [{"key": list(n), "source_id": list(s), "destination_id": list(d)}
                                    for n, s, d in self.tables[t].matched]}
                       for t in self.order],
            "objects": [{"kind": a.kind, "name": a.name, "action": a.action, "ddl": a.ddl} for a in self.objects],
            "drift": self.drift,
        }


def _pk(plan: TablePlan, row: dict[str, Any]) -> list[Any]:
    return [row[c] for c in plan.primary_key]


def _engine(url: Any) -> Any:
    return create_engine(url, pool_pre_ping=False)


@contextmanager
def _connect(url: Any, **options: Any) -> Iterator[Connection]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            if options:
                conn = conn.execution_options(**options)
            yield conn
    finally:
        engine.dispose()


def scope_predicate(settings: SyncTable) -> str:
    """The SQL predicate of a table's scope: its `where`, without the rows its `exclude` keeps out (NULL: kept in)."""
    where = f"({settings.where})" if settings.where else "true"
    if settings.exclude:
        where += f" and not coalesce(({settings.exclude}), false)"
    return where


def _not_excluded(settings: SyncTable) -> str:
    return f"not coalesce(({settings.exclude}), false)" if settings.exclude else "true"


def _quoted(conn: Connection, name: str) -> str:
    prep = conn.dialect.identifier_preparer
    schema, table = name.split(".", 1)
    return f"{prep.quote(schema)}.{prep.quote(table)}"


def _reflect(conn: Connection, names: list[str], side: str) -> dict[str, TableMeta]:
    """Columns, primary key and foreign keys of the tables that exist (the source must have them all)."""
    tables = {}
    insp = inspect(conn)
    for qualified in names:
        schema, name = qualified.split(".", 1)
        if not insp.has_table(name, schema=schema):
            if side == "source":
                raise CdcError(f"sync: the source has no table {qualified}")
            continue
        tables[qualified] = TableMeta(
            qualified, tuple(c["name"] for c in insp.get_columns(name, schema=schema)),
            tuple(insp.get_pk_constraint(name, schema=schema)["constrained_columns"]),
            tuple(ForeignKey(tuple(fk["constrained_columns"]), f"{fk.get('referred_schema') or schema}."
                             f"{fk['referred_table']}", tuple(fk["referred_columns"]))
                  for fk in insp.get_foreign_keys(name, schema=schema)))
    return tables


def _read_rows(conn: Connection, table: TableMeta, predicate: str, what: str,
               params: dict[str, Any] | None = None, relation: str | None = None) -> list[dict[str, Any]]:
    """The rows as `to_jsonb` writes them, in key order."""
    prep = conn.dialect.identifier_preparer
    order = ", ".join(f"t.{prep.quote(c)}" for c in table.primary_key) or "1"
    try:
        return [r[0] for r in conn.execute(text(f"select to_jsonb(t) from {relation or _quoted(conn, table.name)} "
                                                f"as t where {predicate} order by {order}"), params or {})]
    except DBAPIError as exc:
        raise CdcError(f"sync: reading {what} {table.name} where {predicate}: {first_line(exc)}") from None


def _utc(conn: Connection) -> None:
    # Timestamps with time zone are written by to_jsonb in the session's zone: the same zone on both sides.
    conn.execute(text("set local timezone = 'UTC'"))


def read_source(sync: Sync) -> SourceScope:
    """The scope of the source, rows and schema objects, in one consistent snapshot."""
    with _connect(sync.source_url, isolation_level="REPEATABLE READ", postgresql_readonly=True) as conn, \
            conn.begin():
        _utc(conn)
        tables = _reflect(conn, list(sync.tables), "source")
        rows = {name: _read_rows(conn, tables[name], scope_predicate(settings), "the source's")
                for name, settings in sync.tables.items()}
        definitions = objects_mod.read(conn, sync.objects)
        read_at: datetime = conn.execute(text("select now()")).scalar_one()
    for name, table in tables.items():
        missing = [c for c in sync.tables[name].match_by if c not in table.columns]
        if missing:
            raise CdcError(f"syncs: {name}: match_by names {', '.join(missing)}, not a column of the source's table")
    return SourceScope(tables, rows, definitions, read_at)


def _destination_rows(conn: Connection, sync: Sync, table: TableMeta,
                      source_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    settings = sync.tables[table.name]
    rows = _read_rows(conn, table, scope_predicate(settings), "the destination's")
    if not settings.match_by:
        return rows
    # Rows matched by name may lie outside the scope (production made its own "Intake" long ago): read them too.
    naturals = sorted({json.dumps([r.get(c) for c in settings.match_by]) for r in source_rows})
    have = {tuple(r[c] for c in table.primary_key) for r in rows}
    prep = conn.dialect.identifier_preparer
    match = " and ".join(f"t.{prep.quote(c)} = x.{prep.quote(c)}" for c in settings.match_by)
    for start in range(0, len(naturals), CHUNK):
        keys = [dict(zip(settings.match_by, json.loads(n))) for n in naturals[start:start + CHUNK]]
        predicate = (f"exists (select 1 from jsonb_populate_recordset(null::{_quoted(conn, table.name)}, "
                     f"cast(:keys as jsonb)) x where {match}) and {_not_excluded(settings)}")
        for r in _read_rows(conn, table, predicate, "the destination's", {"keys": json.dumps(keys)}):
            if tuple(r[c] for c in table.primary_key) not in have:
                rows.append(r)
    return rows


def _order(tables: dict[str, TableMeta]) -> list[str]:
    edges = {n: {fk.referred_table for fk in t.foreign_keys} for n, t in tables.items()}
    return dependency_order(dict.fromkeys(tables), edges)  # type: ignore[arg-type]


def plan(conn: Connection, sync_name: str, sync: Sync, source: SourceScope) -> SyncPlan:
    """The plan of the sync against the destination as `conn` sees it."""
    _utc(conn)
    dest_tables = _reflect(conn, list(source.tables), "destination")
    inputs = {}
    for name, table in source.tables.items():
        dest_rows = (_destination_rows(conn, sync, dest_tables[name], source.rows[name]) if name in dest_tables
                     else [])
        inputs[name] = TableInput(name, table.primary_key, table.columns, source.rows[name], dest_rows,
                                  sync.tables[name].match_by, table.foreign_keys)
    try:
        tables = plan_rows(inputs)
    except PlanError as exc:
        raise CdcError(f"sync {sync_name}: {exc}") from None
    existing = objects_mod.existing_tables(conn)
    dest_defs = objects_mod.read(conn, sync.objects)
    src_defs = objects_mod.columns_on(source.definitions, existing)
    return SyncPlan(sync_name, _order(source.tables), tables, plan_objects(src_defs, dest_defs))


def dry_run(sync_name: str, sync: Sync, source: SourceScope | None = None) -> SyncPlan:
    """`cdc sync plan`: what `apply` would do now, changing nothing (the drift it would refuse included); with
    `source`, what applying that scope (a past sync read from the topic) would do."""
    source = source or read_source(sync)
    with _connect(sync.destination_url) as conn, conn.begin():
        result = plan(conn, sync_name, sync, source)
        if inspect(conn).has_table(HISTORY_TABLE):
            result.drift = drift(conn, sync_name, sync, result.order)
        conn.rollback()
    return result


# -- history ----------------------------------------------------------------------------------------------------------

def ensure_history(conn: Connection) -> None:
    conn.execute(text(
        f'create table if not exists "{HISTORY_TABLE}" (id bigserial primary key, sync text not null, '
        "kind text not null, started_at timestamptz not null, "
        "finished_at timestamptz not null default clock_timestamp(), "
        "requested_by text not null, source text not null, source_read_at timestamptz, backup_id bigint, "
        "backup_schema text, forced boolean not null default false, drift jsonb not null default '[]', "
        "tables jsonb not null, digests jsonb not null, objects jsonb not null default '[]', "
        "restores bigint, restored_by bigint, sync_id text, topic text)"))
    # sync_id and topic: the sync's event in the log (`cdc sync apply --from-log` applies it again).


@dataclass
class HistoryEntry:
    id: int
    sync: str
    kind: str  # apply or restore
    started_at: datetime
    finished_at: datetime
    requested_by: str
    source: str
    backup_id: int | None
    backup_schema: str | None
    forced: bool
    drift: list[str]
    tables: dict[str, dict[str, int]]
    digests: dict[str, Any]
    objects: list[dict[str, Any]]
    restores: int | None
    restored_by: int | None
    sync_id: str | None = None
    topic: str | None = None

    def as_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat()
        return data


_HISTORY_COLUMNS = ("id, sync, kind, started_at, finished_at, requested_by, source, backup_id, backup_schema, "
                    "forced, drift, tables, digests, objects, restores, restored_by, sync_id, topic")


def history(destination_url: Any, sync_name: str | None = None, entry_id: int | None = None) -> list[HistoryEntry]:
    with _connect(destination_url) as conn, conn.begin():
        if not inspect(conn).has_table(HISTORY_TABLE):
            return []
        where: list[str] = []
        params: dict[str, Any] = {}
        if sync_name is not None:
            where.append("sync = :s")
            params["s"] = sync_name
        if entry_id is not None:
            where.append("id = :i")
            params["i"] = entry_id
        rows = conn.execute(text(f'select {_HISTORY_COLUMNS} from "{HISTORY_TABLE}"'
                                 + (f" where {' and '.join(where)}" if where else "") + " order by id desc"), params)
        return [HistoryEntry(*r) for r in rows]


def _last(conn: Connection, sync_name: str) -> HistoryEntry | None:
    row = conn.execute(text(f'select {_HISTORY_COLUMNS} from "{HISTORY_TABLE}" where sync = :s order by id desc '
                            "limit 1"), {"s": sync_name}).first()
    return HistoryEntry(*row) if row else None


def digests(conn: Connection, sync: Sync, order: list[str]) -> dict[str, Any]:
    """Per table, the row count and an md5 of the destination's scope (its `where`, exclusions out), computed by the
    database: what the next sync compares to see whether the destination changed the scope meanwhile."""
    found: dict[str, Any] = {}
    prep = conn.dialect.identifier_preparer
    existing = objects_mod.existing_tables(conn)
    for name in order:
        if name not in existing:
            found[name] = None
            continue
        schema, table = name.split(".", 1)
        pk = inspect(conn).get_pk_constraint(table, schema=schema)["constrained_columns"]
        by = ", ".join(f"t.{prep.quote(c)}" for c in pk) or "t::text"
        count, md5 = conn.execute(text(
            f"select count(*), md5(coalesce(string_agg(t::text, E'\\n' order by {by}), '')) from "
            f"{prep.quote(schema)}.{prep.quote(table)} as t where {scope_predicate(sync.tables[name])}")).one()
        found[name] = {"rows": count, "md5": md5}
    return found


def drift(conn: Connection, sync_name: str, sync: Sync, order: list[str]) -> list[str]:
    """How the destination's scope differs from what the last sync (or restore) of this sync left, table by table."""
    last = _last(conn, sync_name)
    if last is None:
        return []
    now = digests(conn, sync, order)
    lines = []
    for name in order:
        then = last.digests.get(name)
        if name in last.digests and then != now.get(name):
            was = then["rows"] if then else "no table"
            is_ = now[name]["rows"] if now.get(name) else "no table"
            lines.append(f"{name}: changed at the destination since {last.kind} {last.id} "
                         f"({last.finished_at:%Y-%m-%d %H:%M:%S %Z}): {was} rows then, {is_} rows now")
    return lines


# -- apply ------------------------------------------------------------------------------------------------------------

def _owner(pipeline: Pipeline, sync_name: str) -> str:
    return f"{pipeline.name}.sync.{sync_name}"


def _lock(conn: Connection, sync_name: str, tables: list[str]) -> None:
    conn.execute(text("select pg_advisory_xact_lock(hashtext(:k))"), {"k": f"cdc sync {sync_name}"})
    prep = conn.dialect.identifier_preparer
    existing = objects_mod.existing_tables(conn)
    for name in tables:
        if name in existing:
            schema, table = name.split(".", 1)
            # Writers of the scope wait until the sync commits: what was planned is what is replaced.
            conn.execute(text(f"lock table {prep.quote(schema)}.{prep.quote(table)} in share row exclusive mode"))


def _backup_scopes(sync: Sync, result: SyncPlan, conn: Connection) -> dict[str, tuple[str, dict[str, Any]]]:
    """Per destination table, the rows the sync may change: the scope, and the rows matched by name outside it."""
    existing = objects_mod.existing_tables(conn)
    scopes = {}
    prep = conn.dialect.identifier_preparer
    for name in result.order:
        if name not in existing:
            continue
        predicate, params = scope_predicate(sync.tables[name]), {}
        matched = [d for _, _, d in result.tables[name].matched]
        if matched:
            pk = result.tables[name].primary_key
            if len(pk) != 1:
                raise CdcError(f"syncs: {name}: match_by needs a one-column primary key")
            predicate = f"({predicate}) or {prep.quote(pk[0])} = any(:matched)"
            params = {"matched": [d[0] for d in matched]}
        scopes[name] = (predicate, params)
    return scopes


def _write_rows(conn: Connection, result: SyncPlan, tables: dict[str, TableMeta], progress: Progress) -> None:
    """Updates and inserts parents first (rows of one table after those they reference), then deletes children
    first, a statement per chunk of rows given as JSON. The final state satisfies the foreign keys, so neither step
    needs a row that is not there: an upserted row references a parent that is already there or written before it,
    and a deleted parent's children were deleted before it or re-pointed by an update."""
    prep = conn.dialect.identifier_preparer
    total = sum(p.changes for p in result.tables.values())
    done = 0
    for name in result.order:
        p, table = result.tables[name], tables[name]
        target = _quoted(conn, name)
        source = f"jsonb_populate_recordset(null::{target}, cast(:rows as jsonb)) as x"
        on_key = " and ".join(f"t.{prep.quote(c)} = x.{prep.quote(c)}" for c in table.primary_key)
        values = [c for c in table.columns if c not in table.primary_key]
        if p.updates and values:
            statement = (f"update {target} as t set " + ", ".join(f"{prep.quote(c)} = x.{prep.quote(c)}"
                                                                  for c in values) + f" from {source} where {on_key}")
            rows = [row for row, _ in p.updates]
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start:start + CHUNK]
                _execute(conn, name, "updating", statement, {"rows": json.dumps(chunk)})
                done += len(chunk)
                progress(f"{name}: update", done, total)
        shape = TableShape(name, (), table.primary_key, tuple(
            ForeignKeyShape(fk.columns, fk.referred_table, fk.referred_columns) for fk in table.foreign_keys))
        rows = self_referencing_order(shape, p.inserts)
        columns = ", ".join(prep.quote(c) for c in table.columns)
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            _execute(conn, name, "inserting", f"insert into {target} ({columns}) select {columns} from {source}",
                     {"rows": json.dumps(chunk)})
            done += len(chunk)
            progress(f"{name}: insert", done, total)
    for name in reversed(result.order):
        p, table = result.tables[name], tables[name]
        target = _quoted(conn, name)
        on_key = " and ".join(f"t.{prep.quote(c)} = x.{prep.quote(c)}" for c in table.primary_key)
        for start in range(0, len(p.deletes), CHUNK):
            chunk = [dict(zip(table.primary_key, k)) for k in p.deletes[start:start + CHUNK]]
            _execute(conn, name, "deleting", f"delete from {target} as t using jsonb_populate_recordset("
                     f"null::{target}, cast(:rows as jsonb)) as x where {on_key}", {"rows": json.dumps(chunk)})
            done += len(chunk)
            progress(f"{name}: delete", done, total)


def _execute(conn: Connection, table: str, doing: str, statement: str, params: dict[str, Any]) -> None:
    try:
        conn.execute(text(statement), params)
    except DBAPIError as exc:
        raise CdcError(f"sync: {doing} rows of {table} at the destination failed, nothing was changed: "
                       f"{first_line(exc)}") from None


def _raw(conn: Connection, statement: str) -> None:
    """A DDL statement as the catalog wrote it, on the transaction's connection (no parameters: a `%` is a `%`)."""
    cursor = conn.connection.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()


def _ddl(conn: Connection, action: ObjectAction, statement: str, doing: str) -> None:
    try:
        _raw(conn, statement)
    except DriverError as exc:
        raise CdcError(f"sync: {doing} {action.kind} {action.name} at the destination failed, nothing was changed: "
                       f"{first_line(exc)}") from None


@dataclass
class Applied:
    entry: HistoryEntry | None
    plan: SyncPlan
    backup_schema: str | None


def apply(pipeline: Pipeline, sync_name: str, *, force: bool = False, progress: Progress | None = None,
          echo: Callable[[str], None] = lambda _: None, fail_before_commit: Callable[[Connection], None] | None = None,
          from_log: str | None = None) -> Applied:
    """`cdc sync apply`: the source's scope written to the sync's topic and read back from it (or, with `from_log`,
    a past sync read from the topic), then backup, schema objects, rows and a history entry in one destination
    transaction."""
    from consumers.sync import log

    sync = pipeline.sync(sync_name)
    progress = progress or (lambda *_: None)
    started = datetime.now(UTC)
    topic = log.topic_of(pipeline, sync_name)
    if from_log is None:
        read = read_source(sync)
        echo(f"source read: {sum(len(r) for r in read.rows.values()):,} rows in scope over {len(read.rows)} tables, "
             f"{len(read.definitions)} schema objects")
        sync_id, offset = log.publish(pipeline, sync_name, read)
        echo(f"written to {topic} as sync {sync_id} (offset {offset})")
        source = log.read(pipeline, sync_name, sync_id, offset)
    else:
        source = log.read(pipeline, sync_name, from_log)
        echo(f"sync {from_log} read from {topic}: {sum(len(r) for r in source.rows.values()):,} rows, read from the "
             f"source at {source.read_at:%Y-%m-%d %H:%M:%S %Z}")
    with _connect(sync.destination_url) as conn, conn.begin():
        ensure_history(conn)
        _lock(conn, sync_name, list(sync.tables))
        result = plan(conn, sync_name, sync, source)
        result.drift = drift(conn, sync_name, sync, result.order)
        if result.drift and not force:
            raise SyncDrift("sync " + sync_name + ": the destination changed the scope since the last sync; nothing "
                            "was changed:\n  " + "\n  ".join(result.drift),
                            hint="`cdc sync plan` shows what the sync would overwrite; `--force` syncs anyway")
        store = ScopeBackups(_owner(pipeline, sync_name))
        saved = store.take(conn, _backup_scopes(sync, result, conn))
        echo(f"backup {saved.id}: {saved.location}")
        for action in result.objects:
            _ddl(conn, action, action.ddl, {"create": "creating", "replace": "replacing", "drop": "dropping"}
                 [action.action])
        _write_rows(conn, result, source.tables, progress)
        after = digests(conn, sync, result.order)
        if fail_before_commit is not None:
            fail_before_commit(conn)
        entry_id = conn.execute(text(
            f'insert into "{HISTORY_TABLE}" (sync, kind, started_at, requested_by, source, source_read_at, backup_id, '
            "backup_schema, forced, drift, tables, digests, objects, sync_id, topic) values (:sync, 'apply', :started, "
            ":by, :source, :read_at, :backup, :schema, :forced, cast(:drift as jsonb), cast(:tables as jsonb), "
            "cast(:digests as jsonb), cast(:objects as jsonb), :sync_id, :topic) returning id"),
            {"sync": sync_name, "started": started, "by": getpass.getuser(), "source": masked_url(sync.source_url),
             "read_at": source.read_at, "backup": saved.id, "schema": saved.location, "forced": force,
             "drift": json.dumps(result.drift), "tables": json.dumps({t: result.tables[t].counts()
                                                                       for t in result.order}),
             "digests": json.dumps(after),
             "objects": json.dumps([a.__dict__ for a in result.objects]), "sync_id": source.sync_id,
             "topic": topic}).scalar()
        pruned = store.prune(conn, sync.retention())
        if pruned:
            echo(f"{len(pruned)} backups older than {sync.retention_days} days dropped")
        entry = _last(conn, sync_name)
        assert entry is not None and entry.id == entry_id
    return Applied(entry, result, saved.location)


def restore(pipeline: Pipeline, sync_name: str | None, entry_id: int,
            echo: Callable[[str], None] = lambda _: None) -> HistoryEntry:
    """`cdc sync restore ID`: the scope and schema objects of the destination as they were before sync ID."""
    candidates = [(n, s) for n, s in pipeline.syncs.items() if sync_name in (None, n)]
    for name, sync in candidates:
        with _connect(sync.destination_url) as conn, conn.begin():
            if not inspect(conn).has_table(HISTORY_TABLE):
                continue
            row = conn.execute(text(f'select {_HISTORY_COLUMNS} from "{HISTORY_TABLE}" where id = :i and sync = :s'),
                               {"i": entry_id, "s": name}).first()
            if row is None:
                continue
            entry = HistoryEntry(*row)
            if entry.kind != "apply":
                raise CdcError(f"sync history {entry_id} is a {entry.kind}, not a sync; restore the sync it undid")
            if entry.backup_schema is None or not inspect(conn).has_schema(entry.backup_schema):
                raise CdcError(f"sync {entry_id}: its backup is gone (kept {sync.retention_days} days)")
            return _restore(conn, name, sync, entry, echo)
    raise CdcError(f"sync history: no entry {entry_id}" + (f" for sync {sync_name}" if sync_name else ""))


def _restore(conn: Connection, sync_name: str, sync: Sync, entry: HistoryEntry,
             echo: Callable[[str], None]) -> HistoryEntry:
    """The backup synced back like a source: rows that differ updated in place (so that rows outside the scope that
    reference them keep working), the sync's own rows deleted, the backed-up ones inserted; schema objects undone."""
    started = datetime.now(UTC)
    prep = conn.dialect.identifier_preparer
    order = list(entry.tables)  # recorded parents first
    _lock(conn, sync_name, order)
    backup = prep.quote(entry.backup_schema or "")
    try:
        for action in reversed(entry.objects):
            if action.get("undo"):
                _raw(conn, action["undo"])
        _utc(conn)
        existing = objects_mod.existing_tables(conn)
        insp = inspect(conn)
        names = [t for t in order if t in existing]
        live = _reflect(conn, names, "destination")
        inputs = {}
        for name in names:
            table = live[name]
            if insp.has_table(name, schema=entry.backup_schema):
                relation = f"{backup}.{prep.quote(name)}"
                saved_table = TableMeta(name, tuple(c["name"] for c in insp.get_columns(
                    name, schema=entry.backup_schema)), table.primary_key)
                saved = _read_rows(conn, saved_table, "true", "the backup of", relation=relation)
                keys = ", ".join(prep.quote(c) for c in table.primary_key)
                also = f" or ({keys}) in (select {keys} from {relation})"
            else:
                saved_table, saved, also = table, [], ""
            now = _read_rows(conn, table, f"({scope_predicate(sync.tables[name])}){also}", "the destination's")
            inputs[name] = TableInput(name, table.primary_key, saved_table.columns, saved, now, (),
                                      table.foreign_keys)
            live[name] = TableMeta(name, saved_table.columns, table.primary_key, table.foreign_keys)
        plans = plan_rows(inputs)
        _write_rows(conn, SyncPlan(sync_name, names, plans, []), live, lambda *_: None)
    except (DBAPIError, DriverError) as exc:
        raise CdcError(f"sync restore {entry.id}: failed, nothing was changed: "
                       f"{first_line(getattr(exc, 'orig', None) or exc)}") from None
    after = digests(conn, sync, order)
    restore_id = conn.execute(text(
        f'insert into "{HISTORY_TABLE}" (sync, kind, started_at, requested_by, source, backup_id, backup_schema, '
        "tables, digests, restores) values (:sync, 'restore', :started, :by, :source, :backup, :schema, "
        "cast(:tables as jsonb), cast(:digests as jsonb), :restores) returning id"),
        {"sync": sync_name, "started": started, "by": getpass.getuser(), "source": entry.source,
         "backup": entry.backup_id, "schema": entry.backup_schema,
         "tables": json.dumps({t: plans[t].counts() for t in names}),
         "digests": json.dumps(after), "restores": entry.id}).scalar()
    conn.execute(text(f'update "{HISTORY_TABLE}" set restored_by = :r where id = :i'),
                 {"r": restore_id, "i": entry.id})
    echo(f"sync {entry.id} restored from {entry.backup_schema}")
    result = _last(conn, sync_name)
    assert result is not None
    return result


def backups(pipeline: Pipeline, sync_name: str) -> list[Any]:
    sync = pipeline.sync(sync_name)
    with _connect(sync.destination_url) as conn, conn.begin():
        return ScopeBackups(_owner(pipeline, sync_name)).list(conn)


def prune_backups(pipeline: Pipeline, sync_name: str) -> list[Any]:
    sync = pipeline.sync(sync_name)
    with _connect(sync.destination_url) as conn, conn.begin():
        return ScopeBackups(_owner(pipeline, sync_name)).prune(conn, sync.retention())
