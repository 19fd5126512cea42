"""The wild schema: the structures real schemas have (a hierarchy whose members' names begin with the root's, a
composite key, a nullable root id, a partitioned table, a table without a key, a second schema with quoted mixed-case
names, names with spaces, a quote, unicode and reserved words, char(n) and uuid keys), replicated by one pipeline into
a PostgreSQL replica, a MariaDB replica and a DuckDB analytics replica; after the snapshot and after a mixed workload
(key updates, partition moves, a truncate, a column added with a default, one transaction touching every table),
each destination equals the source.

The comparison is the test's own, beside the type zoo's (which covers column types): each table is read with each
database's driver, every value brought to one canonical form by the source column's type, and the tables compared as
multisets of rows (so duplicate rows of the keyless table count), without the code under test.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID

import duckdb
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import create_engine

from cdc.errors import ConfigError
from producers import capture
from tests.integration.pipelines import (
    assert_nothing_created,
    caught_up,
    execute,
    pipeline_data,
    purge,
    write_pipeline,
)

SHIFT_LOG, STAND, NOTES = "Ops.Shift Log", "Ops.Zähler's Stand", "Ops.Notes; v2"

SCHEMA = r"""
create table film (film_id integer primary key, title text not null, rating char(5));
create table film_actor (actor_id integer, film_id integer not null references film,
                         primary key (actor_id, film_id));
create table film_category (film_id integer primary key references film, category text not null);
-- A member whose root id may be NULL: a note about no film in particular.
create table film_note (note_id integer primary key, film_id integer references film, note text not null);
create table payment (id integer not null, paid date not null, amount numeric(8, 2) not null,
                      primary key (id, paid)) partition by range (paid);
create table payment_2024 partition of payment for values from ('2024-01-01') to ('2025-01-01');
create table payment_2025 partition of payment for values from ('2025-01-01') to ('2026-01-01');
create table payment_2026 partition of payment for values from ('2026-01-01') to ('2027-01-01');
create table event_log (kind text, n integer, at timestamptz);
alter table event_log replica identity full;
create schema "Ops";
create table "Ops"."Shift Log" ("Shift Id" uuid primary key, "Zähler" integer not null, "order" text,
                                "it's" text, "Start Time" timestamptz);
create table "Ops"."Zähler's Stand" ("Code" char(6) primary key, "Wert" numeric(10, 2), "select" text);
create table "Ops"."Notes; v2" (id integer primary key, "Drop Table; --" text);
insert into "Ops"."Notes; v2" select g, 'x; y' from generate_series(1, 10) g;

insert into film select g, 'film ' || g || case when g % 5 = 0 then ' o''brien' else '' end,
                        (array['G', 'PG', 'PG-13', 'R'])[1 + g % 4] from generate_series(1, 40) g;
insert into film_actor select a, f from generate_series(1, 3) a, generate_series(1, 40) f;
insert into film_category select g, 'cat ' || (g % 6) from generate_series(1, 40) g;
insert into film_note select g, case when g % 3 = 0 then null else g end, 'note ' || g from generate_series(1, 30) g;
insert into payment select g, date '2024-01-10' + g * 15, g * 1.25 from generate_series(1, 60) g;
insert into event_log select (array['start', 'stop'])[1 + g % 2], g % 5, timestamptz '2024-05-01 12:00+02'
from generate_series(1, 30) g;  -- rows repeat: (kind, n, at) takes 10 values
insert into "Ops"."Shift Log" select md5(g::text)::uuid, g, 'order ' || g, 'it''s ' || g || ' ✓',
                                     timestamptz '2024-03-01 08:00+01' + g * interval '7 hours'
