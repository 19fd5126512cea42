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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from sqlalchemy import text

from cdc import kafka as kafka_clients
from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError, first_line
from cdc.source_tables import LSN_COLUMN, TableShape, reflect_tables
from consumers.apply.dialects import dialect_for
from consumers.apply.dialects.base import HISTORY_COLUMNS
from consumers.apply.shapes import SNAPSHOT_LSN
from consumers.ops import verify
from consumers.ops.compare import equal, jsonable, kind_of, normal, normal_row
from consumers.ops.verify import resolve_table
from producers.connect import ConnectClient
from producers.source_admin import insert_watermark, psycopg_conninfo, send_incremental_snapshot, split_table

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


def debezium_parts(identifier: str) -> list[str]:
    """How Debezium 3.6's TableIdParser splits an identifier (a port of its states): unquoted parts end at a dot
    or whitespace, "quoted" parts (or '...', `...`) hold anything, doubled quotes inside. ValueError where
    Debezium throws, which makes an incremental snapshot log "Unable to parse table identifier" and skip it."""
    parts: list[str] = []
    i, n = 0, len(identifier)
    expect_part = True
    while i < n:
        c = identifier[i]
        if c.isspace():
            i += 1
            continue
        if not expect_part:
            if c != ".":
                raise ValueError(f"unexpected {c!r} after {parts[-1]!r}")
            expect_part = True
            i += 1
            continue
        if c == ".":
            raise ValueError("unexpected '.'")
        if c in "\"'`":
            j, out = i + 1, []
            while True:
                if j >= n:
                    raise ValueError("unterminated quoted identifier")
                if identifier[j] == c:
                    if j + 1 < n and identifier[j + 1] == c:
                        out.append(c)
                        j += 2
                        continue
                    break
                out.append(identifier[j])
                j += 1
            parts.append("".join(out))
            i = j + 1
        else:
            j = i
            while j < n and not identifier[j].isspace() and identifier[j] != ".":
                j += 1
            parts.append(identifier[i:j])
            i = j
        expect_part = False
    if expect_part:
        raise ValueError("ends without a name")
    return parts


def check_debezium_name(table: str) -> None:
    """Refuse a table whose name Debezium's snapshot signal cannot take: it matches the signal's names against its
    tables' plain `schema.table` form and parses that form again, so quoting cannot help; the snapshot would be
    skipped with only a warning in the Connect log."""
    schema, name = split_table(table)
    try:
        ok = debezium_parts(f"{schema}.{name}") == [schema, name] and ";" not in table
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(
            f"resync: Debezium cannot re-send rows of {table}: its snapshot signal parses the name "
            f"{schema}.{name!r} unquoted, and a name holding whitespace, a dot, a quote or ';' is skipped "
            "(\"Unable to parse table identifier ... Skipping it\" in the Connect log). Rebuild the table with "
            "`cdc replay DEST --tables ...` instead, or rename it")


def _java_regex(name: str) -> str:
    """A table name as the regular expression Debezium matches data-collections with (metacharacters escaped)."""
    # Debezium matches the signal's names as regular expressions against `schema.table`; a '.' matches itself.
    return "".join("\\" + c if c in "\\[]{}()*+?^$|" else c for c in name)


def parse_ids(ids: str | list[Any], shape: TableShape) -> list[list[Any]]:
    """Keys as a user gives them: `1,2,3` for a one-column key, `1:a,2:b` for a composite key (in key column order),
    or JSON for anything else: `[[1, "a, b"], [2, "c"]]`. Each key is checked against the key columns' types."""
    width = len(shape.primary_key)
    if isinstance(ids, str):
        text = ids.strip()
        if text.startswith("["):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"--ids: not valid JSON ({exc})") from None
        else:
            data = [item.split(":") if width > 1 else item for item in (i.strip() for i in text.split(","))
                    if item]
    else:
        data = list(ids)
    keys = [list(k) if isinstance(k, (list, tuple)) else [k] for k in data]
    kinds = [kind_of(shape.column(c).type) for c in shape.primary_key]
    seen: dict[tuple, list[Any]] = {}
    for key in keys:
        if len(key) != width:
            raise ConfigError(f"--ids: {key!r} is not a key of {shape.name}: its key is "
                              f"({', '.join(shape.primary_key)}), {width} value(s)"
                              + (" separated by ':' or as JSON lists" if width > 1 else ""))
        normal_key = tuple(normal(k, v) for k, v in zip(kinds, key))
        for column, value, n in zip(shape.primary_key, key, normal_key):
            if isinstance(n, tuple) and n[:1] == ("unreadable",):
                raise ConfigError(f"--ids: {value!r} is not a valid key of {shape.name} "
                                  f"({column} is {shape.column(column).type})")
        seen.setdefault(normal_key, [int(v) if k.name == "int" and isinstance(v, str) else v
                                     for k, v in zip(kinds, key)])
    return list(seen.values())


