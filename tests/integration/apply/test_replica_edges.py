"""Replica edge cases on the real stack: hostile identifiers, a new source column, poison messages."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from producers import capture
from schemas.codec import AvroDecoder, RegistryClient
from tests.integration.pipelines import CDC, applied_pipeline, pipeline_data, purge, write_pipeline

HOSTILE = '''
create schema "Odd Schema";
create table "Odd Schema"."Weird Table" ("select" bigint primary key, "Mixed Case" text, "spa ce" integer,
                                          "quo""te" text, "ünïcødé" text, "order" date);
create table public."Parent-Table" ("ID" bigint primary key, "Name" text not null);
create table public."child Table" (id bigint primary key,
                                      "Parent ID" bigint not null references public."Parent-Table" ("ID"),
                                      "user" text);
insert into "Odd Schema"."Weird Table" values (1, 'a', 1, 'it''s', 'ça', '2020-01-01'),
                                              (2, null, null, null, null, null);
insert into public."Parent-Table" values (1, 'first'), (2, 'second');
insert into public."child Table" values (10, 1, 'x'), (11, 2, 'y');
'''
HOSTILE_TABLES = ['Odd Schema.Weird Table', 'public.Parent-Table', 'public.child Table']


def table_rows(url: str, qualified: str) -> list[tuple]:
    schema, table = qualified.split(".", 1)
    with psycopg.connect(url) as conn:
        cols = [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
            "and column_name <> '_cdc_lsn' order by ordinal_position", (schema, table))]
        query = psycopg.sql.SQL("select {} from {} order by 1").format(
            psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, cols)), psycopg.sql.Identifier(schema, table))
        return conn.execute(query).fetchall()


@pytest.fixture
def destination(stack):
    name = f"dst_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    yield stack.postgres_url(name)
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


def run(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CDC, "-c", str(path), "run", *args], capture_output=True, text=True, timeout=300)


def test_hostile_identifiers_replicate(stack, source_db, destination, tmp_path):
    source = stack.postgres_url(source_db)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(HOSTILE)
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, HOSTILE_TABLES,
                                      hierarchies={"parent": {"root": "public.Parent-Table",
                                                              "members": {'public.child Table': "Parent ID"}}},
                                      destinations={"copy": {"kind": "replica", "url": destination}})
    try:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute('update "Odd Schema"."Weird Table" set "Mixed Case" = \'b\', "ünïcødé" = \'日本\' '
                         'where "select" = 1')
            conn.execute('insert into public."child Table" values (12, 1, \'z\')')
            conn.execute('delete from public."child Table" where id = 11')
        result = run(path, "--until-caught-up", "--timeout", "240")
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        purge(pipeline)
    for table in HOSTILE_TABLES:
        assert table_rows(source, table) == table_rows(destination, table), table


def test_a_column_added_at_the_source_is_added_at_the_destination(stack, source_db, destination, tmp_path):
    source = stack.postgres_url(source_db)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("create table item (id bigint primary key, name text); insert into item values (1, 'a')")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.item"],
                                      destinations={"copy": {"kind": "replica", "url": destination}})
    try:
        assert run(path, "--until-caught-up", "--timeout", "240").returncode == 0
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("alter table item add column price numeric(10, 2)")
            conn.execute("insert into item values (2, 'b', 9.99)")
            conn.execute("update item set price = 1.50 where id = 1")
        result = run(path, "--until-caught-up", "--timeout", "240")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "added column public.item.price" in result.stdout
    finally:
        purge(pipeline)
    assert table_rows(source, "public.item") == table_rows(destination, "public.item")


@pytest.mark.parametrize("policy", ["stop", "dead-letter"])
def test_a_poison_message_stops_or_goes_to_the_dead_letter_topic(stack, source_db, destination, tmp_path, policy):
    source = stack.postgres_url(source_db)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("create table item (id bigint primary key, name text); insert into item values (1, 'a')")
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, pipeline_data(
        stack, source_db, ["public.item"],
        destinations={"copy": {"kind": "replica", "url": destination, "on_error": policy}}))
    capture.apply(pipeline)
    topic = pipeline.topic_of("public.item")
    try:
        assert run(path, "--until-caught-up", "--timeout", "240").returncode == 0
        producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "partitioner": "murmur2_random"})
        producer.produce(topic, key=b"\x00\x00\x00\x00\x01garbage", value=b"not avro at all", partition=0)
        producer.flush(10)
        offset = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": "x"}).get_watermark_offsets(
            TopicPartition(topic, 0), timeout=10)[1] - 1
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("insert into item values (2, 'after the poison')")
        result = run(path, "--until-caught-up", "--timeout", "120")
        # Read before purge(), which deletes the pipeline's topics (the dead-letter topic among them).
        messages = []
        if policy == "dead-letter":
            dead = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"dlq-{uuid.uuid4()}",
                             "auto.offset.reset": "earliest"})
            dead.subscribe([f"{pipeline.name}.copy.dead-letter"])
            messages = [m for _ in range(20) for m in dead.consume(10, 0.5) if m.error() is None]
            dead.close()
    finally:
        purge(pipeline)
    with psycopg.connect(destination) as conn:
        names = [r[0] for r in conn.execute("select name from item order by id")]
    if policy == "stop":
        assert result.returncode == 1
        assert f"{topic}[0]@{offset}" in result.stderr and "cannot decode" in result.stderr
        assert names == ["a"]  # nothing past the poison message was applied
        return
    assert result.returncode == 0, result.stdout + result.stderr
    assert names == ["a", "after the poison"]
    assert len(messages) == 1
    record = AvroDecoder(RegistryClient(stack.urls()["schema_registry"])).decode(messages[0].value())
    assert (record["topic"], record["partition"], record["offset"]) == (topic, 0, offset)
    assert record["value"] == b"not avro at all" and "cannot decode" in record["error"]


def test_cdc_run_serves_its_own_prometheus_metrics(stack, source_db, destination, tmp_path):
    import socket
    import time

    import httpx

    source = stack.postgres_url(source_db)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("create table item (id bigint primary key, name text); "
                     "insert into item select g, 'i' || g from generate_series(1, 25) g")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.item"],
                                      destinations={"copy": {"kind": "replica", "url": destination}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([CDC, "-c", str(path), "run", "--metrics-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        labels = f'{{destination="copy",pipeline="{pipeline.name}"}}'
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                text = ""
            if f"cdc_applier_rows_total{labels} 25.0" in text:
                break
            time.sleep(0.5)
        assert f"cdc_applier_rows_total{labels} 25.0" in text, text[-2000:]
        assert f"cdc_applier_lag_seconds{labels} 0.0" in text
    finally:
        proc.terminate()
        proc.wait(30)
        purge(pipeline)
