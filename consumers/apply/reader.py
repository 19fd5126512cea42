"""The Kafka side of the replica applier: its consumer and admin client, positions, polling, decoding messages into
change events and runs for the TransactionAssembler, and the outages of Kafka and of the schema registry."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from cdc import kafka as kafka_clients
from cdc.config import Pipeline
from cdc.errors import CdcError, DecodeError, NotApplied, ServiceUnavailable, driver_reason
from cdc.source_tables import TableShape
from consumers.apply import columnar, runs, values
from consumers.apply.dead_letters import DeadLetterSink
from consumers.apply.events import (
    ENVELOPE_PATHS,
    ChangeEvent,
    TransactionMarker,
    from_columns,
    from_envelope,
    marker_from_record,
)
from consumers.apply.outage import REMIND_EVERY_S, Outage
from consumers.apply.plan import ReplayScope
from consumers.apply.transactions import TransactionAssembler
from producers.debezium import avro_name
from schemas.batch import BatchDecoder, extract
from schemas.codec import AvroDecoder, RegistryClient

# Kafka prefetch budget of one applier, shared out among its partitions (see `consumer_config`).
PREFETCH_BUDGET_KB = 16 * 1024
# What one fetch from Kafka brings at most, shared out among the partitions (see `consumer_config`).
FETCH_MAX_BYTES = 2 * 1024 * 1024
# Waiting for a schema registry that cannot answer: the first wait, doubled each attempt up to the last.
REGISTRY_RETRY_FIRST_S = 0.5
REGISTRY_RETRY_MAX_S = 30.0
# Partitions paused to bound what is read ahead (`ChangeReader._hold_back`) all resume when nothing came for this long.
HOLD_BACK_PATIENCE_S = 1.0
# While Kafka is unreachable, how often the applier asks it whether it is back (when no message says so).
KAFKA_PROBE_S = 5.0

# librdkafka's own log lines (one per failed connection attempt, ~20 a second in an outage) go to this logger,
# silent unless a user configures logging: `Outage` turns the failures into one line every 30 s instead.
KAFKA_LOG = logging.getLogger("cdc.librdkafka")
KAFKA_LOG.addHandler(logging.NullHandler())
KAFKA_LOG.propagate = False

# librdkafka's error codes that mean the brokers cannot be reached (it retries them by itself).
_KAFKA_OUTAGE_CODES = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE,
                                 KafkaError._TIMED_OUT, KafkaError.NETWORK_EXCEPTION, KafkaError._MSG_TIMED_OUT})
# What a broker that just restarted answers for a while (its leader epochs moved on, metadata not loaded yet): an
# offsets request is asked again (`ChangeReader._offsets`). After a broker SIGKILL, FENCED_LEADER_EPOCH from the
# log-end offsets stopped an applier for good.
_KAFKA_SETTLING_CODES = frozenset({KafkaError.FENCED_LEADER_EPOCH, KafkaError.UNKNOWN_LEADER_EPOCH,
                                   KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                                   KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.OFFSET_NOT_AVAILABLE,
                                   KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_COORDINATOR, *_KAFKA_OUTAGE_CODES})
OFFSETS_ATTEMPTS = 5
# What decoding a message raises when the message itself is at fault (schemas.codec.Undecodable is a ValueError;
# the others come from a record that decodes but is not what Debezium writes).
UNDECODABLE = (ValueError, TypeError, KeyError, EOFError, IndexError)


def consumer_config(group_id: str, *, partitions: int = 1, **extra: Any) -> dict[str, Any]:
    """The settings of a consumer that reads change topics from positions it is given (never from the group's):
    manual assignment, no automatic commits or offset stores, a bounded prefetch shared out among `partitions`.
    `extra` adds or overrides settings (callbacks, a log level). Where Kafka is and how to log in to it is added by
    cdc.kafka.client_settings."""
    return {
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Bounded prefetch: the applier's memory must not grow with the backlog. librdkafka bounds its queue per
        # partition, so one budget is shared out among them; and every partition gets its share of each fetch.
        # With librdkafka's default share (1 MB a partition) a fetch filled up with the first partitions it asked
        # for and starved the others: with fetches of 4 MB, two of a topic's six partitions came thousands of
        # changes behind, and the transactions they held could not be applied (ChangeReader._hold_back now bounds
        # what that costs; before it, 650,000 changes were held). With fair shares the budget could shrink:
        # measured on 2026-12-01 (seven partitions, 1,000,000 changes into DuckDB; 200,000 into PostgreSQL with
        # benchmarks/apply_bench.py), fetches of 2 MB and 16 MB queued took the same time as 8 MB and 64 MB
        # (7.4-7.8 s against 7.4-8.5; 52,315 and 51,473 rows/s against 52,071 and 52,949) and peaked 25-30 MB
        # lower (DuckDB 330-334 MB against 357-363; PostgreSQL 221-223 against 249).
        "fetch.max.bytes": FETCH_MAX_BYTES,
        "queued.max.messages.kbytes": max(1024, PREFETCH_BUDGET_KB // max(1, partitions)),
        "max.partition.fetch.bytes": max(64 * 1024, min(1024 * 1024, FETCH_MAX_BYTES // max(1, partitions))),
        # librdkafka (2.4 on) stops fetching a partition for this long whenever its queue is full, 1 s by
        # default: a backlog then arrives in bursts with idle seconds between them. Measured reading 1,000,000
        # changes: 150,000 messages/s with the default, 1,000,000 with 10 ms (the broker was never the limit).
        "fetch.queue.backoff.ms": 10,
        "log_level": 3,
        **extra,
    }


def partitions_to_pause(*, held: int, read_ahead: int | None, beyond: Callable[[], set[tuple[str, int]]],
                        paused: set[tuple[str, int]], idle_s: float, hold_off: bool,
                        waiting: bool = True) -> tuple[set[tuple[str, int]], bool]:
    """Which data partitions `ChangeReader._hold_back` keeps paused, and whether pausing is held off from now on.
    `held`: changes the assembler holds in memory; `beyond`: the partitions read beyond the next transaction to
    apply; `paused`: those paused now; `idle_s`: how long no message came while polling; `waiting`: the next
    transaction to apply is not complete (or not known), so the applier needs more than what it holds."""
    if read_ahead is None or held < read_ahead:
        return set(), False  # under the bound: everything read, and pausing allowed again
    if paused and waiting and idle_s >= HOLD_BACK_PATIENCE_S:
        return set(), True  # nothing comes from what is still read: what is missing is in a paused partition
    return (set() if hold_off else beyond()), hold_off


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def kafka_settling(exc: KafkaException) -> bool:
    """Whether Kafka refused a request for a reason that passes by itself (`_KAFKA_SETTLING_CODES`)."""
    error = _kafka_error(exc)
    return error is not None and error.code() in _KAFKA_SETTLING_CODES


def kafka_reason(exc: KafkaException) -> str:
    error = _kafka_error(exc)
    return error.str() if error is not None else str(exc)


class ChangeReader:
    """Reads one destination's partitions from the positions the destination stored, decodes each poll and feeds
    the assembler. Kafka is only touched from the thread that calls `poll` (and `commit_group_offsets`)."""

    def __init__(self, pipeline: Pipeline, name: str, *, registry: RegistryClient, shapes: dict[str, TableShape],
                 columnar: bool, scope: ReplayScope, policy: str, poll_messages: int, dead_letters: DeadLetterSink,
                 on_outage: Callable[[], None], stop: threading.Event, echo: Callable[[str], None]) -> None:
        self.pipeline = pipeline
        self.name = name
        self.shapes = shapes  # the writer's, shared
        self.columnar = columnar
        self.policy = policy
        self.poll_messages = poll_messages
        self.dead_letters = dead_letters
        self.on_outage = on_outage  # an outage began or ended: the applier records it at the destination
        self._stop = stop
        self.echo = echo
        # `cdc replay --from TIME` (ReplayScope.skipped): kept here as plain attributes, read for every message.
        self.skip_before_ms = scope.skip_before_ms
        self.skip_applied = scope.skip_applied
        self.decoder = AvroDecoder(registry)
        self.batch_decoder = BatchDecoder(self.decoder)
        self._converters: dict[int, values.RowConverter] = {}
        self._columnar_schemas: dict[tuple[int, str], bool] = {}  # (writer schema id, table) -> as runs
        self.assembler = TransactionAssembler(frozenset(pipeline.source.tables))
        self.consumer: Consumer | None = None
        self._admin: AdminClient | None = None
        self.read_positions: dict[tuple[str, int], int] = {}
        # Where this reader started on the transaction topic (None: at its beginning), and whether the END records
        # before it were read back (`ends_before_start`, once per assignment).
        self.transaction_start: int | None = None
        self.looked_back = False
        self._group_offsets: dict[tuple[str, int], int] = {}
        self._group_lock = threading.Lock()
        # Outages, as one line each (consumers/apply/outage.py).
        self.kafka = Outage("Kafka")
        self.registry_outage = Outage("the schema registry")  # while decoding waits for it (`_registry_patiently`)
        self._kafka_probed = 0.0
        self.kafka_fatal: KafkaError | None = None
        self._kafka_said: dict[int, float] = {}  # Kafka errors other than outages: when each kind was last said
        # Changes read ahead of their END records that the applier may hold in memory (`_hold_back`); None: no bound.
        self.read_ahead: int | None = None
        self._paused: set[tuple[str, int]] = set()  # data partitions paused by `_hold_back`
        self._hold_off = False  # `_hold_back` resumed them all: no pausing until fewer changes are held
        self._last_message = 0.0  # when a poll last brought messages
        self._last_poll = 0.0  # when `_hold_back` last ran
        self.held_back = 0  # how many times partitions were paused
        self.hold_offs = 0  # how many times they all resumed because nothing came (HOLD_BACK_PATIENCE_S)
        self._hold_off_said = float("-inf")  # when that was last said (once every REMIND_EVERY_S at most)

    @property
    def group_id(self) -> str:
        return f"cdc-{self.pipeline.name}-{self.name}"

    @property
    def topics(self) -> list[str]:
        return [*self.pipeline.data_topics, self.pipeline.transaction_topic]

    # -- Kafka clients ------------------------------------------------------------------------------------------
    def kafka_error(self, error: KafkaError) -> None:
        """librdkafka's error callback (called from consume()): a fatal error stops the applier in `poll`; any
        other is an outage that librdkafka retries by itself, told in one line every 30 s (apply/outage.py)."""
        if error.fatal():
            self.kafka_fatal = error
            return
        if error.code() not in _KAFKA_OUTAGE_CODES:
            # Something else (an authorization refused...): said too, at most once per 30 s for each kind.
            said = self._kafka_said.get(error.code())
            if said is None or time.monotonic() - said >= REMIND_EVERY_S:
                self._kafka_said[error.code()] = time.monotonic()
                self.echo(f"{self.name}: Kafka reported: {error.str()}")
            return
        line = self.kafka.failed(error.str())
        if line:
            self.echo(f"{self.name}: {line}")

    def _admin_client(self) -> AdminClient:
        """An admin client, silent (log_level 0): it is never polled, so callbacks would pile up unserved; its
        failures reach the caller as exceptions, and the consumer's error callback tells an outage."""
        return kafka_clients.admin(self.pipeline.kafka, {"log_level": 0})

    def ask_topics(self) -> Callable[[], dict[str, Any]]:
        """Ask Kafka for its topics in the background; returns the call that waits for the answer (or raises).
        Kafka's metadata is asked for while the destination is prepared: its first request sets up connections
        (0.1 to 0.2 s that every `cdc run` would otherwise wait for). The admin client also serves `end_offsets`."""
        self._admin = admin = self._admin_client()
        answer: dict[str, Any] = {}

        def ask() -> None:
            try:
                answer["topics"] = admin.list_topics(timeout=15).topics
            except Exception as exc:  # noqa: BLE001 - raised by the caller, in its thread
                answer["error"] = exc

        # A daemon thread: a destination that fails first is reported at once, without waiting for Kafka's answer.
        asking = threading.Thread(target=ask, name=f"metadata-{self.name}", daemon=True)
        asking.start()

        def topics() -> dict[str, Any]:
            asking.join()
            if "error" in answer:
                raise answer["error"]
            return answer["topics"]

        return topics

    def assign(self, known: dict[str, Any], stored: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Make the consumer and assign it every partition of the data topics and of the transaction topic at the
        `stored` offsets (where each partition starts when none is stored); the offsets it starts at, by number."""
        partitions = sum(len(known[t].partitions) for t in self.topics if t in known)
        self._paused = set()  # a new consumer: nothing paused
        self.consumer = kafka_clients.consumer(self.pipeline.kafka, consumer_config(
            self.group_id, partitions=partitions,
            # Errors and logs that become one line per outage instead of librdkafka's stream of them.
            error_cb=self.kafka_error, logger=KAFKA_LOG, **{"log.connection.close": False}))
        if self.pipeline.kafka.sasl is not None:
            # A consumer assigned a topic its user may not read gets nothing at all from librdkafka, and no error.
            kafka_clients.check_topic_access(self.consumer, self.pipeline.kafka, self.topics)
        for topic in self.topics:
            info = known.get(topic)
            if info is None or info.error is not None:
                raise NotApplied(f"topic {topic} does not exist (run `cdc connectors apply` first)")
        starts = self._log_starts([(t, p) for t in self.topics for p in known[t].partitions if (t, p) not in stored])
        assignment = []
        numbered: dict[tuple[str, int], int] = {}
        for topic in self.topics:
            for partition in known[topic].partitions:
                offset = stored.get((topic, partition), starts.get((topic, partition), OFFSET_BEGINNING))
                assignment.append(TopicPartition(topic, partition, offset))
                if offset != OFFSET_BEGINNING:
                    self.read_positions[topic, partition] = offset
                    numbered[topic, partition] = offset
        self.transaction_start = numbered.get((self.pipeline.transaction_topic, 0))
        self.looked_back = False
        self.consumer.assign(assignment)
        return numbered

    def _log_starts(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The first offset each partition holds. Assigning the consumer OFFSET_BEGINNING instead makes librdkafka
        look it up itself, and its first message then came 0.5 s later (measured: 519 ms against 21 ms for the same
        partitions assigned numbers). Partitions it cannot tell are left out: those start at OFFSET_BEGINNING."""
        try:
            starts = self._offsets(partitions, OffsetSpec.earliest())
        except (KafkaException, ServiceUnavailable):
            return {}
        return {tp: offset for tp, offset in starts.items() if offset >= 0}

    def _offsets(self, partitions: list[tuple[str, int]], spec: OffsetSpec) -> dict[tuple[str, int], int]:
        """The offsets `spec` names (earliest, latest) of these partitions, in one request (asking the consumer
        partition by partition costs half a second each: it waits for a fetch round)."""
        if not partitions:
            return {}
        if self._admin is None:
            self._admin = self._admin_client()
        request = {TopicPartition(t, p): spec for t, p in partitions}
        for attempt in range(1, OFFSETS_ATTEMPTS + 1):
            try:
                return {(tp.topic, tp.partition): future.result().offset
                        for tp, future in self._admin.list_offsets(request, request_timeout=10).items()}
            except KafkaException as exc:
                if not kafka_settling(exc):
                    raise
                if attempt == OFFSETS_ATTEMPTS:
                    # Transient: `cdc run` starts the applier again after a backoff, from the offsets stored.
                    raise ServiceUnavailable(f"Kafka did not tell the partitions' offsets after {attempt} attempts: "
                                             f"{kafka_reason(exc)}") from exc
                time.sleep(0.5 * attempt)
                # A new client: the old one kept its stale leader epochs (seen answering FENCED_LEADER_EPOCH for
                # 5 s after a broker restart, which a fresh applier's client did not).
                self._admin = self._admin_client()
        raise AssertionError("unreachable")

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """Log-end offsets of every assigned partition."""
        assert self.consumer is not None
        return self._offsets([(tp.topic, tp.partition) for tp in self.consumer.assignment()], OffsetSpec.latest())

    def read_to_end(self, ends: Mapping[tuple[str, int], int] | None = None) -> bool:
        """Whether every partition has been read to `ends` (its log end now, by default)."""
        ends = self.end_offsets() if ends is None else ends
        return all(self.read_positions.get(tp, 0) >= end for tp, end in ends.items() if end > 0)

    def ends_before_start(self, count: int, timeout_s: float = 30.0) -> list[TransactionMarker]:
        """The END records among the `count` records of the transaction topic before where this reader started on
        it, oldest first: transactions this destination took before this run (its stored offset is past them).
        Read with a consumer of its own, which commits nothing; records that do not decode are passed over (they
        were dead-lettered when first read). Empty when the reader started at the topic's beginning."""
        self.looked_back = True
        start = self.transaction_start
        if not start:
            return []
        topic = self.pipeline.transaction_topic
        first = max(self._log_starts([(topic, 0)]).get((topic, 0), 0), start - count)
        if first >= start:
            return []
        reader = kafka_clients.consumer(self.pipeline.kafka, consumer_config(
            self.group_id, logger=KAFKA_LOG, **{"log.connection.close": False}))
        markers: list[TransactionMarker] = []
        try:
            reader.assign([TopicPartition(topic, 0, first)])
            deadline = time.monotonic() + timeout_s
            # The consumer's position, not the last record's offset + 1: it also steps over offsets that hold no
            # record for it (a transactional producer's control records).
            idle = 0  # polls in a row that brought nothing once something came: all there is was read
            while reader.position([TopicPartition(topic, 0)])[0].offset < start and time.monotonic() < deadline \
                    and idle < 3:
                batch = reader.consume(1000, timeout=0.5)
                idle = idle + 1 if not batch and markers else 0
                for msg in batch:
                    if msg.error() is not None or msg.offset() >= start:
                        continue
                    raw = msg.value()
                    with contextlib.suppress(*UNDECODABLE):
                        marker = marker_from_record(self.decoder.decode(raw), msg.offset()) if raw else None
                        if marker is not None and marker.status == "END":
                            markers.append(marker)
        finally:
            reader.close()
        return markers

    def reset(self) -> None:
        """Forget what was read (the destination was lost): read again from the offsets it stored."""
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        self.assembler = TransactionAssembler(frozenset(self.pipeline.source.tables))
        self._paused = set()
        self.read_positions.clear()
        self.transaction_start, self.looked_back = None, False
        with self._group_lock:
            self._group_offsets = {}

    # -- group offsets ------------------------------------------------------------------------------------------
    def acknowledge(self, offsets: dict[tuple[str, int], int]) -> None:
        """Offsets the destination committed: handed to the consumer group by `commit_group_offsets` (any thread)."""
        with self._group_lock:
            self._group_offsets.update(offsets)

    def commit_group_offsets(self) -> None:
        """Hand the applied offsets to Kafka's consumer group, for lag tools. Only from the thread that consumes:
        a commit from another thread while this one waits in consume() was seen to hang both."""
        with self._group_lock:
            offsets, self._group_offsets = self._group_offsets, {}
        if offsets and self.consumer is not None:
            # Group offsets are only for lag tools (the destination holds the truth): a failed commit is no error.
            with contextlib.suppress(KafkaException):
                self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                     asynchronous=True)

    def close(self, applied: dict[tuple[str, int], int]) -> None:
        if self.consumer is not None:
            if applied:
                # The asynchronous commits may still be in flight: lag tools should see where we stopped.
                with contextlib.suppress(KafkaException):
                    self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in applied.items()],
                                         asynchronous=False)
            self.consumer.close()
            self.consumer = None
            self._paused = set()

    # -- polling --------------------------------------------------------------------------------------------------
    def poll(self) -> int:
        """Read and decode what Kafka has (waiting at most 50 ms); how many messages arrived."""
        assert self.consumer is not None
        # Short waits: at a modest rate a long one would hold each batch back (latency); at a high rate the
        # batch fills first anyway.
        messages = self.consumer.consume(self.poll_messages, 0.05)
        if self.kafka_fatal is not None:
            raise ServiceUnavailable(f"Kafka consumer failed: {self.kafka_fatal.str()}")
        good = []
        for msg in messages:
            if msg.error() is not None:
                if msg.error().fatal():
                    raise ServiceUnavailable(f"Kafka consumer failed: {msg.error()}")
                # An ACL that does not grant this consumer its topic or group comes as an error event, once
                # (librdkafka suppresses repeats): said and stopped on, never skipped.
                kafka_clients.raise_for_access(self.pipeline.kafka, msg.error(), msg.topic() or self.group_id)
                continue
            good.append(msg)
        if good:
            self.kafka_answered()
        elif self.kafka.down:
            self._probe_kafka()
        self.on_outage()
        self._feed_batch(good)
        self._hold_back(len(good))
        return len(messages)

    def _hold_back(self, polled: int) -> None:
        """Bound what is read ahead. librdkafka fetches partitions as it likes, and one may come far behind the
        others: a backlog of 1,000,000 changes was seen held in memory up to 650,000 (127 MB), every partition read
        far ahead but the one holding the rest of the next transaction to apply. So while the assembler holds
        `read_ahead` changes in memory, the data partitions already read beyond the next transaction
        (TransactionAssembler.read_beyond_head) are paused, and the others and the transaction topic read on; they
        resume once fewer changes are held. If nothing comes from what is still read for HOLD_BACK_PATIENCE_S while
        some are paused and the next transaction still misses changes, all resume until then: what is missing must
        be in a paused one (a case the ordering argument does not foresee, said in a line, is slow, never stuck).
        Pausing drops what librdkafka prefetched of a partition; it fetches it again from the next offset to read on
        resuming. The progress line and the metrics say how many partitions are paused."""
        assert self.consumer is not None
        now = time.monotonic()
        if polled or now - self._last_poll >= HOLD_BACK_PATIENCE_S:
            # Idle time counts while polling: a write the applier waited for is not time nothing came.
            self._last_message = now
        self._last_poll = now
        held = self.assembler.held_in_memory
        was_off = self._hold_off
        head = self.assembler.head
        wanted, self._hold_off = partitions_to_pause(
            held=held, read_ahead=self.read_ahead, beyond=self.assembler.read_beyond_head,
            paused=self._paused, idle_s=now - self._last_message, hold_off=self._hold_off,
            waiting=head is None or self.assembler.waiting_for is not None)
        if self._hold_off and not was_off:
            self.hold_offs += 1
            if now - self._hold_off_said >= REMIND_EVERY_S:
                # Not expected: the next transaction's missing changes were in a paused partition. Memory may then
                # grow past the bound until fewer changes are held; said, so that it is not silent.
                self._hold_off_said = now
                self.echo(f"{self.name}: {held:,} changes held in memory (bound {self.read_ahead:,}) and nothing "
                          f"came for {HOLD_BACK_PATIENCE_S:g} s from the partitions still read; all "
                          f"{len(self._paused)} paused partition(s) resume, waiting for transaction "
                          f"{self.assembler.waiting_for or '(none known)'}; this happened {self.hold_offs} time(s)")
        if wanted == self._paused:
            return
        if wanted - self._paused:
            self.consumer.pause([TopicPartition(t, p) for t, p in wanted - self._paused])
            self.held_back += 1
        if self._paused - wanted:
            self.consumer.resume([TopicPartition(t, p) for t, p in self._paused - wanted])
        self._paused = wanted

    @property
    def paused(self) -> int:
        """Data partitions paused now by `_hold_back` (the writer has `read_ahead` changes to apply first)."""
        return len(self._paused)

    def kafka_answered(self) -> None:
        line = self.kafka.recovered()
        if line:
            self.echo(f"{self.name}: {line}")

    def _probe_kafka(self) -> None:
        """During an outage with nothing arriving (an idle pipeline gives no message to tell that Kafka is back):
        ask for the cluster's metadata now and then; the reminder line when one is due."""
        assert self.consumer is not None
        if time.monotonic() - self._kafka_probed >= KAFKA_PROBE_S:
            self._kafka_probed = time.monotonic()
            try:
                self.consumer.list_topics(self.pipeline.transaction_topic, timeout=1.0)
            except KafkaException as exc:
                line = self.kafka.failed(kafka_reason(exc))
            else:
                self.kafka_answered()
                return
        else:
            line = self.kafka.tick()
        if line:
            self.echo(f"{self.name}: {line}")

    # -- decoding -------------------------------------------------------------------------------------------------
    def converter(self, schema_id: int, table: str) -> values.RowConverter:
        """The converter of a writer schema's rows into the destination's columns, made once per schema."""
        converter = self._converters.get(schema_id)
        if converter is None:
            converter = values.converters_for_envelope(self.decoder.writer_schema(schema_id))
            shape = self.shapes.get(table)
            if shape is not None:
                converter.rename({avro_name(c): c for c in shape.column_names})
            self._converters[schema_id] = converter
        return converter

    def _feed_batch(self, messages: list[Any]) -> None:
        """Decode the data messages of a poll a writer schema at a time (columnar, schemas.batch) and feed them to the
        assembler: as runs (consumers.apply.runs) where the columnar path will take them, as events otherwise; what the
        fast decode cannot take goes through `_feed` one by one."""
        n = len(messages)
        if not n:
            return
        topics = [m.topic() for m in messages]
        partitions = [m.partition() for m in messages]
        offsets = [m.offset() for m in messages]
        partition_codes, data = runs.partition_codes(topics, partitions, self.pipeline.transaction_topic)
        column = pa.array([m.value() for m in messages], pa.binary())  # the poll's payloads, framing included
        groups = runs.schema_groups(column, data)
        events: list[ChangeEvent | None] = [None] * n  # decoded here as events
        group_of = -1 - np.arange(n)  # the decode a message's run belongs to; on its own (negative) if none
        row_of = np.zeros(n, np.int64)
        transaction_of = np.full(n, -1, np.int64)
        run_groups: list[tuple[int, str, Any]] = []
        transaction_ids: list[str] = []
        for schema_id, indexes in groups.items():
            try:
                frame = self._registry_patiently(functools.partial(
                    self.batch_decoder.frame, schema_id, column if len(indexes) == n else column.take(indexes)))
            except (CdcError, ValueError):
                frame = None  # an unknown schema id...: `_feed` meets the same failure, and follows on_error
            if frame is None:
                continue
            taken = runs.envelope_table(frame) if self.columnar else None
            if taken is not None and self._runs_for(schema_id, taken[0]):
                table, arrow = taken
                group_of[indexes] = len(run_groups)
                row_of[indexes] = np.arange(len(indexes))
                codes, ids = runs.xid_codes(arrow)
                transaction_of[indexes] = np.where(codes >= 0, codes + len(transaction_ids), -1)
                transaction_ids.extend(ids)
                run_groups.append((schema_id, table, arrow))
                continue
            columns = extract(frame, ENVELOPE_PATHS)
            built = from_columns(columns[0], topics=[topics[i] for i in indexes],
                                 partitions=[partitions[i] for i in indexes], offsets=[offsets[i] for i in indexes],
                                 schema_id=schema_id) if columns is not None else None
            try:
                for table in {e.table for e in built or ()}:
                    self.converter(schema_id, table)
            except (ValueError, TypeError, KeyError):
                built = None  # `_feed` meets the same failure, and dead-letters or stops as the policy says
            for i, event in zip(indexes, built or ()):
                events[i] = event
        # `cdc replay --from TIME`: the changes of runs it reads past are cut apart from the others.
        skipped = (self._skipped_runs(run_groups, group_of, row_of, topics, partitions, offsets)
                   if self.skip_before_ms is not None and run_groups else np.zeros(n, bool))
        starts, ends, order = runs.split(partition_codes, group_of, transaction_of, skipped)
        positions = order.tolist()
        group_list = group_of.tolist()
        offsets_array = np.asarray(offsets, np.int64)
        for start, end in zip(starts, ends):
            first = positions[start]
            group = group_list[first]
            if group < 0:  # a message on its own
                event = events[first]
                if event is None:
                    self._feed(messages[first])
                    continue
                self.read_positions[event.topic, event.partition] = event.offset + 1
                if not self._skipped(event.topic, event.partition, event.offset, event.commit_ts_ms):
                    self.assembler.add_event(event)
                continue
            last = positions[end - 1]
            topic, partition = topics[first], partitions[first]
            self.read_positions[topic, partition] = offsets[last] + 1
            if skipped[first]:
                continue  # read past (replay --from TIME)
            transaction = int(transaction_of[first])
            at = order[start:end]
            schema_id, table, arrow = run_groups[group]
            self.assembler.add_event(runs.ChangeRun(
                topic, partition, offsets[first], offsets[last], table,
                transaction_ids[transaction] if transaction >= 0 else None, schema_id, arrow, row_of[at],
                offsets_array[at]))

    def _runs_for(self, schema_id: int, table: str) -> bool:
        """Whether a table's changes of a writer schema go to the assembler as runs: only where the columnar path
        will take them."""
        known = self._columnar_schemas.get((schema_id, table))
        if known is not None:
            return known
        shape = self.shapes.get(table)
        verdict = False
        if self.columnar and shape is not None:
            try:
                verdict = columnar.supports(shape, self.converter(schema_id, table))
            except (ValueError, TypeError, KeyError):
                verdict = False  # events then, and `_feed` reports what is wrong with them
        self._columnar_schemas[schema_id, table] = verdict
        return verdict

    def _skipped_runs(self, run_groups: list[tuple[int, str, Any]], group_of: np.ndarray, row_of: np.ndarray,
                      topics: list[str], partitions: list[int], offsets: list[int]) -> np.ndarray:
        """Which messages of the poll `_skipped` reads past, for those decoded into runs (False for the others)."""
        commit_ms = [arrow.column("_ts").to_pylist() for _, _, arrow in run_groups]
        skipped = np.zeros(len(offsets), bool)
        for i, group in enumerate(group_of.tolist()):
            if group >= 0:
                skipped[i] = self._skipped(topics[i], partitions[i], offsets[i], commit_ms[group][int(row_of[i])])
        return skipped

    def _skipped(self, topic: str, partition: int, offset: int, commit_ts_ms: int | None) -> bool:
        """Whether `cdc replay --from TIME` reads past this change (ReplayScope.skipped, on plain attributes)."""
        return (self.skip_before_ms is not None and (commit_ts_ms or 0) < self.skip_before_ms
                and offset < self.skip_applied.get((topic, partition), 0))

    def _feed(self, msg: Any) -> None:
        """Decode one message and hand it to the assembler. A message that cannot be decoded (schemas.codec.
        Undecodable: bad framing, a schema id the registry does not know, bytes that do not read, not a Debezium
        record) follows `on_error`: `stop` raises a DecodeError naming topic, partition, offset and why;
        `dead-letter` sends it to the dead-letter topic (the reason in its record and headers) and goes on. On a
        data topic it leaves a hole where it was (its transaction is applied without it, `force_next`); on the
        transaction topic it may have been an END record, whose transaction's events are then given up when they
        stand in the way (`TransactionAssembler.add_lost_marker`). A registry that cannot answer is no reason to
        blame the message: waited for (`_registry_patiently`)."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        self.read_positions[topic, partition] = offset + 1
        raw = msg.value()
        if raw is None:
            return  # a tombstone: the delete before it carries the change
        try:
            schema_id = self.decoder.schema_id(raw)
            value = self._registry_patiently(lambda: self.decoder.decode(raw))
            if topic == self.pipeline.transaction_topic:
                marker = marker_from_record(value, offset)
                if not self._skipped(topic, partition, offset, marker.commit_ts_ms):
                    self.assembler.add_marker(marker)
                return
            # The record key (the root id) is not needed to apply: rows carry their keys. Not decoding it saves
            # a second Avro read per message (and a key that does not decode is then no reason to stop).
            event = from_envelope(value, None, topic=topic, partition=partition, offset=offset, schema_id=schema_id)
            self.converter(schema_id, event.table)
        except UNDECODABLE as exc:
            error = DecodeError(f"cannot decode: {exc}", topic=topic, partition=partition, offset=offset)
            if self.policy != "dead-letter":
                raise error from exc
            self.dead_letters.send(str(error), topic, partition, offset, msg.key(), raw, None)
            if topic == self.pipeline.transaction_topic:
                self.assembler.add_lost_marker(offset)
            else:
                self.assembler.add_hole(topic, partition, offset)
            return
        if not self._skipped(topic, partition, offset, event.commit_ts_ms):
            self.assembler.add_event(event)

    def _registry_patiently(self, call: Callable[[], Any]) -> Any:
        """`call()` (a decode), again and again while the schema registry cannot answer (ServiceUnavailable:
        unreachable, 5xx, lost its storage), with backoff: a registry outage is not the messages' fault, and
        dead-lettering good data for it would lose it. Said as an outage (one line, a reminder at most every 30 s,
        the applier BLOCKED in the progress line and in `cdc lag`). Raises ServiceUnavailable when the applier is
        stopped meanwhile."""
        delay = REGISTRY_RETRY_FIRST_S
        while True:
            try:
                result = call()
            except ServiceUnavailable as exc:
                line = self.registry_outage.failed(driver_reason(exc))
                if line:
                    self.echo(f"{self.name}: {line}")
                self.on_outage()
                if self._stop.wait(delay):
                    raise ServiceUnavailable(f"destination {self.name}: stopped while the schema registry could "
                                             f"not answer: {driver_reason(exc)}") from exc
                delay = min(delay * 2, REGISTRY_RETRY_MAX_S)
                continue
            line = self.registry_outage.recovered()
            if line:
                self.echo(f"{self.name}: {line}")
                self.on_outage()
            return result
