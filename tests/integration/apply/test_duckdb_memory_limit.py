"""The DuckDB applier's memory limit (issue 15 item 8) on the real stack: a source transaction that needs more than
the limit is applied whole anyway, once. The applier says it raised the limit, the batch is applied again on a new
connection after the failed one rolled back, and the analytics file then equals the source, with each change once
in the history."""

from __future__ import annotations

import duckdb

from consumers.apply.applier import ReplicaApplier
from consumers.apply.dialects.duckdb import MEMORY_LIMIT_MB
from producers import capture
from tests.integration.pipelines import execute, pipeline_data, purge, table_rows, write_pipeline

ROWS = 20_000  # more than DuckDB can hold under 1 MB (the primary key's index alone)


def test_a_batch_past_the_duckdb_memory_limit_is_applied_once_with_the_limit_raised(stack, source_db, tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, "create table item (id int primary key, v text not null)")
    lake = str(tmp_path / "lake.duckdb")
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", pipeline_data(
        stack, source_db, ["public.item"], destinations={"lake": {"kind": "analytics", "url": f"duckdb:///{lake}"}}))
    capture.apply(pipeline)
    try:
        execute(source, f"insert into item select g, 'v' || g from generate_series(1, {ROWS}) g")
        said: list[str] = []
        applier = ReplicaApplier(pipeline, "lake", echo=said.append)
        assert applier.dialect.memory_limit_mb == MEMORY_LIMIT_MB  # what every applier of a DuckDB file starts with
        try:
            applier.prepare()  # tables created under the default limit: only the batch is to need more
            applier.dialect.limit_memory(1)
            applier.run(until_caught_up=True, timeout=300)
        finally:
            applier.close()
        raised = [line for line in said if "DuckDB needed more than its memory limit of 1 MB" in line]
        assert raised, said
        assert "limit raised to 2 MB, the batch is applied again" in raised[0]
        assert applier.dialect.memory_limit_mb > 1
        assert applier.stats.columnar_rows == ROWS  # the batch applied again is counted once
        expected = table_rows(source, "public.item")
        with duckdb.connect(lake, read_only=True) as conn:
            current = conn.execute('select id, v from "public.item" order by id').fetchall()
            history = conn.execute('select count(*), count(distinct (_cdc_lsn, id, _cdc_op)) '
                                   'from "public.item__history"').fetchone()
        assert current == expected and len(current) == ROWS
        assert history == (ROWS, ROWS)  # each change once: the failed attempt left nothing behind
    finally:
        purge(pipeline)
