"""What an applier reads ahead of what it can apply is bounded (issue 15 item 8): with a small bound, a backlog of
small transactions over several partitions is applied exactly while the changes held in memory stay near the bound,
the partitions read beyond the next transaction being paused and resumed as it goes; on a PostgreSQL replica and a
DuckDB analytics file, whose history holds each change once."""

from __future__ import annotations

import duckdb

from consumers.apply.applier import ReplicaApplier
from consumers.apply.reader import ChangeReader
from tests.integration.pipelines import applied_pipeline, execute, purge, table_rows

TRANSACTIONS = 150
ROWS = 40  # inserted by each transaction, then a tenth of them updated in the next one
READ_AHEAD = 300
POLL = 100


def test_a_backlog_is_applied_exactly_with_what_is_read_ahead_held_near_its_bound(
        stack, source_db, destination_db, tmp_path, monkeypatch):
    source = stack.postgres_url(source_db)
    replica = stack.postgres_url(destination_db)
    execute(source, "create table item (id int primary key, v text not null, n int not null)")
    lake = str(tmp_path / "lake.duckdb")
    _, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.item"], destinations={
        "replica": {"kind": "replica", "url": replica}, "lake": {"kind": "analytics", "url": f"duckdb:///{lake}"}})
    held: list[int] = []
    partitions: set[int] = set()
    real_hold_back = ChangeReader._hold_back

    def hold_back(reader, polled):  # records what the assembler holds after each poll, then bounds it as ever
        held.append(reader.assembler.held_in_memory)
        partitions.add(len(reader.consumer.assignment()) - 1)  # the data topic's (the transaction topic has one)
        real_hold_back(reader, polled)

    monkeypatch.setattr(ChangeReader, "_hold_back", hold_back)
    try:
        for t in range(TRANSACTIONS):
            first = t * ROWS
            execute(source, f"begin; insert into item select g, 'v' || g, g from generate_series({first + 1}, "
                            f"{first + ROWS}) g; update item set n = n + 1 where id > {first - ROWS} and "
                            f"id <= {first - ROWS + ROWS // 10}; commit")
        changes = TRANSACTIONS * ROWS + (TRANSACTIONS - 1) * (ROWS // 10)
        expected = table_rows(source, "public.item")
        assert len(expected) == TRANSACTIONS * ROWS
        for name in ("replica", "lake"):
            held.clear()
            applier = ReplicaApplier(pipeline, name, poll_messages=POLL)
            applier.reader.read_ahead = READ_AHEAD
            try:
                applier.run(until_caught_up=True, timeout=300)
            finally:
                applier.close()
            assert applier.reader.held_back > 0, name  # partitions were paused...
            # ...and what was held stayed near the bound: past it, at most a poll from each partition before it is
            # paused in turn (a poll brings one partition's messages at a time).
            [data_partitions] = partitions
            assert data_partitions > 1 and max(held) <= READ_AHEAD + data_partitions * POLL, (name, held)
            assert applier.stats.rows == changes, name
        assert table_rows(replica, "public.item") == expected
        with duckdb.connect(lake, read_only=True) as conn:
            current = conn.execute('select id, v, n from "public.item" order by id').fetchall()
            history = conn.execute('select count(*), count(distinct (_cdc_lsn, id, _cdc_op)) '
                                   'from "public.item__history"').fetchone()
        assert current == expected
        assert history == (changes, changes)
    finally:
        purge(pipeline)
