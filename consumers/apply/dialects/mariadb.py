"""MariaDB destination: multi-row conditional upserts and keyed deletes, ordered for foreign keys checked row by row;
and the columnar path's writes from Arrow (`apply_columnar`), with the foreign keys they touch checked before the
commit."""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from base64 import b16encode
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import BigInteger, Column, PrimaryKeyConstraint, Table
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import CompileError, IntegrityError, UnsupportedCompilationError
from sqlalchemy.sql import sqltypes
from sqlalchemy.types import TypeEngine

from cdc.errors import ConfigError
from cdc.source_tables import LSN_COLUMN, ColumnShape, ForeignKeyShape, TableShape
from consumers.apply import columnar
from consumers.apply.dialects import types
from consumers.apply.dialects.base import Dialect
from consumers.apply.dialects.canon import MariaDBCanon
from consumers.apply.shapes import SNAPSHOT_LSN
from consumers.apply.values import ValueConversionError

# Byte-wise comparison without trailing-space padding: two keys PostgreSQL tells apart ('a' and 'A', 'a' and
# 'a ') must not collide in a MariaDB primary key, which the default case-insensitive PAD SPACE collations would do.
CHARSET = "utf8mb4"
COLLATION = "utf8mb4_nopad_bin"

# A string or binary column in a key needs a bounded type; 255 characters of utf8mb4 (1020 bytes) leave room for
# three such columns in InnoDB's 3072-byte key limit.
KEY_STRING_LENGTH = 255
# Longer VARCHARs outside keys become LONGTEXT: MariaDB caps the sum of a row's VARCHAR widths at 65535 bytes,
# counted at 4 bytes a character, so a few wide VARCHARs would make the table impossible to create.
MAX_INLINE_VARCHAR = 255

# Rows (or keys) per statement, and a bound on the statement's text: MariaDB refuses packets over
# max_allowed_packet (16 MiB by default), and one character may take 4 bytes.
CHUNK_ROWS = 1000
CHUNK_CHARS = 4 << 20

# Debezium's MicroDuration counts a month as 365.25 / 12 days; an ISO-8601 duration is converted the same way.
_DAYS_PER_MONTH = 365.25 / 12
_ISO_DURATION = re.compile(
    r"^(?P<sign>-)?P(?:(?P<years>-?[\d.]+)Y)?(?:(?P<months>-?[\d.]+)M)?(?:(?P<weeks>-?[\d.]+)W)?"
    r"(?:(?P<days>-?[\d.]+)D)?"
    r"(?:T(?:(?P<hours>-?[\d.]+)H)?(?:(?P<minutes>-?[\d.]+)M)?(?:(?P<seconds>-?[\d.]+)S)?)?$"
)


