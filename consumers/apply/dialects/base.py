"""The shape every destination dialect has: schema management, bulk upsert and delete, and the offsets table.

A dialect works on a SQLAlchemy Connection inside a transaction the applier opened; it never commits. Rows are
dicts of column name to converted value, always holding the primary key and `_cdc_lsn`. Upserts and deletes are
conditional on `_cdc_lsn`: a change older than what the row holds never wins, so replays are harmless.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKeyConstraint,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    and_,
    inspect,
    literal_column,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateSchema
from sqlalchemy.sql.elements import quoted_name
from sqlalchemy.types import TypeEngine

from cdc.errors import CdcError, Terminal
from cdc.source_tables import LSN_COLUMN, ColumnShape, TableShape
from consumers.apply.dialects import bookkeeping
from consumers.apply.dialects.types import SourceType
from consumers.apply.events import ChangeEvent
from consumers.apply.shapes import SNAPSHOT_LSN
from consumers.apply.values import UNAVAILABLE

# The analytics replica's change history: table `t` gets `t__history` with t's columns and these.
HISTORY_SUFFIX = "__history"
HISTORY_COLUMNS = ("_cdc_op", "_cdc_lsn", "_cdc_tx_id", "_cdc_commit_ts")


class NoMatchingRow(CdcError, Terminal):
    """An update or delete of a table without a primary key found no row equal to its before image."""


def _abridged(row: dict[str, Any], limit: int = 300) -> str:
    text_ = ", ".join(f"{c}={v!r}" for c, v in row.items())
    return text_ if len(text_) <= limit else text_[:limit] + "..."


# The source types whose destination spelling `differing_types` compares (the others' spellings differ between a
# catalog and a compiled type, enums and composites above all).
COMPARED_CATEGORIES = frozenset({"int2", "int4", "int8", "numeric", "float4", "float8", "text", "varchar", "char"})


def comparable_type(spelled: str) -> str:
    """A column type's spelling as a catalog and SQLAlchemy both give it: `int(11)` and `INTEGER`, `DECIMAL(8, 2)` and
    `decimal(8,2)`, DuckDB's `FLOAT` and `REAL` alike."""
    spelled = re.sub(r"\s+", "", spelled.lower())
    spelled = re.sub(r"^(tinyint|smallint|mediumint|int|integer|bigint)\(\d+\)", r"\1", spelled)
    return {"integer": "int", "real": "float", "float4": "float"}.get(spelled, spelled)


class SchemaChangeError(CdcError, Terminal):
    """The source table changed in a way the applier does not follow on its own (anything but a new column)."""


def history_rows(shape: TableShape, events: list[tuple[ChangeEvent, dict]]) -> list[dict[str, Any]]:
    """History records of a batch's changes to one table, in order: the row after each change (before it, for a
    delete), with its op, LSN (snapshot reads get SNAPSHOT_LSN), transaction id and commit time (UTC)."""
    rows = []
    for event, row in events:
        # An unchanged TOASTed value Debezium did not send is unknown here: recorded as NULL, never as the sentinel.
        record = {c: None if (v := row.get(c)) is UNAVAILABLE else v for c in shape.column_names}
        record.update(_cdc_op=event.op, _cdc_lsn=event.lsn if event.lsn is not None else SNAPSHOT_LSN,
                      _cdc_tx_id=event.xid or "",
                      _cdc_commit_ts=datetime.fromtimestamp(event.commit_ts_ms / 1000, tz=UTC)
                      if event.commit_ts_ms else None)
        rows.append(record)
    return rows


