"""A PostgreSQL replica's tables are created with the source's validated CHECK constraints, under the same names; a
NOT VALID one is left out (rows it never checked are replicated), one naming a function the destination lacks is
skipped with a message, and rows replicate equal, an unchanged TOASTed column included (issue 13)."""

from __future__ import annotations

import psycopg

from tests.integration.pipelines import (
    applied_pipeline,
    caught_up,
    execute,
    purge,
    table_rows,
)

# An incompressible text of ~40 kB: stored out of line (TOASTed), so an update that leaves it alone does not send it.
BIG = "(select string_agg(md5(g::text || random()::text), '') from generate_series(1, 1200) g)"
SCHEMA = f"""
create function is_even(n integer) returns boolean language sql immutable as 'select n % 2 = 0';
create table box (
    id integer primary key,
    qty integer not null constraint qty_positive check (qty > 0),
    low integer,
    high integer,
    body text,
    kind text not null,
    constraint low_below_high check (low <= high),
    -- Not NULL-tolerant: the replica's upsert must not propose a row whose TOASTed body is NULL.
    constraint body_or_short check (body is not null or kind = 'short'),
    -- is_even exists only at the source: the replica cannot hold this one.
    constraint even_id check (is_even(id))
);
insert into box values (2, 1, 1, 5, 'small', 'long'), (4, 3, null, 7, null, 'short'),
                       (6, 2, 3, 3, {BIG}, 'long'), (8, 9, 0, 1, 'x', 'odd');
-- NOT VALID: row 8 breaks it and stays; the replica must not have it (it would refuse row 8).
alter table box add constraint kind_known check (kind in ('short', 'long')) not valid;
"""


def checks(url: str) -> dict[str, str]:
    """{name: definition} of the CHECK constraints of public.box, from the catalog (NOT VALID ones too)."""
    with psycopg.connect(url) as conn:
        return dict(conn.execute(
            "select conname, pg_get_constraintdef(oid) from pg_constraint "
            "where conrelid = 'public.box'::regclass and contype = 'c'").fetchall())


def test_validated_checks_reach_a_postgresql_replica(stack, source_db, destination_db, tmp_path):
    source, destination = stack.postgres_url(source_db), stack.postgres_url(destination_db)
    execute(source, SCHEMA)
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.box"],
                                      destinations={"pg": {"kind": "replica", "url": destination}})
    try:
        first = caught_up(path)
        assert table_rows(destination, "public.box") == table_rows(source, "public.box")

        at_source = checks(source)
        assert set(at_source) == {"qty_positive", "low_below_high", "body_or_short", "even_id", "kind_known"}
        expected = {n: d for n, d in at_source.items() if n not in ("kind_known", "even_id")}
        assert checks(destination) == expected
        assert "skipped check constraint even_id of public.box" in first.stdout + first.stderr, first.stdout
        assert "is_even" in first.stdout + first.stderr

        # The replica enforces them on other writers.
        with psycopg.connect(destination) as conn:
            try:
                conn.execute("update box set qty = 0 where id = 2")
                raise AssertionError("the replica accepted qty = 0")
            except psycopg.errors.CheckViolation as e:
                assert "qty_positive" in str(e)

        execute(source,
                "insert into box values (10, 5, 2, 4, 'ten', 'long')",
                "update box set qty = qty + 1 where id = 6",   # body unchanged: Debezium does not send it
                "update box set low = 7, high = 9 where id = 4",
                "update box set low = null, qty = 4, kind = 'short' where id = 8",  # kind_known holds for new rows
                "delete from box where id = 2")
        second = caught_up(path)
        rows = table_rows(source, "public.box")
        assert [r[0] for r in rows] == [4, 6, 8, 10]
        assert len(rows[1][4]) > 30_000  # the TOASTed body is still there
        assert table_rows(destination, "public.box") == rows
        # Created with the table only: nothing is added on later runs.
        assert "check constraint" not in second.stdout + second.stderr
        assert checks(destination) == expected
    finally:
        purge(pipeline)
