"""PostgreSQL destination: COPY into a session-local staging table, then one upsert and one delete per table per batch.

`PostgresAnalyticsDialect` is the analytics replica on PostgreSQL: the same current-state tables without foreign
keys, plus a `<table>__history` table beside each (the layout and meaning of the DuckDB replica's), appended with
one COPY per table per batch, and a read-only role for the people who query it.
"""

from __future__ import annotations

import hashlib
import io
import operator
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
from psycopg import sql
from sqlalchemy import Column, Computed, ForeignKeyConstraint, Table, Text, cast, inspect, literal
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from cdc.errors import ConfigError
from cdc.source_tables import LSN_COLUMN, ColumnShape, TableShape
from consumers.apply import columnar
from consumers.apply.dialects import types as t
from consumers.apply.dialects.base import (
    HISTORY_COLUMNS,
    HISTORY_SUFFIX,
    Dialect,
    distinct_changes,
    history_rows,
    new_changes_sql,
    without_fillers,
)
from consumers.apply.dialects.canon import PostgresCanon
from consumers.apply.events import ChangeEvent
from consumers.apply.shapes import SNAPSHOT_LSN

# Rows of one table in one batch from which the columnar path's staging table is analyzed (apply_columnar).
LARGE_BATCH = 10_000
# PostgreSQL silently truncates longer identifiers, which could make two history tables one.
MAX_IDENTIFIER_BYTES = 63
# The comment on the read-only roles the applier creates: it alters only those, never a role someone else made.
READ_ONLY_ROLE_COMMENT = "read-only role of cdc analytics replicas, managed by cdc run"


