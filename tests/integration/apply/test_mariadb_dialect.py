"""The MariaDB destination dialect on the stack's real MariaDB: tables, conditional upserts and deletes, offsets."""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.exc import IntegrityError

from cdc.source_tables import ColumnShape, ForeignKeyShape, TableShape
from consumers.apply.dialects import SchemaChangeError, dialect_for
from consumers.apply.dialects.mariadb import MariaDBDialect
from tests.integration.pipelines import fresh_mariadb_database

SCHOOL = TableShape(
    "public.school",
    (ColumnShape("id", pg.INTEGER(), False), ColumnShape("name", pg.VARCHAR(100), False)),
    ("id",),
)
PERSON = TableShape(
    "public.person",
    (ColumnShape("id", pg.INTEGER(), False), ColumnShape("school_id", pg.INTEGER(), True),
     ColumnShape("mentor_id", pg.INTEGER(), True), ColumnShape("name", pg.TEXT(), True),
     ColumnShape("born", pg.DATE(), True)),
    ("id",),
    (ForeignKeyShape(("school_id",), "public.school", ("id",)),
     ForeignKeyShape(("mentor_id",), "public.person", ("id",))),
)
KINDS = TableShape(
    "lab.kinds",
    (ColumnShape("id", pg.UUID(), False), ColumnShape("doc", pg.JSONB(), True),
     ColumnShape("tags", pg.ARRAY(pg.TEXT()), True), ColumnShape("blob", pg.BYTEA(), True),
     ColumnShape("note", pg.TEXT(), True), ColumnShape("at", pg.TIMESTAMP(timezone=True), True),
     ColumnShape("local_at", pg.TIMESTAMP(), True), ColumnShape("t", pg.TIME(), True),
     ColumnShape("span", pg.INTERVAL(), True), ColumnShape("amount", pg.NUMERIC(), True),
     ColumnShape("price", pg.NUMERIC(10, 2), True), ColumnShape("grade", pg.ENUM("a", "b", name="grade"), True),
     ColumnShape("ratio", pg.DOUBLE_PRECISION(), True), ColumnShape("r", pg.REAL(), True),
     ColumnShape("flag", pg.BOOLEAN(), True), ColumnShape("code", pg.VARCHAR(20), True)),
    ("id",),
)
SHAPES = {s.name: s for s in (SCHOOL, PERSON, KINDS)}


@pytest.fixture
def engine(stack):
    """An engine on a fresh, uniquely named database of the stack's MariaDB; dropped afterwards."""
    for url in fresh_mariadb_database(stack):
        engine = create_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def dialect(engine):
    dialect = dialect_for(engine)
    assert isinstance(dialect, MariaDBDialect)
    with engine.begin() as conn:
        dialect.ensure_offsets_table(conn)
        for shape in (SCHOOL, PERSON, KINDS):
            dialect.ensure_table(conn, shape, SHAPES)
    return dialect


def rows(engine, sql: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]


def person(id_, lsn, *, school=1, mentor=None, name=None):
    return {"id": id_, "school_id": school, "mentor_id": mentor, "name": name or f"p{id_}", "born": date(2010, 1, id_),
            "_cdc_lsn": lsn}


PERSON_COLUMNS = ["id", "school_id", "mentor_id", "name", "born"]


def test_upserted_rows_are_stored_and_an_older_change_never_overwrites(engine, dialect):
    with engine.begin() as conn:
        dialect.upsert(conn, SCHOOL, [{"id": 1, "name": "North 100% 'quoted' \\ back", "_cdc_lsn": 10}], ["id", "name"])
        # Children before their mentors in the batch: the dialect sorts them parent first.
        batch = [person(3, 10, mentor=2), person(2, 10, mentor=1), person(1, 10), person(4, 10)]
        dialect.upsert(conn, PERSON, batch, PERSON_COLUMNS)
    assert rows(engine, "select id, name, _cdc_lsn from school") == [(1, "North 100% 'quoted' \\ back", 10)]
    assert rows(engine, "select id, school_id, mentor_id, name, born, _cdc_lsn from person order by id") == [
        (p["id"], 1, p["mentor_id"], p["name"], p["born"], 10) for p in sorted(batch, key=lambda p: p["id"])]

    with engine.begin() as conn:
        dialect.upsert(conn, PERSON, [person(1, 5, name="older"), person(2, 20, mentor=1, name="newer")],
                       PERSON_COLUMNS)
        # Equal LSN: a replay of the same change, left alone too.
        dialect.upsert(conn, PERSON, [person(3, 10, name="replayed")], PERSON_COLUMNS)
    assert rows(engine, "select id, name, _cdc_lsn from person where id <= 3 order by id") == [
        (1, "p1", 10), (2, "newer", 20), (3, "p3", 10)]

    # Only the named columns are written (an unchanged TOASTed column is left out, say).
    with engine.begin() as conn:
        dialect.upsert(conn, PERSON, [{"id": 4, "name": "renamed", "_cdc_lsn": 30}], ["id", "name"])
    assert rows(engine, "select name, born, school_id, _cdc_lsn from person where id = 4") == [
        ("renamed", date(2010, 1, 4), 1, 30)]