class MariaDBDialect(Dialect):
    """MariaDB (10.11, Debian 12's) through PyMySQL.

    Names: MariaDB has no schemas inside a database, so `public.person` becomes table `person` of the URL's database
    and `hr.person` becomes `hr__person` (a source table literally named `hr__person` in `public` would collide).

    Types (`adapt_type`): TIMESTAMP WITH TIME ZONE becomes DATETIME(6) holding UTC (the value's zone is applied, then
    dropped; TIME WITH TIME ZONE likewise becomes TIME(6) in UTC); INTERVAL becomes BIGINT microseconds, which is
    what Debezium's default `interval.handling.mode=numeric` sends (a timedelta or an ISO-8601 duration is converted,
    a month counting 365.25 / 12 days as in Debezium); JSON, JSONB, HSTORE and arrays become JSON (MariaDB's JSON is
    LONGTEXT with a validity check), arrays as JSON arrays; UUID becomes CHAR(36); strings are compared byte by byte.

    Transactions: MariaDB commits implicitly before and after DDL, so `ensure_table` (CREATE TABLE, ALTER TABLE)
    ends the transaction it runs in; the row methods are transactional.
    """

    name = "mariadb"
    writer_lock_sql = "SELECT GET_LOCK(:key, 0)"  # a user lock: the session's until it ends

    @staticmethod
    def quote(name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    @classmethod
    def catalog_types(cls, conn: Connection, schema: str | None, table: str) -> dict[str, str]:
        # column_type, not data_type: `int(11)`, `decimal(8,2)`, what verify tells numerics and intervals by.
        rows = conn.execute(sql_text("SELECT column_name, column_type FROM information_schema.columns "
                                     "WHERE table_schema = COALESCE(:s, database()) AND table_name = :t"),
                            {"s": schema, "t": table})
        return {r[0]: str(r[1]).lower() for r in rows}

    @classmethod
    def utc_session(cls, conn: Connection) -> None:
        conn.exec_driver_sql("SET time_zone = '+00:00'")

    @classmethod
    def begin_consistent_read(cls, conn: Connection) -> None:
        cls.utc_session(conn)
        conn.exec_driver_sql("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT")

    @classmethod
    def canon(cls) -> MariaDBCanon:
        return MariaDBCanon()

    def one_row(self, statement: Any, table: Table, match: Callable[[Any], Any]) -> Any:
        # No row id to pick one of duplicate rows by, but UPDATE and DELETE take a LIMIT (Dialect.apply_keyless).
        return statement.where(match(table)).ext(mysql.limit(1))
    # InnoDB checks each row against its foreign keys as it is written, even inside one multi-row statement.
    supports_deferred_constraints = False
    # The columnar path (apply_columnar) writes with the checks off and checks what it touched before the commit.
    columnar = True

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.driver != "pymysql":
            raise ConfigError(
                f"MariaDB destinations are written through PyMySQL; the URL {engine.url.render_as_string()} "
                f"selects the {engine.dialect.driver!r} driver",
                hint="Start the URL with mysql+pymysql:// (or mariadb+pymysql://).",
            )
        super().__init__(engine)
        _table_options(self.offsets)
        _table_options(self.applied)
        # The foreign keys the columnar path wrote around in the open batch (apply_columnar), checked before the
        # offsets are stored (check_foreign_keys): tracking table -> (the key, which side, the check's SELECT).
        self._unchecked: dict[str, tuple[_ForeignKey, str, str]] = {}
        self._tracking: set[str] = set()  # the batch's tracking tables, made afresh in each batch
        self._edges: dict[str, list[_ForeignKey]] = {}  # the batch's foreign keys by destination table

    # -- naming and types ---------------------------------------------------------------------------------------
    def destination_name(self, shape: TableShape) -> tuple[str | None, str]:
        if shape.schema == "public":
            return None, shape.table
        return None, f"{shape.schema}__{shape.table}"

    def adapt_type(self, type_: TypeEngine) -> TypeEngine:
        return adapt_mariadb_type(type_, key=False)

    def column_type(self, column: ColumnShape, *, key: bool = False) -> TypeEngine:
        if column.source is not None:
            return mariadb_type(column.source, key=key)
        return adapt_mariadb_type(column.type, key=key)

    def table(self, shape: TableShape) -> Table:
        # As the base class builds it, except that key columns (primary and foreign) get bounded types, no column is
        # AUTO_INCREMENT (SQLAlchemy's default for a lone integer key: a source id 0 would be renumbered), and the
        # table is InnoDB with a byte-wise collation.
        table = self._tables.get(shape.name)
        if table is None:
            schema, name = self.destination_name(shape)
            keys = set(shape.primary_key) | {c for fk in shape.foreign_keys for c in fk.columns}
            columns = [
                Column(c.name, self.column_type(c, key=c.name in keys), autoincrement=False,
                       nullable=c.nullable and c.name not in shape.primary_key)
                for c in shape.columns
            ]
            table = Table(name, self.metadata, *columns, Column(LSN_COLUMN, BigInteger, nullable=False),
                          PrimaryKeyConstraint(*shape.primary_key), schema=schema)
            _table_options(table)
            self._tables[shape.name] = table
        return table

    # -- schema -------------------------------------------------------------------------------------------------
    def add_column(self, conn: Connection, table: Table, column: Column) -> None:
        prep = conn.dialect.identifier_preparer
        _execute(conn, f"ALTER TABLE {prep.format_table(table)} ADD COLUMN {prep.quote_identifier(column.name)} "
                       f"{column.type.compile(dialect=conn.dialect)} NULL")

    def stored_types(self, conn: Connection, shape: TableShape) -> dict[str, str]:
        table = self.table(shape)
        return {name: kind for name, kind in conn.execute(sql_text(
            "select column_name, column_type from information_schema.columns where table_schema = "
            "coalesce(:schema, database()) and table_name = :name"), {"schema": table.schema, "name": table.name})}

    def alter_column_type(self, conn: Connection, shape: TableShape, column: str) -> str:
        # MODIFY COLUMN commits the transaction open before it and itself at once (MariaDB's DDL always does): the
        # applier calls this before the batch writes anything, so only the change of type is committed early, and a
        # batch that fails after it leaves a column that holds the source's type, which its retry needs anyway.
        # Strict for this statement: a stored value the new type cannot hold fails it instead of being truncated.
        table = self.table(shape)
        target = table.c[column]
        prep = conn.dialect.identifier_preparer
        spelled = target.type.compile(dialect=conn.dialect)
        _execute(conn, f"SET STATEMENT sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION' FOR ALTER TABLE "
                       f"{prep.format_table(table)} MODIFY COLUMN {prep.quote_identifier(column)} {spelled} "
                       f"{'NULL' if target.nullable else 'NOT NULL'}")
        return f"changed column {table.fullname}.{column} to {spelled} (MariaDB committed this change at once)"

    # -- data ---------------------------------------------------------------------------------------------------
    def upsert(self, conn: Connection, shape: TableShape, rows: list[dict[str, Any]], columns: list[str]) -> int:
        """One multi-row INSERT ... ON DUPLICATE KEY UPDATE per chunk; returns MariaDB's affected-rows count (an
        inserted row counts 1, an updated one 2, one left alone because it is newer 1 under SQLAlchemy's FOUND_ROWS).
        """
        if not rows:
            return 0
        table = self.table(shape)
        cols = [c for c in dict.fromkeys([*shape.primary_key, *columns]) if c != LSN_COLUMN] + [LSN_COLUMN]
        convert = self._converters(shape, cols)
        converted = [{c: convert[c](row[c]) for c in cols} for row in rows]
        if any(not c.nullable and c.name not in cols for c in table.columns):
            # A NOT NULL column left out (an unchanged TOASTed value): MariaDB refuses the INSERT half of an upsert
            # without it ("doesn't have a default value") before it sees the duplicate key, so these rows, which
            # exist already, are updated.
            return self._update(conn, shape, converted, cols)
        ordered, cyclic = parents_first(converted, self_references(shape))

        prep = conn.dialect.identifier_preparer
        q = prep.quote_identifier
        lsn = q(LSN_COLUMN)
        # MariaDB evaluates the assignments left to right, and a column named on the right-hand side already holds
        # the value assigned to it earlier in the list. `_cdc_lsn` is therefore assigned last: assigned first, it
        # would make every later comparison see the incoming LSN and keep the stored (older) values.
        newer = f"({lsn} < VALUES({lsn}) OR VALUES({lsn}) = {SNAPSHOT_LSN})"
        sets = [f"{q(c)} = IF({newer}, VALUES({q(c)}), {q(c)})"
                for c in cols if c not in shape.primary_key and c != LSN_COLUMN]
        sets.append(f"{lsn} = GREATEST({lsn}, VALUES({lsn}))")
        head = f"INSERT INTO {prep.format_table(table)} ({', '.join(map(q, cols))}) VALUES "
        tail = " ON DUPLICATE KEY UPDATE " + ", ".join(sets)
        literal = _Literals(conn)
        template = "(" + ",".join(["%s"] * len(cols)) + ")"

        def values(indices: list[int]) -> Iterator[str]:
            for i in indices:
                yield literal(template, [converted[i][c] for c in cols])

        count = _run_chunks(conn, head, ",", tail, values(ordered))
        if cyclic:
            # Rows that reference each other (or descend from such rows) have no order that satisfies a check made
            # row by row. Each of them finds its parent among these rows, so the table is consistent once they are
            # all written; the checks are off for these statements only.
            with _foreign_key_checks_off(conn):
                count += _run_chunks(conn, head, ",", tail, values(cyclic))
        return count

    def _update(self, conn: Connection, shape: TableShape, rows: list[dict[str, Any]], cols: list[str]) -> int:
        """One UPDATE per row, of `cols`, where the stored change is older (or the change a snapshot read)."""
        table = self.table(shape)
        prep = conn.dialect.identifier_preparer
        q = prep.quote_identifier
        literal = _Literals(conn)
        lsn = _verbatim(q(LSN_COLUMN))
        sets = [f"{_verbatim(q(c))} = %s" for c in cols if c not in shape.primary_key and c != LSN_COLUMN]
        sets.append(f"{lsn} = GREATEST({lsn}, %s)")
        template = (f"UPDATE {_verbatim(prep.format_table(table))} SET {', '.join(sets)}"
                    f" WHERE {' AND '.join(f'{_verbatim(q(c))} = %s' for c in shape.primary_key)}"
                    f" AND ({lsn} < %s OR %s = {SNAPSHOT_LSN})")
        count = 0
        for row in rows:
            values = [row[c] for c in cols if c not in shape.primary_key and c != LSN_COLUMN]
            values += [row[LSN_COLUMN], *(row[c] for c in shape.primary_key), row[LSN_COLUMN], row[LSN_COLUMN]]
            count += _execute(conn, literal(template, values)).rowcount
        return count

    def delete(self, conn: Connection, shape: TableShape, keys: list[dict[str, Any]]) -> int:
        """Single-table DELETEs whose WHERE is a disjunction of `(key = ... AND _cdc_lsn < ...)` per key.

        The per-key LSN condition sits beside its key, so neither a temporary table nor a join against a list of
        values is needed; MariaDB's range optimizer turns the disjunction of primary-key equalities into primary-key
        lookups (EXPLAIN shows a range scan of PRIMARY). On a self-referencing table the keys are deleted in layers,
        children first, since InnoDB checks each deleted row at once and a single DELETE visits rows in key order.
        """
        if not keys:
            return 0
        table = self.table(shape)
        pk = list(shape.primary_key)
        convert = self._converters(shape, pk + [LSN_COLUMN])
        converted = [{c: convert[c](key[c]) for c in [*pk, LSN_COLUMN]} for key in keys]

        prep = conn.dialect.identifier_preparer
        target = prep.format_table(table)
        literal = _Literals(conn)
        by_key = "(" + " AND ".join(f"{_verbatim(prep.quote_identifier(c))} = %s" for c in pk)
        by_key_and_lsn = by_key + f" AND {_verbatim(prep.quote_identifier(LSN_COLUMN))} < %s)"
        by_key += ")"

        def matches(indices: Iterable[int]) -> Iterator[str]:
            for i in indices:
                yield literal(by_key_and_lsn, [converted[i][c] for c in [*pk, LSN_COLUMN]])

        references = self_references(shape)
        if references:
            wanted = list(dict.fromkeys([*pk, *(c for fk in references for c in (*fk.columns, *fk.referred_columns))]))
            stored: dict[tuple, dict[str, Any]] = {}
            for start in range(0, len(converted), CHUNK_ROWS):
                where = " OR ".join(literal(by_key, [k[c] for c in pk]) for k in converted[start:start + CHUNK_ROWS])
                result = _execute(conn, f"SELECT {', '.join(map(prep.quote_identifier, wanted))} FROM {target} "
                                        f"WHERE {where}")
                for values in result:
                    row = dict(zip(wanted, values))
                    stored[tuple(row[c] for c in pk)] = row
            layers, cyclic = children_first(converted, stored, pk, references)
        else:
            layers, cyclic = [list(range(len(converted)))], []
        count = 0
        for layer in layers:
            count += _run_chunks(conn, f"DELETE FROM {target} WHERE ", " OR ", "", matches(layer))
        if cyclic:
            # Rows referencing each other have no child-first order; they go together, checks off meanwhile.
            with _foreign_key_checks_off(conn):
                count += _run_chunks(conn, f"DELETE FROM {target} WHERE ", " OR ", "", matches(cyclic))
        return count

    def truncate(self, conn: Connection, shape: TableShape) -> None:
        """Empty the table and, like PostgreSQL's TRUNCATE ... CASCADE, every table that references it.

        DELETE rather than TRUNCATE TABLE: MariaDB's TRUNCATE commits the transaction implicitly and refuses a table
        that another table references. Foreign-key checks are off for these statements only: every table that could
        point into an emptied one is emptied too, so nothing dangles afterwards, whatever the order.
        """
        table = self.table(shape)
        prep = conn.dialect.identifier_preparer
        referencing: dict[str, set[str]] = {}
        for child, parent in _execute(
                conn, "SELECT TABLE_NAME, REFERENCED_TABLE_NAME FROM information_schema.REFERENTIAL_CONSTRAINTS "
                      "WHERE CONSTRAINT_SCHEMA = DATABASE() AND UNIQUE_CONSTRAINT_SCHEMA = DATABASE()"):
            referencing.setdefault(parent, set()).add(child)
        emptied, pending = [], [table.name]
        while pending:
            name = pending.pop()
            if name not in emptied:
                emptied.append(name)
                pending.extend(sorted(referencing.get(name, ())))
        with _foreign_key_checks_off(conn):
            for name in reversed(emptied):
                _execute(conn, f"DELETE FROM {prep.quote_identifier(name)}")

    # -- the columnar path ----------------------------------------------------------------------------------------
    def begin_batch(self, conn: Connection, *, snapshot: bool) -> None:
        # What the columnar path wrote around in an earlier batch (committed, or rolled back) is no longer to check.
        self._unchecked.clear()
        self._tracking.clear()
        self._edges.clear()

    def apply_columnar(self, conn: Connection, shape: TableShape, flat: Any) -> None:
        """A table's changes from Arrow (consumers.apply.columnar.flat_images): each key's last change, as SQL
        literals built by Arrow (no Python object per value), into a session-local staging table by multi-row
        INSERTs; then one INSERT ... SELECT ... ON DUPLICATE KEY UPDATE keeping the newer position (the rule `upsert`
        applies) and one DELETE joined on the keys, unless the stored change is newer (as `delete`).

        Foreign keys: the writer writes the columnar path's tables in any order (a child before its parent, a
        parent's delete before its children's), and InnoDB checks each row as it is written; so these statements run
        with the checks off, and what they touched is checked before the offsets are stored, in the same destination
        transaction (check_foreign_keys): the references of the rows written, and the rows still referencing a key
        deleted (or a referenced value changed). Only what the batch touched is looked at, so the check costs what
        the batch costs, not what the tables hold."""
        table = self.table(shape)
        prep = conn.dialect.identifier_preparer
        q = prep.quote_identifier
        target = prep.format_table(table)
        columns, pk = list(shape.column_names), list(shape.primary_key)
        seq, op, change_lsn = columnar.SEQ, columnar.OP, columnar.CHANGE_LSN
        final = columnar.last_changes(flat, pk)  # the batch's net effect: one row per key, its last change
        ddl = {c: table.c[c].type.compile(dialect=conn.dialect) for c in columns}
        stage = q(f"_cdc_stage_{_digest(table.name)}")
        _temporary_table(conn, stage, [(seq, "BIGINT"), (op, "CHAR(1)"), (change_lsn, "BIGINT"),
                                       *((c, ddl[c]) for c in columns)], pk)
        head = f"INSERT INTO {stage} ({', '.join(map(q, [seq, op, change_lsn, *columns]))}) VALUES "
        backslashes = _backslash_escapes(conn)
        for start in range(0, final.num_rows, LITERAL_ROWS):
            # A slice at a time: the literals of a whole part (several copies of its values as text) never all at once.
            rows = _row_literals(final.slice(start, LITERAL_ROWS), table, shape, backslashes=backslashes)
            _run_chunks(conn, head, ",", "", (f"({row})" for row in _strings(rows)))
        del final
        on_key = " AND ".join(f"t.{q(c)} = s.{q(c)}" for c in pk)
        lsn = q(LSN_COLUMN)
        with _foreign_key_checks_off(conn):
            for fk in self._foreign_keys(conn, table.name):
                self._track(conn, fk, table, stage, on_key)
            newer = f"({target}.{lsn} < VALUES({lsn}) OR VALUES({lsn}) = {SNAPSHOT_LSN})"
            # `_cdc_lsn` assigned last, as in `upsert`: MariaDB evaluates the assignments left to right.
            sets = [f"{target}.{q(c)} = IF({newer}, VALUES({q(c)}), {target}.{q(c)})" for c in columns if c not in pk]
            sets.append(f"{target}.{lsn} = GREATEST({target}.{lsn}, VALUES({lsn}))")
            _execute(conn, f"INSERT INTO {target} ({', '.join(map(q, columns))}, {lsn}) "
                           f"SELECT {', '.join(f's.{q(c)}' for c in columns)}, s.{q(change_lsn)} FROM {stage} AS s "
                           f"WHERE s.{q(op)} <> 'd' ON DUPLICATE KEY UPDATE {', '.join(sets)}")
            _execute(conn, f"DELETE t FROM {target} AS t JOIN {stage} AS s ON {on_key} "
                           f"WHERE s.{q(op)} = 'd' AND t.{lsn} < s.{q(change_lsn)}")
        _execute(conn, f"DROP TEMPORARY TABLE {stage}")

    def _foreign_keys(self, conn: Connection, name: str) -> list[_ForeignKey]:
        """The destination's foreign keys from or to table `name` (its catalog's, as InnoDB enforces them), read once
        a batch."""
        found = self._edges.get(name)
        if found is None:
            by_constraint: dict[tuple[str, str], _ForeignKey] = {}
            for constraint, child, column, parent, referred in _execute(conn, (
                    "SELECT CONSTRAINT_NAME, TABLE_NAME, COLUMN_NAME, REFERENCED_TABLE_NAME, REFERENCED_COLUMN_NAME "
                    "FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = DATABASE() "
                    "AND REFERENCED_TABLE_SCHEMA = DATABASE() AND REFERENCED_TABLE_NAME IS NOT NULL AND "
                    f"(TABLE_NAME = {_Literals(conn)('%s', [name])} OR REFERENCED_TABLE_NAME = "
                    f"{_Literals(conn)('%s', [name])}) ORDER BY CONSTRAINT_NAME, TABLE_NAME, ORDINAL_POSITION")):
                fk = by_constraint.setdefault((child, constraint), _ForeignKey(constraint, child, [], parent, []))
                fk.columns.append(column)
                fk.referred.append(referred)
            found = self._edges[name] = list(by_constraint.values())
        return found

    def _track(self, conn: Connection, fk: _ForeignKey, table: Table, stage: str, on_key: str) -> None:
        """Note, in a temporary table, what the staged changes of `table` touch of foreign key `fk` (before they are
        written): as its child, the keys of the rows written; as its parent, the referenced values of the rows
        deleted or changed. check_foreign_keys looks at those only."""
        q = conn.dialect.identifier_preparer.quote_identifier
        op = q(columnar.OP)
        target = conn.dialect.identifier_preparer.format_table(table)
        pk = [c.name for c in table.primary_key.columns]
        for side in ("child", "parent"):
            if getattr(fk, side) != table.name:
                continue
            kept = pk if side == "child" else fk.referred
            track = q(f"_cdc_fk_{side}_{_digest(fk.child, fk.name)}")
            if track not in self._tracking:
                types_ = [(c, table.c[c].type.compile(dialect=conn.dialect)) for c in kept]
                _temporary_table(conn, track, types_, kept if side == "child" else [])
                self._tracking.add(track)
                child, parent = q(fk.child), q(fk.parent)
                if side == "child":
                    # Rows of the child written, whose reference (all its columns set: MATCH SIMPLE) finds no parent.
                    check = (f"SELECT {', '.join(f'c.{q(c)}' for c in fk.columns)} FROM {track} AS w "
                             f"JOIN {child} AS c ON {' AND '.join(f'c.{q(k)} = w.{q(k)}' for k in pk)} "
                             f"LEFT JOIN {parent} AS p ON {_pairs(q, 'p', fk.referred, 'c', fk.columns)} "
                             f"WHERE {' AND '.join(f'c.{q(c)} IS NOT NULL' for c in fk.columns)} "
                             f"AND p.{q(fk.referred[0])} IS NULL LIMIT 1")
                else:
                    # Children still referencing a value no row of the parent holds any more.
                    check = (f"SELECT {', '.join(f'c.{q(c)}' for c in fk.columns)} FROM {track} AS r "
                             f"JOIN {child} AS c ON {_pairs(q, 'c', fk.columns, 'r', fk.referred)} "
                             f"LEFT JOIN {parent} AS p ON {_pairs(q, 'p', fk.referred, 'r', fk.referred)} "
                             f"WHERE p.{q(fk.referred[0])} IS NULL LIMIT 1")
                self._unchecked[track] = (fk, side, check)
            if side == "child":
                _execute(conn, f"INSERT IGNORE INTO {track} ({', '.join(map(q, pk))}) SELECT "
                               f"{', '.join(f's.{q(c)}' for c in pk)} FROM {stage} AS s WHERE s.{op} <> 'd'")
            else:
                same = " AND ".join(f"t.{q(c)} <=> s.{q(c)}" for c in fk.referred)
                _execute(conn, f"INSERT INTO {track} ({', '.join(map(q, fk.referred))}) SELECT "
                               f"{', '.join(f't.{q(c)}' for c in fk.referred)} FROM {target} AS t "
                               f"JOIN {stage} AS s ON {on_key} WHERE s.{op} = 'd' OR NOT ({same})")

    def check_foreign_keys(self, conn: Connection) -> None:
        """Check, before the commit, the foreign keys the columnar path wrote around in this batch (apply_columnar);
        raises IntegrityError, as InnoDB would have, naming the constraint, the tables and the values."""
        pending, self._unchecked = self._unchecked, {}
        try:
            for fk, side, check in pending.values():
                found = _execute(conn, check).first()
                if found is None:
                    continue
                values = ", ".join(repr(v) for v in found)
                spelled = (f"(`{fk.child}`, CONSTRAINT `{fk.name}` FOREIGN KEY ({', '.join(fk.columns)}) "
                           f"REFERENCES `{fk.parent}` ({', '.join(fk.referred)}))")
                if side == "child":
                    reason = (f"Cannot add or update a child row: a foreign key constraint fails {spelled}: a row "
                              f"written references ({values}), which `{fk.parent}` does not hold")
                else:
                    reason = (f"Cannot delete or update a parent row: a foreign key constraint fails {spelled}: "
                              f"`{fk.child}` still references ({values}), which `{fk.parent}` no longer holds")
                import pymysql

                raise IntegrityError(check, None, pymysql.err.IntegrityError(
                    1452 if side == "child" else 1451, reason + " (checked before the commit: the columnar path "
                    "writes with the checks off)"))
        finally:
            if self._tracking:
                _execute(conn, f"DROP TEMPORARY TABLE IF EXISTS {', '.join(sorted(self._tracking))}")
                self._tracking.clear()

    def end_batch(self, conn: Connection) -> None:
        # The foreign keys the columnar path wrote around are checked in the batch's transaction, as PostgreSQL
        # checks its deferred ones at the commit.
        self.check_foreign_keys(conn)

    def upsert_offsets_statement(self) -> Any:
        stmt = mysql_insert(self.offsets)
        return stmt.on_duplicate_key_update(next_offset=stmt.inserted.next_offset,
                                            updated_at=stmt.inserted.updated_at)

    def upsert_applied_statement(self) -> Any:
        stmt = mysql_insert(self.applied)
        return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in (
            "first_lsn", "last_lsn", "end_offset", "committed_at", "applied_at")})

    # -- values -------------------------------------------------------------------------------------------------
    def column_converter(self, column: ColumnShape) -> Callable[[Any], Any] | None:
        # For what binds rows through SQLAlchemy (Dialect.prepared: tables without a key), as upsert binds them.
        return self._converter(column) if column.source is not None else None

    def _converters(self, shape: TableShape, columns: list[str]) -> dict[str, Callable[[Any], Any]]:
        known = set(shape.column_names)
        return {c: self._converter(shape.column(c)) if c in known else _bindable for c in columns}

    def _converter(self, column: ColumnShape) -> Callable[[Any], Any]:
        if column.source is not None:
            if column.source.category == "numeric" and column.source.precision is None:
                return _wide_decimal_check(column.name)
            return mariadb_converter(column.source)
        if isinstance(column.type, sqltypes.CHAR):
            return _char_value
        return value_converter(column.type)