class PostgresDialect(Dialect):
    name = "postgresql"
    supports_deferred_constraints = True
    columnar = True  # foreign keys are checked at commit (begin_batch): tables may be written in any order
    writer_lock_sql = "SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"
    row_id = "ctid"  # tells duplicate rows of a table without a key apart (Dialect.apply_keyless)
    # Whether a table is created with the source's CHECK constraints (TableShape.checks; docs/types.md).
    copies_checks = True
    backups = "schema"  # a replay keeps what it replaces in a backup schema (consumers.ops.backups.SchemaBackups)

    @classmethod
    def utc_session(cls, conn: Connection) -> None:
        conn.exec_driver_sql("SET TimeZone = 'UTC'")
        conn.exec_driver_sql("SET extra_float_digits = 1")

    @classmethod
    def begin_consistent_read(cls, conn: Connection) -> None:
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")
        conn.exec_driver_sql("SET LOCAL extra_float_digits = 1")

    @classmethod
    def canon(cls) -> PostgresCanon:
        return PostgresCanon()

    # -- types (docs/types.md, "PostgreSQL replica") -----------------------------------------------------------
    def map_type(self, source: t.SourceType, *, key: bool = False) -> Any:
        # The source's own type, spelled as its catalog spells it: a domain as its base type (the replica holds
        # what the source accepted; the domain's checks are the source's to enforce), enums and composite types
        # recreated under their names (ensure_types), extension types with their extension.
        return t.RawType(source.sql)

    def column_converter(self, column: ColumnShape) -> Callable[[Any], Any] | None:
        return _pg_converter(column.source) if column.source is not None else None

    def column_extras(self, column: ColumnShape) -> list[Any]:
        # A generated column is computed here too, by the source's expression: logical replication does not send
        # its values (PostgreSQL < 18), and the applier never writes it.
        if column.source is not None and column.source.generated and column.source.expression:
            return [Computed(column.source.expression, persisted=True)]
        return []

    def same_value(self, shape: TableShape, column: Any, value: Any) -> Any:
        # Types without an equality operator (json, xml, the geometric types, and what holds them) are compared as
        # PostgreSQL's text of the value, the bound value first read as the column's type.
        # The bound value is read as the column's type first: psycopg types a list of small ints as smallint[].
        source = shape.column(column.name).source
        if source is None:
            return column.is_not_distinct_from(value)
        typed = cast(literal(value), column.type)
        if not _without_equality(source):
            return column.is_not_distinct_from(typed)
        return cast(column, Text).is_not_distinct_from(cast(typed, Text))

    @staticmethod
    def _written(shape: TableShape, columns: list[str]) -> list[str]:
        generated = {c.name for c in shape.columns if c.source is not None and c.source.generated}
        return [c for c in columns if c not in generated] if generated else columns

    def ensure_types(self, conn: Connection, shape: TableShape) -> list[str]:
        """Create the extensions, enums and composite types the table's columns use, where absent; an enum that
        exists gains the labels the source added."""
        raw = conn.connection.driver_connection
        actions: list[str] = []
        for column in shape.columns:
            if column.source is not None:
                self._ensure_type(raw, column.source.leaf(), actions)
        return actions

    def _ensure_type(self, raw: Any, source: t.SourceType, actions: list[str]) -> None:
        for _, field_type in source.fields:
            self._ensure_type(raw, field_type.leaf(), actions)
        if source.category in t.EXTENSION_OF:
            extension = t.EXTENSION_OF[source.category]
            if raw.execute("select 1 from pg_extension where extname = %s", (extension,)).fetchone() is None:
                raw.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(source.schema)))
                raw.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}").format(
                    sql.Identifier(extension), sql.Identifier(source.schema)))
                actions.append(f"created extension {extension}")
            return
        if source.category not in ("enum", "composite"):
            return
        name = sql.Identifier(source.schema, source.name)
        found = raw.execute("select t.oid from pg_type t join pg_namespace n on n.oid = t.typnamespace "
                            "where n.nspname = %s and t.typname = %s", (source.schema, source.name)).fetchone()
        if found is None:
            raw.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(source.schema)))
            if source.category == "enum":
                raw.execute(sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
                    name, sql.SQL(", ").join(map(sql.Literal, source.labels))))
            else:
                raw.execute(sql.SQL("CREATE TYPE {} AS ({})").format(name, sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(f), sql.SQL(ft.sql)) for f, ft in source.fields)))
            actions.append(f"created type {source.sql}")
        elif source.category == "enum":
            have = {r[0] for r in raw.execute("select enumlabel from pg_enum where enumtypid = %s", (found[0],))}
            # Each new label in its place (BEFORE the next label it has in the source's order): an enum sorts and
            # compares by its labels' order, which must be the source's.
            for n, label in enumerate(source.labels):
                if label not in have:
                    later = next((x for x in source.labels[n + 1:] if x in have), None)
                    where = sql.SQL(" BEFORE {}").format(sql.Literal(later)) if later is not None else sql.SQL("")
                    raw.execute(sql.SQL("ALTER TYPE {} ADD VALUE IF NOT EXISTS {}{}").format(
                        name, sql.Literal(label), where))
                    have.add(label)
                    actions.append(f"added label {label!r} to type {source.sql}")

    def ensure_table(self, conn: Connection, shape: TableShape, shapes: dict[str, TableShape]) -> list[str]:
        table = self.table(shape)
        creating = self.copies_checks and shape.checks and not inspect(conn).has_table(table.name, schema=table.schema)
        actions = [*self.ensure_types(conn, shape), *super().ensure_table(conn, shape, shapes)]
        if creating:
            actions.extend(self._add_checks(conn, shape, table))
        return actions

    def _add_checks(self, conn: Connection, shape: TableShape, table: Table) -> list[str]:
        """The source's validated CHECK constraints on a table just created (in the same transaction, so it is
        created with them), under their names. One whose definition this database cannot take (a function or type
        that exists only at the source) is skipped, with an action saying so: the replica holds what the source
        accepted either way, the check only guards against writers other than the applier."""
        raw = conn.connection.driver_connection
        actions = []
        for name, definition in shape.checks:
            raw.execute("SAVEPOINT cdc_check")
            try:
                raw.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    _identifier(table), sql.Identifier(name), sql.SQL(definition)))
            except psycopg.Error as e:
                raw.execute("ROLLBACK TO SAVEPOINT cdc_check")
                reason = (e.diag.message_primary or str(e)).strip()
                actions.append(f"skipped check constraint {name} of {shape.name} ({definition}): {reason}")
                continue
            finally:
                raw.execute("RELEASE SAVEPOINT cdc_check")
            actions.append(f"added check constraint {name} to {table.fullname}")
        return actions

    def foreign_key(self, columns, ref: Table, ref_columns) -> ForeignKeyConstraint:
        # Deferrable, so that a destination transaction may order rows freely and still be checked at commit.
        return ForeignKeyConstraint(list(columns), [ref.c[c] for c in ref_columns], deferrable=True,
                                    initially="IMMEDIATE")

    def add_column(self, conn: Connection, table: Table, column: Column) -> None:
        prep = conn.dialect.identifier_preparer
        # A generated column added at the source is generated here too (the applier never writes it).
        generated = f" GENERATED ALWAYS AS ({column.computed.sqltext}) STORED" if column.computed is not None else ""
        conn.exec_driver_sql(f"ALTER TABLE {prep.format_table(table)} ADD COLUMN {prep.quote(column.name)} "
                             f"{column.type.compile(dialect=conn.dialect)}{generated}")

    def alter_column_type(self, conn: Connection, shape: TableShape, column: str) -> str:
        table = self.table(shape)
        spelled = table.c[column].type.compile(dialect=conn.dialect)
        for target in self._typed_tables(table):
            # USING: PostgreSQL's own cast of each stored value (int -> text has no implicit one); a value the new
            # type cannot hold fails the statement, and the batch with it, rather than change.
            conn.connection.driver_connection.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING {}::{}")
                                                      .format(target, sql.Identifier(column), sql.SQL(spelled),
                                                              sql.Identifier(column), sql.SQL(spelled)))
        # The session's staging tables were made with the old type (their names follow the columns only): gone,
        # made again on next use. In the transaction: a rollback brings them back with the old type they match.
        raw = conn.connection.driver_connection
        for (stage,) in raw.execute("select relname from pg_class where relnamespace = pg_my_temp_schema() "
                                    "and relname like '\\_cdc\\_stage\\_%'").fetchall():
            raw.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(stage)))
        return f"changed column {table.fullname}.{column} to {spelled}"

    def stored_types(self, conn: Connection, shape: TableShape) -> dict[str, str]:
        table = self.table(shape)
        return dict(conn.connection.driver_connection.execute(
            "select attname, format_type(atttypid, atttypmod) from pg_attribute where attrelid = %s::regclass "
            "and attnum > 0 and not attisdropped", (_identifier(table).as_string(conn.connection.driver_connection),))
            .fetchall())

    def _typed_tables(self, table: Table) -> list[sql.Identifier]:
        """The tables holding a destination table's columns with their types: itself (and its history)."""
        return [_identifier(table)]

    def begin_batch(self, conn: Connection, *, snapshot: bool) -> None:
        conn.exec_driver_sql("SET CONSTRAINTS ALL DEFERRED")

    # The staging tables live for the session (temporary, so invisible to others and never logged) and are
    # emptied after each use; their name follows the target's columns, so a new column gets a new one. `leading`
    # adds columns of the given types before the target's (the columnar path's change order, op and LSN).
    def _staging(self, conn: Connection, table: Table, columns: list[str], purpose: str,
                 leading: tuple[tuple[str, str], ...] = ()) -> sql.Composed:
        names = [n for n, _ in leading] + columns
        digest = hashlib.sha1(f"{table.fullname}|{purpose}|{'|'.join(names)}".encode()).hexdigest()[:16]
        stage = sql.Identifier(f"_cdc_stage_{digest}")
        extra = [sql.SQL("NULL::{} AS {}").format(sql.SQL(kind), sql.Identifier(name)) for name, kind in leading]
        raw = conn.connection.driver_connection
        raw.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} AS SELECT {} FROM {} WITH NO DATA").format(
            stage, sql.SQL(", ").join([*extra, *map(sql.Identifier, columns)]), _identifier(table)))
        return stage

    def _copy(self, conn: Connection, stage: sql.Composed, columns: list[str], rows: list[dict[str, Any]]) -> None:
        raw = conn.connection.driver_connection
        with raw.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(
                stage, sql.SQL(", ").join(map(sql.Identifier, columns)))) as copy:
            pick = operator.itemgetter(*columns)  # a tuple (columns always hold the key and _cdc_lsn), built in C
            for row in rows:
                copy.write_row(pick(row))

    def _upsert_from(self, conn: Connection, shape: TableShape, cols: list[str], source: sql.Composable) -> int:
        """INSERT the `cols` (with `_cdc_lsn`) of the relation `source`, updating a stored row only when the change
        is newer (or a snapshot read)."""
        lsn = sql.Identifier(LSN_COLUMN)
        updates = [c for c in cols if c not in shape.primary_key and c != LSN_COLUMN]
        table = self.table(shape)
        # PostgreSQL checks NOT NULL on the row proposed for insertion before it looks for a conflict: a NOT NULL
        # column left out (an unchanged TOASTed value Debezium did not send) is proposed with the value stored, so
        # the update goes through; a row that is not there yet still fails, loudly, as it should.
        # A CHECK constraint is checked on that proposed row too (NULL in a column left out could fail one that is not
        # NULL-tolerant, `CHECK (a IS NOT NULL OR b > 0)`): where the table has checks, every column left out is kept.
        checked = self.copies_checks and bool(shape.checks)
        kept = [c.name for c in table.columns
                if (checked or not c.nullable) and c.computed is None and c.name not in cols and c.name != LSN_COLUMN]
        names = sql.SQL(", ").join(map(sql.Identifier, [*cols, *kept]))
        picked = sql.SQL(", ").join([*(sql.SQL("s.{}").format(sql.Identifier(c)) for c in cols),
                                     *(sql.SQL("c.{}").format(sql.Identifier(c)) for c in kept)])
        stored = sql.SQL("")
        if kept:
            stored = sql.SQL(" LEFT JOIN {} AS c ON {}").format(_identifier(table), sql.SQL(" AND ").join(
                sql.SQL("c.{0} = s.{0}").format(sql.Identifier(c)) for c in shape.primary_key))
        return conn.connection.driver_connection.execute(sql.SQL(
            "INSERT INTO {target} AS t ({names}) SELECT {picked} FROM {source} AS s{stored} "
            "ON CONFLICT ({pk}) DO UPDATE SET {sets} "
            "WHERE t.{lsn} < EXCLUDED.{lsn} OR EXCLUDED.{lsn} = {snapshot}"
        ).format(
            target=_identifier(table), names=names, picked=picked, stored=stored, source=source,
            pk=sql.SQL(", ").join(map(sql.Identifier, shape.primary_key)),
            sets=sql.SQL(", ").join([*(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates),
                                     sql.SQL("{0} = GREATEST(t.{0}, EXCLUDED.{0})").format(lsn)]),
            lsn=lsn, snapshot=sql.Literal(SNAPSHOT_LSN))).rowcount

    def _delete_from(self, conn: Connection, shape: TableShape, source: sql.Composable) -> int:
        """DELETE the rows whose keys the relation `source` holds, unless the stored change is newer."""
        match = sql.SQL(" AND ").join(sql.SQL("t.{0} = s.{0}").format(sql.Identifier(c)) for c in shape.primary_key)
        return conn.connection.driver_connection.execute(
            sql.SQL("DELETE FROM {} AS t USING {} AS s WHERE {} AND t.{lsn} < s.{lsn}").format(
                _identifier(self.table(shape)), source, match, lsn=sql.Identifier(LSN_COLUMN))).rowcount

    def upsert(self, conn: Connection, shape: TableShape, rows: list[dict[str, Any]], columns: list[str]) -> int:
        if not rows:
            return 0
        columns = self._written(shape, columns)
        cols = [*columns, LSN_COLUMN]
        stage = self._staging(conn, self.table(shape), cols, "upsert")
        self._copy(conn, stage, cols, self.prepared(shape, rows, columns))
        count = self._upsert_from(conn, shape, cols, stage)
        conn.connection.driver_connection.execute(sql.SQL("TRUNCATE {}").format(stage))
        return count

    def delete(self, conn: Connection, shape: TableShape, keys: list[dict[str, Any]]) -> int:
        if not keys:
            return 0
        cols = [*shape.primary_key, LSN_COLUMN]
        stage = self._staging(conn, self.table(shape), cols, "delete")
        self._copy(conn, stage, cols, self.prepared(shape, keys, list(shape.primary_key)))
        count = self._delete_from(conn, shape, stage)
        conn.connection.driver_connection.execute(sql.SQL("TRUNCATE {}").format(stage))
        return count

    def apply_columnar(self, conn: Connection, shape: TableShape, flat: Any) -> None:
        """A table's changes from Arrow (consumers.apply.columnar.flat_images): COPY, as CSV written by Arrow, into a
        staging table, then each key's last change upserted or deleted as `upsert` and `delete` do."""
        cols = self._written(shape, list(shape.column_names))
        stage = self._staging(conn, self.table(shape), cols, "columnar", columnar.STAGE_COLUMNS)
        staged = [name for name, _ in columnar.STAGE_COLUMNS] + cols
        out = io.BytesIO()
        flat = without_fillers(shape, flat)
        for column, convert in self.value_converters(shape).items():
            # Few of the columnar path's types need it (hstore, which arrives as JSON): done on that column alone.
            values = flat.column(column).to_pylist()
            flat = flat.set_column(flat.schema.get_field_index(column), column, pa.array(
                [None if v is None else convert(v) for v in values], pa.string()))
        pa_csv.write_csv(flat.select(staged), out, pa_csv.WriteOptions(include_header=False))
        raw = conn.connection.driver_connection
        with raw.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
                stage, sql.SQL(", ").join(map(sql.Identifier, staged)))) as copy:
            copy.write(out.getbuffer())
        seq, op, change_lsn = map(sql.Identifier, (columnar.SEQ, columnar.OP, columnar.CHANGE_LSN))
        pk = sql.SQL(", ").join(map(sql.Identifier, shape.primary_key))

        def last(wanted: list[str], ops: str) -> sql.Composed:
            # Each key's last change in the batch, if it is of the kinds `ops` selects.
            return sql.SQL("(SELECT {cols}, {change_lsn} AS {lsn} FROM (SELECT DISTINCT ON ({pk}) * FROM {stage} "
                           "ORDER BY {pk}, {seq} DESC) AS l WHERE {op} {ops} 'd')").format(
                cols=sql.SQL(", ").join(map(sql.Identifier, wanted)), change_lsn=change_lsn,
                lsn=sql.Identifier(LSN_COLUMN), pk=pk, stage=stage, seq=seq, op=op, ops=sql.SQL(ops))

        # The planner knows neither the fresh staging rows nor, often, the rows this transaction put in the target
        # (a table created empty is estimated empty): a statement with nothing to do can still pick a plan that
        # compares every row with every other (a snapshot of 100,000 rows: minutes). So a statement runs only when
        # the batch has changes of its kind, and a large batch's staging table is analyzed first.
        ops = set(flat.column(columnar.OP).unique().to_pylist())
        if flat.num_rows >= LARGE_BATCH:
            raw.execute(sql.SQL("ANALYZE {}").format(stage))
        if ops - {"d"}:
            self._upsert_from(conn, shape, [*cols, LSN_COLUMN], last(cols, "<>"))
        if "d" in ops:
            self._delete_from(conn, shape, last(list(shape.primary_key), "="))
        raw.execute(sql.SQL("TRUNCATE {}").format(stage))

    def truncate(self, conn: Connection, shape: TableShape) -> None:
        table = self.table(shape)
        # The source's TRUNCATE of a referenced table names its referencing tables too; each arrives as an event.
        conn.exec_driver_sql(f"TRUNCATE {conn.dialect.identifier_preparer.format_table(table)} CASCADE")

    def upsert_offsets_statement(self) -> Any:
        stmt = pg_insert(self.offsets)
        return stmt.on_conflict_do_update(
            index_elements=[self.offsets.c.pipeline, self.offsets.c.topic, self.offsets.c.kafka_partition],
            set_={"next_offset": stmt.excluded.next_offset, "updated_at": stmt.excluded.updated_at},
        )

    def upsert_applied_statement(self) -> Any:
        return applied_upsert(self.applied)