def test_a_delete_older_than_the_row_does_not_delete_and_chains_go_children_first(engine, dialect):
    with engine.begin() as conn:
        dialect.upsert(conn, SCHOOL, [{"id": 1, "name": "North", "_cdc_lsn": 10}], ["id", "name"])
        dialect.upsert(conn, PERSON, [person(1, 10), person(2, 10, mentor=1), person(3, 10, mentor=2),
                                      person(4, 50)], PERSON_COLUMNS)
    with engine.begin() as conn:
        assert dialect.delete(conn, PERSON, [{"id": 4, "_cdc_lsn": 40}]) == 0
    assert rows(engine, "select id from person where id = 4") == [(4,)]

    # Parents listed first: deleting them first would break their children's foreign keys.
    with engine.begin() as conn:
        deleted = dialect.delete(conn, PERSON, [{"id": 1, "_cdc_lsn": 20}, {"id": 2, "_cdc_lsn": 20},
                                                {"id": 3, "_cdc_lsn": 20}, {"id": 99, "_cdc_lsn": 20}])
    assert deleted == 3
    assert rows(engine, "select id from person order by id") == [(4,)]


def test_foreign_keys_exist_and_a_child_without_its_parent_is_refused(engine, dialect):
    fks = rows(engine, "select table_name, column_name, referenced_table_name, referenced_column_name "
                       "from information_schema.key_column_usage "
                       "where table_schema = database() and referenced_table_name is not null order by column_name")
    assert fks == [("person", "mentor_id", "person", "id"), ("person", "school_id", "school", "id")]
    with pytest.raises(IntegrityError, match="foreign key constraint fails"), engine.begin() as conn:
        dialect.upsert(conn, PERSON, [person(1, 10, school=7)], PERSON_COLUMNS)
    assert rows(engine, "select count(*) from person") == [(0,)]


def test_mentors_referencing_each_other_are_written_and_deleted_together(engine, dialect):
    with engine.begin() as conn:
        dialect.upsert(conn, SCHOOL, [{"id": 1, "name": "North", "_cdc_lsn": 10}], ["id", "name"])
        dialect.upsert(conn, PERSON, [person(1, 10, mentor=2), person(2, 10, mentor=1), person(3, 10, mentor=1),
                                      person(4, 10, mentor=4)], PERSON_COLUMNS)
        assert conn.exec_driver_sql("select @@foreign_key_checks").scalar() == 1
    assert rows(engine, "select id, mentor_id from person order by id") == [(1, 2), (2, 1), (3, 1), (4, 4)]
    # InnoDB would refuse each of these deletes one at a time, the self-mentored 4 included.
    with engine.begin() as conn:
        assert dialect.delete(conn, PERSON, [{"id": i, "_cdc_lsn": 20} for i in (1, 2, 3, 4)]) == 4
        assert conn.exec_driver_sql("select @@foreign_key_checks").scalar() == 1
    assert rows(engine, "select count(*) from person") == [(0,)]


