"""DuckDB destination (the analytics replica): current-state tables plus a change history per table, via Arrow.

Each replicated table `t` gets a history table `t__history` with the same columns and `_cdc_op` (c, u, d, r),
`_cdc_lsn`, `_cdc_tx_id` and `_cdc_commit_ts` (source commit time, UTC). Every change is appended there (for a
delete, the row as it was), so the value of row X as of time T is its newest history row committed at or before
T, unless that row is a delete:

    select * from "public.person__history" where id = 42 and _cdc_commit_ts <= TIMESTAMPTZ '2026-01-01 12:00:00+00'
    order by _cdc_commit_ts desc, _cdc_lsn desc limit 1;

Analytics tables have no foreign keys: nobody writes them but the applier, and DuckDB refuses updates of rows that
foreign keys reference. Rows arrive as Arrow tables registered with DuckDB, then one INSERT ... SELECT per table.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pyarrow as pa
from sqlalchemy import BigInteger, Column, DateTime, ForeignKeyConstraint, String, Table, event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.types import JSON, LargeBinary, Text, TypeEngine

from cdc.source_tables import LSN_COLUMN, ColumnShape, TableShape
from consumers.apply import columnar
from consumers.apply.dialects import types
from consumers.apply.dialects.base import (
    HISTORY_COLUMNS,
    HISTORY_SUFFIX,
    Dialect,
    SchemaChangeError,
    distinct_changes,
    history_rows,
    new_changes_sql,
    without_fillers,
)
from consumers.apply.dialects.canon import DuckDBCanon
from consumers.apply.events import ChangeEvent
from consumers.apply.shapes import SNAPSHOT_LSN

T = TypeVar("T")

# DuckDB's memory limit on an applier's connections (DuckDBDialect.limit_memory), in MB. DuckDB's default is 80 % of
# the machine's memory, and within it DuckDB keeps what it read or wrote (the tables' blocks, rows not checkpointed
# yet) as a cache until the file is closed: the limit is where the cache stops. Under it DuckDB evicts what it can
# read back or spills to `<file>.tmp`; what must stay in memory (a primary key's ART index, about 8 bytes a key once
# loaded) is why the limit is raised when a batch needs more (memory_exhausted) rather than fixed. Whole appliers
# (`cdc run lake`, 1,000,000 changes, twice each; 2026-12-01): a backlog of transactions of 1,000 rows peaked at
# 386-389 MB with 64 MB and 357-363 MB with 32 MB, in 6.4-6.5 s and 7.3-7.4 s; one transaction of 1,000,000 rows
# at 331-334 and 305-311 MB, in 6.4-7.0 and 7.1-7.5 s. Below 32 MB nothing more was saved (DuckDB's own
# allocations, outside the limit, are the rest).
MEMORY_LIMIT_MB = 32
# How far the limit is raised at most: DuckDB's own default, 80 % of the machine's memory.
MEMORY_LIMIT_CAP_MB = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8) // 2**20


def when_free(open_file: Callable[[], T], patience_s: float, *, stop: Callable[[], bool] = lambda: False) -> T:
    """`open_file()`, tried again while another process holds the DuckDB file (DuckDB lets one process write a
    file, or several read it; each holds it only for a while), for up to `patience_s` seconds or until `stop()`."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return open_file()
        except Exception as exc:  # noqa: BLE001 - the driver's and SQLAlchemy's wrappers both say it in the message
            if "Could not set lock" not in str(exc) or time.monotonic() > deadline or stop():
                raise
            time.sleep(0.05)


