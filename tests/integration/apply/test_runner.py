"""`cdc run` of several destinations: one that fails stops alone, says so, and the others go on replicating; the run
ends with its error (exit 1)."""

from __future__ import annotations

import duckdb
import psycopg

from tests.integration.pipelines import cdc
from tests.integration.sample import NAMES, rows, workload


def test_a_destination_that_fails_stops_alone(stack, destination_db, sample_pipeline, tmp_path):
    broken = stack.postgres_url(destination_db)
    # A table made elsewhere, with other columns, where the replica would put `person`: this destination cannot be
    # prepared (a terminal error, the user's to fix), which must not stop the analytics replica beside it.
    with psycopg.connect(broken, autocommit=True) as conn:
        conn.execute("create table public.person (id bigint primary key, unrelated text)")
    lake = tmp_path / "lake.duckdb"
    path, _, source = sample_pipeline({"broken": {"kind": "replica", "url": broken},
                                       "lake": {"kind": "analytics", "url": f"duckdb:///{lake}"}})
    workload(source, 30, seed=3)
    run = cdc(path, "run", "--until-caught-up", "--timeout", "180")
    said = run.stdout + run.stderr
    assert run.returncode == 1, said
    assert "broken: stopped:" in run.stdout and "lake goes on" in run.stdout, said
    assert "person" in run.stderr, said  # the error names the table it could not take
    # The analytics replica went on to the end: equal to the source.
    with duckdb.connect(str(lake), read_only=True) as conn:
        for name in NAMES:
            columns = [r[0] for r in psycopg.connect(source).execute(
                f"select column_name from information_schema.columns where table_name = '{name}' "
                "order by column_name").fetchall()]  # the order `rows` reads them in
            got = conn.execute(f'select {", ".join(columns)} from "public.{name}" order by id').fetchall()
            assert [tuple(r) for r in got] == rows(source, name), name
