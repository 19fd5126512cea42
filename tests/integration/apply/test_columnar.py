"""The columnar path writes exactly what the general path writes (DuckDB analytics, PostgreSQL and MariaDB replicas), on
the real stack."""

from __future__ import annotations

import subprocess
import time

import duckdb
import psycopg
import pyarrow as pa
import pytest

from consumers.apply import columnar
from consumers.apply.applier import ReplicaApplier
from producers import capture
from tests.integration.pipelines import (
    CDC,
    applied_pipeline,
    execute,
    fresh_mariadb_database,
    pipeline_data,
    purge,
    write_pipeline,
)

SCHEMA = """
create type mood as enum ('sad', 'ok', 'happy');
create table "Mixed Types" (
    id int primary key, i2 smallint, i8 bigint, n12 numeric(12, 2), r real, d double precision, b boolean,
    t text, "select" varchar(20), dt date, ts timestamp, tstz timestamptz, js json, jb jsonb, u uuid, m mood
);
"""
WORKLOAD = [
    """insert into "Mixed Types" select g, (g % 300) - 150, g * 1000003, (g * 7.31)::numeric(12,2), g / 3.0,
       g * 1e10, g % 2 = 0, 'text é ✓ ' || g, 'v' || g, date '1999-12-31' + g, timestamp '2001-02-03 04:05:06.789'
       + g * interval '1 hour', timestamptz '2024-02-29 23:59:59.654321+05:30' + g * interval '1 minute',
       ('{"k": ' || g || '}')::json, ('{"n": [' || g || ', null]}')::jsonb,
       ('a0eebc99-9c0b-4ef8-bb6d-' || lpad(g::text, 12, '0'))::uuid, (array['sad','ok','happy'])[g % 3 + 1]::mood
       from generate_series(1, 400) g""",
    """insert into "Mixed Types" (id) values (1000)""",  # NULLs everywhere but the key
    """update "Mixed Types" set t = t || ' updated', n12 = n12 + 1, tstz = now() where id % 7 = 0""",
    """delete from "Mixed Types" where id % 11 = 0""",
    """insert into "Mixed Types" (id, t) select g, 'again' from generate_series(11, 99, 11) g""",
    """update "Mixed Types" set b = not b, dt = null where id between 100 and 200""",
]
# Values only the general path converts: a batch holding one is left to it, whole. One statement, so one source
# transaction: the other rows it changes are surely in that batch.
SPECIAL = ["""update "Mixed Types" set ts = case when id = 5 then '-infinity' else ts end,
                                   dt = case when id = 5 then 'infinity' else dt end,
                                   i8 = case when id = 5 then i8 else -i8 end
              where id = 5 or id between 300 and 310"""]


def dump(file: str) -> dict[str, list[tuple]]:
    with duckdb.connect(file, read_only=True) as conn:
        tables = [r[0] for r in conn.execute("select table_name from information_schema.tables "
                                             "where table_name like 'public.%' order by 1").fetchall()]
        return {t: conn.execute(f'select * from "{t}" order by all').fetchall() for t in tables}


