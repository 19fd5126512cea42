"""Capture fidelity on the real stack: every change a source makes reaches a topic an applier reads, or
`cdc connectors apply` refuses before anything changes (routes, partitioned tables, truncates, heartbeats,
topics of another source database, nullable root ids)."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest

from cdc.errors import CdcError, ConfigError
from consumers.apply.stream import ChangeStream
from producers import capture, topics
from producers.debezium import OPTIONAL_FIELDS
from tests.integration.pipelines import (
    applied_pipeline,
    assert_nothing_created,
    caught_up,
    cdc,
    connect_plugins,
    execute,
    pipeline_data,
    pipeline_topics_now,
    purge,
    require_plugins,
    table_rows,
    write_pipeline,
)

# -- 1. routes match whole names; no topic outside the plan

FILM = """
create table film (film_id integer primary key, title text not null);
create table film_actor (actor_id integer, film_id integer not null references film, primary key (actor_id, film_id));
create table film_category (film_id integer primary key references film, category text not null);
insert into film select g, 'film ' || g from generate_series(1, 5) g;
insert into film_actor select a, f from generate_series(1, 3) a, generate_series(1, 5) f;
insert into film_category select g, 'cat' from generate_series(1, 5) g;
"""


def test_members_whose_names_begin_with_the_roots_reach_the_hierarchy_topic(stack, decoder, source_db, tmp_path):
    execute(stack.postgres_url(source_db), FILM)
    path, pipeline = applied_pipeline(
        stack, source_db, tmp_path, ["public.film", "public.film_actor", "public.film_category"],
        hierarchies={"film": {"root": "public.film", "members": {"public.film_actor": "film_id",
                                                                 "public.film_category": "film_id"}}})
    stream = ChangeStream(stack.kafka_bootstrap, decoder, [f"{pipeline.name}.film"], group=f"t-{pipeline.name}")
    try:
        snapshot = stream.collect(lambda seen: len(seen) >= 25, timeout=120)
        execute(stack.postgres_url(source_db), "insert into film values (6, 'six')",
                "insert into film_actor values (1, 6)", "update film_category set category = 'x' where film_id = 2")
        streamed = stream.collect(lambda seen: len(seen) >= 3, timeout=120)
        status = cdc(path, "connectors", "status")
        existing = pipeline_topics_now(stack, pipeline)
    finally:
        stream.close()
        purge(pipeline)
    assert sorted((e.table, e.op) for e in snapshot).count(("public.film_actor", "r")) == 15
    assert {e.table for e in snapshot} == {"public.film", "public.film_actor", "public.film_category"}
    assert sorted((e.table, e.op) for e in streamed) == [
        ("public.film", "c"), ("public.film_actor", "c"), ("public.film_category", "u")]
    assert all(e.key == {"film_id": e.row["film_id"]} for e in snapshot + streamed)
    assert f"{pipeline.name}.film_actor" not in existing and f"{pipeline.name}.film_category" not in existing
    assert status.returncode == 0, status.stdout + status.stderr


def test_a_topic_outside_the_plan_is_an_error_naming_its_table(stack, source_db, tmp_path):
    execute(stack.postgres_url(source_db), FILM)
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.film"])
    try:
        admin = topics.admin_client(stack.kafka_bootstrap)
        stray = f"{pipeline.name}.public.film_actor"
        topics.create_topics(admin, [topics.TopicSpec(stray, 1, {})], 1)
        status = cdc(path, "connectors", "status")
        as_json = cdc(path, "connectors", "status", "--json")
        again = cdc(path, "connectors", "apply")
    finally:
        purge(pipeline)
    message = (f"error: topic {stray} is not planned by pipeline {pipeline.name!r}: it holds events of table "
               "public.film_actor that no applier reads")
    assert status.returncode == 1 and message in status.stderr, status.stdout + status.stderr
    assert '"unplanned_topics": [\n    {\n      "topic": "' + stray in as_json.stdout
    assert again.returncode == 1 and message in again.stderr, again.stderr


# -- 2. partitioned tables

PAYMENT = """
create table customer (id integer primary key, name text not null);
create table payment (id integer not null, customer_id integer not null references customer, paid date not null,
                      amount numeric(8, 2) not null, primary key (id, paid)) partition by range (paid);