class PostgresAnalyticsDialect(PostgresDialect):
    name = "postgresql analytics"
    keeps_history = True
    columnar = False  # its history is appended by the general path only
    copies_checks = False  # like its foreign keys: only the applier writes here
    mirrors_foreign_keys = False
    backups = None  # not replayed (so far)
    read_only_access = "role"  # `cdc query` logs in as the read-only role grant_read_only prepares

    def foreign_key(self, columns, ref: Table, ref_columns) -> ForeignKeyConstraint | None:  # noqa: ANN001
        # Like DuckDB's: only the applier writes here, and it writes whole source transactions.
        return None

    def _history(self, table: Table) -> sql.Identifier:
        return _identifier(table, HISTORY_SUFFIX)

    def ensure_table(self, conn: Connection, shape: TableShape, shapes: dict[str, TableShape]) -> list[str]:
        table = self.table(shape)
        history = table.name + HISTORY_SUFFIX
        if len(history.encode()) > MAX_IDENTIFIER_BYTES:
            raise ConfigError(f"{shape.name}: its history table {history!r} would be longer than PostgreSQL's "
                              f"{MAX_IDENTIFIER_BYTES}-byte identifiers; it cannot go to a PostgreSQL analytics "
                              "replica")
        actions = super().ensure_table(conn, shape, shapes)
        if inspect(conn).has_table(history, schema=table.schema):
            self._index_changes(conn, shape, table)  # a history from before the index (it is cheap when there)
            return actions
        # The source's columns, all nullable (a delete's before image may hold only the key), then the change's.
        raw = conn.connection.driver_connection
        raw.execute(sql.SQL(
            "CREATE TABLE {history} AS SELECT {cols}, NULL::text AS _cdc_op, NULL::bigint AS _cdc_lsn, "
            "NULL::text AS _cdc_tx_id, NULL::timestamptz AS _cdc_commit_ts FROM {target} WITH NO DATA").format(
            history=self._history(table), target=_identifier(table),
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in shape.column_names)))
        # For "row X as of time T": the newest history row of a key at or before T.
        raw.execute(sql.SQL("CREATE INDEX ON {} ({})").format(
            self._history(table), sql.SQL(", ").join(map(sql.Identifier, [*shape.primary_key, "_cdc_commit_ts"]))))
        self._index_changes(conn, shape, table)
        return [*actions, f"created table {'.'.join(filter(None, (table.schema, history)))}"]

    def add_column(self, conn: Connection, table: Table, column: Column) -> None:
        super().add_column(conn, table, column)
        conn.connection.driver_connection.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
            self._history(table), sql.Identifier(column.name), sql.SQL(column.type.compile(dialect=conn.dialect))))

    def _typed_tables(self, table: Table) -> list[sql.Identifier]:
        return [_identifier(table), self._history(table)]

    def _index_changes(self, conn: Connection, shape: TableShape, table: Table) -> None:
        """The index `append_history`'s anti-join looks changes up by (key, `_cdc_lsn`), named after the history
        (PostgreSQL's 63-byte names: a digest, not the table's name)."""
        name = "_cdc_changes_" + hashlib.sha1(f"{table.schema}.{table.name}{HISTORY_SUFFIX}".encode()).hexdigest()[:16]
        conn.connection.driver_connection.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
            sql.Identifier(name), self._history(table),
            sql.SQL(", ").join(map(sql.Identifier, [*shape.primary_key, "_cdc_lsn"]))))

    def append_history(self, conn: Connection, shape: TableShape, events: list[tuple[ChangeEvent, dict]]) -> None:
        """Every change of the batch, the row after it (before it, for a delete). A change the history holds
        already (Debezium re-sent its transaction) is not stored again: COPY into a staging table, repeats inside
        the batch dropped first (base.distinct_changes), then one INSERT ... SELECT with an anti-join on the
        history's (key, `_cdc_lsn`) index (base.new_changes_sql)."""
        if not events:
            return
        table = self.table(shape)
        columns = list(shape.column_names)
        stage = self._staging(conn, table, columns, "history", (
            ("_cdc_op", "text"), ("_cdc_lsn", "bigint"), ("_cdc_tx_id", "text"), ("_cdc_commit_ts", "timestamptz")))
        rows = self.prepared(shape, distinct_changes(shape, history_rows(shape, events)), columns)
        names = [*columns, *HISTORY_COLUMNS]
        self._copy(conn, stage, names, rows)
        raw = conn.connection.driver_connection
        if len(rows) >= LARGE_BATCH:
            raw.execute(sql.SQL("ANALYZE {}").format(stage))  # the planner knows nothing of fresh staging rows
        history = self._history(table).as_string(raw)
        quote = lambda name: sql.Identifier(name).as_string(raw)  # noqa: E731
        fresh = new_changes_sql(shape, quote, history, "s", text=lambda expression: f"({expression})::text")
        listed = sql.SQL(", ").join(map(sql.Identifier, names))
        raw.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} AS s WHERE {}").format(
            self._history(table), listed, listed, stage, sql.SQL(fresh)))
        raw.execute(sql.SQL("TRUNCATE {}").format(stage))

    def grant_read_only(self, conn: Connection, role: str, password: str | None) -> list[str]:
        """Create the role when absent, a LOGIN role with the password given (else with the one generated for it,
        `reader_password`), read-only by default, allowed to read the replicated tables and their histories, and
        the tables created in their schemas later. `cdc query` logs in as it: no session of the applier's own user,
        so no way back to its rights. A role of that name that the applier did not create is refused: changing its
        login or defaults could lock someone out, and leaving them could leave it able to write. A role given more
        than reading since (a member of `pg_read_server_files`, a superuser...) is said so, not refused: the applier
        goes on replicating, and `cdc query` refuses to run as that role until it is taken away."""
        raw = conn.connection.driver_connection
        who = sql.Identifier(role)
        actions = []
        found = raw.execute("SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s",
                            (role,)).fetchone()
        if found is None:
            raw.execute(sql.SQL("CREATE ROLE {} LOGIN").format(who))
            raw.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(who, sql.Literal(READ_ONLY_ROLE_COMMENT)))
            actions.append(f"created read-only role {role}")
        elif found[0] != READ_ONLY_ROLE_COMMENT:
            raise ConfigError(f"read_only_role: the role {role} already exists and was not created by cdc; name "
                              "another role, or drop that one")
        excess = read_only_role_excess(raw, role)
        if excess:
            actions.append(f"WARNING: read-only role {role} may do more than read ({', '.join(excess)}): `cdc query` "
                           "refuses to run as it until that is taken away (REVOKE, ALTER ROLE)")
        if not password:
            password = reader_password(conn.engine.url, role, create=True)
        # Hashed here, so that the password itself never reaches the server (nor its statement log).
        secret = raw.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()
        raw.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(who, sql.Literal(secret)))
        # For every session of the role, `cdc query`'s (which also begins its transactions READ ONLY) and others.
        raw.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(who))
        tables = list(self._tables.values())
        for schema in sorted({table.schema for table in tables if table.schema}):
            raw.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), who))
            raw.execute(sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(
                sql.Identifier(schema), who))
        if tables:
            names = [*map(_identifier, tables), *map(self._history, tables)]
            raw.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.SQL(", ").join(names), who))
        return actions