def test_the_columnar_path_writes_what_the_general_path_writes(stack, source_db, tmp_path, monkeypatch):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    files = {name: str(tmp_path / f"{name}.duckdb") for name in ("columnar", "general")}
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.Mixed Types"],
                                      destinations={n: {"kind": "analytics", "url": f"duckdb:///{f}"}
                                                    for n, f in files.items()})
    # Small polls: many batches, so that a writer schema already known to go the columnar way (its images left in
    # Arrow) meets a batch that must go the general way after all.
    appliers = {name: ReplicaApplier(pipeline, name, poll_messages=40) for name in files}
    try:
        columnar_rows = []
        for statements in (WORKLOAD, SPECIAL):
            execute(source, *statements)
            appliers["columnar"].run(until_caught_up=True, timeout=300)
            columnar_rows.append(appliers["columnar"].stats.columnar_rows)
            with monkeypatch.context() as patch:
                patch.setenv("CDC_NO_BATCH_DECODE", "1")  # decoded one by one: no Arrow rows, never columnar
                appliers["general"].run(until_caught_up=True, timeout=300)
        assert columnar_rows[0] > 500
        assert columnar_rows[1] == columnar_rows[0]  # the infinities sent that batch the general way
        assert appliers["general"].stats.columnar_rows == 0
        for applier in appliers.values():
            applier.close()
        columnar, general = dump(files["columnar"]), dump(files["general"])
        assert set(columnar) == {"public.Mixed Types", "public.Mixed Types__history"}
        for table in columnar:
            assert len(columnar[table]) > 300
            assert columnar[table] == general[table], f"{table} differs between the two paths"
        with psycopg.connect(source) as conn:
            expected = conn.execute('select id, t, n12, tstz, i8 from "Mixed Types" order by id').fetchall()
        with duckdb.connect(files["columnar"], read_only=True) as conn:
            got = conn.execute('select id, t, n12, tstz, i8 from "public.Mixed Types" order by id').fetchall()
            special = conn.execute('select ts::varchar, dt::varchar from "public.Mixed Types" where id = 5').fetchone()
        assert got == expected
        assert list(special) == ["-infinity", "infinity"]
    finally:
        for applier in appliers.values():
            applier.close()
        purge(pipeline)


def test_a_postgresql_replica_written_by_the_columnar_path_equals_the_source(stack, source_db, destination_db,
                                                                              tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    destination = destination_db
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", pipeline_data(
        stack, source_db, ["public.Mixed Types"],
        destinations={"state": {"kind": "replica", "url": stack.postgres_url(destination)}}))
    capture.apply(pipeline)
    applier = ReplicaApplier(pipeline, "state", poll_messages=40)
    columns = ('id, i2, i8, n12, r, d, b, t, "select", dt::text, ts::text, tstz, js::text, jb, u, m::text')
    try:
        written = []
        for statements in (WORKLOAD, SPECIAL):
            execute(source, *statements)
            applier.run(until_caught_up=True, timeout=300)
            written.append(applier.stats.columnar_rows)
        assert written[0] > 500 and written[1] == written[0]
        read = f'select {columns} from "Mixed Types" order by id'
        with psycopg.connect(source) as src, psycopg.connect(stack.postgres_url(destination)) as dst:
            expected, got = src.execute(read).fetchall(), dst.execute(read).fetchall()
        assert len(got) > 300
        assert got == expected
    finally:
        applier.close()
        purge(pipeline)