create table payment_2024 partition of payment for values from ('2024-01-01') to ('2025-01-01');
create table payment_2025 partition of payment for values from ('2025-01-01') to ('2026-01-01');
insert into customer select g, 'c' || g from generate_series(1, 4) g;
insert into payment select g, 1 + g % 4, date '2024-06-01' + g * 20, g from generate_series(1, 20) g;
"""


def test_a_partitioned_table_is_snapshotted_once_and_streamed_as_its_parent(stack, source_db, destination_db,
                                                                           tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, PAYMENT)
    path, pipeline = applied_pipeline(
        stack, source_db, tmp_path, ["public.customer", "public.payment"],
        destinations={"pg": {"kind": "replica", "url": stack.postgres_url(destination_db)}})
    try:
        caught_up(path)
        # Read once: the parent's snapshot reads every partition's rows, and no partition is read again.
        assert topics.message_counts(stack.kafka_bootstrap, [pipeline.topic_of("public.payment")]) == {
            pipeline.topic_of("public.payment"): 20}
        assert table_rows(source, "public.payment") == table_rows(stack.postgres_url(destination_db), "public.payment")
        with psycopg.connect(source) as conn:
            with conn.transaction():  # a rental and its payment: one source transaction
                conn.execute("insert into customer values (5, 'new')")
                conn.execute("insert into payment values (100, 5, '2025-03-01', 9.5)")
            with conn.transaction():  # moves rows to the other partition
                conn.execute("update payment set paid = paid - interval '1 year' where paid >= '2025-01-01' "
                             "and id < 12")
            conn.execute("delete from payment where id = 3")
            conn.commit()
            conn.execute("create table payment_2026 partition of payment "
                         "for values from ('2026-01-01') to ('2027-01-01')")
            conn.commit()
            conn.execute("insert into payment values (200, 1, '2026-02-02', 1), (201, 2, '2026-03-03', 2)")
            conn.commit()
            # Attached empty: rows a table already holds when it is attached are no change to PostgreSQL (it
            # writes none): see test_partitions_later for the event trigger that follows them.
            conn.execute("create table payment_2023 (like payment)")
            conn.execute("alter table payment attach partition payment_2023 "
                         "for values from ('2023-01-01') to ('2024-01-01')")
            conn.commit()
            conn.execute("insert into payment values (300, 1, '2023-05-05', 3), (301, 1, '2023-06-06', 4)")
            conn.execute("update payment set amount = amount + 1 where id = 300")
            conn.execute("update payment set paid = '2023-12-31' where id = 200")  # into the attached one
            conn.commit()
        caught_up(path)
    finally:
        purge(pipeline)
    for table in ("public.customer", "public.payment"):
        assert table_rows(source, table) == table_rows(stack.postgres_url(destination_db), table), table
    assert len(table_rows(source, "public.payment")) == 24


def test_a_partitioned_hierarchy_member_keeps_its_root_id_in_deletes_and_moves(stack, decoder, source_db,
                                                                              destination_db, tmp_path):
    """PostgreSQL does not pass a partitioned table's REPLICA IDENTITY FULL on to its partitions, and a deleted
    row's old image comes from its partition: without FULL there, Debezium filled the missing root id with 0."""
    source = stack.postgres_url(source_db)
    execute(source, PAYMENT)
    data = pipeline_data(stack, source_db, ["public.customer", "public.payment"],
                         hierarchies={"customer": {"root": "public.customer",
                                                   "members": {"public.payment": "customer_id"}}},
                         destinations={"pg": {"kind": "replica", "url": stack.postgres_url(destination_db)}})
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)
    report = capture.apply(pipeline)
    assert report.identity_set == ["public.payment_2024", "public.payment_2025"]
    stream = ChangeStream(stack.kafka_bootstrap, decoder, pipeline.data_topics, group=f"t-{pipeline.name}")
    try:
        stream.collect(lambda seen: len(seen) >= 24, timeout=120)
        execute(source, "delete from payment where id = 3", "update payment set paid = '2025-06-01' where id = 4",
                "create table payment_2026 partition of payment for values from ('2026-01-01') to ('2027-01-01')",
                "insert into payment values (400, 2, '2026-05-05', 1)")
        # A partition created later gets FULL from the pipeline's event trigger (producers.partitions)...
        with psycopg.connect(source) as conn:
            assert conn.execute("select relreplident from pg_class where oid = 'payment_2026'::regclass"
                                ).fetchone()[0] == "f"
        # ... and one that lost it (or one of a source without the trigger, no superuser) is named by `status`.
        execute(source, "alter table payment_2026 replica identity default")
        status = cdc(path, "connectors", "status")
        again = cdc(path, "connectors", "apply")
        execute(source, "delete from payment where id = 400")
        changes = stream.collect(lambda seen: len(seen) >= 5, timeout=120)
        status_after = cdc(path, "connectors", "status")
        caught_up(path)
    finally:
        stream.close()
        purge(pipeline)
    assert status.returncode == 1 and (
        "error: partition public.payment_2026 of public.payment lacks REPLICA IDENTITY FULL (PostgreSQL does not pass "
        "it on to partitions created or attached later): its updates and deletes carry an incomplete old row; run "
        "`cdc connectors apply`") in status.stderr, status.stdout + status.stderr
    assert again.returncode == 0, again.stderr
    assert "partition public.payment_2026: replica identity FULL" in again.stdout, again.stdout
    assert status_after.returncode == 0, status_after.stderr
    # (op, root id in the key, payment id); partitions of the topic interleave, so compared unordered
    assert sorted((e.op, e.key["id"], e.row["id"]) for e in changes) == [
        ("c", 1, 4), ("c", 2, 400), ("d", 1, 4), ("d", 2, 400), ("d", 4, 3)]
    for table in ("public.customer", "public.payment"):
        assert table_rows(source, table) == table_rows(stack.postgres_url(destination_db), table), table