# ---------------------------------------------------------------------------------------------------------------
# types


def adapt_mariadb_type(type_: TypeEngine, *, key: bool = False) -> TypeEngine:
    """The MariaDB column type for a (PostgreSQL-reflected) source type; `key` for primary- and foreign-key columns,
    which need a bounded, indexable type."""
    if isinstance(type_, pg.DOMAIN):
        return adapt_mariadb_type(type_.data_type, key=key)
    if isinstance(type_, (sqltypes.JSON, sqltypes.ARRAY, pg.HSTORE)):
        return mysql.VARCHAR(KEY_STRING_LENGTH) if key else mysql.JSON()
    if isinstance(type_, sqltypes.Uuid):
        return mysql.CHAR(36)
    if isinstance(type_, sqltypes.LargeBinary):
        return mysql.VARBINARY(KEY_STRING_LENGTH) if key else mysql.LONGBLOB()
    if isinstance(type_, sqltypes.Enum):
        # A string, not MariaDB's ENUM: labels added at the source later would otherwise be refused.
        return mysql.VARCHAR(255)
    if isinstance(type_, sqltypes.Text):
        return mysql.VARCHAR(KEY_STRING_LENGTH) if key else mysql.LONGTEXT()
    if isinstance(type_, sqltypes.String):
        length = type_.length
        if isinstance(type_, sqltypes.CHAR) and length and length <= 255:
            return mysql.CHAR(length)
        if length and (key or length <= MAX_INLINE_VARCHAR):
            return mysql.VARCHAR(length)  # a key keeps the source's length, as the source enforces it
        return mysql.VARCHAR(KEY_STRING_LENGTH) if key else mysql.LONGTEXT()
    if isinstance(type_, sqltypes.DateTime):
        return mysql.DATETIME(fsp=6)
    if isinstance(type_, sqltypes.Time):
        return mysql.TIME(fsp=6)
    if isinstance(type_, (sqltypes.Interval, pg.INTERVAL)):
        return mysql.BIGINT()
    if isinstance(type_, sqltypes.REAL):
        return mysql.FLOAT(asdecimal=False)
    if isinstance(type_, sqltypes.Double):
        return mysql.DOUBLE(asdecimal=False)
    if isinstance(type_, sqltypes.Float):
        return mysql.FLOAT(asdecimal=False) if type_.precision and type_.precision <= 24 else mysql.DOUBLE(
            asdecimal=False)
    if isinstance(type_, sqltypes.Numeric):
        if type_.precision is None:
            return mysql.DECIMAL(65, 30)
        precision, scale = type_.precision, type_.scale or 0
        if scale < 0:  # PostgreSQL 15's negative scale rounds to tens, hundreds...: whole numbers, wider
            precision, scale = precision - scale, 0
        scale = min(scale, 30)
        return mysql.DECIMAL(min(max(precision, scale), 65), scale)
    if isinstance(type_, pg.OID):
        return mysql.BIGINT()
    if isinstance(type_, pg.MONEY):
        return mysql.DECIMAL(19, 2)
    try:
        generic = type_.as_generic()
        generic.compile(dialect=mysql.dialect())
    except (NotImplementedError, CompileError, UnsupportedCompilationError):
        # A PostgreSQL type without a generic counterpart (inet, tsvector, ranges, bit...) arrives as text.
        return mysql.VARCHAR(KEY_STRING_LENGTH) if key else mysql.LONGTEXT()
    return generic


