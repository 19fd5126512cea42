"""`cdc demo`: the stack, the built-in district sample, a Debezium connector and change events read back from Kafka."""

from __future__ import annotations

import getpass
import time
from pathlib import Path
from typing import Callable

import psycopg
from confluent_kafka.admin import AdminClient

from consumers.events import ChangeEvent
from consumers.stream import ChangeStream
from infra import stack
from producers.connect import ConnectClient
from producers.source_admin import drop_slot
from producers.debezium import CaptureSpec, connector_name, slot_name, source_connector_config
from schemas.codec import AvroDecoder, RegistryClient

SAMPLE_SQL = Path(stack.__file__).resolve().parent / "sample" / "district.sql"
SAMPLE_TABLES = ("public.school", "public.person", "public.enrollment", "public.attendance")

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


def reset_source(admin_url: str, database: str, pipeline: str, connect: ConnectClient, bootstrap: str) -> None:
    """Remove what an earlier run left: its connector, slot, topics and database."""
    connect.delete(connector_name(pipeline))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        drop_slot(conn, slot_name(pipeline))
        conn.execute(f'drop database if exists "{database}" with (force)')
        conn.execute(f'create database "{database}"')
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    stale = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{pipeline}.")]
    if stale:
        for future in admin.delete_topics(stale, operation_timeout=30).values():
            future.result()
        time.sleep(1)  # topic deletion completes asynchronously in the broker


def describe(event: ChangeEvent) -> str:
    row = event.row or {}
    shown = ", ".join(f"{k}={v!r}" for k, v in list(row.items())[:4])
    return (f"{event.topic}[{event.partition}]@{event.offset:<4} {event.op} {event.table:18} "
            f"key={dict(event.key or {})} lsn={event.lsn} tx={event.tx_id} #{event.tx_order}  {shown}")


def run(events: int = 12, keep_running: bool = True, echo: Callable[[str], None] = print,
        pipeline: str = "demo", database: str = "cdc_demo_district") -> int:
    started = time.monotonic()
    layout = stack.up(echo)
    urls = layout.urls()
    echo(f"\n== sample source: database {database!r} ({', '.join(SAMPLE_TABLES)})")
    with ConnectClient(urls["connect"]) as connect:
        reset_source(layout.postgres_url(), database, pipeline, connect, layout.kafka_bootstrap)
        with psycopg.connect(layout.postgres_url(database), autocommit=True) as conn:
            conn.execute(SAMPLE_SQL.read_text())
        spec = CaptureSpec(pipeline=pipeline, source_url=layout.postgres_url(database),
                           tables=SAMPLE_TABLES, registry_url=urls["schema_registry"], heartbeat_ms=5000)
        echo(f"== registering Debezium connector {connector_name(pipeline)!r} over {urls['connect']}")
        connect.put_config(connector_name(pipeline), source_connector_config(spec))
        connect.wait_running(connector_name(pipeline), timeout=120)

        registry = RegistryClient(urls["schema_registry"])
        decoder = AvroDecoder(registry)
        topics = [f"{pipeline}.{t}" for t in SAMPLE_TABLES]
        stream = ChangeStream(layout.kafka_bootstrap, decoder, topics, group=f"cdc-demo-{getpass.getuser()}")
        try:
            # Wait for the snapshot before the workload, so the two are easy to tell apart in the output.
            snapshot = stream.collect(lambda seen: sum(e.snapshot for e in seen) >= 103, timeout=120)
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
