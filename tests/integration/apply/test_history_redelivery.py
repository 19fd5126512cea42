"""Analytics histories stay exact under Debezium's at-least-once delivery on the real stack: exact copies of
already-applied Debezium messages (same key, value bytes and headers, the transaction topic's records too) are
written to the topics again, as Debezium re-sends transactions after a crash of Connect or of the broker. The DuckDB
and PostgreSQL analytics destinations that had applied the originals, and one that reads originals and copies in a
single pass, end with histories that hold each change once (no duplicate (_cdc_lsn, key, _cdc_op)), that replay to
the current state (`cdc verify`), and current states equal to the source."""

from __future__ import annotations

import json
from collections import Counter

import duckdb
import psycopg

from tests.integration.pipelines import (
    applied_pipeline,
    cdc,
    end_offsets,
    execute,
    purge,
    redeliver,
    table_rows,
    topic_messages,
)

SCHEMA = """
create table item (id bigint primary key, name text not null, price numeric(8, 2));
insert into item select g, 'item ' || g, g * 1.5 from generate_series(1, 40) g;
create table doc (id int primary key, body jsonb, tags text[]);
insert into doc select g, jsonb_build_object('g', g), array['t' || g] from generate_series(1, 10) g;
"""
TABLES = ["public.item", "public.doc"]
# `item` takes the DuckDB columnar path, `doc` (jsonb, arrays) the general one.
WORKLOAD = [
    "insert into item values (41, 'new', 1), (42, 'gone soon', 2)",
    "update item set name = 'second', price = null where id = 2",
    "begin; update item set name = 'third' where id = 2; update item set price = 9 where id = 2; "
    "delete from item where id = 42; commit",
    "delete from item where id in (5, 6)",
    "insert into item values (5, 'again', 2.5)",
    "update item set price = price + 1 where id between 10 and 20",
    "update item set id = 100 where id = 30",
    "update doc set body = '{\"a\": [1, 2]}' where id = 1",
    "delete from doc where id = 2",
    "insert into doc values (11, '[]', '{}')",
]
LATER = [
    "update item set name = 'after the copies' where id = 7",
    "insert into item values (43, 'late', 3)",
    "delete from doc where id = 3",
]


def _duck_history(file, table: str, key: str) -> tuple[Counter, list[tuple]]:
    lake = duckdb.connect(str(file), read_only=True)
    try:
        rows = lake.execute(f'select _cdc_lsn, {key}, _cdc_op from "{table}__history"').fetchall()
        current = lake.execute(f'select * exclude (_cdc_lsn) from "{table}" order by 1').fetchall()
    finally:
        lake.close()
    return Counter(rows), current


def _pg_history(url: str, table: str, key: str) -> Counter:
    schema, name = table.split(".")
    with psycopg.connect(url) as conn:
        return Counter(conn.execute(f'select _cdc_lsn, {key}, _cdc_op from "{schema}"."{name}__history"').fetchall())


def _verify(path, destination: str) -> dict:
    result = cdc(path, "verify", destination, "--json", "--settle", "0")
    report = json.loads(result.stdout) if result.stdout.strip() else {"stderr": result.stderr}
    assert result.returncode == 0 and report["equal"] is True, json.dumps(report, indent=1)
    for table in report["tables"]:
        history = table["history"]
        assert history["duplicates"] == 0 and history["inconsistent"] == 0 and history["checked"], history
    return report


def test_redelivered_transactions_are_recorded_once_in_the_histories(stack, decoder, source_db, destination_db,
                                                                      tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    lake, fresh = tmp_path / "lake.duckdb", tmp_path / "fresh.duckdb"
    pg = stack.postgres_url(destination_db)
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, TABLES, destinations={
        "lake": {"kind": "analytics", "url": f"duckdb:///{lake}"},
        "pglake": {"kind": "analytics", "url": pg},
        # Run only at the end: it reads each original and its copy in one pass.
        "fresh": {"kind": "analytics", "url": f"duckdb:///{fresh}"}})
    try:
        execute(source, *WORKLOAD)
        first = cdc(path, "run", "lake", "pglake", "--until-caught-up", "--timeout", "240")
        assert first.returncode == 0, first.stdout + first.stderr
        before = {t: _duck_history(lake, t, "id")[0] for t in TABLES}
        assert all(max(c.values()) == 1 for c in before.values()), before

        # At-least-once: every transaction Debezium wrote so far (its changes, BEGIN and END records) again. Not the
        # snapshot reads: Debezium never re-sends those as copies once it streams (a snapshot that did not complete
        # is taken again, reading the rows as they are then), and a copy of one, being outside any transaction,
        # would bring back rows deleted since (the destination skips copies of whole transactions, their deletes
        # included: consumers/apply/copies.py).
        written = topic_messages(stack, [*pipeline.data_topics, pipeline.transaction_topic])
        copies = redeliver(stack, [m for m in written if m.topic() == pipeline.transaction_topic
                                   or (m.value() is not None and decoder.decode(m.value()).get("transaction"))])
        assert copies > 30
        execute(source, *LATER)
        again = cdc(path, "run", "lake", "pglake", "--until-caught-up", "--timeout", "240")
        assert again.returncode == 0, again.stdout + again.stderr
        alone = cdc(path, "run", "fresh", "--until-caught-up", "--timeout", "240")
        assert alone.returncode == 0, alone.stdout + alone.stderr

        for table in TABLES:
            expected = table_rows(source, table)
            pg_history = _pg_history(pg, table, "id")
            for file in (lake, fresh):
                history, current = _duck_history(file, table, "id")
                assert [k for k, n in history.items() if n > 1] == [], (file, table)
                assert history == pg_history, table  # both kinds of destination recorded the same changes
                assert [tuple(map(_plain, r)) for r in current] == [tuple(map(_plain, r)) for r in expected], \
                    (file, table)
            assert [k for k, n in pg_history.items() if n > 1] == [], table
            assert table_rows(pg, table) == expected, table
            # Every change of the first run is still there once, and the later ones were added.
            assert set(before[table]) < set(pg_history)
        # The copies went through the appliers (the stored offsets are past them), not around them.
        ends = end_offsets(stack, [*pipeline.data_topics, pipeline.transaction_topic])
        with psycopg.connect(pg) as conn:
            stored = dict(((t, p), o) for t, p, o in conn.execute(
                "select topic, kafka_partition, next_offset from _cdc_offsets where pipeline = %s",
                (pipeline.name,)).fetchall())
        for (topic, partition), end in ends.items():
            if topic in pipeline.data_topics:
                # (an empty partition has nothing to store: no row, read as 0)
                assert stored.get((topic, partition), 0) == end, (topic, partition, stored, ends)
        for destination in ("lake", "pglake", "fresh"):
            _verify(path, destination)
    finally:
        purge(pipeline)


def _plain(value):
    """DuckDB and PostgreSQL give some values in other Python types (lists as lists, JSON as text or dicts)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