class JsonText(mysql.JSON):
    """MariaDB's JSON, bound as the JSON text the applier already has (SQLAlchemy's JSON would encode that text
    again, as a JSON string)."""

    cache_ok = True

    def bind_processor(self, dialect: Any) -> None:
        return None


_MARIA = {"int2": mysql.SMALLINT(), "int4": mysql.INTEGER(), "int8": mysql.BIGINT(), "bool": mysql.BOOLEAN(),
          # real as DOUBLE: MariaDB stores a FLOAT exactly but returns it rounded to 6 digits; every float32 is a
          # double, so DOUBLE gives back the source's exact value.
          "float4": mysql.DOUBLE(asdecimal=False), "float8": mysql.DOUBLE(asdecimal=False), "date": mysql.DATE(),
          "time": mysql.TIME(fsp=6), "timetz": mysql.TIME(fsp=6), "timestamp": mysql.DATETIME(fsp=6),
          "timestamptz": mysql.DATETIME(fsp=6), "interval": mysql.BIGINT(), "uuid": mysql.CHAR(36),
          "money": mysql.DECIMAL(19, 2)}


def mariadb_type(source: types.SourceType, *, key: bool = False) -> TypeEngine:
    """The MariaDB column type of a source catalog type (docs/types.md, "MariaDB replica"); `key` for primary- and
    foreign-key columns, which need a bounded, indexable type. What MariaDB has no type for is text: PostgreSQL's
    text of the value."""
    kind = source.category
    text = mysql.VARCHAR(KEY_STRING_LENGTH) if key else mysql.LONGTEXT()
    if source.is_array or kind in ("json", "jsonb", "hstore"):
        return mysql.VARCHAR(KEY_STRING_LENGTH) if key else JsonText()
    if kind in _MARIA:
        return _MARIA[kind]
    if kind == "enum":
        # A string, not MariaDB's ENUM: labels added at the source later would otherwise be refused.
        return mysql.VARCHAR(KEY_STRING_LENGTH)
    if kind == "bytea":
        return mysql.VARBINARY(KEY_STRING_LENGTH) if key else mysql.LONGBLOB()
    if kind == "bit" and source.length and source.length <= 64:
        return mysql.BIT(source.length)
    if kind == "numeric":
        return adapt_mariadb_type(sqltypes.Numeric(source.precision, source.scale), key=key)
    if kind in ("char", "varchar"):
        length = source.length
        if kind == "char" and length and length <= 255:
            return mysql.CHAR(length)  # values without their trailing spaces (mariadb_converter)
        if length and (key or length <= MAX_INLINE_VARCHAR):
            return mysql.VARCHAR(length)
    return text


