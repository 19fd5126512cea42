"""The SQL each destination dialect sends, read without a database: upserts that let only a newer change win, keyed
deletes guarded the same way, tables without a key changed one row at a time, the offsets stored, the analytics
history appended without repeats, tables emptied; and a hostile table name that stays inside its quotes everywhere.

The dialects are the real ones, on SQLAlchemy's real PostgreSQL, MariaDB (PyMySQL) and DuckDB dialects, which quote
and compile; only the connection is a recorder that keeps each statement's text (and what a COPY or an Arrow
registration would have carried) instead of sending it."""

from __future__ import annotations

import re
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import psycopg
import pymysql
import pytest
from sqlalchemy import BigInteger, Integer, Text, create_engine
from sqlalchemy.sql import ClauseElement

from cdc.source_tables import LSN_COLUMN, ColumnShape, TableShape
from consumers.apply.dialects import dialect_for
from consumers.apply.events import ChangeEvent
from consumers.apply.plan import KeylessChange

URLS = {"postgresql": "postgresql+psycopg://u@db/state", "mariadb": "mysql+pymysql://u@db/state",
        "duckdb": "duckdb:///:memory:"}
HOSTILE = 'we"ird; drop'


class Result:
    def __init__(self, rows: list[tuple] | None = None, rowcount: int = 1) -> None:
        self.rows = rows or []
        self.rowcount = rowcount

    def __iter__(self):
        return iter(self.rows)

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else 1

    def fetchall(self) -> list[tuple]:
        return self.rows

    def fetchone(self) -> tuple | None:
        return self.rows[0] if self.rows else None


class Recorder:
    """A SQLAlchemy Connection inside a transaction, as far as the dialects use one, that records what they send.
    `answers`: rows returned to a statement containing the key (MariaDB's information_schema reads)."""

    def __init__(self, sa_dialect: Any, answers: dict[str, list[tuple]] | None = None) -> None:
        self.dialect = sa_dialect
        self.statements: list[str] = []
        self.params: list[Any] = []
        self.copied: dict[str, list[tuple]] = {}  # COPY statement -> rows written
        self.registered: dict[str, Any] = {}  # Arrow tables registered with DuckDB, by name
        self.answers = answers or {}
        self.connection = SimpleNamespace(driver_connection=_Driver(self))

    def _answer(self, sql: str) -> Result:
        self.statements.append(" ".join(sql.split()))  # whitespace as one space: the text is what is asserted
        return Result(next((rows for key, rows in self.answers.items() if key in sql), []))

    def exec_driver_sql(self, sql: str, params: Any = None, execution_options: Any = None) -> Result:
        self.params.append(params)
        return self._answer(sql)

    def execute(self, statement: Any, params: Any = None) -> Result:
        self.params.append([dict(p) for p in params] if isinstance(params, list) else params)  # as it was sent
        if isinstance(statement, ClauseElement):
            # Values inline when the statement carries them (a keyless change); placeholders for executemany.
            literal = params is None
            sql = str(statement.compile(dialect=self.dialect, compile_kwargs={"literal_binds": literal}))
        else:
            sql = str(statement)
        return self._answer(sql)


