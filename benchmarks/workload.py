"""The bench_item workload that apply_bench, replay_bench and memory_bench measure: its source table, N changes
loaded in transactions, waiting until Kafka holds them all, the checksum a destination must match, and a pipeline
(source database, pipeline file, connector) that removes everything it created."""

from __future__ import annotations

import math
import os
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import yaml
from confluent_kafka import Consumer, TopicPartition

from benchmarks.common import Session, delete_groups, log

TABLE = "public.bench_item"
SOURCE_SCHEMA = """
create table bench_item (id bigint primary key, name text not null, qty integer not null,
                         price numeric(12, 2) not null, updated_at timestamptz not null default now())
"""
CHECKSUM = "select count(*), coalesce(sum(qty), 0), coalesce(sum(price), 0) from bench_item"
TRANSACTION_ROWS = 1_000  # rows per source transaction in the throughput load
UPDATE_SHARE = 0.2  # of the N changes, this share are updates of rows inserted before
DUCKDB_TABLE = '"public.bench_item"'  # the analytics replica names a table as the source does, schema included
DUCKDB_HISTORY = '"public.bench_item__history"'
SETTLE_S = 5.0

Checksum = tuple[int, int, Decimal]


def checksum(url: str) -> Checksum:
    with psycopg.connect(url, autocommit=True) as conn:
        count, qty, price = conn.execute(CHECKSUM).fetchone()
    return int(count), int(qty), Decimal(price)


def duckdb_checksum(path: Path) -> tuple[Checksum, int]:
    """The analytics replica's current state as the source's CHECKSUM sees it, and its history's row count."""
    import duckdb

    query = CHECKSUM.replace("from bench_item", f"from {DUCKDB_TABLE}")
    with duckdb.connect(str(path), read_only=True) as conn:
        count, qty, price = conn.execute(query).fetchone()
        history = conn.execute(f"select count(*) from {DUCKDB_HISTORY}").fetchone()[0]
    return (int(count), int(qty), Decimal(price)), int(history)


def inserted_rows(rows: int) -> int:
    return max(1, math.ceil(rows * (1 - UPDATE_SHARE)))


def load_source(url: str, rows: int) -> tuple[int, int]:
    """N changes in transactions of TRANSACTION_ROWS rows: inserts first, then updates of the first rows."""
    inserts = inserted_rows(rows)
    updates = rows - inserts
    with psycopg.connect(url, autocommit=True) as conn:  # each statement is one source transaction
        for start in range(1, inserts + 1, TRANSACTION_ROWS):
            conn.execute("insert into bench_item (id, name, qty, price) select g, 'item ' || g, g %% 100, "
                         "(g %% 10000) / 100.0 from generate_series(%s::bigint, %s::bigint) g",
                         (start, min(start + TRANSACTION_ROWS - 1, inserts)))
        for start in range(1, updates + 1, TRANSACTION_ROWS):
            conn.execute("update bench_item set qty = qty + 1, price = price + 1, updated_at = now() "
                         "where id between %s and %s", (start, min(start + TRANSACTION_ROWS - 1, updates)))
    return inserts, updates


def topic_messages(consumer: Consumer, topic: str) -> int:
    metadata = consumer.list_topics(topic, timeout=10)
    total = 0
    for partition in metadata.topics[topic].partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)
        total += high - low
    return total


def wait_for_topic(bootstrap: str, topic: str, expected: int, timeout: float) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-watermarks-{uuid.uuid4().hex[:8]}",
                         "log_level": 3})
    try:
        deadline = time.monotonic() + timeout
        last_report = 0.0
        while True:
            have = topic_messages(consumer, topic)
            if have >= expected:
                if have > expected:
                    log(f"warning: {topic} holds {have} messages, {expected} expected")
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic} holds {have} of {expected} messages after {timeout:.0f} s")
            if time.monotonic() - last_report > 10:
                log(f"capture: {have:,} of {expected:,} changes in {topic}")
                last_report = time.monotonic()
            time.sleep(0.5)
    finally:
        consumer.close()


def capture_timeout(rows: int) -> float:
    """How long Debezium may take to put N changes into Kafka."""
    return max(600.0, rows / 100)


def timeout_for(rows: int) -> float:
    """How long one `cdc run` or `cdc replay` of N changes may take."""
    return max(600.0, rows / 200)


def said(output: str, *words: str) -> list[str]:
    """The lines of a command's output that hold one of `words` (what it says it did)."""
    return [line.strip() for line in output.splitlines() if any(w in line for w in words)]