def mariadb_converter(source: types.SourceType) -> Callable[[Any], Any]:
    """What PyMySQL binds for a source type, from what consumers.apply.values gives."""
    kind = source.category
    if source.is_array:
        inner = _element_converter(source.element)  # type: ignore[arg-type]
        return lambda v: v if v is None or isinstance(v, str) else json_text([None if x is None else inner(x)
                                                                              for x in v])
    if kind == "char":
        return _char_value
    if kind == "bit":
        bits = types.bits_text(source.length)
        if source.length and source.length <= 64:
            return lambda v: v if v is None else int(bits(v), 2)
        return lambda v: v if v is None else bits(v)
    if kind == "point":
        return lambda v: v if v is None else types.point_text(v)
    if kind in types.DEBEZIUM_UNKNOWN or kind == "range":
        return lambda v: v if v is None else types.as_text(v)
    if kind in ("json", "jsonb", "hstore"):
        return _json_value
    if kind in ("timestamp", "timestamptz"):
        return _datetime_value
    if kind in ("time", "timetz"):
        return _time_value
    if kind == "interval":
        return _interval_value
    return _bindable


def _element_converter(source: types.SourceType) -> Callable[[Any], Any]:
    """An array element's value as it goes into the array's JSON."""
    kind = source.category
    if source.is_array:
        return mariadb_converter(source)
    if source.domain or kind in types.DEBEZIUM_UNKNOWN or kind == "range":
        return types.as_text  # arrays of domains and of unknown types: text in bytes
    if kind == "bit":
        return types.bits_text(source.length)
    if kind == "point":
        return types.point_text
    if kind in ("json", "jsonb"):
        return lambda v: json.loads(v) if isinstance(v, str) else v
    return lambda v: v