# What a read-only role must not have: each attribute, and any membership (`pg_read_server_files`,
# `pg_execute_server_program`, `pg_read_all_data`, another user's role...), would let a query read files, run
# programs or reach beyond the replicated tables.
_ROLE_EXCESS = """
SELECT array_remove(ARRAY[CASE WHEN r.rolsuper THEN 'SUPERUSER' END, CASE WHEN r.rolcreaterole THEN 'CREATEROLE' END,
                          CASE WHEN r.rolcreatedb THEN 'CREATEDB' END,
                          CASE WHEN r.rolreplication THEN 'REPLICATION' END,
                          CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END], NULL)
       || ARRAY(SELECT 'member of ' || g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                WHERE m.member = r.oid ORDER BY g.rolname)
FROM pg_roles r WHERE r.rolname = %s
"""


def read_only_role_excess(raw: psycopg.Connection, role: str) -> list[str]:
    """What the role may do beyond reading the tables granted to it: attributes and role memberships, by name."""
    found = raw.execute(_ROLE_EXCESS, (role,)).fetchone()
    return list(found[0]) if found else []


def reader_password_file(url: Any, role: str) -> Path:
    """Where the password generated for a read-only role is kept: `$CDC_HOME/read-only-roles/`, one file
    per role and server (roles belong to a PostgreSQL cluster, not to one database)."""
    from infra.stack import state_home

    server = f"{url.host or url.query.get('host') or 'localhost'}_{url.port or 5432}"
    name = re.sub(r"[^A-Za-z0-9_.@-]", "_", f"{role}@{server}")
    # Not under `secrets/`: the Kafka Connect worker may read that directory (its config provider), and a connector
    # configuration could name a file there.
    return state_home() / "read-only-roles" / name