def test_a_partition_listed_beside_its_parent_is_refused_and_nothing_is_created(stack, connect, source_db, tmp_path):
    execute(stack.postgres_url(source_db), PAYMENT)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml",
                              pipeline_data(stack, source_db, ["public.payment", "public.payment_2025"]))
    with pytest.raises(ConfigError) as info:
        capture.apply(pipeline)
    assert str(info.value) == (
        "source.tables: 'public.payment_2025' is a partition of 'public.payment', which is listed too; a partitioned "
        "table is captured whole through its parent (the publication publishes its partitions' changes under the "
        "parent's name), so list only the parent")
    assert_nothing_created(stack, connect, pipeline, source_db)


# -- 3. truncates

TRUNCATED = """
create table person (id integer primary key, name text not null);
create table enrollment (id integer primary key, person_id integer not null references person, grade integer);
create table school (id integer primary key, name text not null);
insert into person select g, 'p' || g from generate_series(1, 5) g;
insert into enrollment select g, 1 + g % 5, g from generate_series(1, 10) g;
insert into school select g, 's' || g from generate_series(1, 3) g;
"""


def _truncate_round(stack, source_db, destination_url: str, tmp_path, read) -> None:
    source = stack.postgres_url(source_db)
    execute(source, TRUNCATED)
    path, pipeline = applied_pipeline(
        stack, source_db, tmp_path, ["public.person", "public.enrollment", "public.school"],
        hierarchies={"person": {"root": "public.person", "members": {"public.enrollment": "person_id"}}},
        destinations={"d": {"kind": "replica", "url": destination_url}})
    try:
        caught_up(path)
        assert len(read("enrollment")) == 10 and len(read("school")) == 3
        with psycopg.connect(source) as conn:
            with conn.transaction():
                conn.execute("truncate enrollment")
                conn.execute("insert into enrollment values (50, 1, 7)")
            with conn.transaction():
                conn.execute("truncate school")
            conn.execute("insert into school values (9, 'after')")
            conn.execute("insert into enrollment values (51, 2, 8)")
            conn.commit()
        caught_up(path)
    finally:
        purge(pipeline)
    assert read("enrollment") == [(50, 1, 7), (51, 2, 8)]
    assert read("school") == [(9, "after")]
    assert len(read("person")) == 5