def _wide_decimal_check(column: str) -> Callable[[Any], Any]:
    """numeric without a precision goes to DECIMAL(65, 30), which would round a value with more than 30 decimals
    away in silence (and refuse more than 35 integer digits): such a value stops the applier, naming the column."""
    def check(value: Any) -> Any:
        if isinstance(value, Decimal) and value.is_finite():
            sign, digits, exponent = value.as_tuple()
            decimals = max(0, -exponent)
            integers = max(0, len(digits) + exponent)
            if decimals > 30 or integers > 35:
                raise ValueConversionError(column, "numeric", value, "MariaDB's DECIMAL(65, 30) holds 35 digits "
                                           "before the point and 30 after it; this value would be rounded or refused")
        return value
    return check


def _char_value(value: Any) -> Any:
    """char(n) without its trailing spaces. PostgreSQL's character(n) ignores them when it compares ('W05' and
    'W05  ' are one key) and Debezium sends them; MariaDB's CHAR drops them when it stores, and under a NO PAD
    collation a key sent with them would match nothing (a delete of 'W05  ' would leave the row)."""
    return value.rstrip(" ") if isinstance(value, str) else value


def _table_options(table: Table) -> None:
    # InnoDB explicitly: a server whose default engine is MyISAM would drop the foreign keys and the transactions.
    table.dialect_kwargs["mysql_engine"] = "InnoDB"
    table.dialect_kwargs["mysql_charset"] = CHARSET
    table.dialect_kwargs["mysql_collate"] = COLLATION


# ---------------------------------------------------------------------------------------------------------------
# values: what PyMySQL cannot bind, or would bind differently from the column type chosen above


def value_converter(type_: TypeEngine) -> Callable[[Any], Any]:
    """A function turning a decoded source value into one PyMySQL binds as the adapted column expects."""
    if isinstance(type_, pg.DOMAIN):
        return value_converter(type_.data_type)
    if isinstance(type_, (sqltypes.JSON, pg.HSTORE)):
        return _json_value
    if isinstance(type_, sqltypes.ARRAY):
        return _array_value
    if isinstance(type_, sqltypes.DateTime):
        return _datetime_value
    if isinstance(type_, sqltypes.Time):
        return _time_value
    if isinstance(type_, (sqltypes.Interval, pg.INTERVAL)):
        return _interval_value
    return _bindable


def _bindable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, Decimal, bytes)):
        return value
    if isinstance(value, datetime):
        return _datetime_value(value)
    if isinstance(value, time):
        return _time_value(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple, dict)):
        return json_text(value)
    if isinstance(value, timedelta):
        return _interval_value(value)
    return value