class DuckDBDialect(Dialect):
    name = "duckdb"
    supports_deferred_constraints = True  # no foreign keys at all: order never matters
    keeps_history = True
    reflects_foreign_keys = False
    columnar = True
    row_id = "rowid"  # tells duplicate rows of a table without a key apart (Dialect.apply_keyless)
    batch_events = 50_000  # writes open and close the file (readers get it in between): fewer, larger ones
    memory_limit_mb: int | None = None  # set by limit_memory: the applier's connections only
    holds_file = True  # one process writes the file, or several read it
    backups = "file"  # a replay keeps a copy of the whole file (consumers.ops.backups.FileBackups)
    read_only_access = "file"  # `cdc query` opens the file read-only, with DuckDB's own walls up
    mirrors_foreign_keys = False

    @classmethod
    def reader_engine(cls, url: Any, *, write: bool = False, **pooling: Any) -> Any:
        # Read-only unless writing, and never kept open: DuckDB lets one process write (the applier) or several read.
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        return create_engine(url, poolclass=NullPool, connect_args={} if write else {"read_only": True})

    @classmethod
    def connect_reading(cls, engine: Any, patience_s: float) -> Connection:
        return when_free(engine.connect, patience_s)  # the applier holds the file while it writes a batch

    @classmethod
    def catalog_types(cls, conn: Connection, schema: str | None, table: str) -> dict[str, str]:
        # One flat namespace in the file: by name only.
        rows = conn.exec_driver_sql("SELECT column_name, data_type FROM information_schema.columns "
                                    "WHERE table_name = ?", (table,))
        return {r[0]: str(r[1]).lower() for r in rows}

    @classmethod
    def canon(cls) -> DuckDBCanon:
        return DuckDBCanon()

    def limit_memory(self, mb: int | None = None) -> None:
        """Hold DuckDB to `mb` of memory on every connection this dialect's engine opens from now on (the applier's:
        its memory must not grow with the backlog nor with a transaction; `cdc query` and the other readers open
        their own engines). Raised by memory_exhausted when a batch needs more."""
        if self.memory_limit_mb is None:
            event.listen(self.engine, "connect", self._set_memory_limit)
        self.memory_limit_mb = MEMORY_LIMIT_MB if mb is None else mb

    def _set_memory_limit(self, dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"SET memory_limit = '{int(self.memory_limit_mb)}MB'")

    def memory_exhausted(self, exc: BaseException) -> str | None:
        """When `exc` is DuckDB out of the memory limit set by limit_memory: the limit doubled for the next
        connections (up to DuckDB's own default), and the line that says so; None otherwise (then `exc` is the
        error to report). The caller then applies the batch again on a new connection: the failed one rolled back
        (a commit that ran out of memory invalidates the database instance, which goes with its connection)."""
        import duckdb

        cause = getattr(exc, "orig", None) or exc
        if self.memory_limit_mb is None or not isinstance(cause, duckdb.Error):
            return None
        # A statement that cannot get memory raises OutOfMemoryException; a commit that cannot, an error naming the
        # block it could not allocate.
        if not isinstance(cause, duckdb.OutOfMemoryException) and "could not allocate block" not in str(cause):
            return None
        if self.memory_limit_mb >= MEMORY_LIMIT_CAP_MB:
            return None
        before, self.memory_limit_mb = self.memory_limit_mb, min(self.memory_limit_mb * 2, MEMORY_LIMIT_CAP_MB)
        return (f"DuckDB needed more than its memory limit of {before} MB for a batch (what must stay in memory, "
                f"such as primary-key indexes, grew): limit raised to {self.memory_limit_mb} MB, the batch is "
                "applied again")

    def destination_name(self, shape: TableShape) -> tuple[str | None, str]:
        # One flat namespace in the file: "public.person" is the table's name (quoted), as analysts know it.
        return None, shape.name

    def adapt_type(self, type_: TypeEngine) -> TypeEngine:
        if isinstance(type_, (postgresql.JSON, postgresql.JSONB, JSON, postgresql.ARRAY)):
            return Text()  # JSON text, as the applier carries it
        if isinstance(type_, (postgresql.BYTEA, LargeBinary)):
            return LargeBinary()
        if isinstance(type_, postgresql.ENUM):
            return Text()
        if isinstance(type_, postgresql.TIMESTAMP):
            return DateTime(timezone=type_.timezone)
        if isinstance(type_, postgresql.INTERVAL):
            return Text()
        return type_

    def map_type(self, source: types.SourceType, *, key: bool = False) -> TypeEngine:
        return types.RawType(duckdb_type(source))

    def column_converter(self, column: ColumnShape) -> Callable[[Any], Any] | None:
        return _duck_converter(column.source) if column.source is not None else None

    def foreign_key(self, columns, ref: Table, ref_columns) -> ForeignKeyConstraint | None:  # noqa: ANN001
        return None

    def add_column(self, conn: Connection, table: Table, column: Column) -> None:
        prep = _ALWAYS_QUOTED
        for name in (table.name, table.name + HISTORY_SUFFIX):
            conn.exec_driver_sql(f"ALTER TABLE {prep.quote(name)} ADD COLUMN {prep.quote(column.name)} "
                                 f"{column.type.compile(dialect=conn.dialect)}")

    def stored_types(self, conn: Connection, shape: TableShape) -> dict[str, str]:
        return {name: kind for name, kind in conn.exec_driver_sql(
            "select column_name, data_type from information_schema.columns where table_name = ?",
            (self.table(shape).name,))}

    def alter_column_type(self, conn: Connection, shape: TableShape, column: str) -> str:
        table = self.table(shape)
        spelled = table.c[column].type.compile(dialect=conn.dialect)
        prep = _ALWAYS_QUOTED
        for name in (table.name, table.name + HISTORY_SUFFIX):
            # DuckDB's own cast of each stored value; one the new type cannot hold fails the statement.
            conn.exec_driver_sql(f"ALTER TABLE {prep.quote(name)} ALTER COLUMN {prep.quote(column)} TYPE {spelled} "
                                 f"USING CAST({prep.quote(column)} AS {spelled})")
        return f"changed column {table.name}.{column} (and its history's) to {spelled}"

    def ensure_table(self, conn: Connection, shape: TableShape, shapes: dict[str, TableShape]) -> list[str]:
        # DuckDB's information schema, not SQLAlchemy reflection: the driver's reflection speaks PostgreSQL's
        # catalog, which DuckDB only partly has.
        table = self.table(shape)
        prep = _ALWAYS_QUOTED
        stored = {name: kind for name, kind in conn.exec_driver_sql(
            "select column_name, data_type from information_schema.columns where table_name = ?", (table.name,))}
        existing = set(stored)
        actions = []
        if not existing:
            table.create(conn)
            actions.append(f"created table {table.name}")
        else:
            for column in table.columns:
                if column.name not in existing:
                    self.add_column(conn, table, column)
                    actions.append(f"added column {table.name}.{column.name}")
                    self.added_columns.append((shape.name, column.name))
            for column in table.columns:
                wanted = column.type.compile(dialect=conn.dialect)
                if column.name in stored and "ENUM(" in wanted and stored[column.name] != wanted:
                    # The source's enum gained labels: DuckDB's ENUM is the column's type, changed in place.
                    for name in (table.name, table.name + HISTORY_SUFFIX):
                        conn.exec_driver_sql(f"ALTER TABLE {prep.quote(name)} ALTER COLUMN {prep.quote(column.name)} "
                                             f"TYPE {wanted}")
                    actions.append(f"changed column {table.name}.{column.name} to {wanted}")
            dropped = sorted(existing - {c.name for c in table.columns})
            if dropped:
                raise SchemaChangeError(f"{table.name}: the destination has column(s) {', '.join(dropped)} that the "
                                        f"source table {shape.name} no longer has")
        history = prep.quote(table.name + HISTORY_SUFFIX)
        conn.exec_driver_sql(
            f"CREATE TABLE IF NOT EXISTS {history} AS SELECT * EXCLUDE ({prep.quote(LSN_COLUMN)}), "
            f"''::VARCHAR AS _cdc_op, 0::BIGINT AS _cdc_lsn, ''::VARCHAR AS _cdc_tx_id, "
            f"NULL::TIMESTAMPTZ AS _cdc_commit_ts FROM {prep.quote(table.name)} WITH NO DATA")
        return actions

    # -- data -----------------------------------------------------------------------------------------------------
    def _native(self, shape: TableShape) -> frozenset[str]:
        """The columns whose values go to Arrow as lists and dicts (LIST and STRUCT columns), not as JSON text."""
        return frozenset(c.name for c in shape.columns if c.source is not None and (
            c.source.is_array or c.source.category == "point"
            or (c.source.category == "composite" and _struct_fields(c.source))))

    def _arrow(self, rows: list[dict[str, Any]], columns: list[str], native: frozenset[str] = frozenset()) -> pa.Table:
        arrays = {}
        for c in columns:
            values = [r.get(c) for r in rows] if c in native else [_plain(r.get(c)) for r in rows]
            try:
                arrays[c] = pa.array(values)
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                # Mixed kinds in one column: a temporal column holding 'infinity' (or a date outside Python's
                # range) as text among datetimes. As text, all of it: the INSERT's CAST reads every one back.
                arrays[c] = pa.array([None if v is None else str(v) for v in values], pa.string())
        return pa.table(arrays)

    def _register(self, conn: Connection, rows: list[dict[str, Any]], columns: list[str],
                  native: frozenset[str] = frozenset()) -> str:
        name = f"_cdc_stage_{uuid.uuid4().hex[:12]}"
        conn.connection.driver_connection.register(name, self._arrow(rows, columns, native))
        return name

    def _unregister(self, conn: Connection, name: str) -> None:
        _unregister(conn.connection.driver_connection, name)

    def upsert(self, conn: Connection, shape: TableShape, rows: list[dict[str, Any]], columns: list[str]) -> int:
        if not rows:
            return 0
        table = self.table(shape)
        prep = _ALWAYS_QUOTED
        cols = [*columns, LSN_COLUMN]
        stage = self._register(conn, self.prepared(shape, rows, columns), cols, self._native(shape))
        try:
            quoted = ", ".join(prep.quote(c) for c in cols)
            casts = ", ".join(f"CAST({prep.quote(c)} AS {table.c[c].type.compile(dialect=conn.dialect)}) AS "
                              f"{prep.quote(c)}" for c in cols)
            sets = ", ".join(f"{prep.quote(c)} = EXCLUDED.{prep.quote(c)}" for c in columns
                             if c not in shape.primary_key)
            lsn = prep.quote(LSN_COLUMN)
            sets = (sets + ", " if sets else "") + f"{lsn} = GREATEST({prep.quote(table.name)}.{lsn}, EXCLUDED.{lsn})"
            conn.exec_driver_sql(
                f"INSERT INTO {prep.quote(table.name)} ({quoted}) SELECT {casts} FROM {stage} "
                f"ON CONFLICT ({', '.join(prep.quote(c) for c in shape.primary_key)}) DO UPDATE SET {sets} "
                f"WHERE {prep.quote(table.name)}.{lsn} < EXCLUDED.{lsn} OR EXCLUDED.{lsn} = {SNAPSHOT_LSN}")
        finally:
            self._unregister(conn, stage)
        return len(rows)

    def delete(self, conn: Connection, shape: TableShape, keys: list[dict[str, Any]]) -> int:
        if not keys:
            return 0
        table = self.table(shape)
        prep = _ALWAYS_QUOTED
        cols = [*shape.primary_key, LSN_COLUMN]
        stage = self._register(conn, self.prepared(shape, keys, list(shape.primary_key)), cols, self._native(shape))
        try:
            match = " AND ".join(f"t.{prep.quote(c)} = s.{prep.quote(c)}" for c in shape.primary_key)
            lsn = prep.quote(LSN_COLUMN)
            conn.exec_driver_sql(f"DELETE FROM {prep.quote(table.name)} t USING {stage} s WHERE {match} "
                                 f"AND t.{lsn} < s.{lsn}")
        finally:
            self._unregister(conn, stage)
        return len(keys)

    def truncate(self, conn: Connection, shape: TableShape) -> None:
        conn.exec_driver_sql(f"DELETE FROM {conn.dialect.identifier_preparer.quote(self.table(shape).name)}")

    def append_history(self, conn: Connection, shape: TableShape, events: list[tuple[ChangeEvent, dict]]) -> None:
        """Every change of the batch, in order: the row after it (before it, for a delete). A change the history
        holds already (Debezium re-sent its transaction) is not stored again: one INSERT ... SELECT with an
        anti-join (base.new_changes_sql), and repeats inside the batch dropped first (base.distinct_changes)."""
        if not events:
            return
        columns = list(shape.column_names)
        records = distinct_changes(shape, history_rows(shape, events))
        rows = self.prepared(shape, records, columns)
        table = self.table(shape)
        prep = _ALWAYS_QUOTED
        all_columns = [*columns, *HISTORY_COLUMNS]
        stage = self._register(conn, rows, all_columns, self._native(shape))
        try:
            history = prep.quote(table.name + HISTORY_SUFFIX)
            casts = ", ".join(
                f"CAST({prep.quote(c)} AS {table.c[c].type.compile(dialect=conn.dialect)}) AS {prep.quote(c)}"
                for c in columns)
            lsns = [r["_cdc_lsn"] for r in records]
            fresh = new_changes_sql(shape, prep.quote, history, "s", lsn_range=(min(lsns), max(lsns)))
            names = ", ".join(prep.quote(c) for c in all_columns)
            conn.exec_driver_sql(f"INSERT INTO {history} ({names}) SELECT {names} FROM (SELECT {casts}, _cdc_op, "
                                 f"_cdc_lsn, _cdc_tx_id, _cdc_commit_ts, row_number() OVER () AS _cdc_seq "
                                 f"FROM {stage}) s WHERE {fresh} ORDER BY _cdc_seq")
        finally:
            self._unregister(conn, stage)

    def apply_columnar(self, conn: Connection, shape: TableShape, flat: Any) -> None:
        table = self.table(shape)
        prep = _ALWAYS_QUOTED
        types = {c: table.c[c].type.compile(dialect=conn.dialect) for c in shape.column_names}
        columnar.apply_duckdb(conn.connection.driver_connection, prep.quote, prep.quote(table.name),
                              prep.quote(table.name + HISTORY_SUFFIX), shape, without_fillers(shape, flat), types)

    def store_offsets(self, conn: Connection, pipeline: str, offsets: dict[tuple[str, int], int]) -> None:
        # One statement from Arrow: the driver runs an executemany row by row, about 50 ms a batch.
        if not offsets:
            return
        now = datetime.now(UTC)
        items = list(offsets.items())
        rows = pa.table({"pipeline": [pipeline] * len(items), "topic": [t for (t, _), _ in items],
                         "kafka_partition": [p for (_, p), _ in items], "next_offset": [o for _, o in items],
                         "updated_at": pa.array([now] * len(items), pa.timestamp("us", tz="UTC"))})
        raw = conn.connection.driver_connection
        name = f"_cdc_offsets_{uuid.uuid4().hex[:12]}"
        raw.register(name, rows)
        try:
            target = conn.dialect.identifier_preparer.format_table(self.offsets)
            raw.execute(f"INSERT INTO {target} SELECT * FROM {name} ON CONFLICT (pipeline, topic, kafka_partition) "
                        "DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = EXCLUDED.updated_at"
                        ).fetchall()
        finally:
            _unregister(raw, name)

    def record_applied(self, conn: Connection, pipeline: str, records: list[Any]) -> None:
        # One statement from Arrow, as store_offsets: the driver would run an executemany row by row.
        if not records:
            return
        now = datetime.now(UTC)
        rows = pa.table({
            "pipeline": pa.array([pipeline] * len(records), pa.string()),
            "xid": pa.array([r.xid for r in records], pa.string()),
            "source_table": pa.array([r.table for r in records], pa.string()),
            "first_lsn": pa.array([r.first_lsn for r in records], pa.int64()),
            "last_lsn": pa.array([r.last_lsn for r in records], pa.int64()),
            "end_offset": pa.array([r.end_offset for r in records], pa.int64()),
            "committed_at": pa.array([datetime.fromtimestamp(r.commit_ts_ms / 1000, tz=UTC)
                                      if r.commit_ts_ms else None for r in records], pa.timestamp("us", tz="UTC")),
            "applied_at": pa.array([now] * len(records), pa.timestamp("us", tz="UTC"))})
        raw = conn.connection.driver_connection
        name = f"_cdc_applied_{uuid.uuid4().hex[:12]}"
        raw.register(name, rows)
        try:
            target = conn.dialect.identifier_preparer.format_table(self.applied)
            raw.execute(f"INSERT INTO {target} SELECT * FROM {name} "
                        "ON CONFLICT (pipeline, xid, source_table) DO UPDATE "
                        "SET first_lsn = EXCLUDED.first_lsn, last_lsn = EXCLUDED.last_lsn, end_offset = "
                        "EXCLUDED.end_offset, committed_at = EXCLUDED.committed_at, applied_at = EXCLUDED.applied_at"
                        ).fetchall()
        finally:
            _unregister(raw, name)

    def upsert_offsets_statement(self) -> Any:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(self.offsets)  # DuckDB speaks PostgreSQL's ON CONFLICT
        return stmt.on_conflict_do_update(
            index_elements=[self.offsets.c.pipeline, self.offsets.c.topic, self.offsets.c.kafka_partition],
            set_={"next_offset": stmt.excluded.next_offset, "updated_at": stmt.excluded.updated_at},
        )