def _literal(value: Any) -> str:
    """A key value as a SQL literal of the source (PostgreSQL coerces a quoted literal to the column's type)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _condition(shape: TableShape, keys: list[list[Any]], columns: tuple[str, ...] | None = None) -> str:
    """The source rows of these keys as a WHERE condition (Debezium's additional condition, and our own reads)."""
    columns = columns or shape.primary_key
    quoted = ['"' + c.replace('"', '""') + '"' for c in columns]
    if len(columns) == 1:
        return f"{quoted[0]} in ({', '.join(_literal(k[0]) for k in keys)})"
    return " or ".join("(" + " and ".join(f"{q} = {_literal(v)}" for q, v in zip(quoted, k)) + ")" for k in keys)


def _source_table(shape: TableShape) -> str:
    return f'"{shape.schema.replace(chr(34), chr(34) * 2)}"."{shape.table.replace(chr(34), chr(34) * 2)}"'


def _source_rows(conn: psycopg.Connection, shape: TableShape, condition: str) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(f"select * from {_source_table(shape)} where {condition}").fetchall()


def _key_of(shape: TableShape, row: dict, columns: tuple[str, ...] | None = None) -> tuple:
    """A row's key in normal form (the form keys are matched in)."""
    columns = columns or shape.primary_key
    return tuple(normal(kind_of(shape.column(c).type), row[c]) for c in columns)


def _normal_key(shape: TableShape, key: list[Any]) -> tuple:
    return tuple(normal(kind_of(shape.column(c).type), v) for c, v in zip(shape.primary_key, key))


def resync(pipeline: Pipeline, table: str, raw_ids: str | list[Any] | None = None, *,
           keys: list[list[Any]] | None = None, destination: str | None = None, with_members: bool = False,
           with_parents: bool = False, requested_by: str | None = None, wait: float = 120.0,
           echo: Callable[[str], None] = lambda line: None) -> SyncRequest:
    table = resolve_table(table, pipeline.source.tables)
    dest = destination or next((n for n, d in pipeline.destinations.items() if d.kind == "replica"), None)
    if dest is None or dest not in pipeline.destinations:
        raise ConfigError(f"destinations: no replica destination {destination or ''!r} to check the re-sync against")
    shapes = reflect_tables(pipeline.source.sqlalchemy_url, pipeline.source.tables)
    shape = shapes[table]
    if not shape.primary_key:
        if keys or raw_ids:
            raise ConfigError(f"--ids: {table} has no primary key, so no key names its rows; leave --ids out to "
                              "re-sync the whole table (surplus copies deleted, missing ones copied from the source)")
        return sync_keyless(pipeline, table, destination=dest, requested_by=requested_by, wait=wait, echo=echo)
    chosen = parse_ids(keys if keys is not None else (raw_ids or []), shape)
    if not chosen:
        raise ConfigError("--ids: name at least one key")
    check_debezium_name(table)
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        _ensure_history(conn, pipeline)
        request_id, requested_at = conn.execute(
            sql.SQL("insert into {} (pipeline, destination, requested_by, table_name, keys, state) "
                    "values (%s, %s, %s, %s, %s, 'requested') returning id, requested_at").format(
                _history_table(pipeline)),
            (pipeline.name, dest, requested_by or getpass.getuser(), table, json.dumps(chosen, default=str))
        ).fetchone()
        rows = _source_rows(conn, shape, _condition(shape, chosen))
        present = {_key_of(shape, r): [r[c] for c in shape.primary_key] for r in rows}
        # Parents first: their snapshot is requested (and so applied) before the rows that reference them.
        plan: list[tuple[str, list[list[Any]]]] = []
        if with_parents:
            for fk in shape.foreign_keys:
                parent = shapes.get(fk.referred_table)
                if parent is None or parent.name == table or not parent.primary_key \
                        or set(fk.referred_columns) != set(parent.primary_key):
                    continue
                order = [fk.columns[fk.referred_columns.index(c)] for c in parent.primary_key]
                parent_keys = {tuple(r[c] for c in order) for r in rows if all(r[c] is not None for c in order)}
                if parent_keys:
                    check_debezium_name(parent.name)
                    plan.append((parent.name, [list(k) for k in sorted(parent_keys, key=str)]))
        if present:
            plan.append((table, list(present.values())))
        if with_members:
            hierarchy = pipeline.hierarchy_of(table)
            if hierarchy is None or pipeline.hierarchies[hierarchy].root != table or len(shape.primary_key) != 1:
                raise ConfigError(f"--with-members: {table} is not the root of a hierarchy")
            for member, column in pipeline.hierarchies[hierarchy].members.items():
                member_shape = shapes[member]
                member_rows = _source_rows(conn, member_shape, _condition(
                    member_shape, [[k[0]] for k in present.values()], (column,))) if present else []
                if member_rows and member_shape.primary_key:
                    check_debezium_name(member)
                    plan.append((member, [[r[c] for c in member_shape.primary_key] for r in member_rows]))
        for target, target_keys in plan:
            pattern = _java_regex(target)
            send_incremental_snapshot(conn, pipeline.source.signal_table, [pattern],
                                      [{"data-collection": pattern,
                                        "filter": _condition(shapes[target], target_keys)}])
            echo(f"resync {request_id}: requested {len(target_keys)} rows of {target}")
        conn.execute(sql.SQL("update {} set state = 'in progress' where id = %s").format(_history_table(pipeline)),
                     (request_id,))
    request = SyncRequest(request_id, requested_at, requested_by or getpass.getuser(), table,
                          [[jsonable(v) for v in k] for k in chosen], "in progress", destination=dest)
    return check(pipeline, request, shapes, set(present), wait=wait)


def check(pipeline: Pipeline, request: SyncRequest, shapes: dict[str, TableShape], present: set[tuple], *,
          wait: float) -> SyncRequest:
    """Wait until every key present at the source holds the source's row at the destination (by the comparison
    rules of consumers/ops/compare.py), or `wait` runs out; record per-key results (a key absent at the source is
    reported, never skipped), and for a key that did not arrive, why."""
    shape = shapes[request.table]
    by_normal = {_normal_key(shape, k): k for k in request.keys}
    pending = {n for n in by_normal if n in present}
    deadline = time.monotonic() + wait
    src_engine = verify.source_engine(pipeline)
    dst_engine = verify.destination_engine(pipeline, request.destination)
    backend = verify.backend_of(pipeline, request.destination)
    dialect = dialect_for(dst_engine, pipeline.destinations[request.destination].kind)
    target = dialect.table(shape)
    last: dict[tuple, tuple[tuple | None, tuple | None]] = {}
    try:
        while True:
            keys = [by_normal[n] for n in pending]
            with verify.connect(dst_engine) as dst:
                stored = backend.catalog_types(dst, target.schema, target.name)
            with src_engine.connect() as src:
                s_side = verify._Side(src, verify.SOURCE, _source_table(shape), shape, {}, stored)
                s_rows = verify.raw_query(src, s_side._inner() + " WHERE " + _condition(shape, keys)) if keys else []
            texts = [r[0] for r in s_rows]
            with verify.connect(dst_engine) as dst:
                stored = backend.catalog_types(dst, target.schema, target.name)
                d_side = verify._Side(dst, backend, verify.table_sql(backend, target), shape, stored)
                d_rows = verify.raw_query(dst, d_side._inner() + f" WHERE {d_side.key_text} IN ("
                                          + ", ".join(d_side.canon.literal(t) for t in texts) + ")") \
                    if texts and stored else []
            d_by_text = {r[0]: r for r in d_rows}
            for row in s_rows:
                key = tuple(normal(s_side.kinds[i], row[2 + i]) for i in s_side.key_index)
                other = d_by_text.get(row[0])
                last[key] = (tuple(row[2:]), tuple(other[2:]) if other is not None else None)
                if other is not None and verify._equal_row(s_side.kinds, row[2:], other[2:]):
                    pending.discard(key)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        reasons = {key: _why_missing(pipeline, request, dst_engine, dialect, shapes, shape, s_side.columns,
                                     s_side.kinds, *last.get(key, (None, None)))
                   for key in pending}
    finally:
        src_engine.dispose()
        dst_engine.dispose()
    request.results = []
    for n, key in by_normal.items():
        if n not in present:
            request.results.append(KeyResult(key, False, "not at the source"))
        elif n in pending:
            request.results.append(KeyResult(key, False, reasons[n]))
        else:
            request.results.append(KeyResult(key, True))
    request.state = "complete" if all(r.ok for r in request.results) else "failed"
    request.completed_at = datetime.now(UTC)
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        conn.execute(sql.SQL("update {} set state = %s, results = %s, completed_at = %s where id = %s").format(
            _history_table(pipeline)),
            (request.state, json.dumps([{"key": r.key, "ok": r.ok, "reason": r.reason} for r in request.results],
                                       default=str), request.completed_at, request.id))
    return request


def _why_missing(pipeline: Pipeline, request: SyncRequest, engine: Any, dialect: Any, shapes: dict[str, TableShape],
                 shape: TableShape, columns: list[str], kinds: list[Any], source_row: tuple | None,
                 dest_row: tuple | None) -> str:
    """The first cause that holds, checked in the order a user would check them."""
    if source_row is None:
        return "not at the source"
    values = dict(zip(columns, source_row))
    with verify.connect(engine) as dst:
        prep = dst.dialect.identifier_preparer
        for fk in shape.foreign_keys:
            parent = shapes.get(fk.referred_table)
            parent_values = [values.get(c) for c in fk.columns]
            if parent is None or any(v is None for v in parent_values):
                continue
            where = " AND ".join(f"{prep.quote(c)} = :p{i}" for i, c in enumerate(fk.referred_columns))
            found = dst.execute(text(f"select 1 from {prep.format_table(dialect.table(parent))} where {where}"),
                                {f"p{i}": v if isinstance(v, (int, str)) else str(v)
                                 for i, v in enumerate(parent_values)}).first()
            if found is None:
                shown = ", ".join(f"{c}={jsonable(v)}" for c, v in zip(fk.referred_columns, parent_values))
                return (f"its parent {parent.name} {shown} is missing at the destination: re-sync with "
                        "--with-parents")
    try:
        with ConnectClient(pipeline.kafka.connect_url) as connect:
            status = connect.status(pipeline.connector_name)
    except Exception as exc:  # noqa: BLE001 - an unreachable Connect is itself the answer
        return f"Kafka Connect does not answer ({exc}): Debezium cannot have sent the rows"
    if status is None:
        return f"the connector {pipeline.connector_name} does not exist: run `cdc connectors apply`"
    failed = [t for t in status.tasks if t.get("state") != "RUNNING"]
    if status.state != "RUNNING" or failed:
        state = status.state if status.state != "RUNNING" else f"task {failed[0].get('id')} {failed[0].get('state')}"
        return f"the connector {pipeline.connector_name} is {state}: Debezium did not send the rows " \
               "(`cdc connectors status`)"
    sent = _sent_since(pipeline, engine, dialect, request)
    if isinstance(sent, str):
        return sent
    if dest_row is not None:
        for column, kind, a, b in zip(columns, kinds, source_row, dest_row):
            if not equal(kind, a, b):
                return (f"it reached the destination but differs in {column}: source {jsonable(a)!r}, destination "
                        f"{jsonable(b)!r} (a newer change not applied yet, or the destination rewrote it)")
    return (f"the destination {request.destination} applied what Debezium sent after the request, but not this row: "
            "Debezium may still be snapshotting (try a longer --wait), or the row went to the dead letters "
            "(`cdc run` logs them)")


def _sent_since(pipeline: Pipeline, engine: Any, dialect: Any, request: SyncRequest) -> str | None:
    """Whether Debezium wrote the table's topic after the request, and whether the destination applied it: the
    reason when one of them did not happen, None when both did (or Kafka cannot tell)."""
    from confluent_kafka import TopicPartition

    topic = pipeline.topic_of(request.table)
    since_ms = int(request.requested_at.timestamp() * 1000)
    consumer = kafka_clients.consumer(pipeline.kafka, {
        "log_level": 3, "group.id": f"cdc-resync-{pipeline.name}-{request.id}", "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        if not partitions:
            return f"the topic {topic} does not exist: Debezium has never written this table (`cdc connectors status`)"
        found = consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in partitions], timeout=10)
    except Exception:  # noqa: BLE001 - Kafka cannot tell; the caller says what it can
        return None
    finally:
        consumer.close()
    sent = {tp.partition: tp.offset for tp in found if tp.offset >= 0}
    if not sent:
        return (f"Debezium wrote nothing to {topic} after the request ({request.requested_at:%H:%M:%S %Z}): it did "
                "not act on the snapshot signal (its Connect log says why; is the signalling table captured?)")
    try:
        with verify.connect(engine) as dst:
            applied = dialect.load_offsets(dst, pipeline.name)
    except Exception:  # noqa: BLE001 - no offsets table: nothing was ever applied
        applied = {}
    behind = [(p, o, applied.get((topic, p), 0)) for p, o in sent.items() if applied.get((topic, p), 0) <= o]
    if behind:
        p, o, a = behind[0]
        return (f"Debezium sent it (topic {topic}, partition {p}, from offset {o}), but the destination "
                f"{request.destination} has not applied it (applied up to offset {a}): is `cdc run` running?")
    return None


# ---------------------------------------------------------------------------------------------------------------
# history


def history(pipeline: Pipeline, request_id: int | None = None) -> list[SyncRequest]:
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        _ensure_history(conn, pipeline)
        query = sql.SQL("select * from {} where pipeline = %s {} order by id desc").format(
            _history_table(pipeline), sql.SQL("and id = %s" if request_id is not None else ""))
        params = (pipeline.name, request_id) if request_id is not None else (pipeline.name,)
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
        return conn.execute(query, (pipeline.name, before) if before else (pipeline.name,)).rowcount


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


# ---------------------------------------------------------------------------------------------------------------
# tables without a primary key
#
# Nothing names one row of such a table, and Debezium cannot re-send its rows: an incremental snapshot skips a table
# without a key ("skipped because the table has no primary keys"), and with a surrogate key its window buffer, a map
# keyed by the row's (null) record key, keeps one row per chunk; a blocking snapshot would send every row to every
# destination (and into the topic for every later replay), where a snapshot read of a keyless row is an insert.
# So the source's rows are copied to the ONE destination being fixed, directly, at a moment when that destination is
# known to hold exactly the source's changes of the table up to that moment:
# 0. a watermark is awaited without any lock: a destination that is not applying is refused before writers wait;
# 1. the source table is locked against writers (SHARE: readers go on, writers wait, nothing is lost);
# 2. a watermark transaction is committed at the source, and the fix waits until the destination's applier has
#    applied it: every change of the table committed before the lock has then been applied, and no later one exists;
# 3. both sides are compared as multisets (in-database, as `cdc verify` does), the surplus copies are deleted at the
#    destination and the missing copies inserted from the source's values, in one destination transaction;
# 4. the table is compared once more, and the lock released. Writers of the table wait for steps 2 to 4 (seconds:
#    the pipeline's latency plus the comparison); the lock is given up, and the fix refused, when the lock cannot be
#    had within KEYLESS_LOCK_WAIT_S or the destination does not catch up within the wait (at most KEYLESS_HOLD_S).

KEYLESS_LOCK_WAIT_S = 5  # how long to queue for the lock: writers queue behind a waiting lock
KEYLESS_HOLD_S = 60.0  # the longest the source table stays locked while the destination catches up
# Column kinds whose source values are read here in the form the applier gives them (consumers/apply/values.py).
_NATIVE_KINDS = frozenset({"int", "bool", "float4", "float8", "numeric", "text", "char", "uuid", "bytes"})
_ARRAY_ELEMENTS = _NATIVE_KINDS | {"date", "timestamp"}
_TEXT_TYPES = frozenset({"inet", "cidr", "macaddr", "macaddr8", "citext"})  # Debezium sends these as their text


@dataclass
class _KeylessValues:
    """How to read a keyless table's source rows as the applier's values: SQL expressions and a row builder."""

    exprs: list[str]
    build: Callable[[tuple], dict[str, Any]]


def _keyless_values(shape: TableShape, dest: str) -> _KeylessValues:
    """SQL reading each column as the value the applier would have from Debezium (consumers/apply/values.py): native
    values where psycopg gives the same, JSON and a few types as their text, intervals as Debezium's ISO-8601 text,
    dates and times outside Python's range as PostgreSQL's text. A column of any other type is refused by name."""
    from sqlalchemy.dialects import postgresql as pg

    exprs: list[str] = []
    readers: list[Callable[[tuple, int], tuple[Any, int]]] = []
    for col in shape.columns:
        if col.name == LSN_COLUMN:
            continue
        q = '"' + col.name.replace('"', '""') + '"'
        kind = kind_of(col.type)
        if kind.name in _NATIVE_KINDS or (kind.name == "array" and kind.element is not None
                                          and kind.element.name in _ARRAY_ELEMENTS):
            exprs.append(q)
            readers.append(lambda r, i: (r[i], i + 1))
        elif kind.name == "json":
            exprs.append(f"hstore_to_json({q})::text" if isinstance(col.type, pg.HSTORE) else f"{q}::text")
            readers.append(lambda r, i: (r[i], i + 1))
        elif kind.name == "other" and kind.sql_type in _TEXT_TYPES:
            exprs.append(f"{q}::text")
            readers.append(lambda r, i: (r[i], i + 1))
        elif kind.name in ("date", "timestamp", "time"):
            # Python's date and time types stop at years 1..9999 and before 24:00; the applier keeps the others as
            # PostgreSQL's text (consumers/apply/values.py), and so does this.
            inside = {"date": f"{q} BETWEEN '0001-01-01' AND '9999-12-31'",
                      "timestamp": f"{q} BETWEEN '0001-01-01' AND '9999-12-31 23:59:59.999999'",
                      "time": f"{q}::text NOT LIKE '24:%'"}[kind.name]
            exprs += [f"CASE WHEN {inside} THEN {q} END", f"CASE WHEN NOT ({inside}) THEN {q}::text END"]
            readers.append(lambda r, i: (r[i] if r[i] is not None else r[i + 1], i + 2))
        elif kind.name == "interval":
            # Debezium's interval text (interval.handling.mode=string): every field, each signed.
            exprs += [f"extract({p} from {q})" for p in ("year", "month", "day", "hour", "minute", "second")]

            def interval(r: tuple, i: int) -> tuple[Any, int]:
                y, mo, d, h, mi, s = r[i:i + 6]
                if y is None:
                    return None, i + 6
                return f"P{int(y)}Y{int(mo)}M{int(d)}DT{int(h)}H{int(mi)}M{format(s, 'f')}S", i + 6
            readers.append(interval)
        else:
            raise ConfigError(
                f"resync: {shape.name} has no primary key, and its column {col.name} ({col.type}) is of a type whose "
                f"values `cdc resync` cannot copy from the source itself; rebuild the table with "
                f"`cdc replay {dest} --tables {shape.name}`")
    names = [c.name for c in shape.columns if c.name != LSN_COLUMN]

    def build(row: tuple) -> dict[str, Any]:
        out, i = {}, 0
        for name, read in zip(names, readers):
            out[name], i = read(row, i)
        out[LSN_COLUMN] = SNAPSHOT_LSN
        return out

    return _KeylessValues(exprs, build)


def _connector_running(pipeline: Pipeline) -> None:
    """Refuse before locking anything when Debezium cannot carry the source's changes to the destination."""
    try:
        with ConnectClient(pipeline.kafka.connect_url) as connect:
            status = connect.status(pipeline.connector_name)
    except Exception as exc:  # noqa: BLE001 - an unreachable Connect is itself the answer
        raise CdcError(f"resync: Kafka Connect does not answer ({exc}); nothing was changed") from None
    if status is None:
        raise CdcError(f"resync: the connector {pipeline.connector_name} does not exist (`cdc connectors apply`); "
                       "nothing was changed")
    failed = [t for t in status.tasks if t.get("state") != "RUNNING"]
    if status.state != "RUNNING" or failed or not status.tasks:
        raise CdcError(f"resync: the connector {pipeline.connector_name} is not running (`cdc connectors status`); "
                       "nothing was changed")


def _applied_through_now(pipeline: Pipeline, dst_engine: Any, dialect: Any, destination: str, seconds: float,
                         echo: Callable[[str], None]) -> None:
    """Commit a watermark transaction at the source and return once the destination has applied it (so every
    source transaction committed before it); a CdcError naming the step that did not happen otherwise."""
    from confluent_kafka import TopicPartition

    from schemas.codec import AvroDecoder, RegistryClient

    topic = pipeline.transaction_topic
    deadline = time.monotonic() + seconds
    consumer = kafka_clients.consumer(pipeline.kafka, {
        "log_level": 3, "group.id": f"cdc-resync-watermark-{pipeline.name}", "enable.auto.commit": False,
        "enable.partition.eof": False})
    try:
        _, end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
            xid = insert_watermark(conn, pipeline.source.signal_table)
        consumer.assign([TopicPartition(topic, 0, end)])
        decoder = AvroDecoder(RegistryClient(pipeline.kafka.schema_registry_url))
        marker: int | None = None
        while marker is None:
            if time.monotonic() > deadline:
                raise CdcError(f"Debezium did not pass the watermark transaction {xid} within {seconds:.0f} s "
                               f"(nothing in {topic}): is the connector running? (`cdc connectors status`)")
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            value = decoder.decode(msg.value())
            if isinstance(value, dict) and value.get("status") == "END" \
                    and str(value.get("id", "")).split(":", 1)[0] == xid:
                marker = msg.offset()
    finally:
        consumer.close()
    applied = 0
    while True:
        with verify.connect(dst_engine) as dst:
            applied = dialect.load_offsets(dst, pipeline.name).get((topic, 0), 0)
        if applied > marker:
            return
        if time.monotonic() > deadline:
            raise CdcError(f"the destination {destination} has not applied the source's changes up to now within "
                           f"{seconds:.0f} s ({topic} applied up to offset {applied}, the watermark is at {marker}): "
                           + (f"its applier stopped: {stopped}" if (stopped := _stopped(dst_engine, dialect, pipeline))
                              else f"is `cdc run {destination}` running, and keeping up?"))
        time.sleep(0.5)  # short looks: a DuckDB file is the applier's only while nobody else has it open


def _stopped(engine: Any, dialect: Any, pipeline: Pipeline) -> str | None:
    """Why the destination's applier says it stopped (what `cdc lag` shows), if it says so."""
    from sqlalchemy import select

    try:
        with verify.connect(engine) as dst:
            row = dst.execute(select(dialect.status.c.error).where(
                dialect.status.c.pipeline == pipeline.name)).first()
    except Exception:  # noqa: BLE001 - no status table: the applier never recorded a stop
        return None
    return str(row[0]).splitlines()[0] if row is not None and row[0] else None


@dataclass
class _Delta:
    """What makes a keyless destination table equal its source: rows (as shown) with copies to add or remove."""

    insert: list[tuple[list[Any], str, int]] = field(default_factory=list)  # (row, source handle, copies)
    delete: list[tuple[list[Any], str, int]] = field(default_factory=list)  # (row, destination handle, copies)
    source_rows: int = 0
    destination_rows: int = 0

    def __bool__(self) -> bool:
        return bool(self.insert or self.delete)


def _keyless_delta(src: Any, dst: Any) -> _Delta:
    """Compare both sides as multisets of rows (bucket aggregates in each database, then the rows of the differing
    buckets), the way `cdc verify` does; rows with equal normal forms (compare.py) are the same row."""
    (n_s, _, _), (n_d, _, _) = src.count(), dst.count()
    bucketing = verify.Bucketing(digits=verify._digits(max(n_s, n_d)))
    chosen = None
    if max(n_s, n_d) > verify.FETCH_ALL_BELOW:
        a, b = src.buckets(bucketing), dst.buckets(bucketing)
        chosen = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    s_rows, d_rows = src.rows(bucketing, chosen), dst.rows(bucketing, chosen)
    kinds = src.kinds
    sides: dict[tuple, tuple[list[tuple], list[tuple]]] = {}
    for n, rows in ((0, s_rows), (1, d_rows)):
        for r in rows:
            sides.setdefault(normal_row(kinds, r[2:]), ([], []))[n].append(r)
    delta = _Delta(source_rows=n_s, destination_rows=n_d)
    for s_list, d_list in sides.values():
        surplus = len(d_list) - len(s_list)
        if surplus < 0:
            delta.insert.append((_shown_row(kinds, s_list[0][2:]), s_list[0][0], -surplus))
        elif surplus > 0:
            # Copies may hash differently where an engine spells a value otherwise: take them handle by handle.
            for handle, copies in Counter(r[0] for r in d_list).items():
                take = min(copies, surplus)
                if take:
                    row = next(r for r in d_list if r[0] == handle)
                    delta.delete.append((_shown_row(kinds, row[2:]), handle, take))
                    surplus -= take
    return delta


def _shown_row(kinds: list[Any], values: tuple) -> list[Any]:
    return [jsonable(v.rstrip(" ") if isinstance(v, str) and k.name == "char" else v) for k, v in zip(kinds, values)]


def sync_keyless(pipeline: Pipeline, table: str, *, destination: str | None = None, requested_by: str | None = None,
                 wait: float = 120.0, echo: Callable[[str], None] = lambda line: None) -> SyncRequest:
    """Bring a table without a primary key at one destination back to the source's rows (see the section's
    comment): under a short lock of the source table, once the destination has applied everything before it,
    delete the destination's surplus copies and insert the missing ones. The request and, per differing row, what
    was done are recorded in the history like any re-sync."""
    table = resolve_table(table, pipeline.source.tables)
    dest = destination or next((n for n, d in pipeline.destinations.items() if d.kind == "replica"), None)
    if dest is None or dest not in pipeline.destinations:
        raise ConfigError(f"destinations: no destination {destination or ''!r} to re-sync")
    shape = reflect_tables(pipeline.source.sqlalchemy_url, [table])[table]
    if shape.primary_key:
        raise ConfigError(f"resync: {table} has a primary key: name the rows with --ids")
    values = _keyless_values(shape, dest)
    _connector_running(pipeline)
    who = requested_by or getpass.getuser()
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        _ensure_history(conn, pipeline)
        request_id, requested_at = conn.execute(
            sql.SQL("insert into {} (pipeline, destination, requested_by, table_name, keys, state) "
                    "values (%s, %s, %s, %s, '[]', 'in progress') returning id, requested_at").format(
                _history_table(pipeline)), (pipeline.name, dest, who, table)).fetchone()
    request = SyncRequest(request_id, requested_at, who, table, [], "in progress", destination=dest)
    src_engine = verify.source_engine(pipeline)
    dst_engine = verify.destination_engine(pipeline, dest, write=True)
    backend = verify.backend_of(pipeline, dest)
    dialect = dialect_for(dst_engine, pipeline.destinations[dest].kind)
    target = dialect.table(shape)
    dst_sql = verify.table_sql(backend, target)
    failure: str | None = "interrupted"
    try:
        with src_engine.connect() as src:
            # First without the lock: a destination whose applier is not running (or far behind) is found, or
            # caught up, before any writer has to wait.
            _applied_through_now(pipeline, dst_engine, dialect, dest, wait, echo)
            verify.SOURCE.utc_session(src)
            src.exec_driver_sql(f"SET LOCAL lock_timeout = '{KEYLESS_LOCK_WAIT_S}s'")
            started = time.monotonic()
            try:
                src.exec_driver_sql(f"LOCK TABLE {_source_table(shape)} IN SHARE MODE")
            except Exception as exc:  # noqa: BLE001 - a lock not granted is the answer, said plainly
                if "lock timeout" in str(exc):
                    raise CdcError(f"resync: could not lock {table} against writers within {KEYLESS_LOCK_WAIT_S} s "
                                   "(a long transaction writes it); nothing was changed, try again") from None
                # e.g. no UPDATE, DELETE or TRUNCATE privilege, which LOCK ... IN SHARE MODE needs
                raise CdcError(f"resync: could not lock {table} against writers: "
                               f"{first_line(exc)}; nothing was changed") from None
            echo(f"resync {request_id}: {table} locked against writers at the source; waiting for {dest} to apply "
                 "everything committed before")
            _applied_through_now(pipeline, dst_engine, dialect, dest, min(wait, KEYLESS_HOLD_S), echo)
            with verify.connect(dst_engine) as dst:
                backend.utc_session(dst)
                stored = backend.catalog_types(dst, target.schema, target.name)
                if not stored:
                    raise CdcError(f"resync: the destination {dest} has no table {target.fullname} yet (`cdc run` "
                                   "creates it when it applies the table's first changes)")
                s_side = verify._Side(src, verify.SOURCE, _source_table(shape), shape, {}, stored)
                d_side = verify._Side(dst, backend, dst_sql, shape, stored)
                delta = _keyless_delta(s_side, d_side)
                if delta:
                    _apply_delta(src, dst, dialect, shape, s_side, d_side, values, delta,
                                 verify._history_sql(backend, target)[0] if dialect.keeps_history else None)
                    dst.commit()
                after = _keyless_delta(s_side, d_side)
                dst.rollback()
            src.rollback()  # the lock goes: writers continue
            echo(f"resync {request_id}: {table} unlocked after {time.monotonic() - started:.1f} s")
        for row, _, n in delta.insert:
            request.keys.append(row)
            echo(f"resync {request_id}: {table}: inserted {n} missing cop{'y' if n == 1 else 'ies'} of {row}")
        for row, _, n in delta.delete:
            request.keys.append(row)
            echo(f"resync {request_id}: {table}: deleted {n} surplus cop{'y' if n == 1 else 'ies'} of {row}")
        still = [r for r, _, _ in after.insert + after.delete]
        request.results = [KeyResult(r, r not in still) for r in request.keys]
        request.results += [KeyResult(r, False) for r in still if r not in request.keys]
        for r in request.results:
            if not r.ok:
                r.reason = ("still differs after the fix: the row as written reads back unlike the source's (a type "
                            "this copy does not convert exactly?)")
        if not request.keys and not after:
            echo(f"resync {request_id}: {table} at {dest} already equals the source ({delta.source_rows} rows)")
        failure = None
    except Exception as exc:
        failure = first_line(exc)
        if isinstance(exc, CdcError):
            raise
        # A database error (the destination refused a value, a connection dropped): the destination transaction
        # rolled back, nothing half-done; said as this table's failure so that `--fix` goes on with the others.
        raise CdcError(f"resync: {table} at {dest}: {type(exc).__name__}: {failure}") from exc
    finally:
        src_engine.dispose()
        dst_engine.dispose()
        if failure is not None:
            request.results.append(KeyResult([], False, failure))
        request.state = "complete" if failure is None and all(r.ok for r in request.results) else "failed"
        request.completed_at = datetime.now(UTC)
        with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
            conn.execute(sql.SQL("update {} set state = %s, keys = %s, results = %s, completed_at = %s "
                                 "where id = %s").format(_history_table(pipeline)),
                         (request.state, json.dumps(request.keys, default=str),
                          json.dumps([{"key": r.key, "ok": r.ok, "reason": r.reason} for r in request.results],
                                     default=str), request.completed_at, request.id))
    return request


_FIXING_LSN = -2  # marks the copies inserted by this transaction until their history rows are written


def _apply_delta(src: Any, dst: Any, dialect: Any, shape: TableShape, s_side: Any, d_side: Any,
                 values: _KeylessValues, delta: _Delta, history: str | None = None) -> None:
    """Delete the surplus copies and insert the missing ones, in the destination connection's transaction. An
    analytics destination's `history` (quoted) gets a delete for each copy deleted, at the source's current position
    (one apart each: copies are distinct changes), and a snapshot read (`r`, no position) for each copy inserted, so
    that it still tells how the table came to hold what it holds."""
    from consumers.apply.plan import KeylessChange

    d_md5 = d_side.canon.md5(d_side.row_text)
    columns = ", ".join(d_side.backend.quote(c) for c in d_side.columns)
    names = f"{columns}, {', '.join(HISTORY_COLUMNS)}"
    position = int(verify.raw_query(src, "SELECT pg_current_wal_lsn() - '0/0'")[0][0]) if history else 0
    cursor = dst.connection.driver_connection.cursor()
    try:
        for _, handle, copies in delta.delete:
            where = f"{d_md5} = {d_side.canon.literal(handle)}"
            if history:
                cursor.execute(f"INSERT INTO {history} ({names}) SELECT {columns}, 'd', {position} + row_number() "
                               f"OVER (), 'cdc resync', CURRENT_TIMESTAMP FROM {d_side.table} WHERE {where} "
                               f"LIMIT {copies}")
                position += copies
            if dialect.row_id is not None:  # one of equal rows, by the engine's row id (PostgreSQL ctid, DuckDB rowid)
                statement = (f"DELETE FROM {d_side.table} WHERE {dialect.row_id} IN (SELECT {dialect.row_id} FROM "
                             f"{d_side.table} WHERE {where} LIMIT {copies})")
            else:  # MariaDB: DELETE takes a LIMIT
                statement = f"DELETE FROM {d_side.table} WHERE {where} LIMIT {copies}"
            cursor.execute(statement)
            done = cursor.rowcount
            if done is None or done < 0:  # DuckDB answers a DELETE with a row holding the count
                done = cursor.fetchone()[0]
            if done != copies:
                raise CdcError(f"resync: deleting {copies} surplus copies of a row of {shape.name} deleted "
                               f"{done}: the destination changed under the fix (is another writer at work?)")
    finally:
        cursor.close()
    if not delta.insert:
        return
    s_md5 = s_side.canon.md5(s_side.row_text)
    handles = ", ".join(s_side.canon.literal(h) for _, h, _ in delta.insert)
    rows = verify.raw_query(src, f"SELECT {s_md5}, {', '.join(values.exprs)} FROM {s_side.table} "
                                 f"WHERE {s_md5} IN ({handles})")
    by_handle = {r[0]: values.build(r[1:]) for r in rows}
    changes = []
    for row, handle, copies in delta.insert:
        if handle not in by_handle:
            raise CdcError(f"resync: the source row {row} of {shape.name} is gone although the table is locked")
        changes += [KeylessChange("insert", None, {**by_handle[handle], LSN_COLUMN: _FIXING_LSN if history
                                                   else SNAPSHOT_LSN}) for _ in range(copies)]
    dialect.apply_keyless(dst, shape, changes)
    if history:
        lsn = d_side.backend.quote(LSN_COLUMN)
        verify.raw_query(dst, f"INSERT INTO {history} ({names}) SELECT {columns}, 'r', {SNAPSHOT_LSN}, 'cdc resync', "
                              f"CURRENT_TIMESTAMP FROM {d_side.table} WHERE {lsn} = {_FIXING_LSN}", fetch=False)
        verify.raw_query(dst, f"UPDATE {d_side.table} SET {lsn} = {SNAPSHOT_LSN} WHERE {lsn} = {_FIXING_LSN}",
                         fetch=False)