def _datetime_value(value: Any) -> Any:
    # DATETIME has no zone: an aware value is stored as UTC.
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _time_value(value: Any) -> Any:
    if isinstance(value, time) and value.tzinfo is not None and value.utcoffset() is not None:
        moment = datetime.combine(date(2000, 1, 1), value.replace(tzinfo=None)) - value.utcoffset()
        return moment.time()
    return value


def _interval_value(value: Any) -> Any:
    """Microseconds, as Debezium's default interval handling sends them."""
    if isinstance(value, timedelta):
        return value // timedelta(microseconds=1)
    if isinstance(value, str):
        match = _ISO_DURATION.match(value.strip())
        if match:
            parts = {k: float(v) for k, v in match.groupdict().items() if v and k != "sign"}
            days = (parts.get("years", 0) * 12 + parts.get("months", 0)) * _DAYS_PER_MONTH
            days += parts.get("weeks", 0) * 7 + parts.get("days", 0)
            seconds = ((days * 24 + parts.get("hours", 0)) * 60 + parts.get("minutes", 0)) * 60
            micros = round((seconds + parts.get("seconds", 0)) * 1_000_000)
            return -micros if match.group("sign") else micros
    return value


def _json_value(value: Any) -> Any:
    # JSON arrives as its text; anything already parsed is written back as text.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode()
    return json_text(value)


def _array_value(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return json_text(list(value))


def json_text(value: Any) -> str:
    """Compact JSON of a decoded value; numbers stay numbers, unless a Decimal has no exact float."""
    return json.dumps(value, default=_json_default, separators=(",", ":"), ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        if value == value.to_integral_value() and value.is_finite():
            return int(value)
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, timedelta):
        return _interval_value(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + b16encode(bytes(value)).decode().lower()  # PostgreSQL's text form of bytea
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} cannot be written as JSON")


# ---------------------------------------------------------------------------------------------------------------
# order for foreign keys checked row by row


def self_references(shape: TableShape) -> list[ForeignKeyShape]:
    return [fk for fk in shape.foreign_keys if fk.referred_table == shape.name]


def _reference_edges(rows: list[dict[str, Any] | None], references: list[ForeignKeyShape]) -> list[list[int]]:
    """children[j]: the indices of the rows that reference row j through a self-reference (j excluded)."""
    index: dict[tuple, int] = {}
    for i, row in enumerate(rows):
        if row is None:
            continue
        for n, fk in enumerate(references):
            values = tuple(row.get(c) for c in fk.referred_columns)
            if None not in values:
                index.setdefault((n, values), i)
    children: list[list[int]] = [[] for _ in rows]
    for i, row in enumerate(rows):
        if row is None:
            continue
        for n, fk in enumerate(references):
            values = tuple(row.get(c) for c in fk.columns)
            if None in values:
                continue
            j = index.get((n, values))
            if j is not None and j != i:
                children[j].append(i)
    return children


def parents_first(rows: list[dict[str, Any]], references: list[ForeignKeyShape]) -> tuple[list[int], list[int]]:
    """Row indices in an order where a row comes after the row of the batch it references (otherwise in their given
    order), and the indices left over because they sit in, or descend from, a reference cycle."""
    if not references:
        return list(range(len(rows))), []
    children = _reference_edges(rows, references)
    waiting = [0] * len(rows)
    for kids in children:
        for i in kids:
            waiting[i] += 1
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for child in children[i]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)
    return order, [i for i, n in enumerate(waiting) if n > 0]


def _references_itself(row: dict[str, Any], fk: ForeignKeyShape) -> bool:
    values = tuple(row.get(c) for c in fk.columns)
    return None not in values and values == tuple(row.get(c) for c in fk.referred_columns)


def children_first(keys: list[dict[str, Any]], stored: dict[tuple, dict[str, Any]], pk: list[str],
                   references: list[ForeignKeyShape]) -> tuple[list[list[int]], list[int]]:
    """Key indices in layers: no key of a layer is referenced by a key of the same or a later layer; and the keys
    left over in reference cycles, with their ancestors. `stored` holds the destination's current rows by key.

    A row referencing itself counts as a cycle: InnoDB refuses to delete it while checking foreign keys.
    """
    rows = [stored.get(tuple(key[c] for c in pk)) for key in keys]
    children = _reference_edges(rows, references)
    parents: list[list[int]] = [[] for _ in keys]
    remaining = [len(kids) for kids in children]
    for j, kids in enumerate(children):
        for i in kids:
            parents[i].append(j)
    for i, row in enumerate(rows):
        if row is not None and any(_references_itself(row, fk) for fk in references):
            remaining[i] += 1  # never placed in a layer
    layer = [i for i, n in enumerate(remaining) if n == 0]
    layers = []
    while layer:
        layers.append(layer)
        following = []
        for i in layer:
            for j in parents[i]:
                remaining[j] -= 1
                if remaining[j] == 0:
                    following.append(j)
        layer = sorted(following)
    placed = {i for layer in layers for i in layer}
    return layers, [i for i in range(len(keys)) if i not in placed]


# ---------------------------------------------------------------------------------------------------------------
# statements


# Statements carry their values as literals escaped by PyMySQL (as its own executemany does), so that a chunk's
# size is known exactly; they are run without parameters, so a `%` in them needs no escaping, and through SQLAlchemy,
# so that its logging and its exception classes apply as to any other statement.
_VERBATIM = {"no_parameters": True}


def _verbatim(sql: str) -> str:
    """SQL text placed in a template given to `_Literals`, where `%` introduces a placeholder."""
    return sql.replace("%", "%%")


class _Literals:
    """Fills `%s` templates with PyMySQL's escaping of the values (its public `mogrify`)."""

    def __init__(self, conn: Connection) -> None:
        self._cursor = conn.connection.driver_connection.cursor()

    def __call__(self, template: str, values: list[Any]) -> str:
        return self._cursor.mogrify(template, tuple(values))


def _execute(conn: Connection, sql: str) -> Any:
    return conn.exec_driver_sql(sql, execution_options=_VERBATIM)


def _run_chunks(conn: Connection, head: str, separator: str, tail: str, items: Iterable[str]) -> int:
    """Execute `head + items joined + tail` once per chunk of items (bounded in count and size); the affected rows."""
    count, chunk, size = 0, [], 0
    for item in items:
        if chunk and (len(chunk) >= CHUNK_ROWS or size + len(item) > CHUNK_CHARS):
            count += _execute(conn, head + separator.join(chunk) + tail).rowcount
            chunk, size = [], 0
        chunk.append(item)
        size += len(item) + len(separator)
    if chunk:
        count += _execute(conn, head + separator.join(chunk) + tail).rowcount
    return count