def _unregister(raw: Any, name: str) -> None:
    """Drop a registered Arrow view. In a transaction a failed statement aborted, DuckDB refuses this too: the
    statement's error is the one to report (an out-of-memory one raises the limit and the batch is applied again,
    `memory_exhausted`), and the view dies with the connection, which is closed with the transaction."""
    with contextlib.suppress(Exception):
        raw.unregister(name)


def _plain(value: Any) -> Any:
    """Values Arrow cannot type on its own: UUIDs as text; lists and dicts as JSON text (but not in the LIST and
    STRUCT columns of a shape read from the catalog: `DuckDBDialect._native`)."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class _AlwaysQuoted:
    """Identifiers quoted whatever they are: the driver's preparer knows PostgreSQL's reserved words, and DuckDB
    reserves more (a column named `by`)."""

    @staticmethod
    def quote(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'


_ALWAYS_QUOTED = _AlwaysQuoted()


# --- the mapping (docs/types.md, "DuckDB analytics replica") ---------------------------------------------------

_DUCK = {"int2": "SMALLINT", "int4": "INTEGER", "int8": "BIGINT", "float4": "REAL", "float8": "DOUBLE",
         "bool": "BOOLEAN", "bytea": "BLOB", "uuid": "UUID", "json": "JSON", "jsonb": "JSON", "hstore": "JSON",
         "interval": "INTERVAL", "date": "DATE", "time": "TIME", "timetz": "TIMETZ", "timestamp": "TIMESTAMP",
         "timestamptz": "TIMESTAMPTZ", "money": "DECIMAL(19,2)", "bit": "BIT",
         "point": "STRUCT(x DOUBLE, y DOUBLE)"}
# DuckDB's DECIMAL holds 38 digits at most.
MAX_DECIMAL_DIGITS = 38


def duckdb_type(source: types.SourceType) -> str:
    """The DuckDB column type of a source type; text types and what DuckDB has no type for are VARCHAR holding
    PostgreSQL's text of the value (ranges, tsvector, inet, xml, geometry other than point, composites...)."""
    kind = source.category
    if source.is_array:
        return duckdb_type(source.element) + "[]"  # type: ignore[arg-type]
    if kind == "enum":
        return "ENUM(" + ", ".join("'" + label.replace("'", "''") + "'" for label in source.labels) + ")"
    if kind == "composite" and _struct_fields(source):
        return "STRUCT(" + ", ".join(f"{_ALWAYS_QUOTED.quote(name)} {duckdb_type(t)}"
                                     for name, t in source.fields) + ")"
    if kind == "numeric":
        # numeric without a precision can hold any number of digits: kept exact, as its text.
        if source.precision is None:
            return "VARCHAR"
        precision, scale = source.precision, source.scale or 0
        if scale < 0:
            precision, scale = precision - scale, 0
        return f"DECIMAL({precision},{scale})" if precision <= MAX_DECIMAL_DIGITS else "VARCHAR"
    return _DUCK.get(kind, "VARCHAR")


