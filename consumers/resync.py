"""`cdc resync` and `cdc history`: re-send chosen source rows through Debezium, and the history of such requests.

A re-sync is an ad-hoc incremental snapshot (Debezium's `execute-snapshot` signal through the signalling table)
limited by an additional condition to the chosen keys: the current source rows travel the normal path (Kafka,
then the applier), so they arrive in order with everything else and never bypass a transaction. The history lives
in the source database, in `cdc_sync_history` beside the signalling table: each request with its time, requester,
object, keys, state (requested, in progress, complete, failed) and, per key, whether it reached the destination.
"""

from __future__ import annotations

import csv
import getpass
import html
import io
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from sqlalchemy import bindparam, create_engine, text

from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError
from consumers.dialects import dialect_for
from consumers.shapes import TableShape, reflect_shapes
from consumers.verify import _normal
from producers.source_admin import psycopg_conninfo, send_incremental_snapshot, split_table

HISTORY_TABLE = "cdc_sync_history"


@dataclass
class KeyResult:
    key: list[Any]
    ok: bool
    reason: str = ""


@dataclass
class SyncRequest:
    id: int
    requested_at: datetime
    requested_by: str
    table: str
    keys: list[list[Any]]
    state: str
    results: list[KeyResult] = field(default_factory=list)
    completed_at: datetime | None = None
    destination: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "requested_at": self.requested_at.isoformat(), "requested_by": self.requested_by,
                "table": self.table, "keys": self.keys, "state": self.state, "destination": self.destination,
                "completed_at": self.completed_at.isoformat() if self.completed_at else None,
                "results": [{"key": r.key, "ok": r.ok, "reason": r.reason} for r in self.results]}


def _history_table(pipeline: Pipeline) -> sql.Composed:
    schema, _ = split_table(pipeline.source.signal_table)
    return sql.Identifier(schema, HISTORY_TABLE)


def _ensure_history(conn: psycopg.Connection, pipeline: Pipeline) -> None:
    conn.execute(sql.SQL(
        "create table if not exists {} (id bigserial primary key, pipeline text not null, destination text not null, "
        "requested_at timestamptz not null default now(), requested_by text not null, "
        "table_name text not null, keys jsonb not null, state text not null, results jsonb not null default '[]', "
        "completed_at timestamptz)").format(_history_table(pipeline)))


def _parse_keys(raw: list[str], shape: TableShape) -> list[Any]:
    key_type = shape.column(shape.primary_key[0]).type
    python_type = getattr(key_type, "python_type", str)
    keys = []
    for item in raw:
        try:
            keys.append(python_type(item) if python_type in (int, str) else item)
        except (TypeError, ValueError):
            raise ConfigError(f"--ids: {item!r} is not a valid key of {shape.name} "
                              f"({shape.primary_key[0]} is {key_type})") from None
    return list(dict.fromkeys(keys))


def _condition(shape: TableShape, keys: list[Any]) -> str:
    column = '"' + shape.primary_key[0].replace('"', '""') + '"'
    literals = ", ".join(str(k) if isinstance(k, int) else "'" + str(k).replace("'", "''") + "'" for k in keys)
    return f"{column} in ({literals})"


def _source_rows(conn: psycopg.Connection, shape: TableShape, column: str, values: list[Any]) -> list[dict]:
    schema, table = split_table(shape.name)
    query = sql.SQL("select * from {} where {} = any(%s)").format(sql.Identifier(schema, table),
                                                                   sql.Identifier(column))
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, (values,)).fetchall()