def test_a_reader_holding_the_duckdb_file_makes_the_applier_wait_not_fail(stack, source_db, tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    file = str(tmp_path / "lake.duckdb")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.Mixed Types"],
                                      destinations={"lake": {"kind": "analytics",
                                                             "url": f"duckdb:///{file}"}})
    try:
        first = subprocess.run([CDC, "-c", str(path), "run", "--until-caught-up", "--timeout", "120"],
                               capture_output=True, text=True, timeout=180)
        assert first.returncode == 0, first.stderr
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(WORKLOAD[0])
        reader = duckdb.connect(file, read_only=True)  # an analyst's session, open while changes arrive
        run = subprocess.Popen([CDC, "-c", str(path), "run", "--until-caught-up", "--timeout", "120"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        assert run.poll() is None, run.communicate()  # waiting for the file, not failed
        reader.close()
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, out + err
        with duckdb.connect(file, read_only=True) as conn:
            assert conn.execute('select count(*) from "public.Mixed Types"').fetchone() == (400,)
    finally:
        purge(pipeline)


# -- MariaDB ---------------------------------------------------------------------------------------------------------
# Parents, children and a self-reference, changed so that one batch holds a child before its parent (the columnar path
# writes table by table, in any order, with MariaDB's row-by-row checks off) and deletes of parents with children.
FAMILY = """
create table school (id int primary key, name char(12) not null);
create table pupil (id int primary key, school_id int references school, mentor_id int references pupil,
                    name text, grade real);
"""
FAMILY_WORKLOAD = [
    "insert into school select g, 's' || g || '  ' from generate_series(1, 20) g",
    "insert into pupil select g, g % 20 + 1, null, 'p' || g, g / 7.0 from generate_series(1, 300) g",
    # A child of an existing parent, then (another transaction, same batch) a new parent and its children.
    "insert into pupil values (1001, 1, null, 'early', 1.5)",
    """begin; insert into school values (21, 'new'); insert into pupil values (1002, 21, 1001, 'late', 2.5);
       update pupil set mentor_id = 1002 where id between 1 and 50; commit""",
    # Children before their parents at the source; the parent's delete lands in a table written first.
    """begin; delete from pupil where school_id = 3; update pupil set mentor_id = null where mentor_id = 1002;
       delete from pupil where id = 1002; delete from school where id in (3, 21); commit""",
    "update school set name = 'renamed' where id % 4 = 0",
]


def maria_rows(url: str, query: str) -> list[tuple]:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(query)]
    finally:
        engine.dispose()


@pytest.fixture
def second_mariadb(stack):
    """Another fresh database on the stack's MariaDB (mariadb_database gives the first)."""
    yield from fresh_mariadb_database(stack)


def test_a_mariadb_replica_written_by_the_columnar_path_equals_the_general_paths(
        stack, source_db, mariadb_database, second_mariadb, tmp_path, monkeypatch):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA, FAMILY)
    urls = {"columnar": mariadb_database, "general": second_mariadb}
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", pipeline_data(
        stack, source_db, ["public.Mixed Types", "public.school", "public.pupil"],
        destinations={name: {"kind": "replica", "url": url} for name, url in urls.items()}))
    capture.apply(pipeline)
    # Parts of 97 changes: a table's batch is written in several, the foreign keys tracked across them.
    monkeypatch.setattr(columnar, "CHUNK_CHANGES", 97)
    appliers = {name: ReplicaApplier(pipeline, name, poll_messages=400) for name in urls}
    try:
        # (No infinities here: MariaDB's DATE and DATETIME cannot hold them, on either path.)
        execute(source, *WORKLOAD, *FAMILY_WORKLOAD)
        appliers["columnar"].run(until_caught_up=True, timeout=300)
        with monkeypatch.context() as patch:
            patch.setenv("CDC_NO_BATCH_DECODE", "1")  # decoded one by one: never columnar
            appliers["general"].run(until_caught_up=True, timeout=300)
        assert appliers["columnar"].stats.columnar_rows > 800
        assert appliers["general"].stats.columnar_rows == 0
        for table in ("`Mixed Types`", "school", "pupil"):
            query = f"select * from {table} order by 1"
            by_columnar, by_general = maria_rows(urls["columnar"], query), maria_rows(urls["general"], query)
            assert len(by_columnar) > 15
            assert by_columnar == by_general, f"{table} differs between the two paths"
        # And the source's values, where the two databases spell them alike.
        with psycopg.connect(source) as src:
            expected = src.execute("select id, school_id, mentor_id, name, grade::float8 from pupil order by id")
            assert maria_rows(urls["columnar"], "select id, school_id, mentor_id, name, grade from pupil "
                                                "order by id") == [tuple(r) for r in expected.fetchall()]
            expected = src.execute("select id, rtrim(name) from school order by id").fetchall()
            assert maria_rows(urls["columnar"], "select id, name from school order by id") == expected
            expected = src.execute('select id, t, tstz at time zone \'UTC\' from "Mixed Types" order by id').fetchall()
            assert maria_rows(urls["columnar"], "select id, t, tstz from `Mixed Types` order by id") == expected
    finally:
        for applier in appliers.values():
            applier.close()
        purge(pipeline)


def _flat(rows: list[dict], columns: list[str]) -> pa.Table:
    """A columnar.flat_images table by hand: (seq, op, lsn) then the row image of each change."""
    data = {columnar.SEQ: [i for i, _ in enumerate(rows)], columnar.OP: [r["op"] for r in rows],
            columnar.CHANGE_LSN: [r["lsn"] for r in rows], columnar.TX_ID: ["1"] * len(rows),
            columnar.COMMIT_MS: [0] * len(rows)}
    data.update({c: [r.get(c) for r in rows] for c in columns})
    return pa.table(data)