def test_a_truncate_reaches_a_postgresql_replica_in_transaction_order(stack, source_db, destination_db, tmp_path):
    url = stack.postgres_url(destination_db)
    _truncate_round(stack, source_db, url, tmp_path, lambda table: table_rows(url, f"public.{table}"))


def test_a_truncate_reaches_a_mariadb_replica(stack, source_db, mariadb_database, tmp_path):
    from sqlalchemy import create_engine

    engine = create_engine(mariadb_database)

    def read(table: str) -> list[tuple]:
        columns = {"enrollment": "id, person_id, grade", "school": "id, name", "person": "id, name"}[table]
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(f"select {columns} from `{table}` order by id")]

    try:
        _truncate_round(stack, source_db, mariadb_database, tmp_path, read)
    finally:
        engine.dispose()


# -- 4. heartbeats move the slot while the captured database is idle

def test_an_idle_captured_database_does_not_hold_wal_while_others_are_busy(stack, source_db, destination_db,
                                                                            tmp_path):
    execute(stack.postgres_url(source_db), "create table quiet (id integer primary key)")
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", pipeline_data(stack, source_db, ["public.quiet"]))
    capture.apply(pipeline)
    busy = stack.postgres_url(destination_db)
    try:
        execute(busy, "create table noise (id bigserial primary key, pad text)")
        with psycopg.connect(busy, autocommit=True) as conn:
            for _ in range(20):
                conn.execute("insert into noise (pad) select repeat('x', 500) from generate_series(1, 2000)")
            written = conn.execute("select pg_current_wal_lsn()").fetchone()[0]
        with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
            deadline = time.monotonic() + 30  # heartbeat_ms is 1000 in the tests' pipelines
            while True:
                confirmed, behind = conn.execute(
                    "select confirmed_flush_lsn, pg_wal_lsn_diff(%s::pg_lsn, confirmed_flush_lsn) "
                    "from pg_replication_slots where slot_name = %s", (written, pipeline.slot_name)).fetchone()
                if behind <= 0 or time.monotonic() > deadline:
                    break
                time.sleep(1)
        existing = set(pipeline_topics_now(stack, pipeline))
        # The heartbeat's writes are not captured changes: no transaction records, so an idle pipeline has no lag.
        counts = [topics.message_counts(stack.kafka_bootstrap, [pipeline.transaction_topic], ends=True)]
        time.sleep(3.5)
        counts.append(topics.message_counts(stack.kafka_bootstrap, [pipeline.transaction_topic], ends=True))
    finally:
        purge(pipeline)
    assert behind <= 0, f"the slot still holds {behind} bytes of WAL written by another database ({confirmed})"
    assert existing <= topics.planned_topics(pipeline), existing  # no `<pipeline>.message` topic
    assert counts[0] == counts[1], counts


# -- 5. topics holding another source database's history