# Field types whose PostgreSQL text DuckDB casts to the same value: a composite made only of these is a STRUCT.
_STRUCT_FIELDS = frozenset({"int2", "int4", "int8", "numeric", "float4", "float8", "bool", "text", "varchar", "char",
                            "citext", "date", "timestamp", "timestamptz", "uuid", "enum", "json", "jsonb"})


def _struct_fields(source: types.SourceType) -> bool:
    return bool(source.fields) and all(not t.is_array and t.category in _STRUCT_FIELDS for _, t in source.fields)


def _struct(source: types.SourceType) -> Callable[[Any], Any]:
    names = [name for name, _ in source.fields]
    # Debezium sends a composite as the bytes of PostgreSQL's text of it; DuckDB casts each field's text.
    return lambda v: {n: f for n, f in zip(names, types.composite_fields(types.as_text(v)))}


def _duck_converter(source: types.SourceType) -> Callable[[Any], Any] | None:
    """What the Arrow staging needs for a source type, from what consumers.apply.values gives; None: as it is."""
    if source.is_array:
        inner = _duck_element(source.element)  # type: ignore[arg-type]
        return lambda values: [None if v is None else inner(v) for v in values]
    kind = source.category
    if kind == "point":
        return lambda v: {"x": v["x"], "y": v["y"]}
    if kind == "composite" and _struct_fields(source):
        return _struct(source)
    if kind == "bit":
        return types.bits_text(source.length)
    if kind == "interval":
        return types.interval_words
    if kind == "numeric" and duckdb_type(source) == "VARCHAR":
        return types.numeric_text
    if kind in types.DEBEZIUM_UNKNOWN or kind == "range":
        return types.as_text
    return None


def _duck_element(source: types.SourceType) -> Callable[[Any], Any]:
    inner = _duck_converter(source)
    if inner is None:
        if source.domain:
            return types.as_text  # arrays of a domain: Debezium sends text bytes
        if source.category == "uuid":
            return str
        return lambda v: v
    return inner


__all__ = ["DuckDBDialect", "HISTORY_SUFFIX", "String", "BigInteger"]