def distinct_changes(shape: TableShape, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History records (history_rows) with each change once: Debezium delivers at least once, and a transaction
    re-sent after a crash can land in the batch of its original. A change is its key, `_cdc_lsn` and `_cdc_op`
    (and, for reads without a position, its read time), as `cdc verify` counts duplicates. A table without a key is
    left as it is: equal rows changed at one position (a COPY into it) are several changes, and its copies in one
    batch cannot be told from them."""
    if not shape.primary_key:
        return rows
    seen: set[Any] = set()
    out = []
    for row in rows:
        identity = (*(row[c] for c in shape.primary_key), row["_cdc_lsn"], row["_cdc_op"],
                    row["_cdc_commit_ts"] if row["_cdc_lsn"] == SNAPSHOT_LSN else None)
        try:
            fresh = identity not in seen
        except TypeError:  # an unhashable key value (an array): its text stands in for it
            identity = repr(identity)
            fresh = identity not in seen
        if fresh:
            seen.add(identity)
            out.append(row)
    return out


def new_changes_sql(shape: TableShape, quote: Callable[[str], str], history: str, stage: str,
                    text: Callable[[str], str] = lambda expression: expression,
                    lsn_range: tuple[int, int] | None = None) -> str:
    """SQL condition on the alias `stage` (a history record to store): the history table `history` does not hold
    that change yet (same key, `_cdc_lsn` and `_cdc_op`; for reads without a position, same read time), the
    anti-join that keeps histories exact under redelivery. A table without a key is matched on its whole row, its
    snapshot reads never (equal rows read at one position are several rows). `text` turns a column expression into
    one with equality (PostgreSQL's json has none). `lsn_range`, the batch's lowest and highest `_cdc_lsn`, as
    constants: DuckDB then skips the row groups of the history outside it by their statistics (a history is
    appended in about source order), instead of reading the whole history for every batch."""
    within = f" AND h._cdc_lsn BETWEEN {int(lsn_range[0])} AND {int(lsn_range[1])}" if lsn_range else ""
    if shape.primary_key:
        match = [f"h.{quote(c)} = {stage}.{quote(c)}" for c in shape.primary_key]
    else:
        match = [f"{text('h.' + quote(c))} IS NOT DISTINCT FROM {text(stage + '.' + quote(c))}"
                 for c in shape.column_names]
    exists = (f"EXISTS (SELECT 1 FROM {history} h WHERE h._cdc_lsn = {stage}._cdc_lsn "
              f"AND h._cdc_op = {stage}._cdc_op AND {' AND '.join(match)} AND ({stage}._cdc_lsn <> {SNAPSHOT_LSN} "
              f"OR h._cdc_commit_ts IS NOT DISTINCT FROM {stage}._cdc_commit_ts){within})")
    return f"NOT {exists}" if shape.primary_key else f"({stage}._cdc_op = 'r' OR NOT {exists})"


# Types whose text is never empty. A delete's before image (replica identity DEFAULT) holds only the key; Debezium fills
# a NOT NULL column's required field with "" there, which such a column cannot take (an enum, a uuid, JSON ...).
_NEVER_EMPTY = frozenset({"enum", "uuid", "json", "jsonb", "hstore", "xml", "inet", "cidr", "macaddr", "macaddr8",
                          "ltree", "range", "tsvector", "point", "interval", "timetz", "timestamptz"})


def without_fillers(shape: TableShape, flat: Any) -> Any:
    """The decoder's Arrow rows (consumers.apply.columnar.flat_images) with Debezium's "" fillers in deletes' NOT NULL
    columns of types that are never empty turned into NULL: they are no values, and would not cast."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from consumers.apply import columnar

    wanted = [c.name for c in shape.columns if not c.nullable and c.name not in shape.primary_key
              and c.source is not None and c.source.category in _NEVER_EMPTY and c.name in flat.column_names]
    if not wanted:
        return flat
    is_delete = pc.equal(flat.column(columnar.OP), "d")
    for name in wanted:
        column = flat.column(name)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            continue
        filler = pc.and_kleene(is_delete, pc.equal(column, ""))
        flat = flat.set_column(flat.schema.get_field_index(name), name,
                               pc.if_else(filler, pa.scalar(None, column.type), column))
    return flat


class Dialect(ABC):
    """One destination database kind. Subclasses live in their own module with this same shape."""

    name = "base"
    # Whether foreign keys can be checked at commit (PostgreSQL's DEFERRABLE); MariaDB checks each row at once.
    supports_deferred_constraints = False
    # Whether every change is also appended to a history table (the analytics replica).
    keeps_history = False
    # Whether SQLAlchemy can reflect the destination's foreign keys (the PostgreSQL-flavoured DuckDB driver cannot).
    reflects_foreign_keys = True
    # Whether `apply_columnar` can write a table's batch straight from the decoder's Arrow columns.
    columnar = False
    # Changes per destination transaction at most: memory grows with it, the share of each write's fixed cost falls.
    batch_events = 20_000
    # A statement that takes a lock held by the session until it ends, named by :key, without waiting; it returns
    # whether the lock was free (try_writer_lock). None where the destination admits one writer by itself (a DuckDB
    # file).
    writer_lock_sql: str | None = None

    # -- what the operations built on the applier need to know of a backend (class-level: no engine needed) ----
    # A destination that is one file (DuckDB): one process may write it, or several read it, so every reader opens
    # it read-only (`reader_engine`) and waits while the applier holds it (`connect_reading`).
    holds_file = False
    # How `cdc replay` keeps what it replaces (consumers.ops.backups): "schema" (a backup schema beside the tables),
    # "file" (a copy of the whole file); None: this destination is not replayed.
    backups: str | None = None
    # How `cdc query` reads the destination without being able to change it (consumers.ops.query): "role" (a
    # session of a read-only role), "file" (the file opened read-only, its engine's walls up); None: not queried.
    read_only_access: str | None = None
    # Whether the destination's tables carry the source's foreign keys (a replay's scope must then hold the
    # tables that reference the ones it empties).
    mirrors_foreign_keys = True

    @staticmethod
    def quote(name: str) -> str:
        """An identifier quoted for this backend's SQL, whatever it is (a reserved word, a quote inside)."""
        return '"' + name.replace('"', '""') + '"'

    @classmethod
    def reader_engine(cls, url: Any, *, write: bool = False, **pooling: Any) -> Engine:
        """An engine for reading the destination beside its applier (verify, `cdc lag`); `pooling`: create_engine's
        pool arguments (none kept open by default). `write`: it also writes (a resync)."""
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        return create_engine(url, **(pooling or {"poolclass": NullPool}))

    @classmethod
    def connect_reading(cls, engine: Engine, patience_s: float) -> Connection:
        """A connection of `reader_engine`, waiting up to `patience_s` where the applier may hold the destination."""
        return engine.connect()

    @classmethod
    def catalog_types(cls, conn: Connection, schema: str | None, table: str) -> dict[str, str]:
        """The table's columns and their types as information_schema names them, lower case; empty when there is no
        such table (verify reads the stored types to know how to compare a column)."""
        rows = conn.execute(text("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_schema = :s AND table_name = :t"), {"s": schema or "public", "t": table})
        return {r[0]: str(r[1]).lower() for r in rows}

    @classmethod
    def utc_session(cls, conn: Connection) -> None:  # noqa: B027 - a hook: DuckDB needs nothing
        """Set the session so that canonical texts of values (canon.py) are computed alike everywhere: UTC times,
        floats with all their digits."""
        return None

    @classmethod
    def begin_consistent_read(cls, conn: Connection) -> None:
        """Begin the connection's transaction on one consistent snapshot (repeatable read), in `utc_session`'s
        settings: verify reads a table twice and must see it unchanged between."""
        cls.utc_session(conn)

    @classmethod
    def canon(cls) -> Any:
        """The SQL of this backend's canonical text of a value (consumers.apply.dialects.canon), for verify."""
        raise NotImplementedError(f"{cls.name} destinations cannot be compared")

    # DuckDB bounds its memory on the applier's connections; the other backends manage their own.
    def limit_memory(self, mb: int | None = None) -> None:  # noqa: B027 - a hook: only DuckDB has a limit to set
        """Hold the destination to `mb` of memory on the connections this dialect's engine opens (DuckDB)."""

    def memory_exhausted(self, exc: BaseException) -> str | None:
        """When `exc` is the destination out of the memory `limit_memory` set, the limit raised and the line that
        says so (the batch is then applied again); None otherwise, as always where there is no limit."""
        return None

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metadata = MetaData()
        # The applier's own tables (offsets, status, applied transactions), declared once in bookkeeping.py.
        self.offsets, self.status, self.applied = bookkeeping.tables_for(self.metadata)
        self._tables: dict[str, Table] = {}
        # (source table, column) of each column ensure_table added to an existing table: the applier fills them.
        self.added_columns: list[tuple[str, str]] = []
        # Taking over existing tables the applier did not make (ensure_table, `_adopt`): None when the destination
        # does not allow it, "" when it does, else why it cannot be done now. `adopted`: the tables taken over.
        self.adopt: str | None = None
        self.adopted: list[str] = []
        self._value_converters: dict[str, tuple[TableShape, dict[str, Callable[[Any], Any]]]] = {}
        self._relocated: dict[str, tuple[str | None, str]] = {}

    def relocate(self, tables: dict[str, tuple[str | None, str]], offsets_schema: str) -> None:
        """Write these source tables to other (schema, name)s, and keep the offsets table in `offsets_schema`:
        how a shadow replay builds its copy beside the live tables without touching them or their offsets."""
        self._relocated = dict(tables)
        self._tables.clear()
        self.offsets = self.offsets.to_metadata(MetaData(), schema=offsets_schema)

    # -- naming -------------------------------------------------------------------------------------------------
    def destination_name(self, shape: TableShape) -> tuple[str | None, str]:
        """(schema, table) at the destination for a source table; the same names by default."""
        return shape.schema, shape.table

    def adapt_type(self, type_: TypeEngine) -> TypeEngine:
        """The destination column type for a source SQLAlchemy type (shapes built without the source's catalog)."""
        return type_

    def column_type(self, column: ColumnShape, *, key: bool = False) -> TypeEngine:
        """The destination column type of a source column: the dialect's mapping of its catalog type (docs/types.md),
        else `adapt_type` of its SQLAlchemy type."""
        if column.source is not None:
            return self.map_type(column.source, key=key)
        return self.adapt_type(column.type)

    def column_extras(self, column: ColumnShape) -> list[Any]:
        """More arguments of a destination Column (a PostgreSQL replica's generated columns)."""
        return []

    def map_type(self, source: SourceType, *, key: bool = False) -> TypeEngine:
        """The destination type of a catalog type; every dialect has its own mapping (docs/types.md)."""
        raise NotImplementedError

    def value_converters(self, shape: TableShape) -> dict[str, Callable[[Any], Any]]:
        """{column: function} turning a decoded value (apply/values.py) into what this destination's column takes,
        for the columns that need one; built once per table."""
        cached = self._value_converters.get(shape.name)
        if cached is None or cached[0] is not shape:  # a shape replaced (a column added): built again
            cached = self._value_converters[shape.name] = (shape, {
                c.name: f for c in shape.columns if (f := self.column_converter(c)) is not None})
        return cached[1]

    def column_converter(self, column: ColumnShape) -> Callable[[Any], Any] | None:
        return None

    def prepared(self, shape: TableShape, rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
        """`rows` with the values of `columns` converted for this destination (new dicts where anything changes)."""
        converters = self.value_converters(shape)
        wanted = [(c, converters[c]) for c in columns if c in converters]
        if not wanted:
            return rows
        out = []
        for row in rows:
            row = dict(row)
            for c, convert in wanted:
                value = row.get(c)
                if value is not None and value is not UNAVAILABLE:
                    row[c] = convert(value)
            out.append(row)
        return out

    # -- schema ---------------------------------------------------------------------------------------------------
    def try_writer_lock(self, conn: Connection, pipeline: str, destination: str) -> bool:
        """Take the lock that makes `conn`'s session the destination's only writer (ReplicaApplier.claim, a backup's
        restore) until the session ends; whether it was free. Always True where there is none to take."""
        if self.writer_lock_sql is None:
            return True
        key = f"cdc {pipeline} {destination}"
        if len(key) > 64:  # MariaDB's lock names: 64 characters at most
            key = "cdc " + hashlib.sha1(key.encode()).hexdigest()
        return bool(conn.execute(text(self.writer_lock_sql), {"key": key}).scalar())

    def ensure_offsets_table(self, conn: Connection) -> None:
        self.offsets.create(conn, checkfirst=True)
        # Beside the offsets: never relocated (a shadow replay's records are checked against the shadow's offsets).
        self.applied.create(conn, checkfirst=True)

    def table(self, shape: TableShape) -> Table:
        """The SQLAlchemy Table of a shape at the destination (with `_cdc_lsn`), built once."""
        table = self._tables.get(shape.name)
        if table is None:
            schema, name = self._relocated.get(shape.name) or self.destination_name(shape)
            # autoincrement=False: the source assigns every key; a SERIAL here would be a lie.
            # NOT NULL as at the source (key columns always): what the source refused, the replica refuses too.
            # Names quoted always: a driver's list of reserved words may miss some of its database's (DuckDB's `by`).
            columns = [Column(quoted_name(c.name, True), self.column_type(c, key=c.name in shape.primary_key),
                              *self.column_extras(c),
                              nullable=c.nullable and c.name not in shape.primary_key,
                              autoincrement=False)
                       for c in shape.columns]
            table = Table(name, self.metadata, *columns, Column(LSN_COLUMN, BigInteger, nullable=False),
                          PrimaryKeyConstraint(*shape.primary_key), schema=schema)
            self._tables[shape.name] = table
        return table

    def forget_table(self, name: str) -> None:
        """Drop the Table built for source table `name` (`table`), so that the next call builds it from a new
        shape under the same name (the source changed the table, consumers.apply.source_follow)."""
        stale = self._tables.pop(name, None)
        if stale is not None:
            self.metadata.remove(stale)

    def ensure_table(self, conn: Connection, shape: TableShape, shapes: dict[str, TableShape]) -> list[str]:
        """Create the table when absent (mirroring the source's foreign keys to tables that exist); add columns the
        source gained. Any other difference raises SchemaChangeError naming the table and the change."""
        table = self.table(shape)
        insp = inspect(conn)
        if not insp.has_table(table.name, schema=table.schema):
            if table.schema and table.schema not in insp.get_schema_names():
                conn.execute(CreateSchema(table.schema, if_not_exists=True))
            for fk in shape.foreign_keys:
                target = shapes.get(fk.referred_table)
                if target is None:
                    continue
                ref = self.table(target)
                if ref is not table and not insp.has_table(ref.name, schema=ref.schema):
                    continue  # created later: its own creation cannot point back, so this FK is skipped
                constraint = self.foreign_key(fk.columns, ref, fk.referred_columns)
                if constraint is not None:
                    table.append_constraint(constraint)
            table.create(conn)
            return [f"created table {table.fullname}"]
        existing = {c["name"]: c for c in insp.get_columns(table.name, schema=table.schema)}
        actions = []
        if LSN_COLUMN not in existing:
            actions.extend(self._adopt(conn, shape, table, existing))
        for column in table.columns:
            if column.name not in existing:
                self.add_column(conn, table, column)
                actions.append(f"added column {table.fullname}.{column.name}")
                self.added_columns.append((shape.name, column.name))
        source_columns = set(shape.column_names) | {LSN_COLUMN}
        dropped = sorted(set(existing) - source_columns)
        if dropped:
            raise SchemaChangeError(
                f"{table.fullname}: the destination has column(s) {', '.join(dropped)} that the source table "
                f"{shape.name} no longer has; dropping or renaming columns is not followed automatically")
        return actions

    def check_adoption(self, conn: Connection, shape: TableShape) -> None:
        """Raise SchemaChangeError where ensure_table would refuse to take an existing table over, changing nothing:
        called for every table before any is ensured (MariaDB's DDL commits at once)."""
        table = self.table(shape)
        insp = inspect(conn)
        if insp.has_table(table.name, schema=table.schema):
            existing = {c["name"]: c for c in insp.get_columns(table.name, schema=table.schema)}
            if LSN_COLUMN not in existing:
                self._adopt(conn, shape, table, existing)

    def _adopt(self, conn: Connection, shape: TableShape, table: Table, existing: dict[str, Any]) -> list[str]:
        """Take over a table the applier did not make (no `_cdc_lsn`), where the destination allows it (`adopt`,
        set from its `adopt_existing_tables`): its columns and primary key must be the source's; `_cdc_lsn` is added
        and the table is recorded in `adopted`, for the applier to empty (children first) so that the snapshot, read
        from the start of the topics, fills it: a snapshot has no deletes, and rows the source does not have would
        stay. Anything else raises SchemaChangeError, before the table is touched."""
        made_elsewhere = f"{table.fullname}: the destination table exists but has no {LSN_COLUMN} column: it was not " \
                         "made by this applier"
        if self.adopt is None:
            raise SchemaChangeError(f"{made_elsewhere}. Set `adopt_existing_tables: true` on the destination to take "
                                    "it over (its columns and primary key are checked against the source, and its "
                                    "rows replaced by the source's through the snapshot), or drop it")
        if self.adopt:  # a reason it cannot be done now
            raise SchemaChangeError(f"{made_elsewhere}, and adopt_existing_tables cannot take it over: {self.adopt}")
        differences = []
        missing = [c for c in shape.column_names if c not in existing]
        extra = [c for c in existing if c not in shape.column_names]
        if missing:
            differences.append(f"it lacks the source's column(s) {', '.join(missing)}")
        if extra:
            differences.append(f"it has column(s) {', '.join(extra)} that the source has not")
        key = inspect(conn).get_pk_constraint(table.name, schema=table.schema).get("constrained_columns") or []
        if list(key) != list(shape.primary_key):
            differences.append(f"its primary key is ({', '.join(key)}), the source's ({', '.join(shape.primary_key)})")
        if differences:
            raise SchemaChangeError(f"{made_elsewhere}, and adopt_existing_tables cannot take it over: "
                                    + "; ".join(differences))
        if shape.name not in self.adopted:
            self.adopted.append(shape.name)
        return [f"adopted table {table.fullname} (its rows are replaced by the source's through the snapshot)"]

    def foreign_key(self, columns: tuple[str, ...], ref: Table, ref_columns: tuple[str, ...]) -> ForeignKeyConstraint:
        return ForeignKeyConstraint(list(columns), [ref.c[c] for c in ref_columns])

    @abstractmethod
    def add_column(self, conn: Connection, table: Table, column: Column) -> None: ...

    def stored_types(self, conn: Connection, shape: TableShape) -> dict[str, str]:
        """The destination table's column types as its catalog spells them, for `differing_types`; empty where the
        dialect does not say (nothing is then compared)."""
        return {}

    def differing_types(self, conn: Connection, shape: TableShape) -> dict[str, str]:
        """The columns of plain numeric and text types whose type at the destination is not the one `shape` maps
        them to (the source changed it while no applier ran), each with the type stored."""
        stored = self.stored_types(conn, shape)
        if not stored:
            return {}
        table = self.table(shape)
        differing = {}
        for column in shape.columns:
            if column.source is None or column.source.category not in COMPARED_CATEGORIES or column.name not in stored:
                continue
            if comparable_type(stored[column.name]) != comparable_type(
                    table.c[column.name].type.compile(dialect=conn.dialect)):
                differing[column.name] = stored[column.name]
        return differing

    def alter_column_type(self, conn: Connection, shape: TableShape, column: str) -> str:
        """Give `column` the type this dialect maps `shape`'s (the source's, freshly reflected) to, converting the
        stored values with the destination's own cast, which fails rather than loses a value; what was done. The
        Table of the old shape must be forgotten first (self.table(shape) builds the new one)."""
        raise SchemaChangeError(f"{shape.name}.{column}: a {self.name} destination cannot change a column's type")

    # -- data -----------------------------------------------------------------------------------------------------
    def begin_batch(self, conn: Connection, *, snapshot: bool) -> None:  # noqa: B027 - a hook: most need nothing
        """Called first in every destination transaction."""

    def end_batch(self, conn: Connection) -> None:  # noqa: B027 - a hook: most need nothing
        """Called last in a batch's destination transaction, after its rows and before its offsets: what must hold
        at the commit is checked here (MariaDB's foreign keys, which its columnar path writes around)."""

    @abstractmethod
    def upsert(self, conn: Connection, shape: TableShape, rows: list[dict[str, Any]], columns: list[str]) -> int:
        """Insert or update `rows` (which hold at least `columns`, the primary key and `_cdc_lsn`); a row whose
        stored `_cdc_lsn` is not older than the change's is left alone. Only `columns` are written."""

    @abstractmethod
    def delete(self, conn: Connection, shape: TableShape, keys: list[dict[str, Any]]) -> int:
        """Delete rows by primary key, unless the stored `_cdc_lsn` is newer than the delete's."""

    @abstractmethod
    def truncate(self, conn: Connection, shape: TableShape) -> None: ...

    # -- tables without a primary key -----------------------------------------------------------------------------
    # What tells a row from its duplicates where there is no key: a column every row has (PostgreSQL's ctid, DuckDB's
    # rowid). None where UPDATE and DELETE take a LIMIT instead (MariaDB overrides `one_row`).
    row_id: str | None = None

    def one_row(self, statement: Any, table: Table, match: Callable[[Any], Any]) -> Any:
        """`statement`, an UPDATE or DELETE of `table`, restricted to ONE row that `match(t)` selects: duplicates
        are allowed in such a table, and a change of the source changed one of them."""
        inner = table.alias("_cdc_one")
        pick = (select(literal_column(f"_cdc_one.{self.row_id}")).select_from(inner).where(match(inner)).limit(1)
                .scalar_subquery())
        return statement.where(literal_column(self.row_id) == pick)

    def same_value(self, shape: TableShape, column: Any, value: Any) -> Any:
        """The condition that `column` (of a table without a key) holds `value`, NULL matching NULL."""
        return column.is_not_distinct_from(value)

    def apply_keyless(self, conn: Connection, shape: TableShape, changes: list[Any]) -> int:
        """Apply a table's changes without a primary key (plan.KeylessChange), one by one in source order:
        an insert adds a row; an update or a delete changes exactly one row equal to the change's before image.
        Such rows carry no position to compare, so a change is never skipped as older: what makes them apply once
        is the stored offsets, written in the same transaction (the applier's exactly-once), and the applier's record
        of applied transactions against Debezium's re-sent copies (`record_applied`). A before image that
        matches no row means the destination no longer equals the source: raised, never passed over."""
        table = self.table(shape)
        columns = list(shape.column_names)
        inserts: list[dict[str, Any]] = []
        written = 0

        def flush() -> int:
            if inserts:
                conn.execute(table.insert(), self.prepared(shape, inserts, columns))
                inserts.clear()
            return 0

        for change in changes:
            if change.op == "insert":
                inserts.append({c: change.after.get(c) for c in [*columns, LSN_COLUMN]})
                written += 1
                continue
            flush()
            before = self.prepared(shape, [change.before], columns)[0]
            known = [c for c in columns if before.get(c, UNAVAILABLE) is not UNAVAILABLE]

            def match(t: Any, before: dict[str, Any] = before, known: list[str] = known) -> Any:
                return and_(*(self.same_value(shape, t.c[c], before[c]) for c in known))

            if change.op == "delete":
                statement = self.one_row(table.delete(), table, match)
            else:
                after = self.prepared(shape, [change.after], columns)[0]
                statement = self.one_row(table.update(), table, match).values(
                    {c: v for c, v in after.items() if v is not UNAVAILABLE})
            if conn.execute(statement).rowcount == 0:
                raise NoMatchingRow(f"{shape.name} has no primary key, and no row of the destination equals the "
                                    f"before image of {'an' if change.op == 'update' else 'a'} {change.op} "
                                    f"({_abridged(change.before)}): the destination no longer equals the source")
            written += 1
        flush()
        return written

    def append_history(self, conn: Connection, shape: TableShape, events: list[tuple[ChangeEvent, dict]]) -> None:
        """Append every change of the batch to the table's history (dialects with `keeps_history` only)."""
        raise NotImplementedError(f"{self.name} destinations keep no history")

    def apply_columnar(self, conn: Connection, shape: TableShape, flat: Any) -> None:
        """Write one table's changes from Arrow (columnar.flat_images), dialects with `columnar` only."""
        raise NotImplementedError(f"{self.name} destinations have no columnar path")

    def grant_read_only(self, conn: Connection, role: str, password: str | None) -> list[str]:
        """Create or update the role the destination's users read with; returns what was done."""
        raise NotImplementedError(f"{self.name} destinations have no read-only role")

    # -- offsets --------------------------------------------------------------------------------------------------
    def load_offsets(self, conn: Connection, pipeline: str) -> dict[tuple[str, int], int]:
        rows = conn.execute(self.offsets.select().where(self.offsets.c.pipeline == pipeline))
        return {(r.topic, r.kafka_partition): r.next_offset for r in rows}

    def store_offsets(self, conn: Connection, pipeline: str, offsets: dict[tuple[str, int], int]) -> None:
        if not offsets:
            return
        now = datetime.now(UTC)
        rows = [{"pipeline": pipeline, "topic": t, "kafka_partition": p, "next_offset": o, "updated_at": now}
                for (t, p), o in offsets.items()]
        conn.execute(self.upsert_offsets_statement(), rows)

    @abstractmethod
    def upsert_offsets_statement(self) -> Any: ...

    # -- source transactions whose keyless changes were applied (shapes.APPLIED_TABLE) -----------------------------
    def load_applied(self, conn: Connection, pipeline: str, xids: list[str]) -> list[Any]:
        """The records of these source transactions: rows with xid, source_table, first_lsn, last_lsn, end_offset."""
        t = self.applied
        found: list[Any] = []
        for at in range(0, len(xids), 1000):  # bounded IN lists (a batch of one-row transactions holds thousands)
            found += conn.execute(select(t.c.xid, t.c.source_table, t.c.first_lsn, t.c.last_lsn, t.c.end_offset)
                                  .where(t.c.pipeline == pipeline, t.c.xid.in_(xids[at:at + 1000]))).all()
        return found

    def record_applied(self, conn: Connection, pipeline: str, records: list[Any]) -> None:
        """Record (consumers.apply.plan.AppliedRecord) the source transactions whose keyless changes this transaction
        applies, replacing older records of the same ones (a replay applies them again)."""
        if not records:
            return
        now = datetime.now(UTC)
        conn.execute(self.upsert_applied_statement(), [
            {"pipeline": pipeline, "xid": r.xid, "source_table": r.table, "first_lsn": r.first_lsn,
             "last_lsn": r.last_lsn, "end_offset": r.end_offset, "applied_at": now,
             "committed_at": datetime.fromtimestamp(r.commit_ts_ms / 1000, tz=UTC)
             if r.commit_ts_ms else None} for r in records])

    def upsert_applied_statement(self) -> Any:
        raise NotImplementedError(f"{self.name} destinations do not record applied transactions")

    def prune_applied(self, conn: Connection, pipeline: str, committed_before: datetime) -> int:
        """Forget the records of source transactions committed before `committed_before`; how many went."""
        t = self.applied
        result = conn.execute(t.delete().where(t.c.pipeline == pipeline, t.c.committed_at < committed_before))
        return max(result.rowcount or 0, 0)

    # -- the applier's status -------------------------------------------------------------------------------------
    def record_error(self, conn: Connection, pipeline: str, error: str | None) -> None:
        """Record why the pipeline's applier stopped here (None: it runs again), for `cdc lag`."""
        if error is None and not inspect(conn).has_table(self.status.name):
            return
        self.status.create(conn, checkfirst=True)
        conn.execute(self.status.delete().where(self.status.c.pipeline == pipeline))
        if error is not None:
            conn.execute(self.status.insert().values(pipeline=pipeline, error=error,
                                                     updated_at=datetime.now(UTC)))

    def reset_offsets(self, conn: Connection, pipeline: str, topics: list[str] | None = None) -> None:
        stmt = self.offsets.delete().where(self.offsets.c.pipeline == pipeline)
        if topics is not None:
            stmt = stmt.where(self.offsets.c.topic.in_(topics))
        conn.execute(stmt)