def test_a_pipeline_name_reused_for_another_source_database_is_refused_then_reset(stack, connect, tmp_path):
    name = f"reuse{uuid.uuid4().hex[:8]}"
    database = f"src_{uuid.uuid4().hex[:10]}"
    admin_url = stack.postgres_url()

    def create_source(rows: int) -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'create database "{database}"')
        execute(stack.postgres_url(database), "create table item (id integer primary key, label text)",
                f"insert into item select g, 'v' || g from generate_series(1, {rows}) g")

    def drop_source() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{database}" with (force)')

    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, pipeline_data(stack, database, ["public.item"], name=name))
    try:
        create_source(3)
        capture.apply(pipeline)
        capture.delete(pipeline, purge=True)
        drop_source()
        create_source(2)  # same name, another database
        with psycopg.connect(stack.postgres_url(database)) as conn:
            oid = conn.execute("select oid from pg_database where datname = current_database()").fetchone()[0]
        before = pipeline_topics_now(stack, pipeline)
        refused = cdc(path, "connectors", "apply")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert refused.stderr.startswith(f"error: topics {name}.public.item"), refused.stderr
        assert f" hold the history of database {database!r} (oid " in refused.stderr
        assert (f"but source.url reaches database {database!r} (oid {oid}) of cluster " in refused.stderr
                and f"the pipeline name {name!r} was used before for another source database. Nothing was changed."
                in refused.stderr and "Run `cdc connectors apply --reset-topics`" in refused.stderr), refused.stderr
        assert connect.status(pipeline.connector_name) is None
        assert pipeline_topics_now(stack, pipeline) == before
        with psycopg.connect(stack.postgres_url(database)) as conn:
            assert conn.execute("select count(*) from pg_replication_slots where slot_name = %s",
                                (pipeline.slot_name,)).fetchone()[0] == 0
            assert conn.execute("select count(*) from pg_publication").fetchone()[0] == 0

        reset = cdc(path, "connectors", "apply", "--reset-topics")
        assert reset.returncode == 0, reset.stdout + reset.stderr
        assert f"topic {name}.public.item: deleted (--reset-topics)" in reset.stdout
        counts = topics.message_counts(stack.kafka_bootstrap, [f"{name}.public.item"])
        assert counts == {f"{name}.public.item": 2}  # the new database's snapshot only
        again = cdc(path, "connectors", "apply")
        assert again.returncode == 0 and again.stdout.strip() == f"connector {pipeline.connector_name}: unchanged"
    finally:
        capture.delete(pipeline, purge=True)
        drop_source()
        topics.delete_topics(topics.admin_client(stack.kafka_bootstrap), pipeline_topics_now(stack, pipeline))


# -- 6. nullable root-id columns

BRANCHES = """
create table branch (bid integer primary key, name text not null);
create table history (hid bigserial primary key, bid integer references branch, delta integer not null);
insert into branch select g, 'branch ' || g from generate_series(1, 6) g;
insert into history (bid, delta) select case when g % 4 = 0 then null else 1 + g % 6 end, g
from generate_series(1, 40) g;
"""
HISTORY = {"branch": {"root": "public.branch", "members": {"public.history": "bid"}}}


