"""Copies of applied source transactions that Debezium re-sends after a worker restart are skipped whole, on the
real stack (consumers/apply/copies.py).

Debezium starts again from the last source position it flushed and re-sends, behind later transactions, ones the
destinations applied already. Here the copy is written by the test: the exact messages of one transaction (its change
events and its BEGIN and END records, same bytes, same partitions), behind a later transaction that deleted the row it
updated and that row's parent. Applied again, the copy would re-create the child row (a replica then stops on the
foreign key; an analytics replica would hold the row again until the delete's own copy came). Each destination kind
must skip it, say so, store its offsets past it, and stay equal to the source; a full replay through the copies
must end equal to the source too."""

from __future__ import annotations

import json

import duckdb
import psycopg

from tests.integration.pipelines import (
    applied_pipeline,
    cdc,
    destination_rows,
    execute,
    purge,
    redeliver,
    table_rows,
    topic_messages,
)

SCHEMA = """
create table parent (id int primary key, name text not null);
create table child (id int primary key, parent_id int not null references parent (id), note text);
insert into parent values (1, 'one'), (2, 'two');
insert into child values (10, 1, 'a'), (20, 2, 'b');
"""
TABLES = ["public.parent", "public.child"]


def _xid_of(url: str, *statements: str) -> str:
    """Run statements in one source transaction; its transaction id as Debezium writes it."""
    with psycopg.connect(url) as conn:
        for statement in statements:
            conn.execute(statement)
        xid = conn.execute("select pg_current_xact_id()::text").fetchone()[0]
    return xid


def _messages_of(stack, decoder, pipeline, xid: str) -> list:
    """The messages one source transaction was written as: its change events and its BEGIN and END records."""
    found = []
    for m in topic_messages(stack, [*pipeline.data_topics, pipeline.transaction_topic]):
        if m.value() is None:
            continue
        value = decoder.decode(m.value())
        record = value if m.topic() == pipeline.transaction_topic else value.get("transaction") or {}
        tx_id = record.get("id")
        if tx_id and str(tx_id).split(":", 1)[0] == xid:
            found.append(m)
    return found


def test_a_copy_of_an_applied_transaction_does_not_bring_back_a_deleted_row(stack, decoder, source_db,
                                                                             destination_db, mariadb_database,
                                                                             tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    lake = tmp_path / "lake.duckdb"
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, TABLES, destinations={
        "replica": {"kind": "replica", "url": stack.postgres_url(destination_db)},
        "maria": {"kind": "replica", "url": mariadb_database},
        "lake": {"kind": "analytics", "url": f"duckdb:///{lake}"}})
    names = ("replica", "maria", "lake")
    try:
        updated = _xid_of(source, "update child set note = 'changed' where id = 10")
        execute(source, "begin; delete from child where id = 10; delete from parent where id = 1; commit")
        first = cdc(path, "run", *names, "--until-caught-up", "--timeout", "240")
        assert first.returncode == 0, first.stdout + first.stderr

        copy = _messages_of(stack, decoder, pipeline, updated)
        topics = {m.topic() for m in copy}
        assert pipeline.transaction_topic in topics and len(copy) == 3, [(m.topic(), m.offset()) for m in copy]
        redeliver(stack, copy)
        execute(source, "update child set note = 'after the copy' where id = 20")

        again = cdc(path, "run", *names, "--until-caught-up", "--timeout", "240")
        assert again.returncode == 0, again.stdout + again.stderr
        for name in names:
            assert f"{name}: skipped 1 re-sent copy of source transactions already applied" in again.stdout, \
                again.stdout
        _assert_equal(stack, source, destination_db, mariadb_database, lake)

        # A replay reads the original and the copy again from the start of the topics: the mark that skips the
        # copy is set anew as the replay applies the original.
        for name in ("replica", "lake"):
            replayed = cdc(path, "replay", name)
            assert replayed.returncode == 0, replayed.stdout + replayed.stderr
            assert f"{name}: skipped 1 re-sent copy" in replayed.stdout, replayed.stdout
        _assert_equal(stack, source, destination_db, mariadb_database, lake)
    finally:
        purge(pipeline)


def _assert_equal(stack, source, destination_db, maria_url, lake) -> None:
    for table, columns in (("parent", ["id", "name"]), ("child", ["id", "parent_id", "note"])):
        expected = table_rows(source, f"public.{table}")
        assert sorted(expected) == sorted(destination_rows(stack.postgres_url(destination_db), table, columns)), table
        assert sorted(expected) == sorted(destination_rows(maria_url, table, columns)), table
        with duckdb.connect(str(lake), read_only=True) as conn:
            current = conn.execute(f'select {", ".join(columns)} from "public.{table}"').fetchall()
            history = conn.execute(f'select _cdc_lsn, id, _cdc_op, count(*) from "public.{table}__history" '
                                   "group by all having count(*) > 1").fetchall()
        assert sorted(expected) == sorted(current), table
        assert history == [], table  # every change recorded once
    assert [r[0] for r in table_rows(source, "public.child")] == [20]


def test_events_re_sent_without_their_end_record_are_skipped_and_the_lag_comes_back_to_zero(stack, decoder, source_db,
                                                                                            destination_db, tmp_path):
    # Debezium's re-sending cut short again before the END record, and then an idle source: nothing follows the
    # repeated events in their partition. They were held there for good, waiting for an END that never came (the run
    # never caught up, the lag never came back to zero).
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, TABLES, destinations={
        "replica": {"kind": "replica", "url": stack.postgres_url(destination_db)}})
    try:
        updated = _xid_of(source, "update child set note = 'changed' where id = 10",
                          "update parent set name = 'changed' where id = 2")
        first = cdc(path, "run", "replica", "--until-caught-up", "--timeout", "240")
        assert first.returncode == 0, first.stdout + first.stderr

        events = [m for m in _messages_of(stack, decoder, pipeline, updated) if m.topic() != pipeline.transaction_topic]
        assert len(events) == 2, [(m.topic(), m.offset()) for m in events]
        redeliver(stack, events)

        again = cdc(path, "run", "replica", "--until-caught-up", "--timeout", "120")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "replica: skipped 1 re-sent copy of source transactions already applied" in again.stdout, again.stdout
        lag = cdc(path, "lag", "--json", "--window", "0", "--check", timeout=120)
        assert lag.returncode == 0, lag.stdout + lag.stderr
        (dest,) = json.loads(lag.stdout)["destinations"]
        assert dest["status"] == "OK" and dest["lag_messages"] == 0, dest
        for table, columns in (("parent", ["id", "name"]), ("child", ["id", "parent_id", "note"])):
            assert sorted(table_rows(source, f"public.{table}")) == sorted(
                destination_rows(stack.postgres_url(destination_db), table, columns)), table
    finally:
        purge(pipeline)
