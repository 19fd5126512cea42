"""The type zoo: every PostgreSQL type a real schema uses (and arrays of them), domains, an enum and a composite type,
replicated by one pipeline into a PostgreSQL replica, a MariaDB replica and a DuckDB analytics replica; after the
snapshot and after a workload of inserts, updates and deletes, each destination equals the source.

The comparison is the test's own: every value is read with each database's driver and brought to one canonical form
by the source column's type (the `COLUMNS` table below), without the code under test. Where a destination keeps a
value in another form than the source (docs/types.md), the canonical form is what both forms mean: char(n) without
its trailing spaces (PostgreSQL ignores them), timestamptz as the UTC instant, a point as its two floats, geometric
and other text-carried values with their numbers read as floats, JSON as the parsed document.
"""

from __future__ import annotations

import base64
import os

import psycopg
import pytest

from cdc.errors import ConfigError
from producers import capture
from tests.integration.pipelines import applied_pipeline, caught_up, execute, pipeline_data, purge, write_pipeline
from tests.integration.type_zoo import (
    COLUMNS,
    NULL_ROW,
    SCHEMA,
    TABLES,
    TOASTED,
    WORKLOAD,
    as_duckdb,
    as_mariadb,
    assert_equal,
    duckdb_types,
    read_duckdb,
    read_mariadb,
    read_postgres,
    rows,
)


def test_every_type_reaches_every_destination_equal_to_the_source(stack, source_db, destination_db,
                                                                  mariadb_database, tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(rows(1, 150))
        conn.execute(NULL_ROW, [999])
        # A NOT NULL column far past the TOAST threshold, with content pglz cannot shrink: an update that leaves it
        # alone does not send it, and the destinations must keep it (and their NOT NULL) through that update.
        conn.execute("update zoo set t = %s where id = %s", [base64.b64encode(os.urandom(24_000)).decode(), TOASTED])
        conn.execute("insert into char_key values ('W05', 'padded by the source'), ('W05X', 'x'), ('A', 'a')")
        conn.execute("insert into uuid_key select md5(i::text)::uuid, i from generate_series(1, 30) i")
        conn.execute("insert into ident (v) values ('one'), ('two')")
        conn.execute("insert into nokey values ('a', '{\"k\": 1}', '{\"k\" : 1}', point(1.5, 2), '{1,null}', '<a/>', "
                     "0.1), ('b', null, null, null, null, null, null), ('b', null, null, null, null, null, null), "
                     "('c', '[1]', '[1]', point(-1, 1e-3), '{2}', '<c>x</c>', 3.4e38)")
        conn.execute("insert into kv select i, hstore(array['k', 'q\"'], array[i::text, null]), 'sad', "
                     "md5(i::text)::uuid, i / 7.0 from generate_series(1, 40) i")
    lake = str(tmp_path / "lake.duckdb")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, TABLES, destinations={
        "pg": {"kind": "replica", "url": stack.postgres_url(destination_db)},
        "maria": {"kind": "replica", "url": mariadb_database},
        "lake": {"kind": "analytics", "url": f"duckdb:///{lake}"}})
    destination = stack.postgres_url(destination_db)

    def run_and_compare(where: str) -> None:
        caught_up(path, 240)
        for table in COLUMNS:
            expected = read_postgres(source, table)
            assert expected, table
            assert_equal(f"{where}, PostgreSQL replica:", expected, read_postgres(destination, table), table)
            assert_equal(f"{where}, MariaDB replica:", as_mariadb(table, expected),
                         read_mariadb(mariadb_database, table), table)
            assert_equal(f"{where}, DuckDB analytics:", as_duckdb(table, expected), read_duckdb(lake, table), table)

    try:
        run_and_compare("after the snapshot")
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(WORKLOAD)
            conn.execute("update zoo set vc = 'toasted kept' where id = %s", [TOASTED])
            conn.execute(rows(1001, 1060))
            conn.execute(NULL_ROW, [998])
        run_and_compare("after the workload")
    finally:
        purge(pipeline)

    # The destinations' types are the nearest native ones (docs/types.md), not text for everything.
    kinds = duckdb_types(lake)
    assert kinds["jb"] == "JSON" and kinds["hs"] == "JSON" and kinds["iv"] == "INTERVAL"
    assert kinds["ia"] == "INTEGER[]" and kinds["ua"] == "UUID[]" and kinds["u"] == "UUID"
    assert kinds["m"].startswith("ENUM(") and kinds["n52"] == "DECIMAL(5,2)" and kinds["pt"].startswith("STRUCT")
    assert kinds["addr"] == 'STRUCT(street VARCHAR, zip INTEGER)' and kinds["hsa"] == "JSON[]"
    with psycopg.connect(destination) as conn:
        assert dict(conn.execute(
            "select column_name, format_type(atttypid, atttypmod) from information_schema.columns c "
            "join pg_attribute a on a.attrelid = 'public.zoo'::regclass and a.attname = c.column_name "
            "where c.table_name = 'zoo' and column_name in ('m', 'addr', 'pt', 'c5', 'hs', 'yr', 'n52')").fetchall()) \
            == {"m": "mood", "addr": "address", "pt": "point", "c5": "character(5)", "hs": "hstore",
                "yr": "integer", "n52": "numeric(5,2)"}
        not_null = {r[0] for r in conn.execute("select column_name from information_schema.columns where "
                                               "table_name = 'zoo' and is_nullable = 'NO'")}
        assert not_null == {"id", "sc", "m", "f8", "t", "_cdc_lsn"}