def test_member_rows_with_a_null_root_id_replicate_and_join_their_root_later(stack, source_db, destination_db,
                                                                            tmp_path):
    import struct
    from collections import defaultdict

    from confluent_kafka import Consumer, TopicPartition

    require_plugins(stack, OPTIONAL_FIELDS)
    source, destination = stack.postgres_url(source_db), stack.postgres_url(destination_db)
    execute(source, BRANCHES)
    path, pipeline = applied_pipeline(
        stack, source_db, tmp_path, ["public.branch", "public.history"], hierarchies=HISTORY,
        topics={"partitions": 3}, destinations={"pg": {"kind": "replica", "url": destination}})
    try:
        caught_up(path)
        for table in ("public.branch", "public.history"):
            assert table_rows(source, table) == table_rows(destination, table), table
        with psycopg.connect(source) as conn:
            with conn.transaction():
                conn.execute("update history set bid = 2 where hid = 4")  # joins a hierarchy
                conn.execute("insert into history (bid, delta) values (null, 99)")
                conn.execute("update branch set name = 'renamed' where bid = 2")
            conn.execute("update history set bid = null where hid = 5")  # leaves it
            conn.execute("delete from history where hid = 8")  # a NULL root id's delete
            conn.commit()
        caught_up(path)
        for table in ("public.branch", "public.history"):
            assert table_rows(source, table) == table_rows(destination, table), table
        topic = pipeline.topic_of("public.history")
        consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"t-{pipeline.name}",
                             "enable.auto.commit": False, "log_level": 3})
        total = topics.message_counts(stack.kafka_bootstrap, [topic])[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
        messages = []
        deadline = time.monotonic() + 60
        while len(messages) < total and time.monotonic() < deadline:
            messages += [m for m in consumer.consume(500, 1.0) if m.error() is None]
        consumer.close()
    finally:
        purge(pipeline)
    # A change of a member's root id changes its record key: Debezium sends a delete under the old key and a
    # create under the new one (so two messages for each of the two such updates).
    assert len(messages) == total == 6 + 40 + 7
    # One key schema for the root and its member: one registry id in every key, so one root id, one partition.
    framings = {struct.unpack(">bI", m.key()[:5]) for m in messages}  # magic byte, registry id
    assert len(framings) == 1 and next(iter(framings))[0] == 0, framings
    partitions = defaultdict(set)
    for m in messages:
        partitions[m.key()].add(m.partition())
    assert all(len(p) == 1 for p in partitions.values())
    assert len(partitions) == 7  # six branch ids and the null root id


def test_without_the_transform_a_nullable_root_id_is_refused_and_nothing_is_created(stack, connect, source_db,
                                                                                   tmp_path):
    if OPTIONAL_FIELDS in connect_plugins(stack):
        pytest.skip("this Kafka Connect has the project's transform")
    execute(stack.postgres_url(source_db), BRANCHES)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", pipeline_data(
        stack, source_db, ["public.branch", "public.history"], hierarchies=HISTORY))
    with pytest.raises(CdcError) as info:
        capture.apply(pipeline)
    assert str(info.value) == (
        "hierarchies branch: a member's root-id column is nullable, so the hierarchy's keys need the transform "
        f"cdc.transforms.OptionalFields$Key, which Kafka Connect at {stack.urls()['connect']} does not have; "
        "`cdc stack up` builds it into the plugin path, and Connect loads it when it starts. Nothing was changed.")
    assert_nothing_created(stack, connect, pipeline, source_db)


def test_reset_topics_is_refused_while_the_connector_of_the_other_source_exists(stack, connect, source_db,
                                                                                destination_db, tmp_path):
    """A running pipeline pointed at another database: the topics, and the connector's offsets, are the other's."""
    for database in (source_db, destination_db):
        execute(stack.postgres_url(database), "create table item (id integer primary key)",
                "insert into item values (1)")
    data = pipeline_data(stack, source_db, ["public.item"])
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)  # written again below, pointed at the other database
    capture.apply(pipeline)
    try:
        config_before = connect.config(pipeline.connector_name)
        topics_before = pipeline_topics_now(stack, pipeline)
        data["source"]["url"] = stack.postgres_url(destination_db)
        write_pipeline(path, data)
        plain = cdc(path, "connectors", "apply")
        reset = cdc(path, "connectors", "apply", "--reset-topics")
        assert plain.returncode == 1 and f"hold the history of database {source_db!r}" in plain.stderr, plain.stderr
        assert reset.returncode == 1, reset.stdout + reset.stderr
        assert reset.stderr.strip() == (
            f"error: --reset-topics: connector {pipeline.connector_name} exists and its stored offsets belong to the "
            "other source; run `cdc connectors delete --purge` first. Nothing was changed.")
        assert connect.config(pipeline.connector_name) == config_before
        assert pipeline_topics_now(stack, pipeline) == topics_before
        assert topics.message_counts(stack.kafka_bootstrap, [pipeline.topic_of("public.item")]) == {
            pipeline.topic_of("public.item"): 1}
        with psycopg.connect(stack.postgres_url(destination_db)) as conn:
            assert conn.execute("select count(*) from pg_publication").fetchone()[0] == 0
    finally:
        purge(pipeline)
