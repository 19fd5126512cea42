"""Helpers for integration tests: pipeline files pointed at the test stack, fresh databases, running `cdc`, and
reading what reached Kafka and the destinations."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from psycopg import sql

from cdc import config
from cdc.config import Pipeline
from infra.stack import StackLayout
from producers import capture, topics
from producers.source_admin import drop_slot, slots_of_database


def fresh_database(stack: StackLayout, prefix: str):
    """A new, uniquely named PostgreSQL database (a generator: yields its name); dropped afterwards with whatever
    slot still points at it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    yield name
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        for slot in slots_of_database(conn, name):
            drop_slot(conn, slot)
        conn.execute(f'drop database if exists "{name}" with (force)')


def fresh_mariadb_database(stack: StackLayout, prefix: str = "dst"):
    """A new, uniquely named database on the stack's MariaDB (a generator: yields its URL); dropped afterwards."""
    from sqlalchemy import create_engine

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(stack.mariadb_url())
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
        yield stack.mariadb_url(name)
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        admin.dispose()


def pipeline_data(stack: StackLayout, database: str, tables: list[str], *, name: str | None = None,
                  hierarchies: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    urls = stack.urls()
    data: dict[str, Any] = {
        "pipeline": name or f"t{uuid.uuid4().hex[:8]}",
        "kafka": {"bootstrap_servers": stack.kafka_bootstrap, "schema_registry_url": urls["schema_registry"],
                  "connect_url": urls["connect"]},
        "source": {"url": stack.postgres_url(database), "tables": tables, "heartbeat_ms": 1000},
    }
    if hierarchies:
        data["hierarchies"] = hierarchies
    data.update(extra)
    return data


CDC = str(Path(sys.executable).parent / "cdc")


def cdc(path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The command line, as a user runs it, on a pipeline file."""
    return subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=timeout)


def caught_up(path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """`cdc run --until-caught-up` on a pipeline file, which must exit 0."""
    run = cdc(path, "run", "--until-caught-up", "--timeout", str(timeout))
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def table_rows(url: str, table: str) -> list[tuple]:
    """Every row of a PostgreSQL table (`schema.table`), with plain SQL, `_cdc_lsn` left out, ordered by its first
    two columns."""
    schema, name = table.split(".")
    with psycopg.connect(url) as conn:
        columns = [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
            "and column_name <> '_cdc_lsn' order by ordinal_position", (schema, name))]
        assert columns, f"{table} does not exist at {url}"
        query = sql.SQL("select {} from {} order by 1{}").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(schema, name),
            sql.SQL(", 2" if len(columns) > 1 else ""))
        return conn.execute(query).fetchall()


def execute(url: str, *statements: str) -> None:
    """Run statements on a database, each committed on its own (a source transaction each)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def write_pipeline(path: Path, data: dict[str, Any]) -> Pipeline:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return config.load(path, env={})


def applied_pipeline(stack: StackLayout, source_db: str, tmp_path: Path, tables: list[str],
                     **data: Any) -> tuple[Path, Pipeline]:
    """A pipeline file capturing `tables` of `source_db` (pipeline_data's other settings, destinations and
    hierarchies, in `data`) written to tmp_path/pipeline.yaml, and its connector applied as `cdc connectors apply`
    does: (the file, the Pipeline). The caller purges the pipeline."""
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, pipeline_data(stack, source_db, tables, **data))
    capture.apply(pipeline)
    return path, pipeline


def connect_plugins(stack: StackLayout) -> set[str]:
    """The plugin classes the stack's Kafka Connect loaded (the project's transforms among them)."""
    from producers.connect import ConnectClient

    with ConnectClient(stack.urls()["connect"]) as client:
        return {p.get("class") for p in client.plugins()}


def require_plugins(stack: StackLayout, *classes: str) -> None:
    """Fail (not skip) when Connect lacks a class: `cdc stack up` builds the project's transforms and restarts a
    Connect that predates them."""
    import pytest

    missing = sorted(set(classes) - connect_plugins(stack))
    if missing:
        pytest.fail(f"Kafka Connect lacks {', '.join(missing)}: `cdc stack up` builds them and restarts Connect")


def purge(pipeline: Pipeline) -> None:
    """Delete the test pipeline's connector, slot and publication, and its topics: thousands of topics left by a run
    of the suite slow the broker's metadata requests and fill its heap."""
    capture.delete(pipeline, purge=True)
    admin = topics.admin_client(pipeline.kafka.bootstrap_servers)
    prefix = pipeline.name + "."
    mine = [t for t in topics.existing_topics(admin)
            if t.startswith(prefix) or t == f"__debezium-heartbeat.{pipeline.name}"]
    if mine:
        admin.delete_topics(mine, operation_timeout=30)  # not waited for: nothing reads them again


def pipeline_topics_now(stack: StackLayout, pipeline: Pipeline) -> list[str]:
    """The pipeline's topics that exist at the broker now, sorted."""
    admin = topics.admin_client(stack.kafka_bootstrap)
    return sorted(t for t in topics.existing_topics(admin) if t.startswith(f"{pipeline.name}."))


def assert_nothing_created(stack: StackLayout, connect: Any, pipeline: Pipeline, database: str) -> None:
    """A refused `cdc connectors apply` left nothing behind: no connector, slot, publication or topic."""
    assert connect.status(pipeline.connector_name) is None
    with psycopg.connect(stack.postgres_url(database)) as conn:
        assert conn.execute("select slot_name from pg_replication_slots where slot_name = %s",
                            (pipeline.slot_name,)).fetchall() == []
        assert conn.execute("select pubname from pg_publication where pubname = %s",
                            (pipeline.publication_name,)).fetchall() == []
    assert pipeline_topics_now(stack, pipeline) == []


def expire_history(stack: StackLayout, path: Path, table: str) -> None:
    """Delete every record of the topic holding `table`, as if retention had expired the whole history."""
    from confluent_kafka.admin import AdminClient

    topic = config.load(path, env={}).topic_of(table)
    probe = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": "replay-test"})
    cut = [TopicPartition(topic, p, probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
           for p in range(6)]
    probe.close()
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    for future in admin.delete_records([tp for tp in cut if tp.offset > 0]).values():
        future.result()


def destination_rows(url: str, table: str, columns: list[str], order: str = "") -> list[tuple]:
    """A table's rows at a destination (PostgreSQL, MariaDB or a DuckDB file), read with plain SQL; sorted."""
    if url.startswith("duckdb:///"):
        import duckdb

        with duckdb.connect(url.removeprefix("duckdb:///"), read_only=True) as conn:
            cols = ", ".join(f'"{c}"' for c in columns)
            return sorted(conn.execute(f'select {cols} from "public.{table}"').fetchall(), key=repr)
    if url.startswith("mysql"):
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                cols = ", ".join(f"`{c}`" for c in columns)
                return sorted((tuple(r) for r in conn.execute(text(f"select {cols} from `{table}`"))), key=repr)
        finally:
            engine.dispose()
    with psycopg.connect(url) as conn:
        cols = ", ".join(f'"{c}"' for c in columns)
        return sorted(conn.execute(f'select {cols} from public."{table}"').fetchall(), key=repr)


def topic_messages(stack: StackLayout, topics: list[str]) -> list:
    """Every message of the topics, from their beginning to their end now."""
    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"copy-{uuid.uuid4()}"})
    metadata = consumer.list_topics(timeout=10)
    starts, ends = {}, {}
    for topic in topics:
        for partition in metadata.topics[topic].partitions:
            starts[topic, partition], ends[topic, partition] = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10)
    consumer.close()
    return messages_between(stack, starts, ends)