GENERATED = """
create table gen (id int primary key, a int, t text,
                  twice int generated always as (a * 2) stored,
                  shout text generated always as (upper(t) || '!') stored);
insert into gen (id, a, t) select i, i, 'row ' || i from generate_series(1, 20) i;
create type mood as enum ('sad', 'ok');
create table odd (k float8 primary key, vb varbit(8), spans interval[], moods mood[]);
"""


def test_generated_columns_are_computed_by_a_postgresql_replica_and_refused_elsewhere(
        stack, connect, source_db, destination_db, mariadb_database, tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, GENERATED)
    # MariaDB and DuckDB cannot compute the source's expression, and streaming never sends the values: refused
    # before anything is created.
    refused = write_pipeline(tmp_path / "refused.yaml", pipeline_data(stack, source_db, ["public.gen", "public.odd"],
                                                                      destinations={
        "maria": {"kind": "replica", "url": mariadb_database},
        "lake": {"kind": "analytics", "url": f"duckdb:///{tmp_path / 'lake.duckdb'}"}}))
    with pytest.raises(ConfigError) as caught:
        capture.apply(refused)
    message = str(caught.value)
    for destination in ("maria", "lake"):
        for column in ("twice", "shout"):
            assert f"destination {destination}: public.gen.{column}: a generated column" in message, message
        assert (f"destination {destination}: public.odd.vb: type bit varying(8): Debezium sends bit varying as bytes "
                "without the value's length, so leading zero bits are lost") in message
        assert (f"destination {destination}: public.odd.spans: type interval[]: Debezium 3.6 leaves columns of this "
                "array type out of its change events") in message
        assert (f"destination {destination}: public.odd.moods: type public.mood[]: Debezium 3.6 sends an array of "
                "this type that holds a NULL element as NULL, whole") in message
    assert "destination maria: public.odd.k: type double precision in the primary key: MariaDB cannot store NaN" \
        in message
    assert "destination lake: public.odd.k" not in message
    assert connect.status(refused.connector_name) is None
    with psycopg.connect(source) as conn:  # nor a publication, nor a slot
        assert conn.execute("select count(*) from pg_publication").fetchone() == (0,)
        assert conn.execute("select count(*) from pg_replication_slots where database = current_database()"
                            ).fetchone() == (0,)

    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.gen"], destinations={
        "pg": {"kind": "replica", "url": stack.postgres_url(destination_db)}})
    try:
        execute(source, "update gen set a = a + 100 where id % 2 = 0", "update gen set t = null where id % 3 = 0",
                "delete from gen where id % 5 = 0", "insert into gen (id, a, t) values (100, 7, 'new')")
        caught_up(path, 240)
    finally:
        purge(pipeline)
    query = "select id, a, t, twice, shout from gen order by id"
    with psycopg.connect(source) as src, psycopg.connect(stack.postgres_url(destination_db)) as dst:
        assert dst.execute(query).fetchall() == src.execute(query).fetchall()
        assert dst.execute("select attname from pg_attribute where attrelid = 'public.gen'::regclass "
                           "and attgenerated = 's' order by attnum").fetchall() == [("twice",), ("shout",)]