from generate_series(1, 30) g;
insert into "Ops"."Zähler's Stand" select lpad(g::text, 3, 'z'), g * 10.5, 'sel ' || g from generate_series(1, 20) g;
insert into "Ops"."Zähler's Stand" values ('W05', 1, 'shorter than char(6)'), (' lead', 2, 'leading space');
"""

TABLES = ["public.film", "public.film_actor", "public.film_category", "public.film_note", "public.payment",
          "public.event_log", SHIFT_LOG, STAND, NOTES]
HIERARCHIES = {"film": {"root": "public.film", "members": {"public.film_actor": "film_id",
                                                          "public.film_category": "film_id",
                                                          "public.film_note": "film_id"}}}

# Each statement its own source transaction, except the last block: one transaction touching every table.
WORKLOAD = [
    "insert into film select g, 'late film ' || g, 'NC-17' from generate_series(41, 50) g",
    "insert into film_actor select a, f from generate_series(1, 2) a, generate_series(41, 50) f",
    "update film set title = title || ' (restored)', rating = 'R' where film_id % 7 = 0",
    "update film_actor set actor_id = actor_id + 100 where film_id % 4 = 0 and actor_id = 1",  # primary-key updates
    "delete from film_actor where film_id in (3, 13)",
    "delete from film_category where film_id in (3, 13)",
    "delete from film_note where film_id in (3, 13)",
    "delete from film where film_id in (3, 13)",
    "update film_note set film_id = 2 where note_id = 6",  # joins a hierarchy
    "update film_note set film_id = null where note_id = 7",  # leaves it
    "insert into film_note values (100, null, 'orphan note'), (101, 41, 'late note')",
    "update payment set paid = paid + interval '1 year' where id % 4 = 0 and paid < '2026-01-01'",  # moves partition
    "update payment set paid = paid - interval '1 year', amount = amount + 1 where id % 9 = 0 and paid >= '2025-01-01'",
    "update payment set id = id + 1000 where id % 10 = 1",  # primary-key update
    "delete from payment where id % 11 = 0",
    "insert into payment select g, date '2024-02-01' + (g - 200) * 20, g from generate_series(200, 230) g",
    # The keyless table: an update and a delete of one of several equal rows.
    "update event_log set n = 42 where ctid = (select min(ctid) from event_log where kind = 'start' and n = 1)",
    "delete from event_log where ctid = (select min(ctid) from event_log where kind = 'stop' and n = 0)",
    "insert into event_log values ('stop', 2, timestamptz '2024-05-01 12:00+02'), ('new', null, null)",
    """update "Ops"."Shift Log" set "order" = 'reordered', "it's" = 'it''s not' where "Zähler" % 3 = 0""",
    """update "Ops"."Shift Log" set "Shift Id" = md5('moved' || "Zähler")::uuid where "Zähler" % 5 = 0""",
    """delete from "Ops"."Shift Log" where "Zähler" % 7 = 0""",
    """update "Ops"."Zähler's Stand" set "Code" = 'W06' where "Code" = 'W05'""",  # a char(n) key update
    """delete from "Ops"."Zähler's Stand" where "Code" = ' lead'""",
    """update "Ops"."Notes; v2" set id = id + 100 where id % 2 = 0""",
    """delete from "Ops"."Notes; v2" where id = 3""",
    """truncate "Ops"."Zähler's Stand\"""",
    """insert into "Ops"."Zähler's Stand" values ('W05', 3, 'after the truncate'), ('zz1', 4, 'same key as before')""",
    # PostgreSQL writes no change for the existing rows: they hold 'n/a' without an event.
    """alter table "Ops"."Shift Log" add column "Status Note" text default 'n/a'""",
    """insert into "Ops"."Shift Log" ("Shift Id", "Zähler", "Status Note") values (md5('new')::uuid, 500, 'fresh')""",
]
EVERY_TABLE = [
    "insert into film values (60, 'one transaction', 'G')",
    "insert into film_actor values (7, 60)",
    "insert into film_category values (60, 'all')",
    "insert into film_note values (200, 60, 'all'), (201, null, 'all')",
    "update payment set paid = '2026-06-06' where id = 2",
    "insert into event_log values ('all', 1, now())",
    """update "Ops"."Shift Log" set "Zähler" = "Zähler" + 1000, "Status Note" = 'touched' where "Zähler" = 1""",
    """insert into "Ops"."Zähler's Stand" values ('all', 5, 'all')""",
    """update "Ops"."Notes; v2" set "Drop Table; --" = 'all' where id = 1""",
]


def split(table: str) -> tuple[str, str]:
    schema, name = table.split(".", 1)
    return schema, name


def source_columns(url: str, table: str) -> list[tuple[str, str]]:
    """(name, data type) of the source table's columns, in order."""
    with psycopg.connect(url) as conn:
        return conn.execute("select column_name, data_type from information_schema.columns "
                            "where table_schema = %s and table_name = %s order by ordinal_position",
                            split(table)).fetchall()


def canonical(kind: str, value):
    """One form for what a value means, whatever database it was read from."""
    if value is None:
        return None
    if kind == "character":
        return str(value).rstrip(" ")  # PostgreSQL's character(n) ignores trailing spaces
    if kind == "uuid":
        return UUID(str(value))
    if kind == "numeric":
        return Decimal(str(value)).normalize()
    if kind == "integer":
        return int(value)
    if kind == "timestamp with time zone":
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        # MariaDB holds the UTC wall time without a zone
        return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    if kind == "date":
        return value
    if kind == "text":
        return str(value)
    raise AssertionError(f"no canonical form for {kind}")


def rows_of(kinds: list[str], rows) -> Counter:
    return Counter(tuple(canonical(k, v) for k, v in zip(kinds, row)) for row in rows)


