"""A source transaction larger than the applier holds in memory (issue 15 item 8): its runs go to disk until its END
and are written in parts, in one destination transaction; every destination still equals the source, with the
transaction's later changes of a key (in later parts) winning over its earlier ones, and histories exact."""

from __future__ import annotations

import duckdb

from consumers.apply import columnar, runs
from consumers.apply.applier import ReplicaApplier
from tests.integration.pipelines import applied_pipeline, execute, purge, table_rows

SCHEMA = "create table item (id int primary key, v text not null, n int not null)"
# One source transaction: inserts, then updates, deletes and re-inserts of the first rows (their changes come after
# the inserts in the partition, so in later parts), then updates again of some of the rows updated already.
BIG = """
do $$ begin
  insert into item select g, 'v' || g, g from generate_series(1, 3000) g;
  update item set v = 'u1', n = n + 1 where id <= 500;
  delete from item where id between 501 and 1000;
  insert into item select g, 'again', -g from generate_series(600, 700) g;
  update item set v = 'u2', n = n * 2 where id <= 100;
end $$"""
BIG_CHANGES = 3000 + 500 + 500 + 101 + 100
SMALL = ["update item set v = 'after' where id = 2", "delete from item where id = 3"]


def test_a_transaction_spilled_to_disk_and_written_in_parts_is_applied_whole_and_exact(
        stack, source_db, destination_db, tmp_path, monkeypatch):
    source = stack.postgres_url(source_db)
    replica = stack.postgres_url(destination_db)
    execute(source, SCHEMA)
    lake = str(tmp_path / "lake.duckdb")
    _, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.item"], destinations={
        "replica": {"kind": "replica", "url": replica}, "lake": {"kind": "analytics", "url": f"duckdb:///{lake}"}})
    spilled: list[int] = []
    real_spill = runs.ChangeRun.spill

    def spill(run, file):  # counts the runs set aside, and still sets them aside
        spilled.append(run.count)
        real_spill(run, file)

    monkeypatch.setattr(runs.ChangeRun, "spill", spill)
    monkeypatch.setattr(columnar, "CHUNK_CHANGES", 700)  # parts of about 700 changes: several per table
    try:
        execute(source, BIG, *SMALL)
        for name in ("replica", "lake"):
            spilled.clear()
            # Small polls: many runs; a transaction past 1,000 changes goes to disk.
            applier = ReplicaApplier(pipeline, name, poll_messages=250)
            applier.assembler.spill_at = 1_000
            try:
                applier.run(until_caught_up=True, timeout=300)
            finally:
                applier.close()
            assert sum(spilled) > BIG_CHANGES - 1_000, name  # past the line, the transaction went to disk
            assert applier.stats.columnar_rows == BIG_CHANGES + len(SMALL), name
            assert applier.assembler._spill is None, name  # nothing left pointing at the file
        expected = table_rows(source, "public.item")
        assert len(expected) == 3000 - 500 + 101 - 1
        assert (1, "u2", 4) in expected and (2, "after", 6) in expected and (650, "again", -650) in expected
        assert table_rows(replica, "public.item") == expected
        with duckdb.connect(lake, read_only=True) as conn:
            current = conn.execute('select id, v, n from "public.item" order by id').fetchall()
            history = conn.execute('select count(*), count(distinct (_cdc_lsn, id, _cdc_op)) '
                                   'from "public.item__history"').fetchone()
            ops = dict(conn.execute('select _cdc_op, count(*) from "public.item__history" group by 1').fetchall())
        assert current == expected
        assert history == (BIG_CHANGES + len(SMALL),) * 2  # each change once
        assert ops == {"c": 3101, "u": 601, "d": 501}
    finally:
        purge(pipeline)
