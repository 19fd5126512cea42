"""PostgreSQL's own pgbench schema (foreign keys, a history table without a primary key) replicated to a PostgreSQL
replica through its initial load and a 30-second TPC-B-like run, then compared row for row."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from tests.integration.pipelines import applied_pipeline, caught_up, purge

PGBENCH = Path("/usr/lib/postgresql/15/bin/pgbench")
TABLES = ["public.pgbench_branches", "public.pgbench_tellers", "public.pgbench_accounts", "public.pgbench_history"]


def multiset(url: str, table: str) -> Counter:
    """Every row of a table as a multiset (pgbench_history has no key, and may hold duplicates); `_cdc_lsn` left out."""
    with psycopg.connect(url) as conn:
        columns = [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = 'public' and table_name = %s "
            "and column_name <> '_cdc_lsn' order by column_name", (table,))]
        query = psycopg.sql.SQL("select {} from {}").format(
            psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, columns)), psycopg.sql.Identifier(table))
        return Counter(conn.execute(query).fetchall())


@pytest.mark.skipif(not PGBENCH.exists(), reason="pgbench (postgresql-15's client) is not installed")
def test_pgbench_replicates_equal_after_a_run(stack, source_db, destination_db, tmp_path):
    source, destination = stack.postgres_url(source_db), stack.postgres_url(destination_db)
    init = subprocess.run([str(PGBENCH), "-i", "--foreign-keys", "-s", "1", "-q", source],
                          capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, TABLES, destinations={
        "replica": {"kind": "replica", "url": destination}})
    try:
        bench = subprocess.run([str(PGBENCH), "-T", "30", "-c", "2", "-n", source],
                               capture_output=True, text=True, timeout=300)
        assert bench.returncode == 0, bench.stderr
        caught_up(path, 600)
    finally:
        purge(pipeline)
    with psycopg.connect(source) as conn:
        history = conn.execute("select count(*) from pgbench_history").fetchone()[0]
    assert history > 100, bench.stdout  # the run did write
    for table in TABLES:
        name = table.split(".", 1)[1]
        expected, got = multiset(source, name), multiset(destination, name)
        assert got == expected, (table, sum(expected.values()), sum(got.values()),
                                 list((expected - got).items())[:3], list((got - expected).items())[:3])