def read_postgres(url: str, table: str, columns: list[tuple[str, str]]) -> Counter:
    query = sql.SQL("select {} from {}").format(sql.SQL(", ").join(sql.Identifier(c) for c, _ in columns),
                                                sql.Identifier(*split(table)))
    with psycopg.connect(url) as conn:
        return rows_of([k for _, k in columns], conn.execute(query).fetchall())


def read_mariadb(url: str, table: str, columns: list[tuple[str, str]]) -> Counter:
    schema, name = split(table)
    name = name if schema == "public" else f"{schema}__{name}"  # MariaDB has no schemas (the dialect's docstring)
    select = ", ".join(f"`{c}`" for c, _ in columns)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return rows_of([k for _, k in columns],
                           conn.exec_driver_sql(f"select {select} from `{name}`").fetchall())
    finally:
        engine.dispose()


def read_duckdb(path: str, table: str, columns: list[tuple[str, str]]) -> Counter:
    conn = duckdb.connect(path, read_only=True)
    try:
        conn.execute("SET TimeZone = 'UTC'")
        select = ", ".join('"{}"'.format(c.replace('"', '""')) for c, _ in columns)
        quoted = '"{}"'.format(table.replace('"', '""'))  # one flat namespace: "schema.table"
        return rows_of([k for _, k in columns], conn.execute(f"select {select} from {quoted}").fetchall())
    finally:
        conn.close()


def assert_equal(where: str, table: str, source: Counter, replica: Counter) -> None:
    missing, extra = source - replica, replica - source
    assert not missing and not extra, (f"{where} {table}: {sum(missing.values())} source rows missing, "
                                       f"{sum(extra.values())} rows not at the source; missing e.g. "
                                       f"{list(missing)[:3]}, extra e.g. {list(extra)[:3]}")


def test_a_wild_schema_reaches_every_destination_equal_to_the_source(stack, connect, source_db, destination_db,
                                                                    mariadb_database, tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    lake = str(tmp_path / "lake.duckdb")
    destinations = {"pg": {"kind": "replica", "url": stack.postgres_url(destination_db)},
                    "maria": {"kind": "replica", "url": mariadb_database},
                    "lake": {"kind": "analytics", "url": f"duckdb:///{lake}"}}

    # Table names holding a double quote or a dot are refused by name before anything is created.
    execute(source, 'create table "Ops"."say ""hi""" (id integer primary key)')
    data = pipeline_data(stack, source_db, [*TABLES, 'Ops.say "hi"'], hierarchies=HIERARCHIES,
                         destinations=destinations)
    with pytest.raises(ConfigError) as caught:
        write_pipeline(tmp_path / "quoted.yaml", data)
    assert """'Ops.say "hi"': table names holding a double quote cannot be captured""" in str(caught.value)
    execute(source, 'create table "Ops"."v1.2" (id integer primary key)')
    data["source"]["tables"] = [*TABLES, "Ops.v1.2"]
    with pytest.raises(ConfigError) as caught:
        write_pipeline(tmp_path / "dotted.yaml", data)
    assert "'Ops.v1.2': schema and table names holding a dot cannot be captured" in str(caught.value)

    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, pipeline_data(stack, source_db, TABLES, name=data["pipeline"],
                                                  hierarchies=HIERARCHIES, destinations=destinations))
    assert_nothing_created(stack, connect, pipeline, source_db)
    capture.apply(pipeline)
    destination = stack.postgres_url(destination_db)

    def run_and_compare(where: str) -> None:
        caught_up(path, 240)
        for table in TABLES:
            columns = source_columns(source, table)
            expected = read_postgres(source, table, columns)
            assert expected, table
            assert_equal(f"{where}, PostgreSQL replica:", table, expected, read_postgres(destination, table, columns))
            assert_equal(f"{where}, MariaDB replica:", table, expected,
                         read_mariadb(mariadb_database, table, columns))
            assert_equal(f"{where}, DuckDB analytics:", table, expected, read_duckdb(lake, table, columns))

    try:
        run_and_compare("after the snapshot")
        execute(source, *WORKLOAD)
        with psycopg.connect(source) as conn, conn.transaction():
            for statement in EVERY_TABLE:
                conn.execute(statement)
        run_and_compare("after the workload")
    finally:
        purge(pipeline)
    # The workload did what it says: rows moved between partitions, the truncate emptied before the new rows.
    with psycopg.connect(source) as conn:
        assert conn.execute("select count(*) from payment_2026").fetchone()[0] > 0
        assert conn.execute("""select count(*) from "Ops"."Zähler's Stand\"""").fetchone() == (3,)
        assert conn.execute("""select count(*) from "Ops"."Shift Log" where "Status Note" = 'n/a'""").fetchone()[0] > 20
