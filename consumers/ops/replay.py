"""`cdc replay`: rebuild a destination (a PostgreSQL replica or a DuckDB analytics file) from the topics.

A replay, in order:
1. Refuse when the topics no longer hold the start of the history (retention deleted it): a rebuild from them
   would silently lack rows. The remedy is a fresh Debezium snapshot of the tables.
2. Back up what will be replaced (consumers/ops/backups.py; PostgreSQL: a copy of each table, and of the pipeline's
   stored offsets, into a timestamped schema; DuckDB: a copy of the file), kept for the retention period.
3. In one destination transaction: empty the tables in scope (children first), and their change histories where the
   destination keeps them (they are rebuilt from the topics too), and forget the pipeline's stored offsets.
4. Apply from the beginning of the topics until caught up. With `--tables`, only the chosen tables take the
   events that the destination had already applied (before the stored offsets); beyond them, every table does,
   as in normal running. Re-applying the other tables' old events could bring back rows deleted since.
Two appliers on one destination would write the same rows: the replay claims the destination before step 2
(DestinationWriter.claim) and refuses while a `cdc run` of it is at work. What the replay asks of the applier it
then runs (the tables in scope, the offsets applied before, the time to skip before) is a ReplayScope given to it
when it is made, with the writer that holds the claim.

`--shadow` builds the new tables elsewhere while the live ones keep serving, then swaps them in atomically:
PostgreSQL in a new schema (`_replay_shadow`), DuckDB in a new file beside the live one (`_replay_shadow_file`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from pydantic import SecretStr
from sqlalchemy import inspect, text

from cdc import kafka as kafka_clients
from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError
from cdc.source_tables import TableShape, reflect_tables
from consumers.apply.applier import ReplicaApplier
from consumers.apply.dialects import Dialect, dialect_for
from consumers.apply.dialects.base import HISTORY_SUFFIX
from consumers.apply.dialects.bookkeeping import OFFSETS
from consumers.apply.plan import NO_SCOPE, ReplayScope, dependency_order
from consumers.apply.writer import DestinationWriter
from consumers.ops.backups import (
    Backup,
    FileBackups,
    SchemaBackups,
    check_not_written,
    copy_database,
    duckdb_path,
    fold_wal,
    remove_database,
    replayed_dialect,
    store_for,
)


def check_history(pipeline: Pipeline) -> None:
    """Raise when a topic partition no longer starts at offset 0: its oldest changes are gone."""
    consumer = kafka_clients.consumer(pipeline.kafka, {"group.id": "cdc-replay-check",
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
                        "history, so a rebuild from the topics would lack rows. Rebuild from a fresh Debezium "
                        "snapshot instead: `cdc replay DEST --from-snapshot` (it empties the tables first, since a "
                        "snapshot emits no deletes)")
    finally:
        consumer.close()


def _validate_scope(pipeline: Pipeline, tables: list[str] | None, shapes: dict[str, Any], *,
                    foreign_keys: bool) -> list[str]:
    chosen = tables or list(pipeline.source.tables)
    unknown = [t for t in chosen if t not in pipeline.source.tables]
    if unknown:
        raise ConfigError(f"--tables: {', '.join(unknown)} not in source.tables")
    # Emptying a table that other tables reference would break their foreign keys: they join the scope. A
    # destination without foreign keys (an analytics replica) has nothing to break, so any tables may be replayed.
    dependents = sorted({name for name, shape in shapes.items() if name not in chosen
                         for fk in shape.foreign_keys if fk.referred_table in chosen}) if foreign_keys else []
    if dependents:
        raise ConfigError(f"--tables: {', '.join(dependents)} reference the tables to replay; "
                          "replay them too (add them to --tables)")
    return chosen


def offsets_at(pipeline: Pipeline, when: datetime) -> dict[tuple[str, int], int]:
    """Per partition (data topics and the transaction topic), the first offset written at or after `when`; the
    log end where nothing was. Kafka stamps a record when Connect produces it, never before the source commit, so
    every change committed at or after `when` is at or after these offsets."""
    consumer = kafka_clients.consumer(pipeline.kafka, {"group.id": "cdc-replay-time",
                         "log_level": 3})
    try:
        metadata = consumer.list_topics(timeout=15)
        wanted = [TopicPartition(topic, partition, int(when.timestamp() * 1000))
                  for topic in [*pipeline.data_topics, pipeline.transaction_topic]
                  if topic in metadata.topics for partition in metadata.topics[topic].partitions]
        found = consumer.offsets_for_times(wanted, timeout=15)
        positions = {}
        for tp in found:
            offset = tp.offset
            if offset < 0:  # nothing at or after that time
                offset = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)[1]
            positions[tp.topic, tp.partition] = offset
        return positions
    finally:
        consumer.close()


def end_positions(pipeline: Pipeline) -> dict[tuple[str, int], int]:
    """The log-end offset of every data and transaction partition."""
    consumer = kafka_clients.consumer(pipeline.kafka, {"group.id": "cdc-replay-end",
                         "log_level": 3})
    try:
        metadata = consumer.list_topics(timeout=15)
        return {(topic, partition): consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
                for topic in [*pipeline.data_topics, pipeline.transaction_topic] if topic in metadata.topics
                for partition in metadata.topics[topic].partitions}
    finally:
        consumer.close()


def replay(pipeline: Pipeline, destination: str, *, tables: list[str] | None = None, make_backup: bool = True,
           start: datetime | None = None, shadow: bool = False, from_snapshot: bool = False,
           timeout: float | None = None, echo: Callable[[str], None] = lambda line: None,
           progress: Callable[[ReplicaApplier], None] | None = None) -> tuple[Backup | None, ReplicaApplier]:
    """Rebuild `destination` (see the module's docstring). `start`: re-apply the changes committed since then
    on top of the tables instead of emptying them. `shadow`: build beside the live tables, then swap.
    `from_snapshot`: the history is gone from the topics; empty the scope and take a fresh Debezium snapshot."""
    if sum([start is not None, shadow, from_snapshot]) > 1:
        raise ConfigError("replay: --from TIME, --shadow and --from-snapshot are different ways to replay; choose one")
    dialect = replayed_dialect(pipeline, destination)
    if dialect.holds_file:
        check_not_written(duckdb_path(pipeline, destination))
    shapes = reflect_tables(pipeline.source.sqlalchemy_url, pipeline.source.tables)
    chosen = _validate_scope(pipeline, tables, shapes, foreign_keys=dialect.mirrors_foreign_keys)
    if start is None and not from_snapshot:
        check_history(pipeline)
    if shadow and dialect.holds_file:
        return _replay_shadow_file(pipeline, destination, chosen, shapes, partial=bool(tables),
                                   make_backup=make_backup, timeout=timeout, echo=echo, progress=progress)
    # The destination is claimed before anything is saved or emptied (DuckDB's file lock does that for a file):
    # an applier at work beside the replay would change what is saved, and write into what is emptied.
    writer = None if dialect.holds_file else DestinationWriter(pipeline, destination, echo=echo)
    try:
        if writer is not None:
            writer.claim()
        if shadow:
            assert writer is not None
            return _replay_shadow(pipeline, destination, chosen, shapes, partial=bool(tables),
                                  make_backup=make_backup, timeout=timeout, echo=echo, progress=progress,
                                  writer=writer)
        saved = store_for(pipeline, destination).take(chosen) if make_backup else None
        if saved:
            echo(f"backup {saved.id}: {len(chosen)} tables saved in {saved.location}")
        elif make_backup:
            echo("backup: nothing to back up (the destination was never written)")
        applier = _rebuild(pipeline, destination, chosen, shapes, partial=bool(tables), start=start,
                           from_snapshot=from_snapshot, timeout=timeout, echo=echo, progress=progress,
                           writer=writer)
    except BaseException:
        if writer is not None:
            writer.close()  # the claim with it
        raise
    return saved, applier


def _rebuild(pipeline: Pipeline, destination: str, chosen: list[str], shapes: dict[str, TableShape], *,
             partial: bool, start: datetime | None, from_snapshot: bool, timeout: float | None,
             echo: Callable[[str], None], progress: Callable[[ReplicaApplier], None] | None,
             writer: DestinationWriter | None = None) -> ReplicaApplier:
    """Steps 3 and 4 of the module's docstring, on the destination as `pipeline` names it (through `writer` when
    the caller has one: it holds the claim)."""
    writer = writer or DestinationWriter(pipeline, destination, echo=echo)
    positions = offsets_at(pipeline, start) if start is not None else end_positions(pipeline) if from_snapshot else {}
    # `--from TIME` skips by commit time in whole milliseconds (source.ts_ms): the history cut is the same instant.
    skip_before_ms = int(start.timestamp() * 1000) if start is not None else None
    with writer.engine.begin() as conn:
        writer.dialect.ensure_offsets_table(conn)
        stored = writer.dialect.load_offsets(conn, pipeline.name)
        if start is not None:
            # A destination behind TIME has changes from before it still to apply: read from where it stopped.
            positions = {tp: min(offset, stored.get(tp, 0)) for tp, offset in positions.items()}
        writer.dialect.begin_batch(conn, snapshot=True)
        _empty(conn, writer.dialect, {n: shapes[n] for n in chosen}, since_ms=skip_before_ms)
        writer.dialect.reset_offsets(conn, pipeline.name)
        writer.dialect.store_offsets(conn, pipeline.name, positions)
    if start is not None:
        echo(f"replay: re-applying the changes committed since {start.isoformat()} on top of the tables")
    elif from_snapshot:
        echo(f"replay: emptied {', '.join(chosen)}; asking Debezium for a fresh snapshot of them")
        snapshot_and_wait(pipeline, chosen, timeout=timeout, echo=echo)
    else:
        echo(f"replay: emptied {', '.join(chosen)}; reading the topics from the beginning")
    scope = ReplayScope(tables=frozenset(chosen) if partial else None, applied_before=stored if partial else {},
                        skip_before_ms=skip_before_ms, skip_applied=stored if start is not None else {})
    applier = ReplicaApplier(pipeline, destination, echo=echo, scope=scope, writer=writer)
    try:
        applier.run(until_caught_up=True, timeout=timeout, progress=progress)
    except BaseException:
        applier.close()
        raise
    return applier


def _empty(conn: Any, dialect: Dialect, shapes: dict[str, TableShape], *, since_ms: int | None) -> None:
    """Empty the tables in scope, children first, and their change histories where the destination keeps them.
    With `since_ms` (`--from TIME`) the tables stay, and only the history rows committed since then go: the replay
    appends them again as it re-applies those changes, and would otherwise record each of them twice."""
    prep = conn.dialect.identifier_preparer
    insp = inspect(conn)
    # Half a millisecond of slack: history times come from milliseconds through a float.
    since = None if since_ms is None else \
        datetime.fromtimestamp(since_ms // 1000, tz=UTC) + timedelta(microseconds=since_ms % 1000 * 1000 - 500)
    for name in reversed(dependency_order(shapes)):
        table = dialect.table(shapes[name])
        if since is None and insp.has_table(table.name, schema=table.schema):
            conn.execute(text(f"delete from {prep.format_table(table)}"))
        history = table.name + HISTORY_SUFFIX
        if dialect.keeps_history and insp.has_table(history, schema=table.schema):
            qualified = f"{prep.quote_schema(table.schema)}.{prep.quote(history)}" if table.schema else \
                prep.quote(history)
            if since is None:
                conn.execute(text(f"delete from {qualified}"))
            else:
                conn.execute(text(f"delete from {qualified} where _cdc_commit_ts >= :since"), {"since": since})


def snapshot_and_wait(pipeline: Pipeline, tables: list[str], *, timeout: float | None,
                      echo: Callable[[str], None]) -> None:
    """Ask Debezium for a blocking snapshot of `tables` and wait for its notification that the snapshot completed.

    Blocking, not incremental: an incremental snapshot de-duplicates a chunk's rows by record key, and a hierarchy
    member's key (its root's id) is shared by many rows, so rows would be lost. A blocking snapshot's notifications
    do not carry the signal's id; the ones read here come after the signal (the topic is read from its end as it
    was before sending it). Applying starts afterwards, so the watermark that ends the replay follows every
    snapshot row in Kafka."""
    import psycopg

    from producers.source_admin import psycopg_conninfo, send_incremental_snapshot
    from schemas.codec import AvroDecoder, RegistryClient

    consumer = kafka_clients.consumer(pipeline.kafka, {"group.id": "cdc-replay-snapshot",
                         "enable.auto.commit": False, "log_level": 3})
    registry = RegistryClient(pipeline.kafka.schema_registry_url)
    decoder = AvroDecoder(registry)
    try:
        metadata = consumer.list_topics(timeout=15)
        info = metadata.topics.get(pipeline.notification_topic)
        if info is None or info.error is not None:
            raise CdcError(f"replay: topic {pipeline.notification_topic} does not exist; run `cdc connectors apply` "
                           "(it enables Debezium's notifications, which say when a snapshot is complete)")
        ends = [TopicPartition(pipeline.notification_topic, p,
                               consumer.get_watermark_offsets(TopicPartition(pipeline.notification_topic, p),
                                                              timeout=10)[1]) for p in info.partitions]
        consumer.assign(ends)
        with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
            send_incremental_snapshot(conn, pipeline.source.signal_table, tables, kind="blocking")
        limit = timeout or 3600
        deadline = time.monotonic() + limit
        started = False
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, 1.0):
                if msg.error() is not None or msg.value() is None:
                    continue
                note = decoder.decode(msg.value())
                if note.get("aggregate_type") != "Initial Snapshot":
                    continue
                kind = note.get("type")
                extra = note.get("additional_data") or {}
                started = started or kind == "STARTED"
                if not started:
                    continue  # the end of an earlier snapshot
                if kind == "TABLE_SCAN_COMPLETED":
                    echo(f"replay: snapshot of {extra.get('scanned_collection')}: "
                         f"{extra.get('total_rows_scanned')} rows ({str(extra.get('status', '')).lower()})")
                elif kind == "COMPLETED":
                    echo("replay: snapshot complete")
                    return
                elif kind in ("ABORTED", "SKIPPED"):
                    raise CdcError(f"replay: Debezium reports the snapshot {kind.lower()} ({extra})")
        raise CdcError(f"replay: the snapshot did not complete within {limit:.0f} s")
    finally:
        consumer.close()
        registry.close()


def _replay_shadow(pipeline: Pipeline, destination: str, chosen: list[str], shapes: dict[str, Any], *,
                   partial: bool, make_backup: bool, timeout: float | None, echo: Callable[[str], None],
                   progress: Callable[[ReplicaApplier], None] | None,
                   writer: DestinationWriter) -> tuple[Backup | None, ReplicaApplier]:
    """PostgreSQL: build the scope's tables in a new schema from the start of the topics while the live ones keep
    serving, then swap them in one transaction. Readers see the old tables or the new ones, whole: the swap holds each
    table's exclusive lock only for renames, and PostgreSQL re-resolves a waiting query's table names after it.
    The old tables move into a backup schema (recorded like any replay's backup) unless --no-backup."""
    now = datetime.now(UTC)
    shadow = f"_cdc_shadow_{now:%Y%m%d_%H%M%S_%f}"
    with writer.engine.begin() as conn:
        conn.execute(text(f'create schema "{shadow}"'))
    writer.dialect.relocate({name: (shadow, name) for name in chosen}, offsets_schema=shadow)
    scope = ReplayScope(only_tables=frozenset(chosen)) if partial else NO_SCOPE
    applier = ReplicaApplier(pipeline, destination, echo=echo, scope=scope, writer=writer)
    echo(f"replay: building {', '.join(chosen)} in schema {shadow} while the live tables keep serving")
    try:
        applier.run(until_caught_up=True, timeout=timeout, progress=progress)
        saved = _swap(pipeline, applier, shadow, chosen, shapes, now, keep_old=make_backup)
    except BaseException:
        try:
            with applier.engine.begin() as conn:
                conn.execute(text(f'drop schema if exists "{shadow}" cascade'))
        finally:
            applier.close()  # the claim with it
        raise
    echo("replay: swapped the rebuilt tables in" + (f"; the old ones are backup {saved.id} ({saved.location})"
                                                     if saved else ""))
    return saved, applier


def _swap(pipeline: Pipeline, applier: ReplicaApplier, shadow: str, chosen: list[str], shapes: dict[str, Any],
          now: datetime, *, keep_old: bool) -> Backup | None:
    live = dialect_for(applier.engine)
    backup_schema = f"_cdc_backup_{now:%Y%m%d_%H%M%S_%f}"
    full = len(chosen) == len(pipeline.source.tables)
    with applier.engine.begin() as conn:
        prep = conn.dialect.identifier_preparer
        q = prep.quote
        SchemaBackups.ensure_table(conn)
        live.ensure_offsets_table(conn)
        conn.execute(text(f"create schema {q(backup_schema)}"))
        insp = inspect(conn)
        for name in chosen:
            table = live.table(shapes[name])
            schema = table.schema or "public"
            if insp.has_table(table.name, schema=schema):
                # Renamed first, in place: the backup schema holds every table under its source name.
                conn.execute(text(f"alter table {q(schema)}.{q(table.name)} rename to {q(name)}"))
                conn.execute(text(f"alter table {q(schema)}.{q(name)} set schema {q(backup_schema)}"))
                # The backup must not hold the live tables back: its foreign keys go.
                for (constraint,) in conn.execute(text(
                        "select conname from pg_constraint where contype = 'f' and conrelid = "
                        "cast(:t as regclass)"), {"t": f"{q(backup_schema)}.{q(name)}"}).all():
                    conn.execute(text(f"alter table {q(backup_schema)}.{q(name)} drop constraint {q(constraint)}"))
            conn.execute(text(f"create schema if not exists {q(schema)}"))
            conn.execute(text(f"alter table {q(shadow)}.{q(name)} set schema {q(schema)}"))
            conn.execute(text(f"alter table {q(schema)}.{q(name)} rename to {q(table.name)}"))
        conn.execute(text(f"create table {q(backup_schema)}.{q(OFFSETS.name)} as select * from {q(OFFSETS.name)} "
                          "where pipeline = :p"), {"p": pipeline.name})
        old = live.load_offsets(conn, pipeline.name)
        new = applier.dialect.load_offsets(conn, pipeline.name)
        if not full:
            # The tables outside the scope are where the old offsets say; the rebuilt ones may take a change
            # twice (harmless: `_cdc_lsn`), never miss one.
            new = {tp: min(offset, old[tp]) for tp, offset in new.items() if tp in old}
        live.reset_offsets(conn, pipeline.name)
        live.store_offsets(conn, pipeline.name, new)
        conn.execute(text(f"drop schema {q(shadow)} cascade"))
        saved = None
        if keep_old:
            saved = SchemaBackups(pipeline, applier.name).record(conn, backup_schema, chosen)
        else:
            conn.execute(text(f"drop schema {q(backup_schema)} cascade"))
    return saved


def _replay_shadow_file(pipeline: Pipeline, destination: str, chosen: list[str], shapes: dict[str, TableShape], *,
                        partial: bool, make_backup: bool, timeout: float | None, echo: Callable[[str], None],
                        progress: Callable[[ReplicaApplier], None] | None) -> tuple[Backup | None, ReplicaApplier]:
    """DuckDB: build the new replica in a new file beside the live one while the live file keeps serving, then put
    it in place with one rename: a reader that opens the file gets the old one or the new one, whole (one that has
    the old one open keeps reading it). The old file becomes the replay's backup unless --no-backup.

    The new file starts as a copy of the live one and the scope is rebuilt in it exactly as an in-place replay
    does it: the tables outside the scope, and whatever other pipelines keep in the file, come along as they are,
    and the copy's stored offsets say where each table stands, as they do in the live file."""
    store = FileBackups(pipeline, destination)
    shadow = store.live.with_name(f"{store.live.name}.shadow-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
    if store.live.exists():
        copy_database(store.live, shadow)
    echo(f"replay: building {', '.join(chosen)} in {shadow} while {store.live} keeps serving")
    try:
        applier = _rebuild(_pointed_at(pipeline, destination, shadow), destination, chosen, shapes, partial=partial,
                           start=None, from_snapshot=False, timeout=timeout, echo=echo, progress=progress)
        applier.engine.dispose()
        fold_wal(shadow)
        saved = store.swap_in(shadow, chosen, keep_old=make_backup)
    except BaseException:
        remove_database(shadow)
        raise
    echo("replay: swapped the rebuilt file in" + (f"; the old one is backup {saved.id} ({saved.location})"
                                                   if saved else ""))
    return saved, applier


def _pointed_at(pipeline: Pipeline, destination: str, path: Path) -> Pipeline:
    """A copy of the pipeline whose destination is the DuckDB file `path`: what the applier of a shadow writes to."""
    dest = pipeline.destinations[destination]
    url = dest.sqlalchemy_url.set(database=str(path)).render_as_string(hide_password=False)
    return pipeline.model_copy(update={"destinations": {**pipeline.destinations,
                                                        destination: dest.model_copy(update={"url": SecretStr(url)})}})