def test_every_type_round_trips(engine, dialect):
    key = uuid.UUID("6f1c2a5e-1c1e-4a57-9d64-2d2f6b0f7e11")
    row = {
        "id": key, "doc": '{"a": [1, 2], "b": "\\u00e9t\\u00e9"}', "tags": ["x", "y z"], "blob": b"\x00\xff\x10",
        "note": "long text \U0001f600",
        "at": datetime(2024, 3, 1, 12, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
        "local_at": datetime(2024, 3, 1, 12, 30, 0, 5), "t": time(23, 59, 59, 999999),
        "span": timedelta(days=2, hours=3, microseconds=7), "amount": Decimal("12345.678901234567890123456789"),
        "price": Decimal("9.99"), "grade": "b", "ratio": 0.1, "r": 1.5, "flag": True, "code": "abc", "_cdc_lsn": 1,
    }
    with engine.begin() as conn:
        dialect.upsert(conn, KINDS, [row], [c for c in row if c != "_cdc_lsn"])
    (got,) = rows(engine, "select id, doc, tags, `blob`, note, `at`, local_at, t, span, amount, price, grade, ratio, "
                          "r, flag, code from lab__kinds")
    assert got[0] == str(key)
    assert json.loads(got[1]) == {"a": [1, 2], "b": "été"} and json.loads(got[2]) == ["x", "y z"]
    assert got[3] == b"\x00\xff\x10" and got[4] == "long text \U0001f600"
    assert got[5] == datetime(2024, 3, 1, 10, 30, 0, 123456)  # stored as UTC
    assert got[6] == datetime(2024, 3, 1, 12, 30, 0, 5)
    assert got[7] == timedelta(hours=23, minutes=59, seconds=59, microseconds=999999)  # PyMySQL reads TIME so
    assert got[8] == (2 * 86400 + 3 * 3600) * 1_000_000 + 7
    assert got[9] == Decimal("12345.678901234567890123456789") and got[10] == Decimal("9.99")
    assert got[11:] == ("b", 0.1, 1.5, 1, "abc")


def test_a_new_source_column_is_added_and_a_dropped_one_is_refused(engine, dialect):
    with engine.begin() as conn:
        dialect.upsert(conn, SCHOOL, [{"id": 1, "name": "North", "_cdc_lsn": 10}], ["id", "name"])
    grown = TableShape("public.school", (*SCHOOL.columns, ColumnShape("motto", pg.VARCHAR(50), True)), ("id",))
    fresh = MariaDBDialect(engine)  # a restarted applier sees the new shape
    with engine.begin() as conn:
        assert fresh.ensure_table(conn, grown, {grown.name: grown}) == ["added column school.motto"]
        fresh.upsert(conn, grown, [{"id": 1, "name": "North", "motto": "Onward", "_cdc_lsn": 11}],
                     ["id", "name", "motto"])
    assert rows(engine, "select id, name, motto from school") == [(1, "North", "Onward")]
    shrunk = TableShape("public.school", (SCHOOL.columns[0],), ("id",))
    with pytest.raises(SchemaChangeError, match=r"^school: .*name.*public\.school"), engine.begin() as conn:
        MariaDBDialect(engine).ensure_table(conn, shrunk, {shrunk.name: shrunk})


def test_offsets_round_trip_per_pipeline(engine, dialect):
    with engine.begin() as conn:
        dialect.store_offsets(conn, "district", {("district.person", 0): 10, ("district.person", 1): 4})
        dialect.store_offsets(conn, "other", {("other.person", 0): 1})
    with engine.begin() as conn:
        dialect.store_offsets(conn, "district", {("district.person", 0): 12})
        assert dialect.load_offsets(conn, "district") == {("district.person", 0): 12, ("district.person", 1): 4}
        assert dialect.load_offsets(conn, "other") == {("other.person", 0): 1}
    # Offsets and rows share the destination transaction: a rolled-back one leaves neither behind.
    with pytest.raises(RuntimeError), engine.begin() as conn:
        dialect.upsert(conn, SCHOOL, [{"id": 5, "name": "South", "_cdc_lsn": 1}], ["id", "name"])
        dialect.store_offsets(conn, "district", {("district.person", 0): 99})
        raise RuntimeError("crash before commit")
    with engine.begin() as conn:
        assert dialect.load_offsets(conn, "district")[("district.person", 0)] == 12
    assert rows(engine, "select count(*) from school") == [(0,)]


def test_truncate_empties_the_table_and_its_referencing_tables_inside_the_transaction(engine, dialect):
    with engine.begin() as conn:
        dialect.upsert(conn, SCHOOL, [{"id": 1, "name": "North", "_cdc_lsn": 10}], ["id", "name"])
        dialect.upsert(conn, PERSON, [person(1, 10), person(2, 10, mentor=1)], PERSON_COLUMNS)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        dialect.truncate(conn, SCHOOL)
        raise RuntimeError("rolled back")
    assert rows(engine, "select count(*) from person") == [(2,)]
    with engine.begin() as conn:
        dialect.truncate(conn, SCHOOL)
        assert conn.exec_driver_sql("select @@foreign_key_checks").scalar() == 1
    assert rows(engine, "select (select count(*) from school), (select count(*) from person)") == [(0, 0)]


def test_large_batches_are_chunked_and_deletes_look_keys_up_by_primary_key(engine, dialect):
    statements = []
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *rest: statements.append(sql))
    many = [{"id": i, "name": f"school {i}", "_cdc_lsn": 1} for i in range(1, 12001)]
    with engine.begin() as conn:
        assert dialect.upsert(conn, SCHOOL, many, ["id", "name"]) == 12000
        assert dialect.delete(conn, SCHOOL, [{"id": i, "_cdc_lsn": 2} for i in range(1, 2501, 2)]) == 1250
    assert rows(engine, "select count(*), min(id) from school") == [(10750, 2)]
    inserts = [s for s in statements if s.startswith("INSERT INTO school")]
    deletes = [s for s in statements if s.startswith("DELETE FROM school")]
    assert len(inserts) == 12 and len(deletes) == 2
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE TABLE school")
        plan = conn.exec_driver_sql("EXPLAIN " + deletes[0], execution_options={"no_parameters": True}).mappings()
        plan = plan.one()
    assert (plan["type"], plan["key"]) == ("range", "PRIMARY")


def test_the_writer_lock_is_a_session_s_until_it_ends(engine, dialect):
    # ReplicaApplier.claim's statement on MariaDB: one session has the lock, another is refused at once (no wait),
    # and the lock is free again as soon as the holder's session ends.
    claim = text(dialect.writer_lock_sql)
    key = {"key": "cdc " + "0123456789abcdef0123456789abcdef01234567"}  # as claim() names it: 44 characters
    first, second = engine.connect(), engine.connect()
    try:
        assert first.execute(claim, key).scalar() == 1
        assert second.execute(claim, key).scalar() == 0
        first.invalidate()
        first.close()
        assert second.execute(claim, key).scalar() == 1
    finally:
        second.invalidate()
        second.close()