@contextmanager
def _foreign_key_checks_off(conn: Connection) -> Iterator[None]:
    previous = int(_execute(conn, "SELECT @@SESSION.foreign_key_checks").scalar())
    _execute(conn, "SET SESSION foreign_key_checks = 0")
    try:
        yield
    finally:
        _execute(conn, f"SET SESSION foreign_key_checks = {previous}")


# ---------------------------------------------------------------------------------------------------------------
# the columnar path's helpers (MariaDBDialect.apply_columnar)


@dataclass
class _ForeignKey:
    """A foreign key of the destination's catalog: `child`.`columns` references `parent`.`referred`."""

    name: str
    child: str
    columns: list[str]
    parent: str
    referred: list[str]


def _digest(*names: str) -> str:
    return hashlib.sha1("|".join(names).encode()).hexdigest()[:16]


def _pairs(q: Callable[[str], str], left: str, lefts: list[str], right: str, rights: list[str]) -> str:
    return " AND ".join(f"{left}.{q(a)} = {right}.{q(b)}" for a, b in zip(lefts, rights))


def _temporary_table(conn: Connection, name: str, columns: list[tuple[str, str]], key: list[str]) -> None:
    """A session-local table made afresh (neither statement ends the transaction, unlike other DDL in MariaDB),
    with the destination's collation so that its keys compare as the tables' do."""
    q = conn.dialect.identifier_preparer.quote_identifier
    spelled = [f"{q(c)} {kind} {'NOT NULL' if c in key else 'NULL'}" for c, kind in columns]
    if key:
        spelled.append(f"PRIMARY KEY ({', '.join(map(q, key))})")
    _execute(conn, f"DROP TEMPORARY TABLE IF EXISTS {name}")
    _execute(conn, f"CREATE TEMPORARY TABLE {name} ({', '.join(spelled)}) ENGINE=InnoDB "
                   f"DEFAULT CHARSET={CHARSET} COLLATE={COLLATION}")


def _backslash_escapes(conn: Connection) -> bool:
    """Whether the session reads a backslash in a string literal as an escape (unless sql_mode has
    NO_BACKSLASH_ESCAPES), as PyMySQL's own escaping asks the server."""
    from pymysql.constants import SERVER_STATUS

    return not conn.connection.driver_connection.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES


# Rows of a part turned into SQL literals at a time (apply_columnar).
LITERAL_ROWS = 5000
_QUOTE = pa.scalar("'", pa.large_string())
_EMPTY = pa.scalar("", pa.large_string())


def _row_literals(flat: pa.Table, table: Table, shape: TableShape, *, backslashes: bool) -> pa.ChunkedArray:
    """Each row of `flat` (columnar.flat_images) as the text between the parentheses of a VALUES list: SEQ, OP,
    CHANGE_LSN, then the table's columns, each value as mariadb_converter would bind it (a timestamp with time zone
    in UTC, char(n) without its trailing spaces, a boolean as 1 or 0); a delete's non-key columns NULL (its before
    image may hold Debezium's fillers, which are no values)."""
    is_delete = pc.equal(flat.column(columnar.OP), "d")
    literals = [_literal(flat.column(columnar.SEQ), sqltypes.BigInteger(), columnar.SEQ, backslashes),
                _literal(flat.column(columnar.OP), sqltypes.String(), columnar.OP, backslashes),
                _literal(flat.column(columnar.CHANGE_LSN), sqltypes.BigInteger(), columnar.CHANGE_LSN, backslashes)]
    for name in shape.column_names:
        column = flat.column(name)
        if name not in shape.primary_key:
            column = pc.if_else(is_delete, pa.scalar(None, column.type), column)
        literals.append(_literal(column, table.c[name].type, name, backslashes))
    return pc.binary_join_element_wise(*literals, pa.scalar(",", pa.large_string()))


def _literal(column: Any, kind: TypeEngine, name: str, backslashes: bool) -> Any:
    """One column's values as SQL literals (NULL for a null), computed by Arrow."""
    arrow = column.type
    quoted = True
    if pa.types.is_string(arrow) or pa.types.is_large_string(arrow):
        if isinstance(kind, sqltypes.DateTime):
            # Debezium's ZonedTimestamp (ISO-8601 with its zone): DATETIME holds the moment in UTC (_datetime_value).
            text = column.cast(pa.timestamp("us", "UTC")).cast(pa.timestamp("us")).cast(pa.large_string())
        else:
            text = column.cast(pa.large_string())
            if isinstance(kind, sqltypes.CHAR):
                text = pc.utf8_rtrim(text, characters=" ")  # _char_value
            if backslashes:
                text = pc.replace_substring(text, "\\", "\\\\")
                text = pc.replace_substring(text, "'", "\\'")
            else:
                text = pc.replace_substring(text, "'", "''")
    elif pa.types.is_boolean(arrow):
        text, quoted = column.cast(pa.int8()).cast(pa.large_string()), False
    elif pa.types.is_timestamp(arrow):
        text = column.cast(pa.timestamp("us", arrow.tz)).cast(pa.timestamp("us")).cast(pa.large_string())
    elif pa.types.is_date(arrow):
        text = column.cast(pa.large_string())
    elif pa.types.is_floating(arrow):
        column = column.cast(pa.float64())  # a real's exact value, as Python's float of it (DOUBLE holds it)
        finite = pc.is_finite(column)
        if not pc.all(pc.or_kleene(finite, pc.is_null(column))).as_py():
            bad = pc.filter(column, pc.invert(pc.fill_null(finite, True)))[0].as_py()
            raise ValueConversionError(name, str(arrow), bad, "MariaDB's DOUBLE holds no NaN or infinity")
        text, quoted = column.cast(pa.large_string()), False
    elif pa.types.is_integer(arrow) or pa.types.is_decimal(arrow):
        text, quoted = column.cast(pa.large_string()), False
    else:
        text = column.cast(pa.large_string())
    if quoted:
        text = pc.binary_join_element_wise(_QUOTE, text, _QUOTE, _EMPTY)
    return pc.fill_null(text, pa.scalar("NULL", pa.large_string()))


def _strings(rows: Any, size: int = CHUNK_ROWS) -> Iterator[str]:
    """The values of a chunked string array as Python strings, a slice at a time (never all of them at once)."""
    for chunk in rows.chunks:
        for start in range(0, len(chunk), size):
            yield from chunk.slice(start, size).to_pylist()