def reader_password(url: Any, role: str, *, create: bool) -> str | None:
    """The password generated for a read-only role (which has none in the pipeline file), from its file; with
    `create`, one is generated and kept when there is none yet. The file is the owner's only (0600, in 0700
    directories) and written whole or not at all: a temporary file linked into place, so that two appliers
    preparing the same role at once end with one password, the first one's."""
    path = reader_password_file(url, role)
    if path.exists():
        text = path.read_text().strip()
        if text:
            return text
        if create:
            path.unlink()  # emptied by hand: a new one
    if not create:
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = secrets.token_urlsafe(32)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, password.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    except FileExistsError:
        password = path.read_text().strip()  # another applier was first
    finally:
        temporary.unlink()
    return password


def applied_upsert(applied: Table) -> Any:
    """INSERT ... ON CONFLICT of the applied-transactions table (base.Dialect.record_applied); DuckDB speaks it too."""
    stmt = pg_insert(applied)
    return stmt.on_conflict_do_update(
        index_elements=[applied.c.pipeline, applied.c.xid, applied.c.source_table],
        set_={c: stmt.excluded[c] for c in ("first_lsn", "last_lsn", "end_offset", "committed_at", "applied_at")})


def _identifier(table: Table, suffix: str = "") -> sql.Identifier:
    """The table's schema-qualified name, or that of its companion named with `suffix`, for psycopg's sql."""
    return sql.Identifier(*([table.schema] if table.schema else []), table.name + suffix)


_NO_EQUALITY = frozenset({"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"})


def _without_equality(source: t.SourceType) -> bool:
    leaf = source.leaf()
    return leaf.category in _NO_EQUALITY or (leaf.category == "composite"
                                             and any(_without_equality(f) for _, f in leaf.fields))


def _pg_converter(source: t.SourceType) -> Callable[[Any], Any] | None:
    """What psycopg's COPY needs for a source type, from what apply/values.py gives (docs/types.md); None: as is."""
    if source.is_array:
        inner = _pg_converter(source.element)  # type: ignore[arg-type]
        if inner is None and source.leaf().domain:
            inner = t.as_text  # an array of a domain is a type Debezium does not know: text in bytes
        return t.elements(inner) if inner is not None else None
    kind = source.category
    if kind == "hstore":
        return t.hstore_text
    if kind == "bit":
        return t.bits_text(source.length)
    if kind == "point":
        return t.point_text
    if kind in t.DEBEZIUM_UNKNOWN or kind in ("range",):
        return t.as_text
    return None