def messages_between(stack: StackLayout, starts: dict[tuple[str, int], int], ends: dict[tuple[str, int], int],
                     timeout: float = 60) -> list:
    """The messages of each partition of `ends` from its offset in `starts` (0 where absent) up to its end there."""
    wanted = {tp: (starts.get(tp, 0), end) for tp, end in ends.items() if end > starts.get(tp, 0)}
    if not wanted:
        return []
    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"copy-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(t, p, low) for (t, p), (low, _) in wanted.items()])
    out, done = [], set()
    deadline = time.monotonic() + timeout
    while len(done) < len(wanted) and time.monotonic() < deadline:
        for m in consumer.consume(500, 1.0):
            if m.error() is not None:
                continue
            tp = (m.topic(), m.partition())
            if m.offset() < wanted[tp][1]:
                out.append(m)
            if m.offset() >= wanted[tp][1] - 1:
                done.add(tp)
    consumer.close()
    assert len(done) == len(wanted), f"could not read the messages back within {timeout:.0f} s"
    return out


def end_offsets(stack: StackLayout, topics: list[str]) -> dict[tuple[str, int], int]:
    """The end offset of every partition of the topics now."""
    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"ends-{uuid.uuid4()}"})
    metadata = consumer.list_topics(timeout=10)
    ends = {(t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t in topics for p in metadata.topics[t].partitions}
    consumer.close()
    return ends


def redeliver(stack: StackLayout, messages: list) -> int:
    """Write exact copies of messages (same topic and partition, key, value bytes and headers), as Debezium's
    at-least-once delivery does after a crash; returns how many."""
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "enable.idempotence": True})
    for m in messages:
        producer.produce(m.topic(), key=m.key(), value=m.value(), partition=m.partition(), headers=m.headers())
    assert producer.flush(30) == 0
    return len(messages)