def test_mariadb_columnar_writes_keep_the_newer_position_and_check_foreign_keys_before_the_commit(mariadb_database):
    from sqlalchemy import create_engine
    from sqlalchemy.dialects import postgresql as pg
    from sqlalchemy.exc import IntegrityError

    from cdc.source_tables import ColumnShape, ForeignKeyShape, TableShape
    from consumers.apply.dialects import dialect_for

    school = TableShape("public.school", (ColumnShape("id", pg.INTEGER(), False),
                                          ColumnShape("name", pg.TEXT(), True)), ("id",))
    pupil = TableShape("public.pupil", (ColumnShape("id", pg.INTEGER(), False),
                                        ColumnShape("school_id", pg.INTEGER(), True),
                                        ColumnShape("mentor_id", pg.INTEGER(), True)), ("id",),
                       (ForeignKeyShape(("school_id",), "public.school", ("id",)),
                        ForeignKeyShape(("mentor_id",), "public.pupil", ("id",))))
    engine = create_engine(mariadb_database)
    dialect = dialect_for(engine)
    assert dialect.columnar
    shapes = {s.name: s for s in (school, pupil)}
    with engine.begin() as conn:
        dialect.ensure_offsets_table(conn)
        for shape in shapes.values():
            dialect.ensure_table(conn, shape, shapes)

    def batch(*writes: tuple[TableShape, list[dict]]) -> None:
        with engine.begin() as conn:
            dialect.begin_batch(conn, snapshot=False)
            for shape, rows in writes:
                dialect.apply_columnar(conn, shape, _flat(rows, list(shape.column_names)))
            dialect.end_batch(conn)  # as the writer ends every batch
            dialect.store_offsets(conn, "p", {("t", 0): 1})

    def stored(table: str) -> list[tuple]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(f"select * from {table} order by id")]

    try:
        # Children first, one referencing another of the batch: the checks are made before the commit.
        batch((pupil, [{"op": "c", "lsn": 20, "id": 1, "school_id": 1, "mentor_id": 2},
                       {"op": "c", "lsn": 20, "id": 2, "school_id": 1, "mentor_id": None}]),
              (school, [{"op": "c", "lsn": 10, "id": 1, "name": "one"}, {"op": "c", "lsn": 10, "id": 2,
                                                                         "name": "two"}]))
        assert stored("pupil") == [(1, 1, 2, 20), (2, 1, None, 20)]
        # The position rule: an older change is not written, a newer one is, a key's last change wins.
        batch((school, [{"op": "u", "lsn": 5, "id": 1, "name": "old"}, {"op": "u", "lsn": 30, "id": 2, "name": "x"},
                        {"op": "u", "lsn": 31, "id": 2, "name": "newer"}, {"op": "d", "lsn": 4, "id": 1}]))
        assert stored("school") == [(1, "one", 10), (2, "newer", 31)]
        # A reference to nothing: refused, naming the key, and the batch rolled back.
        with pytest.raises(IntegrityError, match=r"pupil.*FOREIGN KEY \(school_id\) REFERENCES `school`.*\(9\)"):
            batch((pupil, [{"op": "c", "lsn": 40, "id": 3, "school_id": 9, "mentor_id": None}]))
        # A parent deleted while a child still references it: refused too.
        with pytest.raises(IntegrityError, match=r"Cannot delete or update a parent row.*`pupil` still references"):
            batch((school, [{"op": "d", "lsn": 50, "id": 1}]))
        # Its children deleted in the same batch (after it, in the writer's order): fine.
        batch((school, [{"op": "d", "lsn": 50, "id": 1}]),
              (pupil, [{"op": "d", "lsn": 50, "id": 1}, {"op": "d", "lsn": 50, "id": 2}]))
        assert stored("school") == [(2, "newer", 31)] and stored("pupil") == []
    finally:
        engine.dispose()