def settle(source_url: str) -> None:
    """Let the load's own aftermath pass before anything is timed: the source's vacuum and checkpoint of a million
    changed rows (done now, instead of by autovacuum during a measurement), the kernel's write-back of the
    hundreds of MB just written to Kafka's and PostgreSQL's files, then a short pause. On this 2-CPU machine the
    first DuckDB ingestion measured 122,000 rows/s straight after the load and 155,000 after 20 s of rest."""
    started = time.monotonic()
    with psycopg.connect(source_url, autocommit=True) as conn:
        conn.execute(f"VACUUM ANALYZE {TABLE}")
        conn.execute("CHECKPOINT")
    os.sync()
    time.sleep(SETTLE_S)
    log(f"settle: vacuum, checkpoint, sync and a {SETTLE_S:.0f} s pause took {time.monotonic() - started:.1f} s; "
        f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def pipeline_data(layout: Any, name: str, source_url: str, destinations: dict[str, dict[str, str]]) -> dict[str, Any]:
    urls = layout.urls()
    return {
        "pipeline": name,
        "kafka": {"bootstrap_servers": layout.kafka_bootstrap, "schema_registry_url": urls["schema_registry"],
                  "connect_url": urls["connect"]},
        "source": {"url": source_url, "tables": [TABLE]},
        "destinations": destinations,
    }


def replica(url: str) -> dict[str, str]:
    return {"kind": "replica", "url": url}


def analytics(path: Path) -> dict[str, str]:
    return {"kind": "analytics", "url": f"duckdb:///{path}"}


class BenchPipeline:
    """A fresh source database `bench_src_<name>` with bench_item, a pipeline file `bench<name>` with the given
    destinations (name: {kind, url}) in the session's work folder, and its connector and topics; cleanup() removes
    the connector, slot, publication, topics and consumer groups (the session drops the databases)."""

    def __init__(self, session: Session, name: str, destinations: dict[str, dict[str, str]]) -> None:
        from cdc import config
        from producers import capture

        self.layout, self.name = session.layout, name
        self.destinations = list(destinations)
        self.pipeline: Any = None
        self.source_url = session.dbs.create(f"bench_src_{name}")
        with psycopg.connect(self.source_url, autocommit=True) as conn:
            conn.execute(SOURCE_SCHEMA)
        self.data = pipeline_data(self.layout, f"bench{name}", self.source_url, destinations)
        self.config_path = session.work / f"{name}-pipeline.yaml"
        self.config_path.write_text(yaml.safe_dump(self.data, sort_keys=False))
        self.pipeline = config.load(self.config_path, env={})
        self.topic: str = self.pipeline.topic_of(TABLE)
        log(f"pipeline {self.pipeline.name}: creating topics and the Debezium connector")
        capture.apply(self.pipeline)

    def load(self, rows: int) -> float:
        """N changes (load_source) into the source, and until Kafka holds them all; the seconds that took."""
        started = time.monotonic()
        inserts, updates = load_source(self.source_url, rows)
        log(f"source: {inserts:,} inserts and {updates:,} updates committed in {time.monotonic() - started:.1f} s")
        wait_for_topic(self.layout.kafka_bootstrap, self.topic, rows, timeout=capture_timeout(rows))
        capture_s = time.monotonic() - started
        log(f"capture: all {rows:,} changes are in {self.topic} after {capture_s:.1f} s")
        return capture_s

    def cleanup(self, groups: tuple[str, ...] = ()) -> None:
        """Remove what the pipeline made in Connect, the source and Kafka; `groups`: more consumer groups the run
        used (each destination's and the signal's are removed anyway)."""
        from producers import capture
        from producers.topics import admin_client, delete_topics

        p = self.pipeline
        if p is None:
            return
        try:
            capture.delete(p, purge=True)
        except Exception as exc:  # noqa: BLE001 - clean up what can be cleaned up
            log(f"cleanup: deleting the source connector failed: {exc}")
        try:
            delete_topics(admin_client(self.layout.kafka_bootstrap),
                          [*p.data_topics, p.transaction_topic, p.signal_topic, p.notification_topic,
                           f"__debezium-heartbeat.{p.name}",
                           *(f"{p.name}.{d}.dead-letter" for d in self.destinations)])
        except Exception as exc:  # noqa: BLE001
            log(f"cleanup: deleting topics failed: {exc}")
        delete_groups(self.layout.kafka_bootstrap, [*(f"cdc-{p.name}-{d}" for d in self.destinations), *groups,
                                                    f"{p.name}-signal"])
