"""Measuring lag (I/O): applied offsets from each destination, log-end offsets and oldest unapplied changes from
Kafka, the replication slot's retained WAL from the source, and the connector's state from Kafka Connect.

The judging and the arithmetic are in `consumers/lag/status.py`; this module only gathers the facts for one moment.

- Applied offsets come from the destination's own `_cdc_offsets` (what the applier stored with the rows), never
  from Kafka's group offsets; those are read too, but only to show Kafka's own view next to ours.
- The commit time of the oldest unapplied change is read, not estimated: the message AT the applied offset of each
  partition with lag is fetched and decoded, and its `source.ts_ms` taken (on the transaction topic, the END record's
  `ts_ms`, reading on from a BEGIN). Only partitions with lag are read, so an idle pipeline costs nothing.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from cdc import kafka as kafka_clients
from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError, ServiceUnavailable, first_line
from consumers.apply.dialects import dialect_class
from consumers.apply.dialects.bookkeeping import OFFSETS as _OFFSETS
from consumers.apply.dialects.bookkeeping import STATUS as _STATUS
from consumers.lag.status import (
    BLOCKED_PREFIX,
    BLOCKED_RECORD,
    DestinationSample,
    PartitionLag,
    SourceState,
    applied_offset,
)
from producers.connect import ConnectClient
from producers.source_admin import psycopg_conninfo
from schemas.codec import AvroDecoder, RegistryClient

# How far past a BEGIN to look for its END on the transaction topic.
_MAX_SCAN = 200


class LagProbe:
    """Takes samples of one pipeline's lag; keeps its Kafka clients and database engines between samples."""

    def __init__(self, pipeline: Pipeline, destinations: list[str] | None = None, *, timeout: float = 10.0) -> None:
        self.pipeline = pipeline
        self.names = destinations or list(pipeline.destinations)
        unknown = [n for n in self.names if n not in pipeline.destinations]
        if unknown:
            raise ConfigError(f"destinations: no destination named {unknown[0]!r} "
                              f"(known: {', '.join(pipeline.destinations) or 'none'})")
        self.timeout = timeout
        self._reader = kafka_clients.consumer(pipeline.kafka, {
            # A group of its own that never commits: reading must not disturb the appliers' groups.
            "group.id": f"cdc-lag-probe-{pipeline.name}-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "log_level": 3,
        })
        self._admin = kafka_clients.admin(pipeline.kafka, {"log_level": 3})
        self._registry = RegistryClient(pipeline.kafka.schema_registry_url)
        self._decoder = AvroDecoder(self._registry)
        self._engines: dict[str, Engine] = {}
        self._commit_ts_cache: dict[tuple[str, int, int], int | None] = {}

    # -- the whole picture -----------------------------------------------------------------------------------------
    def sample(self) -> tuple[dict[str, DestinationSample], SourceState]:
        partitions = self.partitions()
        ends = self.watermarks(partitions)
        source = self.source_state()
        applied_by_dest = {name: self.applied(name) for name in self.names}
        # The commit time of the message at each distinct applied offset with lag: read once for all destinations.
        wanted: dict[tuple[str, int, int], int] = {}
        for stored, _, error in applied_by_dest.values():
            if error and not stored:
                continue
            for tp in partitions:
                low, high = ends[tp]
                offset = applied_offset(stored.get(tp), low)
                if offset < high:
                    wanted[(tp[0], tp[1], offset)] = high
        commit_times = self.commit_times(wanted)
        now = time.time()
        samples = {}
        for name, (stored, last_applied, error) in applied_by_dest.items():
            group = self.group_offsets(name, partitions) if stored or not error else {}
            rows = []
            for tp in partitions:
                low, high = ends[tp]
                offset = applied_offset(stored.get(tp), low)
                rows.append(PartitionLag(tp[0], tp[1], offset, high,
                                         commit_times.get((tp[0], tp[1], offset)) if offset < high else None,
                                         group.get(tp)))
            samples[name] = DestinationSample(name, now, tuple(rows), last_applied, error)
        return samples, source

    # -- Kafka ------------------------------------------------------------------------------------------------------
    @property
    def topics(self) -> list[str]:
        return [*self.pipeline.data_topics, self.pipeline.transaction_topic]

    def partitions(self) -> list[tuple[str, int]]:
        try:
            metadata = self._reader.list_topics(timeout=self.timeout)
        except KafkaException as exc:
            raise ServiceUnavailable(f"Kafka at {self.pipeline.kafka.bootstrap_servers} did not answer: {exc}") from exc
        found = []
        for topic in self.topics:
            info = metadata.topics.get(topic)
            if info is None or info.error is not None:
                continue  # not created yet (`cdc connectors apply`): nothing to lag behind
            found.extend((topic, p) for p in sorted(info.partitions))
        return found

    def watermarks(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        marks = {}
        for topic, partition in partitions:
            try:
                marks[topic, partition] = self._reader.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=self.timeout, cached=False)
            except KafkaException as exc:
                raise ServiceUnavailable(f"Kafka did not give the offsets of {topic}[{partition}]: {exc}") from exc
        return marks

    def group_offsets(self, destination: str, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """What the applier's consumer group committed (Kafka's view; the lag tools' view). Empty when unknown."""
        group = f"cdc-{self.pipeline.name}-{destination}"
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in partitions])
        try:
            result = self._admin.list_consumer_group_offsets([request], request_timeout=self.timeout)[group]
            answer = result.result(timeout=self.timeout)
        except Exception:  # noqa: BLE001 - Kafka's view is shown when available, never needed
            return {}
        return {(tp.topic, tp.partition): tp.offset for tp in answer.topic_partitions if tp.offset >= 0}

    def commit_times(self, wanted: dict[tuple[str, int, int], int]) -> dict[tuple[str, int, int], int | None]:
        """Source commit time (ms) of the message at each (topic, partition, offset); `wanted` maps to the end."""
        result = {k: self._commit_ts_cache[k] for k in wanted if k in self._commit_ts_cache}
        todo = {k: end for k, end in wanted.items() if k not in result}
        if not todo:
            return result
        # One partition is read from one place: the lowest offset wanted (other destinations' are read likewise).
        by_tp: dict[tuple[str, int], list[int]] = {}
        for topic, partition, offset in todo:
            by_tp.setdefault((topic, partition), []).append(offset)
        for (topic, partition), offsets in by_tp.items():
            for offset in sorted(offsets):
                ts = self._read_commit_ts(topic, partition, offset, todo[(topic, partition, offset)])
                result[(topic, partition, offset)] = ts
                if ts is not None:
                    self._commit_ts_cache[(topic, partition, offset)] = ts
        if len(self._commit_ts_cache) > 10_000:
            self._commit_ts_cache.clear()
        return result

    def _read_commit_ts(self, topic: str, partition: int, offset: int, end: int) -> int | None:
        transaction_topic = topic == self.pipeline.transaction_topic
        self._reader.assign([TopicPartition(topic, partition, offset)])
        fallback: int | None = None
        deadline = time.monotonic() + self.timeout
        try:
            seen = 0
            while time.monotonic() < deadline:
                msg = self._reader.poll(0.5)
                if msg is None:
                    continue
                if msg.error() is not None or msg.topic() != topic or msg.partition() != partition:
                    continue
                seen += 1
                ts = self._message_commit_ts(msg, transaction_topic)
                if ts is not None and not (transaction_topic and ts[1] != "END"):
                    return ts[0]
                if fallback is None:
                    fallback = ts[0] if ts is not None else _kafka_timestamp(msg)
                if msg.offset() + 1 >= end or seen >= _MAX_SCAN:
                    break
        finally:
            self._reader.unassign()
        return fallback

    def _message_commit_ts(self, msg: Any, transaction_topic: bool) -> tuple[int, str] | None:
        """(commit ms, record kind) of a message: Debezium's source.ts_ms, or the END/BEGIN record's ts_ms."""
        raw = msg.value()
        if raw is None:
            return None
        try:
            value = self._decoder.decode(raw)
        except (CdcError, ValueError, TypeError, KeyError, EOFError, IndexError):
            return None
        if not isinstance(value, dict):
            return None
        if transaction_topic:
            ts = value.get("ts_ms")
            return (int(ts), str(value.get("status"))) if ts is not None else None
        source = value.get("source") or {}
        ts = source.get("ts_ms") if isinstance(source, dict) else None
        return (int(ts), "EVENT") if ts is not None else None

    # -- destinations -------------------------------------------------------------------------------------------------
    def _engine(self, name: str) -> Engine:
        engine = self._engines.get(name)
        if engine is None:
            dest = self.pipeline.destinations[name]
            # A DuckDB file is opened read-only and never kept open (the dialect's reader_engine).
            engine = dialect_class(dest.driver_url, dest.kind).reader_engine(
                dest.driver_url, pool_size=1, max_overflow=1, pool_pre_ping=True)
            self._engines[name] = engine
        return engine

    def applied(self, name: str) -> tuple[dict[tuple[str, int], int], float | None, str | None]:
        """(next offset per partition, newest `updated_at` as epoch seconds, error) for one destination."""
        try:
            engine = self._engine(name)
            with engine.connect() as conn:
                if not inspect(conn).has_table(_OFFSETS.name):
                    return {}, None, None  # the applier never ran here
                rows = conn.execute(select(_OFFSETS.c.topic, _OFFSETS.c.kafka_partition, _OFFSETS.c.next_offset,
                                           _OFFSETS.c.updated_at)
                                    .where(_OFFSETS.c.pipeline == self.pipeline.name)).all()
                # Why the applier stopped, if it stopped on an error (ReplicaApplier._record_error).
                stopped = (conn.execute(select(_STATUS.c.error).where(_STATUS.c.pipeline == self.pipeline.name))
                           .scalar() if inspect(conn).has_table(_STATUS.name) else None)
        except (SQLAlchemyError, CdcError, ImportError) as exc:
            return {}, None, f"destination {name} cannot be read: {first_line(exc, 300)}"
        stored = {(r.topic, int(r.kafka_partition)): int(r.next_offset) for r in rows}
        times = [_epoch(r.updated_at) for r in rows if r.updated_at is not None]
        if stopped and stopped.startswith(BLOCKED_RECORD):  # running, but waiting for an outage to end
            return stored, (max(times) if times else None), BLOCKED_PREFIX + stopped[len(BLOCKED_RECORD):]
        return stored, (max(times) if times else None), (f"applier stopped: {stopped}" if stopped else None)

    # -- the source ----------------------------------------------------------------------------------------------
    def source_state(self) -> SourceState:
        retained, active = self.slot()
        try:
            with ConnectClient(self.pipeline.kafka.connect_url, timeout=self.timeout, retries=2,
                               backoff=0.5) as connect:
                status = connect.status(self.pipeline.connector_name)
        except CdcError as exc:
            return SourceState("UNKNOWN", (), retained, active, error=first_line(exc))
        if status is None:
            return SourceState("MISSING", (), retained, active)
        return SourceState(status.state, tuple(status.tasks), retained, active)

    def slot(self) -> tuple[int | None, bool | None]:
        """WAL the pipeline's replication slot retains (current LSN - restart_lsn), in bytes, and whether it is
        active."""
        try:
            with psycopg.connect(psycopg_conninfo(self.pipeline.source.sqlalchemy_url), autocommit=True,
                                 connect_timeout=int(self.timeout)) as conn:
                row = conn.execute(
                    "select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, active "
                    "from pg_replication_slots where slot_name = %s", (self.pipeline.slot_name,)).fetchone()
        except psycopg.Error:
            return None, None
        return (int(row[0]) if row[0] is not None else None, bool(row[1])) if row else (None, None)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._reader.close()
        self._registry.close()
        for engine in self._engines.values():
            engine.dispose()



def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        # MariaDB's DATETIME comes back naive; the applier writes UTC.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return float(value)


def _kafka_timestamp(msg: Any) -> int | None:
    kind, ts = msg.timestamp()
    return ts if kind and ts and ts > 0 else None
