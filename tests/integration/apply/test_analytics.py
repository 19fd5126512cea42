"""The analytics replica (DuckDB) on the real stack: equal to the source, a change history that answers
"the value of row X as of time T", and read-only for its users."""

from __future__ import annotations

import json
import subprocess
import time
from decimal import Decimal

import duckdb
import psycopg

from tests.integration.pipelines import CDC
from tests.integration.sample import workload


def test_analytics_replica_history_and_read_only_queries(sample_pipeline, tmp_path):
    file = tmp_path / "analytics.duckdb"
    path, _, source = sample_pipeline({"lake": {"kind": "analytics", "url": f"duckdb:///{file}"}})

    def cdc(*args):
        return subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=300)

    # A scripted sequence of values for one row, each committed at a known time.
    moments = []
    with psycopg.connect(source, autocommit=True) as conn:
        for name in ("first", "second", "third"):
            conn.execute("update person set name = %s where id = 7", (name,))
            moments.append((name, conn.execute("select now()").fetchone()[0]))
            time.sleep(0.2)
        conn.execute("delete from attendance where person_id = 9")
        conn.execute("update enrollment set grade = grade where person_id = 9")
    workload(source, 200, seed=8)
    result = cdc("run", "--until-caught-up", "--timeout", "240")
    assert result.returncode == 0, result.stdout + result.stderr

    with psycopg.connect(source) as src:
        expected = {t: src.execute(f"select count(*), coalesce(sum(id), 0) from {t}").fetchone()
                    for t in ("school", "person", "enrollment", "attendance")}
    lake = duckdb.connect(str(file), read_only=True)
    try:
        for table, (count, total) in expected.items():
            assert lake.execute(f'select count(*), coalesce(sum(id), 0) from "public.{table}"').fetchone() == \
                (count, Decimal(total) if isinstance(total, Decimal) else total), table
        for name, moment in moments:
            as_of = lake.execute(
                'select name from "public.person__history" where id = 7 and _cdc_commit_ts <= ? '
                "order by _cdc_commit_ts desc, _cdc_lsn desc limit 1", [moment]).fetchone()
            assert as_of == (name,), (name, moment, as_of)
        ops = {r[0] for r in lake.execute('select _cdc_op from "public.attendance__history"').fetchall()}
        assert {"r", "d"} <= ops
        for table in expected:
            # The history tells which keys exist now: its newest row per key is no delete exactly for those
            # (the workload's primary-key updates of attendance included).
            alive = set(lake.execute(
                f'select id from "public.{table}__history" qualify row_number() over '
                f"(partition by id order by _cdc_lsn desc, _cdc_op = 'd') = 1 and _cdc_op <> 'd'").fetchall())
            assert alive == set(lake.execute(f'select id from "public.{table}"').fetchall()), table
    finally:
        lake.close()

    read = cdc("query", "select count(*) as n from \"public.person\"", "--json")
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == [{"n": expected["person"][0]}]
    write = cdc("query", "delete from \"public.person\"")
    assert write.returncode == 1 and "read-only" in write.stderr
