"""`cdc demo`: the stack, the built-in district sample, a Debezium connector and change events read back from Kafka."""

from __future__ import annotations

import getpass
import os
import time
from pathlib import Path
from typing import Callable

import psycopg
from psycopg import sql

from cdc import config
from cdc.config import Pipeline
from consumers.events import ChangeEvent
from consumers.stream import ChangeStream
from infra import stack
from producers import capture, topics
from producers.source_admin import drop_slot, slots_of_database
from schemas.codec import AvroDecoder, RegistryClient

SAMPLE_DIR = Path(stack.__file__).resolve().parent / "sample"
SAMPLE_SQL = SAMPLE_DIR / "district.sql"
SAMPLE_PIPELINE = SAMPLE_DIR / "pipeline.yaml"
SAMPLE_ROWS = 103  # rows of the sample database: 3 schools, 20 persons, 20 enrollments, 60 attendance

# A few source transactions that touch every table and every kind of change.
WORKLOAD = [
    # a new person with an enrollment and attendance, in one transaction
    """insert into person (id, first_name, last_name, email, balance) values (101, 'Ada', 'Lovelace', 'ada@example.org', 50);
       insert into enrollment (id, person_id, school_id, grade, start_date) values (101, 101, 2, 9, '2026-09-01');
       insert into attendance (id, person_id, enrollment_id, day, status) values (1001, 101, 101, '2026-09-02', 'present');""",
    # a transfer of balance between two persons: the total stays constant at every commit
    """update person set balance = balance - 25, updated_at = now() where id = 1;
       update person set balance = balance + 25, updated_at = now() where id = 2;""",
    # a person leaves: children first, then the root
    """delete from attendance where person_id = 3; delete from enrollment where person_id = 3;
       delete from person where id = 3;""",
    "update school set name = 'Jefferson Elementary School' where id = 1;",
]


def sample_pipeline(layout: stack.StackLayout, database: str) -> Pipeline:
    """The sample pipeline file, pointed at this stack's endpoints."""
    urls = layout.urls()
    env = {
        **os.environ,
        "CDC_KAFKA_BOOTSTRAP": layout.kafka_bootstrap,
        "CDC_SCHEMA_REGISTRY_URL": urls["schema_registry"],
        "CDC_CONNECT_URL": urls["connect"],
        "CDC_POSTGRES_PORT": str(layout.ports["postgres"]),
        "CDC_DEMO_DATABASE": database,
    }
    return config.load(SAMPLE_PIPELINE, env=env)


def reset_source(layout: stack.StackLayout, pipeline: Pipeline) -> None:
    """Remove what an earlier run left: the connector, slot, publication, topics and the sample database."""
    capture.delete(pipeline, purge=True)
    with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
        # Slots of the sample database (this pipeline's, or one left by an older run) block dropping it.
        conn.execute("select pg_terminate_backend(active_pid) from pg_replication_slots "
                     "where database = %s and active_pid is not null", (pipeline.source.sqlalchemy_url.database,))
        for slot in slots_of_database(conn, pipeline.source.sqlalchemy_url.database):
            drop_slot(conn, slot, wait=10)
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(
            sql.Identifier(pipeline.source.sqlalchemy_url.database)))
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(pipeline.source.sqlalchemy_url.database)))
    admin = topics.admin_client(layout.kafka_bootstrap)
    stale = [t for t in topics.existing_topics(admin) if t.startswith(f"{pipeline.pipeline}.")]
    topics.delete_topics(admin, stale)
    deadline = time.monotonic() + 30
    while any(t in topics.existing_topics(admin) for t in stale) and time.monotonic() < deadline:
        time.sleep(0.5)  # topic deletion completes asynchronously in the broker


def describe(event: ChangeEvent) -> str:
    row = event.row or {}
    shown = ", ".join(f"{k}={v!r}" for k, v in list(row.items())[:4])
    return (f"{event.topic}[{event.partition}]@{event.offset:<4} {event.op} {event.table:18} "
            f"key={dict(event.key or {})} lsn={event.lsn} tx={event.tx_id} #{event.tx_order}  {shown}")


def run(events: int = 12, keep_running: bool = True, echo: Callable[[str], None] = print,
        database: str = "cdc_demo_district") -> int:
    started = time.monotonic()
    layout = stack.up(echo)
    pipeline = sample_pipeline(layout, database)
    echo(f"\n== sample source: database {database!r} ({', '.join(pipeline.source.tables)})")
    reset_source(layout, pipeline)
    with psycopg.connect(layout.postgres_url(database), autocommit=True) as conn:
        conn.execute(SAMPLE_SQL.read_text())
    echo(f"== cdc connectors apply ({SAMPLE_PIPELINE.name}: hierarchy person = person, enrollment, attendance)")
    capture.apply(pipeline, lambda line: echo("   " + line))

    registry = RegistryClient(pipeline.kafka.schema_registry_url)
    decoder = AvroDecoder(registry)
    stream = ChangeStream(layout.kafka_bootstrap, decoder, pipeline.data_topics, group=f"cdc-demo-{getpass.getuser()}")
    try:
        # Wait for the snapshot before the workload, so the two are easy to tell apart in the output.
        snapshot = stream.collect(lambda seen: sum(e.snapshot for e in seen) >= SAMPLE_ROWS, timeout=120)
        echo(f"== snapshot: {sum(e.snapshot for e in snapshot)} rows read from Kafka")
        echo(f"== workload: {len(WORKLOAD)} source transactions")
        with psycopg.connect(layout.postgres_url(database)) as conn:
            for statements in WORKLOAD:
                with conn.transaction():
                    conn.execute(statements)
        streamed = stream.collect(
            lambda seen: any(e.table == "public.school" and e.op == "u" for e in seen), timeout=120
        )
    finally:
        stream.close()
        registry.close()
    changes = [e for e in snapshot + streamed if not e.snapshot]
    echo(f"== {len(changes)} change events read from Kafka (Avro, writer schemas from the registry "
         f"by id: {decoder.cached_ids}):")
    for event in changes[: max(events, 0)] if events else changes:
        echo("  " + describe(event))
    if len(changes) > events > 0:
        echo(f"  ... and {len(changes) - events} more")
    if not keep_running:
        stack.down(echo)
    echo(f"== demo finished in {time.monotonic() - started:.1f} s")
    return 0 if changes else 1
