"""PostgreSQL destination: COPY into a session-local staging table, then one upsert and one delete per table per batch."""

from __future__ import annotations

import hashlib
import operator
from typing import Any

from psycopg import sql
from sqlalchemy import Column, ForeignKeyConstraint, Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from consumers.dialects.base import Dialect
from consumers.shapes import LSN_COLUMN, SNAPSHOT_LSN, TableShape


class PostgresDialect(Dialect):
    name = "postgresql"
    supports_deferred_constraints = True

    def foreign_key(self, columns, ref: Table, ref_columns) -> ForeignKeyConstraint:
        # Deferrable, so that a destination transaction may order rows freely and still be checked at commit.
        return ForeignKeyConstraint(list(columns), [ref.c[c] for c in ref_columns], deferrable=True,
                                    initially="IMMEDIATE")

    def add_column(self, conn: Connection, table: Table, column: Column) -> None:
        prep = conn.dialect.identifier_preparer
        conn.exec_driver_sql(f"ALTER TABLE {prep.format_table(table)} ADD COLUMN {prep.quote(column.name)} "
                             f"{column.type.compile(dialect=conn.dialect)}")

    def begin_batch(self, conn: Connection, *, snapshot: bool) -> None:
        conn.exec_driver_sql("SET CONSTRAINTS ALL DEFERRED")

    # The staging tables live for the session (temporary, so invisible to others and never logged) and are
    # emptied after each use; their name follows the target's columns, so a new column gets a new one.
    def _staging(self, conn: Connection, table: Table, columns: list[str], purpose: str) -> sql.Composed:
        digest = hashlib.sha1(f"{table.fullname}|{purpose}|{'|'.join(columns)}".encode()).hexdigest()[:16]
        stage = sql.Identifier(f"_cdc_stage_{digest}")
        target = sql.Identifier(*([table.schema] if table.schema else []), table.name)
        raw = conn.connection.driver_connection
        raw.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} AS SELECT {} FROM {} WITH NO DATA").format(
            stage, sql.SQL(", ").join(map(sql.Identifier, columns)), target))
        return stage

    def _copy(self, conn: Connection, stage: sql.Composed, columns: list[str], rows: list[dict[str, Any]]) -> None:
        raw = conn.connection.driver_connection
        with raw.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(
                stage, sql.SQL(", ").join(map(sql.Identifier, columns)))) as copy:
            pick = operator.itemgetter(*columns)  # a tuple (columns always hold the key and _cdc_lsn), built in C
            for row in rows:
                copy.write_row(pick(row))

    def upsert(self, conn: Connection, shape: TableShape, rows: list[dict[str, Any]], columns: list[str]) -> int:
        if not rows:
            return 0
        table = self.table(shape)
        cols = [*columns, LSN_COLUMN]
        stage = self._staging(conn, table, cols, "upsert")
        self._copy(conn, stage, cols, rows)
        target = sql.Identifier(*([table.schema] if table.schema else []), table.name)
        updates = [c for c in cols if c not in shape.primary_key and c != LSN_COLUMN]
        statement = sql.SQL(
            "INSERT INTO {target} AS t ({cols}) SELECT {cols} FROM {stage} "
            "ON CONFLICT ({pk}) DO UPDATE SET {sets} "
            "WHERE t.{lsn} < EXCLUDED.{lsn} OR EXCLUDED.{lsn} = {snapshot}"
        ).format(
            target=target, stage=stage, cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
            pk=sql.SQL(", ").join(map(sql.Identifier, shape.primary_key)),
            sets=sql.SQL(", ").join([
                *(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates),
                sql.SQL("{0} = GREATEST(t.{0}, EXCLUDED.{0})").format(sql.Identifier(LSN_COLUMN))]),
            lsn=sql.Identifier(LSN_COLUMN), snapshot=sql.Literal(SNAPSHOT_LSN),
        )
        raw = conn.connection.driver_connection
        count = raw.execute(statement).rowcount
        raw.execute(sql.SQL("TRUNCATE {}").format(stage))
        return count

    def delete(self, conn: Connection, shape: TableShape, keys: list[dict[str, Any]]) -> int:
        if not keys:
            return 0
        table = self.table(shape)
        cols = [*shape.primary_key, LSN_COLUMN]
        stage = self._staging(conn, table, cols, "delete")
        self._copy(conn, stage, cols, keys)
        target = sql.Identifier(*([table.schema] if table.schema else []), table.name)
        match = sql.SQL(" AND ").join(sql.SQL("t.{0} = s.{0}").format(sql.Identifier(c)) for c in shape.primary_key)
        raw = conn.connection.driver_connection
        count = raw.execute(sql.SQL("DELETE FROM {} AS t USING {} AS s WHERE {} AND t.{lsn} < s.{lsn}").format(
            target, stage, match, lsn=sql.Identifier(LSN_COLUMN))).rowcount
        raw.execute(sql.SQL("TRUNCATE {}").format(stage))
        return count

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
