"""`cdc replay` and `cdc backups`: rebuild a replica destination from the topics, after backing it up.

A replay, in order:
1. Refuse when the topics no longer hold the start of the history (retention deleted it): a rebuild from them
   would silently lack rows. The remedy is a fresh Debezium snapshot of the tables.
2. Back up what will be replaced (PostgreSQL: a copy of each table, and of the pipeline's stored offsets, into a
   timestamped schema `_cdc_backup_<time>`), recorded in `_cdc_backups` and kept for the retention period.
3. In one destination transaction: empty the tables in scope (children first) and, for a full replay, forget
   the pipeline's stored offsets.
4. Apply from the beginning of the topics until caught up. With `--tables`, only the chosen tables take the
   events that the destination had already applied (before the stored offsets); beyond them, every table does,
   as in normal running. Re-applying the other tables' old events could bring back rows deleted since.
Stop `cdc run` for the destination while it replays: two appliers would write the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import create_engine, inspect, text

from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError
from consumers.applier import ReplicaApplier
from consumers.dialects import dialect_for
from consumers.plan import dependency_order
from consumers.shapes import OFFSETS_TABLE, reflect_shapes

BACKUPS_TABLE = "_cdc_backups"
DEFAULT_RETENTION = timedelta(days=30)


@dataclass
class Backup:
    id: int
    created_at: datetime
    schema: str
    pipeline: str
    tables: list[str]


def _engine(pipeline: Pipeline, destination: str) -> Any:
    if destination not in pipeline.destinations or pipeline.destinations[destination].kind != "replica":
        raise ConfigError(f"destinations: no replica destination named {destination!r}")
    engine = create_engine(pipeline.destinations[destination].driver_url)
    if engine.url.get_backend_name() != "postgresql":
        raise ConfigError(f"destinations.{destination}: backups and replays are implemented for PostgreSQL "
                          "destinations only so far")
    return engine


def check_history(pipeline: Pipeline) -> None:
    """Raise when a topic partition no longer starts at offset 0: its oldest changes are gone."""
    consumer = Consumer({"bootstrap.servers": pipeline.kafka.bootstrap_servers, "group.id": "cdc-replay-check",
                         "log_level": 3})
    try:
        metadata = consumer.list_topics(timeout=15)
        for topic in [*pipeline.data_topics, pipeline.transaction_topic]:
            info = metadata.topics.get(topic)
            if info is None:
                continue
            for partition in info.partitions:
                low, _ = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                if low > 0:
                    raise CdcError(
                        f"replay: {topic}[{partition}] starts at offset {low}: retention deleted the start of the "
                        "history, so a rebuild from the topics would lack rows. Take a fresh snapshot instead: "
                        "`cdc resync` the tables' keys, or re-create the connector with `cdc connectors delete "
                        "--purge` and `cdc connectors apply` (a snapshot emits no deletes: empty the tables first)")
    finally:
        consumer.close()


def _ensure_backups_table(conn: Any) -> None:
    conn.execute(text(f'create table if not exists "{BACKUPS_TABLE}" (id bigserial primary key, created_at timestamptz '
                      "not null default now(), schema_name text not null, pipeline text not null, tables jsonb not "
                      "null)"))


def backup(pipeline: Pipeline, destination: str, tables: list[str]) -> Backup:
    """Copy the tables (and the pipeline's stored offsets) into a new timestamped schema."""
    import json

    engine = _engine(pipeline, destination)
    dialect = dialect_for(engine)
    shapes = reflect_shapes(pipeline.source.sqlalchemy_url, tables)
    now = datetime.now(timezone.utc)
    schema = f"_cdc_backup_{now:%Y%m%d_%H%M%S_%f}"
    try:
        with engine.begin() as conn:
            prep = conn.dialect.identifier_preparer
            _ensure_backups_table(conn)
            conn.execute(text(f"create schema {prep.quote(schema)}"))
            insp = inspect(conn)
            for name in tables:
                table = dialect.table(shapes[name])
                if insp.has_table(table.name, schema=table.schema):
                    conn.execute(text(f"create table {prep.quote(schema)}.{prep.quote(name)} as table "
                                      f"{prep.format_table(table)}"))
            conn.execute(text(f"create table {prep.quote(schema)}.{prep.quote(OFFSETS_TABLE)} as "
                              f"select * from {prep.quote(OFFSETS_TABLE)} where pipeline = :p"), {"p": pipeline.pipeline})
            row = conn.execute(text(f'insert into "{BACKUPS_TABLE}" (schema_name, pipeline, tables) '
                                    "values (:s, :p, cast(:t as jsonb)) returning id, created_at"),
                               {"s": schema, "p": pipeline.pipeline, "t": json.dumps(tables)}).one()
    finally:
        engine.dispose()
    return Backup(row[0], row[1], schema, pipeline.pipeline, tables)


def list_backups(pipeline: Pipeline, destination: str) -> list[Backup]:
    engine = _engine(pipeline, destination)
    try:
        with engine.begin() as conn:
            _ensure_backups_table(conn)
            rows = conn.execute(text(f'select id, created_at, schema_name, pipeline, tables from "{BACKUPS_TABLE}" '
                                     "where pipeline = :p order by id desc"), {"p": pipeline.pipeline}).all()
    finally:
        engine.dispose()
    return [Backup(r[0], r[1], r[2], r[3], list(r[4])) for r in rows]


def restore(pipeline: Pipeline, destination: str, backup_id: int) -> Backup:
    """Put back exactly the backed-up content of each table, and the offsets stored at that time."""
    found = [b for b in list_backups(pipeline, destination) if b.id == backup_id]
    if not found:
        raise CdcError(f"backups: no backup {backup_id} for pipeline {pipeline.pipeline!r}")
    chosen = found[0]
    engine = _engine(pipeline, destination)
    dialect = dialect_for(engine)
    shapes = reflect_shapes(pipeline.source.sqlalchemy_url, chosen.tables)
    try:
        with engine.begin() as conn:
            prep = conn.dialect.identifier_preparer
            dialect.begin_batch(conn, snapshot=True)
            order = dependency_order(shapes)
            for name in reversed(order):
                conn.execute(text(f"delete from {prep.format_table(dialect.table(shapes[name]))}"))
            for name in order:
                conn.execute(text(f"insert into {prep.format_table(dialect.table(shapes[name]))} "
                                  f"select * from {prep.quote(chosen.schema)}.{prep.quote(name)}"))
            conn.execute(text(f"delete from {prep.quote(OFFSETS_TABLE)} where pipeline = :p"), {"p": pipeline.pipeline})
            conn.execute(text(f"insert into {prep.quote(OFFSETS_TABLE)} select * from "
                              f"{prep.quote(chosen.schema)}.{prep.quote(OFFSETS_TABLE)}"))
    finally:
        engine.dispose()
    return chosen


def prune(pipeline: Pipeline, destination: str, older_than: timedelta = DEFAULT_RETENTION) -> list[Backup]:
    cutoff = datetime.now(timezone.utc) - older_than
    old = [b for b in list_backups(pipeline, destination) if b.created_at < cutoff]
    engine = _engine(pipeline, destination)
    try:
        with engine.begin() as conn:
            for b in old:
                conn.execute(text(f'drop schema if exists "{b.schema}" cascade'))
                conn.execute(text(f'delete from "{BACKUPS_TABLE}" where id = :i'), {"i": b.id})
    finally:
        engine.dispose()
    return old


def replay(pipeline: Pipeline, destination: str, *, tables: list[str] | None = None, make_backup: bool = True,
           timeout: float | None = None, echo: Callable[[str], None] = lambda line: None,
           progress: Callable[[ReplicaApplier], None] | None = None) -> tuple[Backup | None, ReplicaApplier]:
    chosen = tables or list(pipeline.source.tables)
    unknown = [t for t in chosen if t not in pipeline.source.tables]
    if unknown:
        raise ConfigError(f"--tables: {', '.join(unknown)} not in source.tables")
    engine = _engine(pipeline, destination)
    engine.dispose()
    shapes = reflect_shapes(pipeline.source.sqlalchemy_url, pipeline.source.tables)
    # Emptying a table that other tables reference would break their foreign keys: they join the scope.
    dependents = sorted({name for name, shape in shapes.items() if name not in chosen
                         for fk in shape.foreign_keys if fk.referred_table in chosen})
    if dependents:
        raise ConfigError(f"--tables: {', '.join(dependents)} reference the tables to replay; "
                          "replay them too (add them to --tables)")
    check_history(pipeline)
    saved = backup(pipeline, destination, chosen) if make_backup else None
    if saved:
        echo(f"backup {saved.id}: {len(chosen)} tables copied into schema {saved.schema}")
    applier = ReplicaApplier(pipeline, destination, echo=echo)
    applier.shapes = shapes
    with applier.engine.begin() as conn:
        applier.dialect.ensure_offsets_table(conn)
        stored = applier.dialect.load_offsets(conn, pipeline.pipeline)
        applier.dialect.begin_batch(conn, snapshot=True)
        prep = conn.dialect.identifier_preparer
        insp = inspect(conn)
        for name in reversed(dependency_order({n: applier.shapes[n] for n in chosen})):
            table = applier.dialect.table(applier.shapes[name])
            if insp.has_table(table.name, schema=table.schema):
                conn.execute(text(f"delete from {prep.format_table(table)}"))
        applier.dialect.reset_offsets(conn, pipeline.pipeline)
    echo(f"replay: emptied {', '.join(chosen)}; reading the topics from the beginning")
    if tables:
        applier.replay_scope = (frozenset(chosen), stored)
    applier.run(until_caught_up=True, timeout=timeout, progress=progress)
    return saved, applier