def resync(pipeline: Pipeline, table: str, raw_ids: list[str], *, destination: str | None = None,
           with_members: bool = False, with_parents: bool = False, requested_by: str | None = None,
           wait: float = 120.0, echo: Callable[[str], None] = lambda line: None) -> SyncRequest:
    if table not in pipeline.source.tables:
        raise ConfigError(f"resync: {table!r} is not in source.tables")
    if not raw_ids:
        raise ConfigError("--ids: name at least one key")
    dest = destination or next((n for n, d in pipeline.destinations.items() if d.kind == "replica"), None)
    if dest is None or dest not in pipeline.destinations:
        raise ConfigError(f"destinations: no replica destination {destination or ''!r} to check the re-sync against")
    shapes = reflect_shapes(pipeline.source.sqlalchemy_url, pipeline.source.tables)
    shape = shapes[table]
    if len(shape.primary_key) != 1:
        raise ConfigError(f"resync: {table} has no single-column primary key")
    keys = _parse_keys(raw_ids, shape)
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        _ensure_history(conn, pipeline)
        request_id, requested_at = conn.execute(
            sql.SQL("insert into {} (pipeline, destination, requested_by, table_name, keys, state) "
                    "values (%s, %s, %s, %s, %s, 'requested') returning id, requested_at").format(
                _history_table(pipeline)),
            (pipeline.pipeline, dest, requested_by or getpass.getuser(), table, json.dumps([[k] for k in keys]))
        ).fetchone()
        present = {row[shape.primary_key[0]] for row in _source_rows(conn, shape, shape.primary_key[0], keys)}
        # Parents first: their snapshot is requested (and so applied) before the rows that reference them.
        plan: list[tuple[str, list[Any]]] = []
        if with_parents:
            rows = _source_rows(conn, shape, shape.primary_key[0], list(present))
            for fk in shape.foreign_keys:
                parent = shapes.get(fk.referred_table)
                if parent is not None and len(fk.columns) == 1 and parent.name != table:
                    parent_keys = sorted({r[fk.columns[0]] for r in rows if r[fk.columns[0]] is not None})
                    if parent_keys:
                        plan.append((parent.name, parent_keys))
        if present:
            plan.append((table, sorted(present)))
        if with_members:
            hierarchy = pipeline.hierarchy_of(table)
            if hierarchy is None or pipeline.hierarchies[hierarchy].root != table:
                raise ConfigError(f"--with-members: {table} is not the root of a hierarchy")
            for member, column in pipeline.hierarchies[hierarchy].members.items():
                member_shape = shapes[member]
                member_keys = [r[member_shape.primary_key[0]] for r in
                               _source_rows(conn, member_shape, column, list(present))]
                if member_keys:
                    plan.append((member, sorted(member_keys)))
        for target, target_keys in plan:
            send_incremental_snapshot(conn, pipeline.source.signal_table, [target],
                                      [{"data-collection": target, "filter": _condition(shapes[target], target_keys)}])
            echo(f"resync {request_id}: requested {len(target_keys)} rows of {target}")
        conn.execute(sql.SQL("update {} set state = 'in progress' where id = %s").format(_history_table(pipeline)),
                     (request_id,))
    request = SyncRequest(request_id, requested_at, requested_by or getpass.getuser(), table, [[k] for k in keys],
                          "in progress", destination=dest)
    return check(pipeline, request, shapes, present, wait=wait)


def check(pipeline: Pipeline, request: SyncRequest, shapes: dict[str, TableShape], present: set[Any], *,
          wait: float) -> SyncRequest:
    """Wait until every key present at the source holds the source's row at the destination, or `wait` runs out;
    record per-key results (a key absent at the source is reported, never skipped)."""
    shape = shapes[request.table]
    engine = create_engine(pipeline.destinations[request.destination].driver_url)
    dialect = dialect_for(engine)
    target = dialect.table(shape)
    columns = list(shape.column_names)
    key_column = shape.primary_key[0]
    deadline = time.monotonic() + wait
    pending = {k[0] for k in request.keys if k[0] in present}
    reasons: dict[Any, str] = {}
    try:
        while True:
            with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url)) as src:
                source_rows = {r[key_column]: r for r in _source_rows(src, shape, key_column, list(pending))}
            with engine.connect() as dst:
                prep = dst.dialect.identifier_preparer
                query = text(f"select {', '.join(prep.quote(c) for c in columns)} from {prep.format_table(target)} "
                             f"where {prep.quote(key_column)} in :keys").bindparams(bindparam("keys", expanding=True))
                dest_rows = {r[0]: r for r in dst.execute(query, {"keys": list(pending)})} if pending else {}
            for key in list(pending):
                src_row, dst_row = source_rows.get(key), dest_rows.get(key)
                if src_row is not None and dst_row is not None and \
                        [_normal(src_row[c]) for c in columns] == [_normal(v) for v in dst_row]:
                    pending.discard(key)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for key in pending:
            reasons[key] = _why_missing(engine, dialect, shapes, shape, source_rows.get(key))
    finally:
        engine.dispose()
    request.results = []
    for [key] in request.keys:
        if key not in present:
            request.results.append(KeyResult([key], False, "not at the source"))
        elif key in pending:
            request.results.append(KeyResult([key], False, reasons.get(key, "did not reach the destination")))
        else:
            request.results.append(KeyResult([key], True))
    request.state = "complete" if all(r.ok for r in request.results) else "failed"
    request.completed_at = datetime.now(timezone.utc)
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        conn.execute(sql.SQL("update {} set state = %s, results = %s, completed_at = %s where id = %s").format(
            _history_table(pipeline)),
            (request.state, json.dumps([{"key": r.key, "ok": r.ok, "reason": r.reason} for r in request.results],
                                       default=str), request.completed_at, request.id))
    return request