class _Driver:
    """The DBAPI connection under the Recorder: psycopg's execute and COPY, PyMySQL's mogrify, DuckDB's register."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        # What psycopg's sql.Composable.as_string asks of a connection: none open, its default adapters.
        self.connection = None
        self.adapters = psycopg.adapters
        # PyMySQL escapes values with a connection's settings; this one is never opened.
        self._pymysql = pymysql.connect(defer_connect=True, charset="utf8mb4")
        self._pymysql.server_status = 0  # a server without NO_BACKSLASH_ESCAPES, MariaDB's default

    def execute(self, query: Any, params: Any = None) -> Result:
        return self.recorder._answer(query.as_string(None) if hasattr(query, "as_string") else str(query))

    def cursor(self) -> Any:
        recorder, mysql = self.recorder, self._pymysql

        @contextmanager
        def copy(query: Any):
            rows: list[tuple] = []
            yield SimpleNamespace(write_row=rows.append, write=lambda data: rows.append((data,)))
            text = query.as_string(None)
            recorder.statements.append(text)
            recorder.copied[text] = rows

        return SimpleNamespace(copy=copy, mogrify=lambda template, values: mysql.cursor().mogrify(template, values))

    def register(self, name: str, table: Any) -> None:
        self.recorder.registered[name] = table

    def unregister(self, name: str) -> None:
        pass


def dialect(backend: str, kind: str = "replica") -> Any:
    return dialect_for(create_engine(URLS[backend]), kind)


def recorder(backend: str, **answers: list[tuple]) -> Recorder:
    return Recorder(create_engine(URLS[backend]).dialect, answers)


def shape(table: str = "public.person", *, key: bool = True) -> TableShape:
    return TableShape(table, (ColumnShape("id", BigInteger(), False), ColumnShape("name", Text(), True),
                              ColumnShape("age", Integer(), True)), ("id",) if key else ())


ROWS = [{"id": 1, "name": "O'Brien", "age": 40, LSN_COLUMN: 100}, {"id": 2, "name": "Ann", "age": None, LSN_COLUMN: -1}]
KEYS = [{"id": 3, LSN_COLUMN: 120}]


def unquoted(sql: str, quote: str) -> str:
    """`sql` without its quoted identifiers and string literals: what the database reads as SQL itself."""
    identifiers = r'"(?:[^"]|"")*"' if quote == '"' else r"`(?:[^`]|``)*`"
    return re.sub(r"'(?:[^'\\]|''|\\.)*'", "''", re.sub(identifiers, "I", sql))


def one(statements: list[str], pattern: str) -> str:
    found = [s for s in statements if re.search(pattern, s)]
    assert len(found) == 1, (pattern, statements)
    return found[0]


# -- upserts ---------------------------------------------------------------------------------------------------------

def test_postgresql_upsert_copies_the_rows_and_updates_only_where_the_change_is_newer():
    conn = recorder("postgresql")
    assert dialect("postgresql").upsert(conn, shape(), ROWS, ["id", "name", "age"]) == 1
    copy = one(conn.statements, r"^COPY ")
    assert conn.copied[copy] == [(1, "O'Brien", 40, 100), (2, "Ann", None, -1)]
    stage = re.match(r'COPY ("_cdc_stage_[0-9a-f]+")', copy).group(1)
    upsert = one(conn.statements, r"^INSERT INTO")
    assert upsert.startswith(f'INSERT INTO "public"."person" AS t ("id", "name", "age", "_cdc_lsn") '
                             f'SELECT s."id", s."name", s."age", s."_cdc_lsn" FROM {stage} AS s')
    assert upsert.endswith('ON CONFLICT ("id") DO UPDATE SET "name" = EXCLUDED."name", "age" = EXCLUDED."age", '
                           '"_cdc_lsn" = GREATEST(t."_cdc_lsn", EXCLUDED."_cdc_lsn") '
                           'WHERE t."_cdc_lsn" < EXCLUDED."_cdc_lsn" OR EXCLUDED."_cdc_lsn" = -1')
    assert conn.statements[-1] == f"TRUNCATE {stage}"  # the session's staging table emptied for the next batch


def test_mariadb_upsert_assigns_the_position_last_so_every_column_compares_with_the_stored_one():
    conn = recorder("mariadb")
    dialect("mariadb").upsert(conn, shape(), ROWS, ["id", "name", "age"])
    upsert = one(conn.statements, r"^INSERT INTO")
    newer = "(`_cdc_lsn` < VALUES(`_cdc_lsn`) OR VALUES(`_cdc_lsn`) = -1)"
    assert upsert == ("INSERT INTO person (`id`, `name`, `age`, `_cdc_lsn`) VALUES (1,'O\\'Brien',40,100),"
                      "(2,'Ann',NULL,-1) ON DUPLICATE KEY UPDATE "
                      f"`name` = IF({newer}, VALUES(`name`), `name`), `age` = IF({newer}, VALUES(`age`), `age`), "
                      "`_cdc_lsn` = GREATEST(`_cdc_lsn`, VALUES(`_cdc_lsn`))")


def test_duckdb_upsert_reads_registered_arrow_rows_and_updates_only_where_the_change_is_newer():
    conn = recorder("duckdb")
    dialect("duckdb", "analytics").upsert(conn, shape(), ROWS, ["id", "name", "age"])
    (name, rows), = conn.registered.items()
    assert rows.to_pylist() == ROWS
    upsert = one(conn.statements, r"^INSERT INTO")
    assert f"FROM {name} ON CONFLICT (\"id\") DO UPDATE SET" in upsert
    assert upsert.endswith('"_cdc_lsn" = GREATEST("public.person"."_cdc_lsn", EXCLUDED."_cdc_lsn") '
                           'WHERE "public.person"."_cdc_lsn" < EXCLUDED."_cdc_lsn" OR EXCLUDED."_cdc_lsn" = -1')


# -- deletes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, expected", [
    ("postgresql", r'^DELETE FROM "public"\."person" AS t USING "_cdc_stage_[0-9a-f]+" AS s '
                   r'WHERE t\."id" = s\."id" AND t\."_cdc_lsn" < s\."_cdc_lsn"$'),
    ("mariadb", r"^DELETE FROM person WHERE \(`id` = 3 AND `_cdc_lsn` < 120\)$"),
    ("duckdb", r'^DELETE FROM "public\.person" t USING _cdc_stage_[0-9a-f]+ s WHERE t\."id" = s\."id" '
               r'AND t\."_cdc_lsn" < s\."_cdc_lsn"$'),
])
def test_a_delete_removes_a_row_only_when_the_stored_change_is_older(backend, expected):
    conn = recorder(backend)
    dialect(backend, "analytics" if backend == "duckdb" else "replica").delete(conn, shape(), KEYS)
    one(conn.statements, expected)


def test_mariadb_deletes_many_keys_in_one_statement_each_key_with_its_own_position():
    conn = recorder("mariadb")
    dialect("mariadb").delete(conn, shape(), [{"id": 3, LSN_COLUMN: 120}, {"id": 4, LSN_COLUMN: 130}])
    one(conn.statements, r"^DELETE FROM person WHERE \(`id` = 3 AND `_cdc_lsn` < 120\) OR "
                         r"\(`id` = 4 AND `_cdc_lsn` < 130\)$")


# -- tables without a primary key ------------------------------------------------------------------------------------

KEYLESS = [KeylessChange("insert", None, {"id": 1, "name": "a", "age": 1, LSN_COLUMN: 10}),
           KeylessChange("update", {"id": 1, "name": "a", "age": 1}, {"id": 1, "name": "b", "age": 1, LSN_COLUMN: 11}),
           KeylessChange("delete", {"id": 1, "name": "b", "age": None}, None)]


@pytest.mark.parametrize("backend, one_row", [
    ("postgresql", 'ctid = (SELECT _cdc_one.ctid FROM public.person AS _cdc_one WHERE '),
    ("mariadb", " LIMIT 1"),
    ("duckdb", 'rowid = (SELECT _cdc_one.rowid FROM "public.person" AS _cdc_one WHERE '),
])
def test_keyless_changes_apply_in_order_each_update_and_delete_to_exactly_one_equal_row(backend, one_row):
    conn = recorder(backend)
    written = dialect(backend, "analytics" if backend == "duckdb" else "replica").apply_keyless(
        conn, shape(key=False), KEYLESS)
    assert written == 3
    insert, update, delete = conn.statements
    assert insert.startswith("INSERT INTO") and conn.params[0] == [{"id": 1, "name": "a", "age": 1, LSN_COLUMN: 10}]
    assert update.startswith("UPDATE") and one_row in update
    assert delete.startswith("DELETE FROM") and one_row in delete
    # The before image is matched NULL-safe (age was NULL): an equality would match nothing.
    null_safe = "<=>" if backend == "mariadb" else "IS NOT DISTINCT FROM"
    assert f"age {null_safe} NULL" in delete.replace('"', "").replace("`", "")


def test_a_keyless_change_that_matches_no_row_is_an_error_naming_the_table():
    from consumers.apply.dialects.base import NoMatchingRow

    conn = recorder("postgresql")
    conn.execute = lambda statement, params=None: Result(rowcount=0)  # no row equals the before image
    with pytest.raises(NoMatchingRow, match=r"public\.person has no primary key.*no row of the destination equals"):
        dialect("postgresql").apply_keyless(conn, shape(key=False), KEYLESS[1:2])


# -- offsets ---------------------------------------------------------------------------------------------------------

OFFSETS = {("district.person", 0): 42, ("district.transaction", 0): 7}


def test_postgresql_stores_offsets_with_one_upsert_of_every_partition():
    conn = recorder("postgresql")
    dialect("postgresql").store_offsets(conn, "district", OFFSETS)
    stored, = conn.statements
    assert stored.startswith("INSERT INTO _cdc_offsets (pipeline, topic, kafka_partition, next_offset, updated_at) "
                             "VALUES (%(pipeline)s")
    assert stored.endswith("ON CONFLICT (pipeline, topic, kafka_partition) DO UPDATE SET next_offset = "
                           "excluded.next_offset, updated_at = excluded.updated_at")
    assert [(r["pipeline"], r["topic"], r["kafka_partition"], r["next_offset"]) for r in conn.params[0]] == [
        ("district", "district.person", 0, 42), ("district", "district.transaction", 0, 7)]


def test_mariadb_stores_offsets_with_on_duplicate_key_update():
    conn = recorder("mariadb")
    dialect("mariadb").store_offsets(conn, "district", OFFSETS)
    stored = one(conn.statements, r"^INSERT INTO _cdc_offsets")
    assert stored.endswith("ON DUPLICATE KEY UPDATE next_offset = VALUES(next_offset), updated_at = "
                           "VALUES(updated_at)")
    assert len(conn.params[-1]) == 2


def test_duckdb_stores_offsets_from_one_arrow_table():
    conn = recorder("duckdb")
    dialect("duckdb", "analytics").store_offsets(conn, "district", OFFSETS)
    (name, rows), = conn.registered.items()
    assert [(r["pipeline"], r["topic"], r["kafka_partition"], r["next_offset"]) for r in rows.to_pylist()] == [
        ("district", "district.person", 0, 42), ("district", "district.transaction", 0, 7)]
    assert conn.statements == [f"INSERT INTO _cdc_offsets SELECT * FROM {name} ON CONFLICT (pipeline, topic, "
                               "kafka_partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = "
                               "EXCLUDED.updated_at"]


def test_every_dialect_declares_the_one_offsets_table():
    from consumers.apply.dialects.bookkeeping import OFFSETS as DECLARED

    for backend in URLS:
        offsets = dialect(backend, "analytics" if backend == "duckdb" else "replica").offsets
        assert offsets.name == DECLARED.name == "_cdc_offsets"
        assert [(c.name, type(c.type), c.primary_key) for c in offsets.columns] == \
            [(c.name, type(c.type), c.primary_key) for c in DECLARED.columns]
    # A dialect's copy is its own: MariaDB's table options do not reach the declaration.
    assert dialect("mariadb").offsets.dialect_kwargs["mysql_engine"] == "InnoDB"
    assert "mysql_engine" not in DECLARED.dialect_kwargs


# -- the analytics history -------------------------------------------------------------------------------------------

def events() -> list[tuple[ChangeEvent, dict]]:
    def change(op: str, offset: int, row: dict) -> tuple[ChangeEvent, dict]:
        return (ChangeEvent(topic="district.person", partition=0, offset=offset, table="public.person", op=op,
                            key={"id": row["id"]}, before=None, after=row, lsn=100 + offset, tx_id=f"7:{offset}",
                            tx_order=offset, commit_ts_ms=1_700_000_000_000, snapshot=False, xid="7"), row)

    row = {"id": 1, "name": "a", "age": 1}
    # The same change twice (Debezium re-sent its transaction into this batch), then a later one.
    return [change("c", 1, row), change("c", 1, row), change("u", 2, {**row, "name": "b"})]


def test_postgresql_history_is_appended_once_per_change_never_repeating_one_it_holds():
    conn = recorder("postgresql")
    dialect("postgresql", "analytics").append_history(conn, shape(), events())
    copy = one(conn.statements, r"^COPY ")
    assert [r[-4:-2] for r in conn.copied[copy]] == [("c", 101), ("u", 102)]  # the repeat dropped in the batch
    append = one(conn.statements, r'^INSERT INTO "public"."person__history"')
    assert 'WHERE NOT EXISTS (SELECT 1 FROM "public"."person__history" h WHERE h._cdc_lsn = s._cdc_lsn ' \
           'AND h._cdc_op = s._cdc_op AND h."id" = s."id"' in append


def test_duckdb_history_skips_changes_it_holds_reading_only_the_batchs_positions():
    conn = recorder("duckdb")
    dialect("duckdb", "analytics").append_history(conn, shape(), events())
    (name, rows), = conn.registered.items()
    assert [(r["_cdc_op"], r["_cdc_lsn"]) for r in rows.to_pylist()] == [("c", 101), ("u", 102)]
    append = one(conn.statements, r'^INSERT INTO "public.person__history"')
    assert f"FROM {name})" in append and "ORDER BY _cdc_seq" in append
    assert "NOT EXISTS (SELECT 1 FROM \"public.person__history\" h WHERE h._cdc_lsn = s._cdc_lsn" in append
    assert "AND h._cdc_lsn BETWEEN 101 AND 102)" in append  # the history's row groups outside it are skipped


def test_a_replica_keeps_no_history_and_says_so():
    with pytest.raises(NotImplementedError, match="mariadb destinations keep no history"):
        dialect("mariadb").append_history(recorder("mariadb"), shape(), events())


# -- emptying a table ------------------------------------------------------------------------------------------------

def test_postgresql_truncates_with_the_tables_that_reference_it():
    conn = recorder("postgresql")
    dialect("postgresql").truncate(conn, shape())
    assert conn.statements == ['TRUNCATE public.person CASCADE']


def test_mariadb_empties_the_referencing_tables_first_with_foreign_key_checks_off_meanwhile():
    conn = recorder("mariadb", REFERENTIAL_CONSTRAINTS=[("enrollment", "person"), ("grade", "enrollment")])
    dialect("mariadb").truncate(conn, shape())
    deletes = [s for s in conn.statements if s.startswith("DELETE")]
    assert deletes == ["DELETE FROM `grade`", "DELETE FROM `enrollment`", "DELETE FROM `person`"]
    off, on = conn.statements.index("SET SESSION foreign_key_checks = 0"), conn.statements.index(
        "SET SESSION foreign_key_checks = 1")
    assert off < conn.statements.index(deletes[0]) and conn.statements.index(deletes[-1]) < on


def test_duckdb_empties_a_table_with_delete():
    conn = recorder("duckdb")
    dialect("duckdb", "analytics").truncate(conn, shape())
    assert conn.statements == ['DELETE FROM "public.person"']


# -- a hostile table name --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", list(URLS))
def test_a_hostile_table_name_stays_inside_its_quotes_in_every_statement(backend):
    hostile = shape(f"public.{HOSTILE}")
    d = dialect(backend, "analytics" if backend == "duckdb" else "replica")
    conn = recorder(backend)
    d.upsert(conn, hostile, ROWS, ["id", "name", "age"])
    d.delete(conn, hostile, KEYS)
    d.apply_keyless(conn, shape(f"public.{HOSTILE}", key=False), KEYLESS)
    d.truncate(conn, hostile)
    if d.keeps_history:
        d.append_history(conn, hostile, events())
    quote = "`" if backend == "mariadb" else '"'
    written = [s for s in conn.statements if "ird; drop" in s]
    assert len(written) >= 5, conn.statements  # the name is in what was sent...
    for sql in written:
        assert "drop" not in unquoted(sql, quote), sql  # ...and only ever inside a quoted identifier
    escaped = HOSTILE.replace('"', '""') if quote == '"' else HOSTILE
    assert all(escaped in s for s in written), written


# -- what the operations ask of a backend (verify, query, replay, lag) -----------------------------------------------

def test_each_backend_says_how_it_is_read_compared_and_backed_up_without_a_connection():
    from sqlalchemy.engine import make_url

    from consumers.apply.dialects import dialect_class
    from consumers.ops.compare import Kind

    def of(backend: str, kind: str = "replica") -> Any:
        return dialect_class(make_url(URLS[backend]), kind)

    replica, warehouse, maria, duck = of("postgresql"), of("postgresql", "analytics"), of("mariadb"), of("duckdb")
    assert [d.backups for d in (replica, warehouse, maria, duck)] == ["schema", None, None, "file"]
    assert [d.read_only_access for d in (replica, warehouse, maria, duck)] == [None, "role", None, "file"]
    assert [d.holds_file for d in (replica, warehouse, maria, duck)] == [False, False, False, True]
    assert maria.quote("a`b") == "`a``b`" and duck.quote('a"b') == '"a""b"'
    # The same canonical text (microseconds since the epoch) spelled in each database's SQL.
    stamp = Kind("timestamp")
    assert replica.canon().column(stamp, '"t"').startswith('(CASE WHEN isfinite("t") THEN (extract(epoch from "t")')
    assert maria.canon().column(stamp, "`t`") == \
        "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', `t`) AS CHAR)"
    assert duck.canon().column(stamp, '"t"') == 'CAST(epoch_us("t") AS VARCHAR)'
    # A DuckDB file that keeps a type as text is read as text, never cast (a failed cast would fail the query).
    assert duck.canon().column(stamp, '"t"', "VARCHAR") == 'CAST("t" AS VARCHAR)'
    assert maria.canon().literal("a\\'b") == "'a\\\\''b'"  # MariaDB reads backslashes in literals as escapes