def _why_missing(engine: Any, dialect: Any, shapes: dict[str, TableShape], shape: TableShape,
                 source_row: dict | None) -> str:
    """Name a missing parent at the destination, the usual reason a re-synced child cannot be applied."""
    if source_row is None:
        return "did not reach the destination"
    with engine.connect() as dst:
        prep = dst.dialect.identifier_preparer
        for fk in shape.foreign_keys:
            parent = shapes.get(fk.referred_table)
            value = source_row.get(fk.columns[0]) if len(fk.columns) == 1 else None
            if parent is None or value is None:
                continue
            found = dst.execute(text(f"select 1 from {prep.format_table(dialect.table(parent))} "
                                     f"where {prep.quote(fk.referred_columns[0])} = :v"), {"v": value}).first()
            if found is None:
                return (f"its parent {parent.name} {fk.referred_columns[0]}={value} is missing at the destination: "
                        "re-sync with --with-parents")
    return "did not reach the destination (is `cdc run` running?)"


# ---------------------------------------------------------------------------------------------------------------
# history


def history(pipeline: Pipeline, request_id: int | None = None) -> list[SyncRequest]:
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        _ensure_history(conn, pipeline)
        query = sql.SQL("select * from {} where pipeline = %s {} order by id desc").format(
            _history_table(pipeline), sql.SQL("and id = %s" if request_id is not None else ""))
        params = (pipeline.pipeline, request_id) if request_id is not None else (pipeline.pipeline,)
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(query, params).fetchall()
    if request_id is not None and not rows:
        raise CdcError(f"history: no request {request_id}")
    return [SyncRequest(r["id"], r["requested_at"], r["requested_by"], r["table_name"], r["keys"], r["state"],
                        [KeyResult(x["key"], x["ok"], x.get("reason", "")) for x in r["results"]],
                        r["completed_at"], r["destination"]) for r in rows]


def clear_history(pipeline: Pipeline, before: datetime | None = None) -> int:
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        _ensure_history(conn, pipeline)
        query = sql.SQL("delete from {} where pipeline = %s {}").format(
            _history_table(pipeline), sql.SQL("and requested_at < %s" if before else ""))
        return conn.execute(query, (pipeline.pipeline, before) if before else (pipeline.pipeline,)).rowcount


def report_csv(request: SyncRequest) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["request", "table", "key", "ok", "reason"])
    for r in request.results:
        writer.writerow([request.id, request.table, json.dumps(r.key, default=str), r.ok, r.reason])
    return out.getvalue()


def report_html(request: SyncRequest) -> str:
    """A one-page report: keys that succeeded, keys that failed and why."""
    ok = [r for r in request.results if r.ok]
    failed = [r for r in request.results if not r.ok]
    rows = "".join(f"<tr><td>{html.escape(json.dumps(r.key, default=str))}</td><td>{html.escape(r.reason)}</td></tr>"
                   for r in failed)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Sync request {request.id}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;
padding:.2em .6em}}</style></head><body>
<h1>Sync request history</h1>
<p>The {html.escape(request.table)} sync requested on {request.requested_at:%Y-%m-%d %H:%M:%S %Z} by
{html.escape(request.requested_by)} for destination {html.escape(request.destination)}: <b>{request.state}</b>,
{len(ok)}/{len(request.results)} keys synced.</p>
<h2>Keys that failed</h2><table><tr><th>key</th><th>reason</th></tr>{rows}</table>
<h2>Keys synced</h2><p>{html.escape(', '.join(json.dumps(r.key, default=str) for r in ok)) or 'none'}</p>
</body></html>"""
