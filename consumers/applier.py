"""The replica applier: whole source transactions, in commit order, foreign-key safe, exactly once, per batch.

Commit protocol (this order is the correctness argument):

1. On start, read the destination's offset table (`_cdc_offsets`, keyed by pipeline, topic and partition) and
   assign every partition of the data topics and of the transaction topic at those offsets (the beginning when
   none is stored). Kafka's group offsets are never read.
2. Poll a batch of messages; decode each (writer schemas by registry id, parsed once) into change events and
   transaction END markers, and hand them to the TransactionAssembler.
3. Take the steps that are complete: whole source transactions in source commit order (and snapshot reads), never
   a part of one. Many source transactions go into one destination transaction (group commit).
4. In ONE destination transaction: defer constraint checks where the destination can; collapse the steps into
   each row's last change; upsert parents first, delete children first, each table in one bulk statement guarded
   by `_cdc_lsn`; store the next offset of every partition the steps consumed, and of the transaction topic.
5. Commit the destination transaction. A crash before this point loses nothing (it rolls back, and the offsets
   it would have stored were not); a crash after it repeats nothing (the offsets were stored with the rows).
6. Only then commit the same offsets as the consumer group's, asynchronously, for lag tools.

SIGINT and SIGTERM stop the loop between batches: the batch in flight commits whole, or not at all.

What the source does without a change event, and what cannot complete, is never passed over in silence:
- A source transaction whose END record counts events that never arrive (routed to a topic this applier does not
  read, a topic holding another database's history) is named once every partition has been read past where they
  should be and the destination's `incomplete_transaction_grace_s` has passed: its id, commit time, END record, and
  per table the events missing and the topic they belong to. `on_error: stop` raises ApplyError, also recorded in
  the destination's `_cdc_status` for `cdc lag` (ERROR, same reason); `dead-letter` dead-letters what arrived of it
  (and its END record) and goes on; events of it that arrive after all are dead-lettered too, never applied.
- A column added with a default holds, in rows stored before it, a value no change carried: the fast default's
  missing value (pg_attribute.attmissingval), or per row for a volatile default (copied from the source by key).
  The applier writes it into existing rows when it adds the column, and into rows of changes from before the column
  (a replay) as it applies them (`_column_origin`).
- Tables without a primary key (captured with REPLICA IDENTITY FULL) are applied change by change: an insert adds
  a row, an update or delete changes exactly one row equal to the whole before image (duplicates stay duplicates),
  and one that matches no row stops. They have no per-row LSN guard: applying them once rests on the offsets stored
  in the same transaction, and, since Debezium re-sends transactions after a crash, on the record of the source
  transactions whose keyless changes were applied (`_keyless_once`, `_cdc_applied_transactions`); a replay empties
  them first like every table. The analytics replica stores them the same way (a table without a key, duplicates as
  rows) beside their history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import psycopg
import pyarrow as pa
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from sqlalchemy import bindparam, create_engine, inspect
from sqlalchemy.pool import NullPool
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from cdc.config import Destination, Pipeline
from cdc.errors import CdcError, DecodeError, DestinationBusy, ServiceUnavailable, Terminal
from consumers import columnar, plan, runs, values
from consumers.dialects import Dialect, dialect_for
from consumers.dialects.base import NoMatchingRow, SchemaChangeError
from consumers.dialects.duckdb import when_free
from consumers.outage import REMIND_EVERY_S, Outage, clock
from consumers.events import ENVELOPE_PATHS, ChangeEvent, from_columns, from_envelope, marker_from_record
from consumers.plan import dependency_order, net_changes, primary_key, self_referencing_order
from consumers.shapes import LSN_COLUMN, ColumnShape, TableShape, reflect_shapes
from consumers.transactions import Step, TransactionAssembler, positions_after
from producers.debezium import avro_name
from producers.source_admin import insert_watermark, psycopg_conninfo
from schemas.batch import BatchDecoder, extract
from schemas.codec import AvroDecoder, AvroEncoder, RegistryClient, load_schema


# How long a write waits for readers to let go of a DuckDB file before the applier gives up.
LOCK_PATIENCE_S = 60.0
# While behind, consecutive batches into a DuckDB file share one connection: opening costs ~20 ms and closing
# checkpoints the file, ~100 ms a batch (2.7 of 8.5 s applying 1,000,000 changes). For at most this long, then the
# file is closed for READER_WINDOW_S, so that readers waiting for it (they try every 50 ms) get their turn.
HOLD_S = 5.0
READER_WINDOW_S = 0.2
# Kafka prefetch budget of one applier, shared out among its partitions (see the consumer's settings).
PREFETCH_BUDGET_KB = 64 * 1024
# Waiting for a schema registry that cannot answer: the first wait, doubled each attempt up to the last.
REGISTRY_RETRY_FIRST_S = 0.5
REGISTRY_RETRY_MAX_S = 30.0
# How often an idle applier makes sure the session holding its writer lock is still alive: a destination restarted
# while nothing was written must be noticed (and the lock re-taken) before a second applier can take it.
LOCK_CHECK_S = 1.0
# Reconnecting to a destination that went away: the first wait, doubled each attempt up to the last.
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 30.0
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


class DestinationLost(ServiceUnavailable):
    """The destination's session ended (a restart, a terminated backend): the writer lock went with it. `run`
    reconnects, re-takes the lock and resumes from the offsets the destination stored."""


class DestinationUnreachable(ServiceUnavailable):
    """The destination refused the connection or is starting or stopping (not a login or a database that does not
    exist): waited for, like a broker that does not answer, when `cdc run` starts."""


class ApplyError(CdcError, Terminal):
    """A batch could not be applied; carries the table and where in Kafka its events came from."""


@dataclass
class ApplierStats:
    rows: int = 0
    transactions: int = 0
    batches: int = 0
    columnar_rows: int = 0  # changes written by the columnar path (consumers.columnar)
    started: float = field(default_factory=time.monotonic)
    last_commit_ts_ms: int | None = None
    last_applied_at: float | None = None  # wall-clock time of the last committed batch

    @property
    def rows_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0


class ReplicaApplier:
    def __init__(self, pipeline: Pipeline, destination_name: str, *, batch_events: int | None = None,
                 poll_messages: int = 5_000, echo: Callable[[str], None] | None = None) -> None:
        self.pipeline = pipeline
        self.name = destination_name
        self.destination: Destination = pipeline.destinations[destination_name]
        self.policy = self.destination.on_error or "stop"
        self._batch_events = batch_events
        self.poll_messages = poll_messages
        self.echo = echo or (lambda line: None)
        self.stats = ApplierStats()
        self._stop = threading.Event()
        # Arrow's default allocator (mimalloc) keeps what the batches free for later: measured with
        # benchmarks/apply_bench.py, the replica applier peaked at 308 MB with it and 259 MB with the system's, at
        # the same speed (a DuckDB analytics file: 580-590 MB against 532-539 MB).
        pa.set_memory_pool(pa.system_memory_pool())
        self.registry = RegistryClient(pipeline.kafka.schema_registry_url)
        self.decoder = AvroDecoder(self.registry)
        self.batch_decoder = BatchDecoder(self.decoder)
        self._converters: dict[int, values.RowConverter] = {}
        # Columns the source gained: what rows from before them hold there (_column_origin), and which columns
        # each writer schema lacks (_absent_columns).
        self._origins: dict[tuple[str, str], tuple[str, Any]] = {}
        self._absent: dict[int, list[str]] = {}
        self._schemas_checked: set[int] = set()  # writer schemas whose table's columns were compared (_check_columns)
        self._tables_seen: set[str] = set()  # tables with a writer schema checked since the start (_check_columns)
        self._columnar_schemas: dict[tuple[int, str], bool] = {}  # (writer schema id, table) -> as runs
        url = self.destination.driver_url
        # A DuckDB file: one process may write it, or several read it, so the applier holds it only while writing.
        self._holds_file = url.get_backend_name() == "duckdb"
        if self._holds_file:
            # No pool: batches open and close the file (`_begin`), so that readers can open it between them
            # (DuckDB lets one process write, or several read).
            # A checkpoint when the connection closes (HOLD_S at most), not one whenever 16 MB of log has built up:
            # applying 1,000,000 changes took 5.7 s instead of 6.3.
            self.engine: Engine = create_engine(url, poolclass=NullPool,
                                                connect_args={"config": {"checkpoint_threshold": "1GB"}})
        else:
            self.engine = create_engine(url, pool_size=2, pool_pre_ping=True)
        self.dialect: Dialect = dialect_for(self.engine, self.destination.kind)
        if self._holds_file:
            self.dialect.limit_memory()  # DuckDB's memory bounded; raised when a batch needs more (apply)
        self.shapes: dict[str, TableShape] = {}
        self.order: list[str] = []
        self.assembler = TransactionAssembler(frozenset(pipeline.source.tables))
        self.consumer: Consumer | None = None
        self.read_positions: dict[tuple[str, int], int] = {}
        self.applied_positions: dict[tuple[str, int], int] = {}
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._dead_letters: AvroEncoder | None = None
        self._retry: list[Step] = []
        # Set by a partial replay: (tables replayed, offsets the destination had applied before). Events before
        # those offsets are applied only to the replayed tables.
        self.replay_scope: tuple[frozenset[str], dict[tuple[str, int], int]] | None = None
        # Set by a shadow replay of some tables: the other tables' events are not this applier's to write.
        self.only_tables: frozenset[str] | None = None
        self._writer_lock: Any = None  # the connection whose session holds the destination's writer lock (claim)
        # Set by `cdc replay --from TIME`: changes committed before it (epoch ms) that the destination had applied
        # (before `skip_applied`, its stored offsets then) are read past, not applied; those it had not, are. All
        # the events of a source transaction, and its END record, carry its commit time, and stored offsets fall
        # between transactions, so a transaction is kept or skipped whole.
        self.skip_before_ms: int | None = None
        self.skip_applied: dict[tuple[str, int], int] = {}
        self._watermark: str | None = None
        self._watermark_applied = False
        # The transaction at the head of the commit order while it is incomplete and nothing else can be applied:
        # (xid, since when, each partition's end a second later, since when every partition was read to those ends).
        self._incomplete: tuple[str, float, dict[tuple[str, int], int] | None, float | None] | None = None
        self._group_offsets: dict[tuple[str, int], int] = {}
        self._group_lock = threading.Lock()
        self._producer_lock = threading.Lock()
        # A connection kept open between batches (`_begin`), and since when; no new one before `_reopen_at`.
        self._held: Any = None
        self._held_since = 0.0
        self._reopen_at = 0.0
        # The writer lock's session is also the one every write goes through (`_begin`), one transaction at a time:
        # a write can then never happen without the lock (if the session dies, so does the write).
        self._lock_guard = threading.RLock()
        self._lock_checked = 0.0
        # Outages, as one line each (consumers/outage.py); `blocked` says why nothing is applied meanwhile.
        self.kafka = Outage("Kafka")
        self.registry_outage = Outage("the schema registry")  # while decoding waits for it (`_registry_patiently`)
        self.destination_outage = Outage(f"destination {destination_name}")
        self._kafka_probed = 0.0
        self._kafka_fatal: KafkaError | None = None
        self._blocked_recorded: float | None = None  # the outage recorded in `_cdc_status` (its start)
        self._kafka_said: dict[int, float] = {}  # Kafka errors other than outages: when each kind was last said

    # -- set-up ---------------------------------------------------------------------------------------------------
    @property
    def batch_events(self) -> int:
        """Changes per destination transaction at most (the dialect's choice unless the caller made one)."""
        return self._batch_events or self.dialect.batch_events

    @property
    def group_id(self) -> str:
        return f"cdc-{self.pipeline.pipeline}-{self.name}"

    @property
    def topics(self) -> list[str]:
        return [*self.pipeline.data_topics, self.pipeline.transaction_topic]

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.pipeline.pipeline}.{self.name}.dead-letter"

    def claim(self) -> None:
        """Make this applier the destination's only writer until `close`, or raise DestinationBusy.

        Two appliers on one destination (a `cdc run` left running in another terminal, a `cdc replay` started
        beside it) would write the same rows, and a replay would empty tables under the other. PostgreSQL and
        MariaDB: a lock of the database session (an advisory lock; a user lock), named after the pipeline and the
        destination, which the database releases when the session ends, however the process ends. A DuckDB file
        admits one writing process by itself.

        The session that holds the lock is also the one the applier writes through (`_begin`): if it ends (the
        destination restarted, the backend was terminated), the lock and any transaction in flight end with it, so
        no write can happen without the lock; `run` then reconnects and takes the lock again (`_recover`)."""
        if self._writer_lock is not None or self.dialect.writer_lock_sql is None:
            return
        with self._lock_guard:
            try:
                conn = self.engine.connect()
            except OperationalError as exc:
                unreachable = DestinationUnreachable if _unreachable(exc) else ServiceUnavailable
                raise unreachable(f"destination {self.name} did not answer: {_first_line(exc)}") from exc
            try:
                free = self.dialect.try_writer_lock(conn, self.pipeline.pipeline, self.name)
                conn.commit()  # the lock is the session's: not left idle in a transaction
            except OperationalError as exc:
                conn.invalidate()
                conn.close()
                raise ServiceUnavailable(f"destination {self.name} did not answer: {_first_line(exc)}") from exc
            except BaseException:
                conn.invalidate()
                conn.close()
                raise
            if not free:
                conn.invalidate()
                conn.close()
                raise DestinationBusy(self.name, self.pipeline.pipeline)
            self._writer_lock = conn
            self._lock_checked = time.monotonic()

    def _unclaim(self) -> None:
        with self._lock_guard:
            conn, self._writer_lock = self._writer_lock, None
            if conn is not None:
                try:
                    conn.invalidate()  # the session ends, and the lock with it (a pooled connection would keep both)
                    conn.close()
                except Exception:  # noqa: BLE001 - a session already gone is what was wanted
                    pass

    def _lock_session(self) -> Any:
        """The connection holding the writer lock, taking the lock first when this applier has none."""
        if self._writer_lock is None:
            self.claim()
        return self._writer_lock

    def _check_lock(self) -> None:
        """Between batches: is the writer lock's session still alive? Raise DestinationLost when it is not (the
        lock ended with it). Skipped while a batch is being written (its outcome says the same)."""
        if self._writer_lock is None or time.monotonic() - self._lock_checked < LOCK_CHECK_S:
            return
        if not self._lock_guard.acquire(blocking=False):
            return
        try:
            conn = self._writer_lock
            if conn is None:
                return
            try:
                conn.exec_driver_sql("select 1")
                conn.rollback()
            except DBAPIError as exc:
                self._unclaim()
                raise DestinationLost(f"destination {self.name}: the session holding its writer lock ended "
                                      f"({_first_line(exc)})") from exc
            self._lock_checked = time.monotonic()
        finally:
            self._lock_guard.release()

    @property
    def blocked(self) -> str | None:
        """Why nothing can be applied right now (an outage), or None: for the progress line and `cdc lag`."""
        return (self.destination_outage.describe() or self.kafka.describe() or self.registry_outage.describe())

    def _outage(self) -> Outage | None:
        """The outage of a service the applier reads from (Kafka first), if any: what `_cdc_status` says."""
        return next((o for o in (self.kafka, self.registry_outage) if o.down), None)

    def _kafka_error(self, error: KafkaError) -> None:
        """librdkafka's error callback (called from consume()): a fatal error stops the applier in `_poll`; any
        other is an outage that librdkafka retries by itself, told in one line every 30 s (consumers/outage.py)."""
        if error.fatal():
            self._kafka_fatal = error
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

    def _kafka_config(self) -> dict[str, Any]:
        """What every Kafka client of the applier shares: the bootstrap servers, and errors and logs that become
        one line per outage instead of librdkafka's stream of them."""
        return {"bootstrap.servers": self.pipeline.kafka.bootstrap_servers, "error_cb": self._kafka_error,
                "logger": KAFKA_LOG, "log.connection.close": False}

    def _admin_client(self) -> AdminClient:
        """An admin client, silent (log_level 0): it is never polled, so callbacks would pile up unserved; its
        failures reach the caller as exceptions, and the consumer's error callback tells an outage."""
        return AdminClient({"bootstrap.servers": self.pipeline.kafka.bootstrap_servers, "log_level": 0})

    def _recover(self, lost: BaseException, deadline: float | None) -> None:
        """The destination went away (DestinationLost): reconnect with backoff, a line per attempt (at most 30 s
        apart), take the writer lock again, and resume from the offsets the destination stored (what was read but
        not committed there is read again: a batch whose commit was cut off is found applied, or applied again).
        Another applier holding the lock by then stops this one: two must never write the same destination."""
        self.destination_outage.failed(_first_line(lost))
        if isinstance(lost, DestinationUnreachable):
            self.echo(f"{self.name}: the destination does not answer ({_first_line(lost.__cause__ or lost)}); "
                      "waiting for it: nothing is written until it answers and its writer lock is taken")
        else:
            self.echo(f"{self.name}: lost the destination ({_first_line(lost.__cause__ or lost)}); its writer lock "
                      "went with its session, nothing is written until it is taken again; reconnecting")
        self._unclaim()
        self._release()
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        self.assembler = TransactionAssembler(frozenset(self.pipeline.source.tables))
        self.read_positions.clear()
        self.applied_positions.clear()
        self._retry = []
        self._incomplete = None
        with self._group_lock:
            self._group_offsets = {}
        delay = RECONNECT_FIRST_S
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            try:
                self.prepare()
            except DestinationBusy as busy:
                raise CdcError(
                    f"destination {self.name}: this applier lost its writer lock when the destination's session "
                    f"ended ({_first_line(lost.__cause__ or lost)}), and another applier holds it now; stopping so "
                    "that only one writes the destination",
                    hint="one applier at a time: two would write the same rows") from busy
            except (ServiceUnavailable, OperationalError, KafkaException) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise CdcError(f"destination {self.name} still unreachable at the end of the timeout: "
                                   f"{_first_line(exc)}") from exc
                if self.consumer is not None:  # prepared up to the consumer, then failed
                    self.consumer.close()
                    self.consumer = None
                self.echo(f"{self.name}: destination still unreachable (attempt {attempt}, down since "
                          f"{clock(self.destination_outage.since or time.time())} UTC): {_first_line(exc)}; "
                          f"next attempt in {delay:.1f} s")
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            self.destination_outage.recovered()
            self.echo(f"{self.name}: reconnected to the destination (attempt {attempt}) and took its writer lock "
                      "again; resuming from its stored offsets")
            return

    def prepare(self) -> None:
        """Create the offsets table and the replicated tables as needed, then position the consumer."""
        self.claim()
        # Kafka's metadata is asked for while the databases are: its first request sets up connections (0.1 to
        # 0.2 s that every `cdc run` would otherwise wait for). The admin client also serves end_offsets later.
        self._admin = admin = self._admin_client()
        answer: dict[str, Any] = {}

        def ask() -> None:
            try:
                answer["topics"] = admin.list_topics(timeout=15).topics
            except Exception as exc:  # noqa: BLE001 - raised below, in this thread
                answer["error"] = exc

        # A daemon thread: a destination that fails first is reported at once, without waiting for Kafka's answer.
        asking = threading.Thread(target=ask, name=f"metadata-{self.name}", daemon=True)
        asking.start()
        stored = self._prepare_destination()
        asking.join()
        if "error" in answer:
            raise answer["error"]
        known = answer["topics"]
        partitions = sum(len(known[t].partitions) for t in self.topics if t in known)
        self.consumer = Consumer({
            **self._kafka_config(),
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # Bounded prefetch: the applier's memory must not grow with the backlog. librdkafka bounds its queue per
            # partition, so one budget is shared out among them. Measured on 7 partitions (benchmarks/): 32 MB
            # each cost 200 MB of resident memory; 4 MB each halved the throughput; 9 MB each (64 MB in all) kept
            # the throughput within 5 % of 14 MB each and the applier's peak at 280 MB.
            "fetch.max.bytes": 8_388_608,
            "queued.max.messages.kbytes": max(1024, PREFETCH_BUDGET_KB // max(1, partitions)),
            # librdkafka (2.4 on) stops fetching a partition for this long whenever its queue is full, 1 s by
            # default: a backlog then arrives in bursts with idle seconds between them. Measured reading 1,000,000
            # changes: 150,000 messages/s with the default, 1,000,000 with 10 ms (the broker was never the limit).
            "fetch.queue.backoff.ms": 10,
            "log_level": 3,
        })
        assignment = []
        for topic in self.topics:
            info = known.get(topic)
            if info is None or info.error is not None:
                raise ServiceUnavailable(f"topic {topic} does not exist (run `cdc connectors apply` first)")
        starts = self._log_starts([(t, p) for t in self.topics for p in known[t].partitions if (t, p) not in stored])
        for topic in self.topics:
            for partition in known[topic].partitions:
                offset = stored.get((topic, partition), starts.get((topic, partition), OFFSET_BEGINNING))
                assignment.append(TopicPartition(topic, partition, offset))
                if offset != OFFSET_BEGINNING:
                    self.read_positions[topic, partition] = offset
                    self.applied_positions[topic, partition] = offset
        self.consumer.assign(assignment)

    def _log_starts(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The first offset each partition holds. Assigning the consumer OFFSET_BEGINNING instead makes librdkafka
        look it up itself, and its first message then came 0.5 s later (measured: 519 ms against 21 ms for the same
        partitions assigned numbers). Partitions it cannot tell are left out: those start at OFFSET_BEGINNING."""
        try:
            starts = self._offsets(partitions, OffsetSpec.earliest())
        except KafkaException:
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
        return {(tp.topic, tp.partition): future.result().offset
                for tp, future in self._admin.list_offsets(request, request_timeout=10).items()}

    def _prepare_destination(self) -> dict[tuple[str, int], int]:
        """Reflect the source tables, create (or follow) them at the destination; the destination's stored
        offsets."""
        self.shapes = reflect_shapes(self.pipeline.source.sqlalchemy_url, self.pipeline.source.tables)
        try:
            with self._begin() as conn:
                self.dialect.ensure_offsets_table(conn)
                stored = self.dialect.load_offsets(conn, self.pipeline.pipeline)
                # Tables made elsewhere are taken over only on the pipeline's first run here: the snapshot that
                # refills them is at the start of the topics.
                self.dialect.adopt = (None if not self.destination.adopt_existing_tables else
                                      "" if not stored else
                                      f"pipeline {self.pipeline.pipeline} has already applied changes here, so the "
                                      "snapshot that would refill it is behind its stored offsets (cdc replay "
                                      "rebuilds the destination from the start of the topics)")
                self.dialect.adopted.clear()
                self.dialect.added_columns.clear()
                order = dependency_order(self.shapes)
                if self.destination.adopt_existing_tables:
                    for name in order:  # every refusal before any table is touched
                        self.dialect.check_adoption(conn, self.shapes[name])
                for name in order:
                    for action in self.dialect.ensure_table(conn, self.shapes[name], self.shapes):
                        self.echo(f"{self.name}: {action}")
                # Adopted tables are emptied children first (their foreign keys hold), for the snapshot to refill.
                for name in reversed(order):
                    if name in self.dialect.adopted:
                        conn.execute(self.dialect.table(self.shapes[name]).delete())
                # Columns the source gained while no applier ran: their existing rows get their values too.
                for table, column in self.dialect.added_columns:
                    if column != LSN_COLUMN:  # an adopted table's: the snapshot writes it
                        self._fill_new_column(conn, self.shapes[table], column)
                if self.destination.read_only_role:  # PostgreSQL analytics destinations (cdc.config)
                    password = self.destination.read_only_password
                    for action in self.dialect.grant_read_only(conn, self.destination.read_only_role,
                                                               password.get_secret_value() if password else None):
                        self.echo(f"{self.name}: {action}")
                self.dialect.record_error(conn, self.pipeline.pipeline, None)  # running again: no longer stopped
        except OperationalError as exc:
            raise ServiceUnavailable(f"destination {self.name} did not answer: {_first_line(exc)}") from exc
        except DBAPIError as exc:
            raise ApplyError(f"destination {self.name}: preparing its tables failed: {_first_line(exc)}") from exc
        self.order = self._dependency_order()
        return stored

    def _dependency_order(self) -> list[str]:
        """Parents first, from the destination's foreign keys, and the source's for tables that declare none."""
        edges: dict[str, set[str]] = {}
        if not self.dialect.reflects_foreign_keys:
            return dependency_order(self.shapes)
        by_destination = {self.dialect.table(s).fullname: n for n, s in self.shapes.items()}
        insp = inspect(self.engine)
        for name, shape in self.shapes.items():
            table = self.dialect.table(shape)
            declared = insp.get_foreign_keys(table.name, schema=table.schema)
            targets = set()
            for fk in declared:
                schema = fk.get("referred_schema") or table.schema
                referred = f"{schema}.{fk['referred_table']}" if schema else fk["referred_table"]
                if referred in by_destination:
                    targets.add(by_destination[referred])
            edges[name] = targets or {fk.referred_table for fk in shape.foreign_keys}
        return dependency_order(self.shapes, edges)

    # -- decoding -------------------------------------------------------------------------------------------------
    def _converter(self, schema_id: int, table: str) -> values.RowConverter:
        converter = self._converters.get(schema_id)
        if converter is None:
            converter = values.converters_for_envelope(self.decoder.writer_schema(schema_id))
            shape = self.shapes.get(table)
            if shape is not None:
                converter.rename({avro_name(c): c for c in shape.column_names})
            self._converters[schema_id] = converter
        return converter

    def convert(self, event: ChangeEvent, image: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if image is None:
            return None
        if event.schema_id is None:
            return dict(image)
        row = self._converter(event.schema_id, event.table).convert(image)
        absent = self._absent_columns(event.schema_id, event.table)
        return self._fill_absent(event.table, row, absent) if absent and row is not None else row

    def _feed_batch(self, messages: list[Any]) -> None:
        """Decode the data messages of a poll a writer schema at a time (columnar, schemas.batch) and feed them to the
        assembler: as runs (consumers.runs) where the columnar path will take them, as events otherwise; what the
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
                frame = self._registry_patiently(lambda: self.batch_decoder.frame(
                    schema_id, column if len(indexes) == n else column.take(indexes)))
            except (CdcError, ValueError):
                frame = None  # an unknown schema id...: `_feed` meets the same failure, and follows on_error
            if frame is None:
                continue
            taken = runs.envelope_table(frame) if self.dialect.columnar else None
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
                    self._converter(schema_id, table)
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
        if self.dialect.columnar and shape is not None:
            try:
                verdict = columnar.supports(shape, self._converter(schema_id, table))
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
        """Whether `cdc replay --from TIME` reads past this change (see skip_before_ms)."""
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
            self._converter(schema_id, event.table)
        except (ValueError, TypeError, KeyError, EOFError, IndexError) as exc:
            error = DecodeError(f"cannot decode: {exc}", topic=topic, partition=partition, offset=offset)
            if self.policy != "dead-letter":
                raise error from exc
            self._dead_letter(str(error), topic, partition, offset, msg.key(), raw, None)
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
                line = self.registry_outage.failed(_first_line(exc))
                if line:
                    self.echo(f"{self.name}: {line}")
                if self._blocked_recorded != (self._outage() or self.registry_outage).since:
                    self._record_blocked()
                if self._stop.wait(delay):
                    raise ServiceUnavailable(f"destination {self.name}: stopped while the schema registry could "
                                             f"not answer: {_first_line(exc)}") from exc
                delay = min(delay * 2, REGISTRY_RETRY_MAX_S)
                continue
            line = self.registry_outage.recovered()
            if line:
                self.echo(f"{self.name}: {line}")
                self._record_blocked()
            return result

    # -- applying -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _begin(self, *, hold: bool = False) -> Iterator[Any]:
        """A destination transaction (committed when the block ends, rolled back if it raises). With `hold`, the
        connection stays open for the next one (a DuckDB file only, for at most HOLD_S; see `_release`).

        PostgreSQL and MariaDB: the transaction runs in the session holding the writer lock (`claim`), one at a
        time. If that session is gone (the destination restarted, the backend was terminated), the lock is gone
        too: the transaction fails with it and DestinationLost is raised, never a write on another session."""
        if self.dialect.writer_lock_sql is not None:
            with self._lock_guard:
                conn = self._lock_session()
                try:
                    with conn.begin():
                        yield conn
                except Exception as exc:
                    # Through SQLAlchemy (DBAPIError) or straight from the driver (the columnar path's COPY).
                    if getattr(exc, "connection_invalidated", False) or _session_ended(exc) or _broken(conn):
                        self._unclaim()
                        raise DestinationLost(f"destination {self.name}: its session ended "
                                              f"({_first_line(exc)})") from exc
                    raise
                self._lock_checked = time.monotonic()  # the session just answered
            return
        # One at a time here too: the reader thread records outages (`_record_blocked`) while a batch may be
        # being written by the writer thread, and the held connection is one.
        with self._lock_guard:
            conn, self._held = self._held, None
            if conn is None:
                if time.monotonic() < self._reopen_at:
                    time.sleep(max(0.0, self._reopen_at - time.monotonic()))
                conn = self._connect()
                self._held_since = time.monotonic()
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                conn.close()
                raise
            if hold and self._holds_file and time.monotonic() - self._held_since < HOLD_S:
                self._held = conn
            else:
                conn.close()
                if self._holds_file and time.monotonic() - self._held_since >= HOLD_S:
                    self._reopen_at = time.monotonic() + READER_WINDOW_S

    def _release(self) -> None:
        """Close a connection held between batches."""
        with self._lock_guard:
            conn, self._held = self._held, None
            if conn is not None:
                conn.close()

    def _connect(self) -> Any:
        """A destination connection. A DuckDB file is someone else's while a reader has it open: wait for it, up to
        LOCK_PATIENCE_S, rather than stop replicating."""
        return when_free(self.engine.connect, LOCK_PATIENCE_S, stop=self._stop.is_set)

    def _write(self, conn: Any, steps: list[Step], offsets: dict[tuple[str, int], int]) -> int:
        entries = [(n, item) for n, step in enumerate(steps) for item in step.events]
        if self.only_tables is not None:
            entries = [(n, item) for n, item in entries if item.table in self.only_tables]
        if self.replay_scope is not None:
            scope, applied_before = self.replay_scope
            kept = []
            for n, item in entries:
                since = applied_before.get((item.topic, item.partition), 0)
                # A run keeps its changes from `since` on; an event (decoded one by one) is kept or not.
                part = item if item.table in scope else item.since(since) if isinstance(item, runs.ChangeRun) else \
                    item if item.offset >= since else None
                if part is not None:
                    kept.append((n, part))
            entries = kept
        self._check_columns(conn, [item for _, item in entries])
        count = runs.count(item for _, item in entries)
        if self.dialect.columnar:
            entries = self._write_columnar(conn, entries, steps)
        events = self._events(entries, steps)
        # Keyless changes Debezium re-sent: out of both (`events` keeps, for the history, those applied earlier).
        events, state_events = self._keyless_once(conn, events, steps)
        phases = net_changes(state_events, self.shapes, self.convert)
        if self.dialect.keeps_history:
            history: dict[str, list] = {}
            for event in events:
                shape = self.shapes.get(event.table)
                if shape is None:
                    continue
                row = self.convert(event, event.before if event.op == "d" else event.after)
                if event.op == "u" and event.before is not None and row is not None:
                    before = self.convert(event, event.before)
                    if before is not None and primary_key(shape, before) != primary_key(shape, row):
                        # A primary-key update sent as one update (a member whose root id did not change): the
                        # old key ends here, as a delete would have said.
                        history.setdefault(event.table, []).append((dataclasses.replace(event, op="d"), before))
                if row is not None:
                    history.setdefault(event.table, []).append((event, row))
            for table, changes in history.items():
                self.dialect.append_history(conn, self.shapes[table], changes)
        rows = 0
        for phase in phases:
            for table in phase.truncate_first:
                self.dialect.truncate(conn, self.shapes[table])
            for table in self.order:
                changes = phase.changes.get(table)
                if changes and changes.upserts:
                    rows += self._upsert(conn, self.shapes[table], list(changes.upserts.values()))
                keyless = phase.keyless.get(table)
                if keyless:
                    # A table without a key, every change in order, where its upserts would go (parents first):
                    # its inserts need their parents, and nothing can reference its rows (no key to reference).
                    rows += self.dialect.apply_keyless(conn, self.shapes[table], keyless)
            for table in reversed(self.order):
                changes = phase.changes.get(table)
                if changes and changes.deletes:
                    keys = list(changes.deletes.values())
                    if not self.dialect.supports_deferred_constraints:
                        keys = list(reversed(self_referencing_order(self.shapes[table], keys)))
                    rows += self.dialect.delete(conn, self.shapes[table], keys)
        self.dialect.store_offsets(conn, self.pipeline.pipeline, offsets)
        return count

    _applied_pruned_at = 0.0  # when `_keyless_once` last pruned the applied-transactions records (monotonic)

    def _keyless_once(self, conn: Any, events: list[ChangeEvent],
                      steps: list[Step]) -> tuple[list[ChangeEvent], list[ChangeEvent]]:
        """Each change of a table without a primary key applied once, whatever Debezium re-sends (docs/applier.md,
        "Tables without a primary key under redelivery"). Returns the batch's events without repeats (a copy taken
        along with its original), and those to apply to the current state: without the keyless changes of
        transactions the destination recorded as applied. The history gets those too: its anti-join absorbs copies,
        and a replay `--from TIME` that emptied it since then needs them. The transactions whose keyless changes
        are applied are recorded in this same destination transaction; one lookup and one multi-row insert a batch,
        nothing for a batch without keyless changes."""
        if not plan.has_keyless(events, self.shapes):
            return events, events
        events, repeats = plan.keyless_repeats(events, self.shapes)
        pipeline = self.pipeline.pipeline
        xids = plan.keyless_xids(events, self.shapes)
        records = [plan.AppliedRecord(r.source_table, r.xid, r.first_lsn, r.last_lsn, r.end_offset)
                   for r in self.dialect.load_applied(conn, pipeline, xids)]
        state, skipped = plan.already_applied(events, self.shapes, records, self._applied_position)
        end_offsets: dict[str, int] = {}
        for step in steps:
            if step.xid is not None and step.marker_offset is not None:
                end_offsets[step.xid] = min(step.marker_offset, end_offsets.get(step.xid, step.marker_offset))
        self.dialect.record_applied(conn, pipeline, plan.applied_records(state, self.shapes, end_offsets))
        if time.monotonic() - self._applied_pruned_at >= plan.APPLIED_PRUNE_EVERY_S:
            cutoff = plan.applied_cutoff(events)
            if cutoff is not None:
                self.dialect.prune_applied(conn, pipeline, cutoff)
                self._applied_pruned_at = time.monotonic()
        if repeats or skipped:
            again = sorted({e.xid for e in [*repeats, *skipped]}, key=lambda x: (len(x), x))
            named = ", ".join(again[:5]) + (f" and {len(again) - 5} more" if len(again) > 5 else "")
            self.echo(f"{self.name}: {len(repeats) + len(skipped)} re-sent keyless change(s) of source "
                      f"transaction(s) {named} already applied: skipped")
        return events, state

    def _applied_position(self, table: str) -> int:
        """The transaction topic's offset up to which the destination holds `table`'s changes: an applied-transaction
        record whose END record is before it still holds (plan.already_applied). The stored offset, or more where a
        replay left the table as it was: outside a partial replay's scope, the offsets applied before it; in a
        replay `--from TIME`, which empties nothing, the offsets applied before it."""
        tx = (self.pipeline.transaction_topic, 0)
        position = self.applied_positions.get(tx, 0)
        if self.replay_scope is not None and table not in self.replay_scope[0]:
            position = max(position, self.replay_scope[1].get(tx, 0))
        if self.skip_before_ms is not None:
            position = max(position, self.skip_applied.get(tx, 0))
        return position

    @staticmethod
    def _events(entries: list[tuple[int, Any]], steps: list[Step]) -> list[ChangeEvent]:
        """The general path's changes in apply order: runs become events, and a source transaction's events are
        ordered as the assembler orders them (it cannot order what is inside a run)."""
        events: list[ChangeEvent] = []
        for n, group in itertools.groupby(entries, key=lambda entry: entry[0]):
            items = [item for _, item in group]
            taken = runs.expand(items)
            # Any run, even of one change, was placed first by the assembler (a run has no order of its own): a
            # member's root-id change (a delete under the old root, a create under the new one, in two
            # partitions) must not be applied create first.
            if steps[n].xid is not None and any(isinstance(item, runs.ChangeRun) for item in items):
                taken.sort(key=lambda e: (e.tx_order or 0, e.lsn or 0))
            events.extend(taken)
        return events

    def _write_columnar(self, conn: Any, entries: list[tuple[int, Any]], steps: list[Step]) -> list[tuple[int, Any]]:
        """Write what the columnar path takes, table by table (in any order: the dialects with a columnar path
        have no foreign keys, or check them at commit); returns the entries (step number, events or runs) left for
        the general path."""
        if any(item.op == "t" for _, item in entries if isinstance(item, ChangeEvent)):
            return entries  # a truncate orders the batch into phases: the general path's job, whole
        by_table: dict[str, list[tuple[int, runs.ChangeRun]]] = {}
        for n, item in entries:
            by_table.setdefault(item.table, []).append((n, item))
        done = set()
        snapshot_steps = {n for n, step in enumerate(steps) if step.xid is None}
        for table, changes in by_table.items():
            shape = self.shapes.get(table)
            schema_ids = {item.schema_id for _, item in changes}
            if shape is None or len(schema_ids) != 1 or not all(isinstance(i, runs.ChangeRun) for _, i in changes):
                continue
            converter = self._converters[schema_ids.pop()]
            # In parts (columnar.chunks): a large source transaction's are written one after the other.
            for part in columnar.chunks(changes):
                batch = columnar.runs_table(part, snapshot_steps)
                flat = columnar.flat_images(batch, shape, converter) if batch else None
                del batch
                if flat is None:
                    break  # this part and the rest go to the general path, after the parts written (order kept)
                self.dialect.apply_columnar(conn, shape, flat)
                del flat
                done.update(id(item) for _, item in part)
                self.stats.columnar_rows += runs.count(item for _, item in part)
        return [(n, item) for n, item in entries if id(item) not in done] if done else entries

    def _offsets_after(self, steps: list[Step]) -> dict[tuple[str, int], int]:
        """Next offsets after these steps (data partitions and the transaction topic), computed once per batch."""
        offsets = positions_after(steps)
        markers = [s.marker_offset for s in steps if s.marker_offset is not None]
        if markers:
            offsets[self.pipeline.transaction_topic, 0] = max(markers) + 1
        return offsets

    def _upsert(self, conn: Any, shape: TableShape, rows: list[dict[str, Any]]) -> int:
        if not self.dialect.supports_deferred_constraints:
            rows = self_referencing_order(shape, rows)
        # Rows missing unchanged TOASTed values are written without those columns, so the stored ones stay.
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        unavailable = values.UNAVAILABLE
        for row in rows:
            # `in` on the values scans in C (identity first): the common row, with nothing missing, costs little.
            missing = tuple(c for c, v in row.items() if v is unavailable) if unavailable in row.values() else ()
            groups.setdefault(missing, []).append(row)
        written = 0
        for missing, group in groups.items():
            columns = [c for c in shape.column_names if c not in missing]
            written += self.dialect.upsert(conn, shape, group, columns)
        return written

    def _check_columns(self, conn: Any, events: list[ChangeEvent]) -> None:
        """A writer schema met for the first time may say the source changed the table: Debezium registers a new one
        whenever a change shows in its Avro (a column added or dropped, int -> bigint, a numeric's scale). The table
        is then reflected afresh from the source (unless it is the table's first writer schema since the start and
        matches the shape reflected then) and compared with the shape the destination was made from: columns
        the source gained are added (and filled, `_fill_new_column`), columns whose catalog type changed get the
        new mapped type (Dialect.alter_column_type, in the batch's transaction, before any row is written) unless
        `_refuse_type_changes` stops; a dropped column stops the applier (the dialect's ensure_table). The destination's
        catalog is compared too (Dialect.differing_types): a type changed while no applier ran is found by the first
        change after a start. A change with no Avro of its own while an applier runs (varchar(10) -> text: a string
        either way; an enum's new label) is found when a value the old type cannot hold fails its batch: the source
        is reflected again, the destination follows, and the batch is applied again (`_source_changed_under`). A
        value is never truncated to fit."""
        for schema_id in {e.schema_id for e in events if e.schema_id is not None} - self._schemas_checked:
            converter = self._converters[schema_id]
            table = next(e.table for e in events if e.schema_id == schema_id)
            shape = self.shapes.get(table)
            if shape is None:
                self._schemas_checked.add(schema_id)
                continue
            gained = set(converter.columns) - set(shape.column_names)
            # The destination's catalog: the source may have changed a type while no applier ran (the shape,
            # reflected at start, already has it), or a batch that changed it here was rolled back.
            differing = self.dialect.differing_types(conn, shape)
            first = table not in self._tables_seen
            self._tables_seen.add(table)
            if first and not gained and not differing and set(converter.columns) == set(shape.column_names):
                # A table's first writer schema since the start, matching the shape reflected at the start: the
                # source is not reflected again (once per table at every start would slow a start of many tables).
                self._schemas_checked.add(schema_id)
                continue
            fresh = reflect_shapes(self.pipeline.source.sqlalchemy_url, [table])[table]
            changed = _type_changes(shape, fresh, differing)
            dropped = set(shape.column_names) - set(fresh.column_names)
            if not gained and not changed and not dropped:
                self._schemas_checked.add(schema_id)
                continue
            converter.rename({avro_name(c): c for c in fresh.column_names})
            self._follow_source(conn, fresh, changed)
            self._schemas_checked.add(schema_id)

    def _follow_source(self, conn: Any, fresh: TableShape, changed: list[tuple[str, str, str]]) -> None:
        """Make the destination's table the source's `fresh` shape: `changed` columns get their new type (or the
        applier stops, `_refuse_type_changes`), columns the source gained are added and filled, an enum's new labels
        are added; a dropped column stops the applier (the dialect's ensure_table raises, naming it)."""
        table = fresh.name
        self._refuse_type_changes(fresh, changed)
        self._absent.clear()
        stale = self.dialect._tables.pop(table, None)
        if stale is not None:
            self.dialect.metadata.remove(stale)  # rebuilt from the fresh shape, under the same name
        for column, old, new in changed:
                try:
                    action = self.dialect.alter_column_type(conn, fresh, column)
                except SchemaChangeError as exc:
                    raise ApplyError(f"destination {self.name}: {table}.{column} changed type at the source from "
                                     f"{old} to {new}, which this destination cannot follow ({exc}); rebuild the "
                                     f"table from the topics with `cdc replay {self.name} --tables {table}`") from exc
                self.echo(f"{self.name}: {action} ({table}.{column} changed at the source from {old} to {new})")
        self.shapes[table] = fresh
        self.dialect.added_columns.clear()
        for action in self.dialect.ensure_table(conn, fresh, self.shapes):
            self.echo(f"{self.name}: {action}")
        for _, column in self.dialect.added_columns:
            self._fill_new_column(conn, fresh, column)

    def _source_changed_under(self, steps: list[Step], exc: BaseException) -> bool:
        """After a batch failed on a value its destination column cannot hold: did the source change a column of the
        batch's tables in a way no writer schema told (varchar(10) -> varchar(50) is a string in Avro either way; an
        enum's new label is not in the shape)? If so, the destination follows it in a transaction of its own
        (PostgreSQL can use an enum label only once the transaction that added it has committed) and the caller
        applies the batch again; if not, the value is really too big for the source's type as reflected: False."""
        if not _is_data_error(exc):
            return False
        tables = sorted({item.table for step in steps for item in step.events} & set(self.shapes))
        if not tables:
            return False
        fresh_shapes = reflect_shapes(self.pipeline.source.sqlalchemy_url, tables)
        followed = False
        for table in tables:
            shape, fresh = self.shapes[table], fresh_shapes[table]
            changed = _type_changes(shape, fresh, {})
            if not changed and not _relabelled(shape, fresh):
                continue
            with self._begin() as conn:
                self._follow_source(conn, fresh, changed)
            followed = True
        return followed

    def _refuse_type_changes(self, fresh: TableShape, changed: list[tuple[str, str, str]]) -> None:
        """Raise ApplyError, before anything changes, for a type change the destination is not made to follow: a
        key column's (primary or foreign, or referred to by another table's foreign key: both ends of a constraint
        would have to change together, MariaDB's key columns have types of their own) or a generated column's
        (the source's expression decides its type)."""
        referred = {c for s in self.shapes.values() for fk in s.foreign_keys if fk.referred_table == fresh.name
                    for c in fk.referred_columns}
        keys = set(fresh.primary_key) | {c for fk in fresh.foreign_keys for c in fk.columns} | referred
        for column, old, new in changed:
            source = fresh.column(column).source
            why = ("it is a key column (a primary or foreign key, or referred to by one): its constraints would "
                   "have to change with it" if column in keys else
                   "it is a generated column" if source is not None and source.generated else None)
            if why:
                raise ApplyError(f"destination {self.name}: {fresh.name}.{column} changed type at the source from "
                                 f"{old} to {new}, which is not followed automatically: {why}. Rebuild the table from "
                                 f"the topics with `cdc replay {self.name} --tables {fresh.name}`")

    def _fill_new_column(self, conn: Any, shape: TableShape, column: str) -> None:
        """Give a column the source gained the values its existing rows have there: PostgreSQL wrote no change for
        them. Every row the destination holds now was written by changes from before the column existed (the first
        change that has it is what made the applier add it), so each holds, at the source, what the ADD COLUMN gave
        it (`_column_origin`), or a value a later change (applied after this) sets. In the batch's destination
        transaction: with the ADD COLUMN, or not at all."""
        kind, value = self._column_origin(shape, column)
        table = self.dialect.table(shape)
        if kind == "value":
            if value is not None:
                conn.execute(table.update().values({column: self.dialect.prepared(shape, [{column: value}],
                                                                                  [column])[0][column]}))
                self.echo(f"{self.name}: filled {table.fullname}.{column} of existing rows with the source's default")
            return
        if value:
            key = [f"_k{i}" for i in range(len(shape.primary_key))]
            statement = table.update().where(*(table.c[c] == bindparam(k) for c, k in zip(shape.primary_key, key)))\
                .values({column: bindparam("_v")})
            rows = self.dialect.prepared(shape, [{**dict(zip(shape.primary_key, pk)), column: v}
                                                 for pk, v in value.items()], [*shape.primary_key, column])
            conn.execute(statement, [{**{k: row[c] for c, k in zip(shape.primary_key, key)}, "_v": row[column]}
                                     for row in rows])
        self.echo(f"{self.name}: copied {table.fullname}.{column} of {len(value)} existing rows from the source "
                  "(a volatile default)")

    def _column_origin(self, shape: TableShape, column: str) -> tuple[str, Any]:
        """What a source column holds in the rows stored before it was added (PostgreSQL wrote no change for them):

        - ("value", v), the same for all: a constant default (a "fast default") is kept as the column's missing
          value (pg_attribute.attmissingval) and read for every row stored before the ADD; without a default, NULL.
        - ("copy", {primary key: value}): a volatile default (random(), clock_timestamp()...) rewrote the table, a
          value per row, again without a change: the rows' current values, read once from the source. A later
          change of a row overwrites what was copied, so the copy converges like any snapshot read. A table without
          a primary key cannot be matched row by row: refused, naming the table and column.
        Asked once per column and kept."""
        known = self._origins.get((shape.name, column))
        if known is not None:
            return known
        from psycopg import sql as pg_sql

        relation = pg_sql.Identifier(shape.schema, shape.table)
        with psycopg.connect(psycopg_conninfo(self.pipeline.source.sqlalchemy_url), autocommit=True) as source:
            found = source.execute(
                "select atthasmissing, attmissingval::text, format_type(atttypid, atttypmod), atthasdef "
                "from pg_attribute where attrelid = %s::regclass and attname = %s and not attisdropped",
                (relation.as_string(source), column)).fetchone()
            if found is None:
                origin: tuple[str, Any] = ("value", None)  # dropped again since: the next change says so
            elif found[0]:
                missing_text, type_name = found[1], found[2]
                origin = ("value", source.execute(pg_sql.SQL("select ({}::text::{})[1]").format(
                    pg_sql.Literal(missing_text), pg_sql.SQL(type_name + "[]"))).fetchone()[0])
            elif not found[3] or not source.execute(pg_sql.SQL("select exists (select from {} where {} is not null)")
                                                    .format(relation, pg_sql.Identifier(column))).fetchone()[0]:
                origin = ("value", None)
            elif not shape.primary_key:
                raise ApplyError(
                    f"destination {self.name}: {shape.name}.{column} was added at the source with values PostgreSQL "
                    "wrote without a change event (a volatile default rewrote the table), and the table has no "
                    "primary key to copy them by: its rows cannot be made equal to the source's")
            else:
                rows = source.execute(pg_sql.SQL("select {}, {} from {}").format(
                    pg_sql.SQL(", ").join(map(pg_sql.Identifier, shape.primary_key)), pg_sql.Identifier(column),
                    relation)).fetchall()
                origin = ("copy", {tuple(row[:-1]): row[-1] for row in rows})
        self._origins[shape.name, column] = origin
        return origin

    def _absent_columns(self, schema_id: int, table: str) -> list[str]:
        """The table's columns that changes of this writer schema do not carry: they were written before the
        columns existed (a replay of the topics into a table made with them)."""
        absent = self._absent.get(schema_id)
        if absent is None:
            shape = self.shapes.get(table)
            carried = self._converter(schema_id, table).avro_names()
            absent = [c for c in shape.column_names if c not in carried] if shape is not None else []
            self._absent[schema_id] = absent
        return absent

    def _fill_absent(self, table: str, row: dict[str, Any], absent: list[str]) -> dict[str, Any]:
        """A row of a change from before `absent` columns existed, with what the source holds there for it."""
        shape = self.shapes[table]
        for column in absent:
            kind, value = self._column_origin(shape, column)
            row[column] = value if kind == "value" else value.get(tuple(row.get(c) for c in shape.primary_key))
        return row

    def apply(self, steps: list[Step], *, more: bool = False) -> None:
        """Apply steps in one destination transaction, then acknowledge them to Kafka's group offsets. `more`: another
        batch is ready behind this one (a DuckDB file then stays open for it)."""
        offsets = self._offsets_after(steps)
        attempt = 1
        columnar_rows = self.stats.columnar_rows  # a batch applied again counts its rows once
        while True:
            try:
                try:
                    with self._begin(hold=more) as conn:
                        self.dialect.begin_batch(conn, snapshot=any(s.xid is None for s in steps))
                        count = self._write(conn, steps, offsets)
                except Exception as exc:
                    # DuckDB out of its memory limit (rolled back): the limit is raised and the batch tried again.
                    raised = self._holds_file and self.dialect.memory_exhausted(exc)
                    if not raised:
                        raise
                    self.echo(f"{self.name}: {raised}")
                    self.stats.columnar_rows = columnar_rows
                    continue
                break
            except (OperationalError, psycopg.OperationalError) as exc:
                raise ServiceUnavailable(f"destination {self.name} failed: {_first_line(exc)}") from exc
            except (DBAPIError, NoMatchingRow, psycopg.Error, *_duckdb_errors()) as exc:
                if attempt == 1 and self._source_changed_under(steps, exc):
                    attempt = 2
                    self.stats.columnar_rows = columnar_rows
                    continue
                raise ApplyError(f"destination {self.name}: applying {_where(steps)} failed: "
                                 f"{_first_line(exc)}") from exc
        self._acknowledge(steps, offsets)
        self.stats.rows += count
        self.stats.transactions += sum(1 for s in steps if s.xid is not None)
        self.stats.batches += 1
        self.stats.last_applied_at = time.time()
        commit_times = [s.commit_ts_ms for s in steps if s.commit_ts_ms]
        if commit_times:
            self.stats.last_commit_ts_ms = max(commit_times)

    def _acknowledge(self, steps: list[Step], offsets: dict[tuple[str, int], int]) -> None:
        self.applied_positions.update(offsets)
        if self._watermark is not None and any(s.xid == self._watermark for s in steps):
            self._watermark_applied = True
        with self._group_lock:
            self._group_offsets.update(offsets)

    def _commit_group_offsets(self) -> None:
        """Hand the applied offsets to Kafka's consumer group, for lag tools. Only from the thread that consumes:
        a commit from another thread while this one waits in consume() was seen to hang both."""
        with self._group_lock:
            offsets, self._group_offsets = self._group_offsets, {}
        if offsets and self.consumer is not None:
            try:
                self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                     asynchronous=True)
            except KafkaException:
                pass  # group offsets are only for lag tools; the destination holds the truth

    def _apply_with_policy(self, steps: list[Step], *, may_wait: bool = True, more: bool = False) -> None:
        try:
            self.apply(steps, more=more)
            self._retry = []
        except ApplyError as exc:
            if may_wait and isinstance(exc.__cause__, IntegrityError) and any(s.xid is None for s in steps):
                # Snapshot rows of a child may arrive before their parent's, from another partition: wait for
                # more, and try again with what has arrived since.
                self._retry = steps
                return
            if self.policy != "dead-letter":
                raise
            # One step at a time, so that only the source transactions that fail are set aside.
            for step in steps:
                try:
                    self.apply([step])
                except ApplyError as step_error:
                    for event in runs.expand(step.events):
                        self._dead_letter(str(step_error), event.topic, event.partition, event.offset, None, None,
                                          _event_json(event))
                    self._skip(step)
            self._retry = []

    def _skip(self, step: Step) -> None:
        """Record a dead-lettered step's offsets as applied, so that the stream goes on past it."""
        offsets = self._offsets_after([step])
        with self._begin() as conn:
            self.dialect.store_offsets(conn, self.pipeline.pipeline, offsets)
        self._acknowledge([step], offsets)

    def _dead_letter(self, error: str, topic: str, partition: int, offset: int, key: bytes | None,
                     value: bytes | None, event_json: str | None) -> None:
        with self._producer_lock:  # both threads may dead-letter: one producer
            if self._producer is None:
                self._producer = Producer({"bootstrap.servers": self.pipeline.kafka.bootstrap_servers,
                                           "enable.idempotence": True, "log_level": 3})
                self._dead_letters = AvroEncoder(self.registry, f"{self.dead_letter_topic}-value",
                                                 load_schema("dead_letter"))
        assert self._dead_letters is not None
        record = {"pipeline": self.pipeline.pipeline, "destination": self.name, "error": error, "topic": topic,
                  "partition": partition, "offset": offset, "key": key, "value": value, "event_json": event_json,
                  "failed_at_ms": int(time.time() * 1000)}
        failures: list[Any] = []
        self._producer.produce(self.dead_letter_topic, value=self._dead_letters.encode(record), key=key,
                               headers={"cdc.error": error[:1000], "cdc.topic": topic,
                                        "cdc.partition": str(partition), "cdc.offset": str(offset)},
                               on_delivery=lambda err, _msg: failures.append(err) if err is not None else None)
        left = self._producer.flush(30)
        if failures or left:
            # The applier goes past a dead-lettered message: one whose dead letter was not written would be lost.
            raise ServiceUnavailable(f"destination {self.name}: could not write the dead letter of "
                                     f"{topic}[{partition}]@{offset} to {self.dead_letter_topic}: "
                                     f"{failures[0] if failures else 'not acknowledged within 30 s'}")
        self.echo(f"{self.name}: dead-lettered {topic}[{partition}]@{offset}: {error.splitlines()[0]}")

    # -- the loop -------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """Log-end offsets of every assigned partition."""
        assert self.consumer is not None
        return self._offsets([(tp.topic, tp.partition) for tp in self.consumer.assignment()], OffsetSpec.latest())

    def _read_to_end(self) -> bool:
        return all(self.read_positions.get(tp, 0) >= end for tp, end in self.end_offsets().items() if end > 0)

    def caught_up(self, targets: Mapping[tuple[str, int], int]) -> bool:
        if self.assembler.buffered or self.assembler.waiting_for or self._retry:
            return False
        return all(self.read_positions.get(tp, 0) >= end for tp, end in targets.items() if end > 0)

    def _caught_up_to_watermark(self) -> bool:
        """The watermark transaction is applied, and everything written to Kafka before it has been read."""
        return self._watermark_applied and self.caught_up(self.end_offsets())

    def _poll(self) -> int:
        """Read and decode what Kafka has (waiting at most 50 ms); how many messages arrived."""
        assert self.consumer is not None
        # Short waits: at a modest rate a long one would hold each batch back (latency); at a high rate the
        # batch fills first anyway.
        messages = self.consumer.consume(self.poll_messages, 0.05)
        if self._kafka_fatal is not None:
            raise ServiceUnavailable(f"Kafka consumer failed: {self._kafka_fatal.str()}")
        good = []
        for msg in messages:
            if msg.error() is not None:
                if msg.error().fatal():
                    raise ServiceUnavailable(f"Kafka consumer failed: {msg.error()}")
                continue
            good.append(msg)
        if good:
            self._kafka_answered()
        elif self.kafka.down:
            self._probe_kafka()
        if self._blocked_recorded != (outage.since if (outage := self._outage()) else None):
            self._record_blocked()
        self._feed_batch(good)
        return len(messages)

    def _kafka_answered(self) -> None:
        line = self.kafka.recovered()
        if line:
            self.echo(f"{self.name}: {line}")

    def _record_blocked(self) -> None:
        """Say in the destination's `_cdc_status` that an outage of Kafka or of the schema registry blocks this
        applier, for `cdc lag` (BLOCKED, consumers/lag.py reads the "blocked: " prefix), and clear it when the
        outage ends. Best effort."""
        outage = self._outage()
        try:
            with self._begin() as conn:
                self.dialect.record_error(conn, self.pipeline.pipeline, None if outage is None else
                                          f"blocked: {outage.describe()} UTC, retrying ({outage.detail})")
        except DestinationLost:
            raise  # `run` reconnects
        except Exception as exc:  # noqa: BLE001 - the outage line was printed; its record is a convenience
            self.echo(f"{self.name}: could not record the outage at the destination: {_first_line(exc)}")
        self._blocked_recorded = outage.since if outage else None

    def _probe_kafka(self) -> None:
        """During an outage with nothing arriving (an idle pipeline gives no message to tell that Kafka is back):
        ask for the cluster's metadata now and then; the reminder line when one is due."""
        assert self.consumer is not None
        if time.monotonic() - self._kafka_probed >= KAFKA_PROBE_S:
            self._kafka_probed = time.monotonic()
            try:
                self.consumer.list_topics(self.pipeline.transaction_topic, timeout=1.0)
            except KafkaException as exc:
                line = self.kafka.failed(_kafka_reason(exc))
            else:
                self._kafka_answered()
                return
        else:
            line = self.kafka.tick()
        if line:
            self.echo(f"{self.name}: {line}")

    def run(self, *, until_caught_up: bool = False, timeout: float | None = None,
            progress: Callable[["ReplicaApplier"], None] | None = None) -> None:
        """Apply until stopped (or caught up, or the timeout). A destination that goes away is waited for and
        reconnected to, its writer lock taken again (`_recover`); Kafka outages are waited out by the consumer."""
        deadline = time.monotonic() + timeout if timeout else None
        if self.consumer is None:
            try:
                self._prepare_waiting_for_kafka(deadline, progress)
            except (DestinationLost, DestinationUnreachable) as lost:
                # The session ended while the destination was being prepared, or it was not up yet: an applier is a
                # service, started with or before its destination as often as after it. (A wrong login or database
                # name is not waited for.)
                self._recover(lost, deadline)
            if self.consumer is None:  # stopped while waiting
                return
        quiet_garbage_collector()
        if until_caught_up:
            with psycopg.connect(psycopg_conninfo(self.pipeline.source.sqlalchemy_url), autocommit=True) as conn:
                self._watermark = insert_watermark(conn, self.pipeline.source.signal_table)
            self._watermark_applied = False  # a second run on the same applier waits for its own watermark
        while True:
            try:
                self._loop(until_caught_up=until_caught_up, deadline=deadline, timeout=timeout, progress=progress)
                break
            except DestinationLost as lost:
                self._recover(lost, deadline)
                if self.consumer is None:  # stopped while reconnecting
                    break
        self._commit_group_offsets()
        if progress:
            progress(self)

    def _prepare_waiting_for_kafka(self, deadline: float | None,
                                   progress: Callable[["ReplicaApplier"], None] | None) -> None:
        """`prepare`, waiting for a Kafka that does not answer (one line every 30 s, the progress line BLOCKED)
        rather than exiting: an applier is a service, started with or before the broker as often as after it."""
        while not self._stop.is_set():
            try:
                self.prepare()
            except KafkaException as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise ServiceUnavailable(f"Kafka at {self.pipeline.kafka.bootstrap_servers} did not answer: "
                                             f"{_kafka_reason(exc)}") from exc
                line = self.kafka.failed(_kafka_reason(exc))
                if line:
                    self.echo(f"{self.name}: {line}")
                self._record_blocked()  # again each time: `prepare` clears the destination's status
                if progress:
                    progress(self)
                self._stop.wait(KAFKA_PROBE_S)
                continue
            self._kafka_answered()
            if self._blocked_recorded is not None:
                self._record_blocked()
            return

    def _loop(self, *, until_caught_up: bool, deadline: float | None, timeout: float | None,
              progress: Callable[["ReplicaApplier"], None] | None) -> None:
        assert self.consumer is not None
        last_progress = 0.0
        # A batch is written by a worker thread while this one reads and decodes the next: the destination's work
        # (the columnar path leaves little else to a write) overlaps ours. Only reading overlaps: the next steps are
        # taken once the batch in flight has committed or failed, so the retry and dead-letter decisions below see
        # its outcome exactly as if it had run here. Kafka is only touched from this thread.
        writer = ThreadPoolExecutor(1, thread_name_prefix=f"apply-{self.name}")
        in_flight: Future | None = None
        arrived = False  # messages read since the last decision
        try:
            while not self._stop.is_set():
                polled = self._poll()
                arrived = arrived or polled > 0
                if self.assembler.late:
                    self._dead_letter_late()
                if self.assembler.superseded:
                    self._say_superseded()
                backlog = polled >= self.poll_messages and self.assembler.buffered < self.batch_events
                if in_flight is not None:
                    if not in_flight.done() and polled and self.assembler.buffered < self.batch_events:
                        continue  # keep reading while the destination writes
                    future, in_flight = in_flight, None
                    future.result()
                    self._commit_group_offsets()
                if backlog and not self._retry:
                    continue  # fill the batch before writing (each write has a fixed cost)
                steps = self._retry + self.assembler.ready(self.batch_events)
                if not steps and not arrived and self.assembler.holes and self.assembler.waiting_for \
                        and self._read_to_end():
                    # A transaction lost an undecodable (dead-lettered) event and nothing more is coming for it.
                    steps = self.assembler.force_next()
                if not steps and not self._retry and self.assembler.waiting_for:
                    steps = self._incomplete_transaction()
                else:
                    self._incomplete = None
                if steps and (not self._retry or arrived):
                    behind = polled >= self.poll_messages or self.assembler.buffered >= self.batch_events
                    in_flight = writer.submit(self._apply_with_policy, steps, more=behind)
                elif self._retry and not arrived and self.caught_up(self.end_offsets()):
                    self._retry = []
                    self._apply_with_policy(steps, may_wait=False)  # nothing more will come: the failure is real
                if in_flight is None:
                    self._release()  # nothing to write: readers may have the file
                    self._check_lock()  # idle: a destination restarted meanwhile is noticed now, not at the next write
                arrived = False
                self._commit_group_offsets()
                if progress and time.monotonic() - last_progress >= 1:
                    progress(self)
                    last_progress = time.monotonic()
                if until_caught_up and in_flight is None and self._watermark_applied \
                        and not self.kafka.down and self._caught_up_to_watermark():
                    break
                if deadline and time.monotonic() > deadline:
                    raise CdcError(f"{self.name}: not caught up after {timeout:.0f} s "
                                   f"(waiting for source transaction {self.assembler.waiting_for or '-'}"
                                   + (f"; {self.blocked}" if self.blocked else "") + ")")
            if in_flight is not None:
                future, in_flight = in_flight, None
                future.result()
        except CdcError as exc:
            if isinstance(exc, Terminal):
                self._record_error(str(exc))
            raise
        finally:
            if in_flight is not None:
                in_flight.exception()  # failing here: the batch in flight still commits or rolls back whole first
            writer.shutdown(wait=True)
            self._release()

    def _incomplete_transaction(self) -> list[Step]:
        """Called while the next source transaction to apply is missing events and nothing else can be applied.
        Once every partition has been read to its end with it still incomplete (its END record was read, so its
        events were written before what is at those ends), and the destination's grace period has passed, its
        missing events are not coming (routed to a topic this applier does not read, a topic holding another
        database's history...): stop naming them, or, under `on_error: dead-letter`, dead-letter what arrived of it
        and go on without it. Returns no steps: the dead-letter path applies what it must itself."""
        xid = self.assembler.waiting_for
        assert xid is not None
        now = time.monotonic()
        if self._incomplete is None or self._incomplete[0] != xid:
            self._incomplete = (xid, now, None, None)
            return []
        _, first_seen, targets, since = self._incomplete
        if targets is None:
            # Stuck for a second (a transaction is often briefly incomplete at high rates: no request for those):
            # where every partition ends now. Its END record was read, so its events were written before these
            # ends, give or take the producer's delivery, which the grace period covers.
            if now - first_seen < 1.0:
                return []
            self._incomplete = (xid, first_seen, self.end_offsets(), None)
            return []
        if since is None:
            if not all(self.read_positions.get(tp, 0) >= end for tp, end in targets.items() if end > 0):
                return []
            since = now
            self._incomplete = (xid, first_seen, targets, since)
        if now - since < self.destination.incomplete_transaction_grace_s:
            return []
        marker = self.assembler.head
        assert marker is not None
        missing = self.assembler.missing(marker)
        committed = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(marker.commit_ts_ms / 1000))
                     if marker.commit_ts_ms else "at an unknown time")
        reason = (f"source transaction {xid} (committed {committed}, END record at "
                  f"{self.pipeline.transaction_topic}[0]@{marker.offset}) cannot complete: every partition was read "
                  f"to its end and {self.destination.incomplete_transaction_grace_s:g} s passed, but it is missing "
                  + "; ".join(f"{expected - got} of {expected} events of {table} (topic {self.pipeline.topic_of(table)})"
                              for table, (expected, got) in missing.items())
                  + ". Its events went to a topic this applier does not read, or the topics hold another source "
                  "database's history")
        self._incomplete = None
        if self.policy != "dead-letter":
            raise ApplyError(f"destination {self.name}: {reason}")
        steps = self.assembler.force_next()
        given_up = steps.pop()  # the transaction's own step comes last, after snapshot reads before it
        for event in runs.expand(given_up.events):
            self._dead_letter(reason, event.topic, event.partition, event.offset, None, None, _event_json(event))
        # The END record too: a transaction none of whose events arrived still leaves a trace.
        self._dead_letter(reason, self.pipeline.transaction_topic, 0, marker.offset, None, None,
                          json.dumps({"status": marker.status, "id": marker.xid,
                                      "event_counts": dict(marker.event_counts), "ts_ms": marker.commit_ts_ms}))
        if steps:
            self._apply_with_policy(steps, may_wait=False)
        self._skip(given_up)
        return []

    def _say_superseded(self) -> None:
        """Events of a delivery cut short by a crash were set aside for their transaction's copy (see
        consumers.transactions): said once per transaction, since a copy that never came would be a loss."""
        superseded, self.assembler.superseded = self.assembler.superseded, {}
        for xid, count in superseded.items():
            self.echo(f"{self.name}: source transaction {xid}: {count} change(s) of a delivery cut short (Connect or "
                      "the broker stopped before its END record) set aside; Debezium re-sends it whole and the copy "
                      "is applied")

    def _dead_letter_late(self) -> None:
        """Events of a transaction given up that arrived after all: dead-lettered, never applied out of order."""
        late, self.assembler.late = self.assembler.late, []
        for event in runs.expand(late):
            if event.xid in self.assembler.orphaned:
                reason = (f"an event of source transaction {event.xid}, whose END record was lost (a record of "
                          f"{self.pipeline.transaction_topic} did not decode and was dead-lettered): it cannot be "
                          "known complete, so it is dead-lettered, not applied")
            else:
                reason = (f"an event of source transaction {event.xid}, which was dead-lettered as incomplete, "
                          "arrived after it was given up")
            self._dead_letter(reason, event.topic, event.partition, event.offset, None, None, _event_json(event))

    def _record_error(self, error: str) -> None:
        """Leave why this applier stopped in the destination, for `cdc lag` (best effort: it may be unreachable)."""
        try:
            with self._begin() as conn:
                self.dialect.record_error(conn, self.pipeline.pipeline, error)
        except Exception as exc:  # noqa: BLE001 - the error being raised matters more than its record
            self.echo(f"{self.name}: could not record the error at the destination: {_first_line(exc)}")

    def lag_seconds(self) -> float:
        """Now minus the commit time of the oldest change not applied yet; 0 when none is waiting."""
        oldest = self.assembler.oldest_commit_ts()
        return max(0.0, time.time() - oldest / 1000) if oldest else 0.0

    def close(self) -> None:
        if self.consumer is not None:
            if self.applied_positions:
                # The asynchronous commits may still be in flight: lag tools should see where we stopped.
                try:
                    self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in
                                                  self.applied_positions.items()], asynchronous=False)
                except KafkaException:
                    pass
            self.consumer.close()
            self.consumer = None
        if self._producer is not None:
            self._producer.flush(10)
        self._unclaim()
        self.registry.close()
        self.engine.dispose()



def _spelled(column: ColumnShape) -> str:
    """A source column's type as its catalog spells it (`numeric(12,4)`): what a change of type is told by."""
    return column.source.sql if column.source is not None else str(column.type)


def _type_changes(shape: TableShape, fresh: TableShape, differing: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(column, old type, new type) of the columns whose type differs between the shape a destination was made from
    and the source's `fresh` one, or whose destination type (`differing`, from its catalog) differs."""
    changed = [(c.name, _spelled(shape.column(c.name)), _spelled(c)) for c in fresh.columns
               if c.name in shape.column_names and _spelled(shape.column(c.name)) != _spelled(c)]
    known = {column for column, _, _ in changed}
    changed += [(column, stored, _spelled(fresh.column(column))) for column, stored in differing.items()
                if column not in known and column in fresh.column_names]
    return changed


def _labels(column: ColumnShape) -> tuple[str, ...]:
    source = column.source.leaf() if column.source is not None else None
    return source.labels if source is not None else ()


def _relabelled(shape: TableShape, fresh: TableShape) -> bool:
    """Whether an enum column of the table gained labels at the source since the shape was reflected."""
    return any(_labels(c) != _labels(shape.column(c.name)) for c in fresh.columns if c.name in shape.column_names)


def _duckdb_errors() -> tuple[type[BaseException], ...]:
    import duckdb

    return (duckdb.Error,)


def _is_data_error(exc: BaseException) -> bool:
    """A destination's refusal of a value for its column's type (too long, not a label of the enum, out of range):
    the errors a source's silent column change causes. PostgreSQL's class 22, MariaDB's data errors, DuckDB's
    conversion errors."""
    import duckdb
    from sqlalchemy.exc import DataError

    orig = getattr(exc, "orig", None) or exc
    return isinstance(exc, DataError) or isinstance(orig, (psycopg.errors.DataError, duckdb.ConversionException,
                                                             duckdb.InvalidInputException))


def _unreachable(exc: BaseException) -> bool:
    """A connection error that waiting can mend: refused, timed out, the server starting or shutting down. Not a
    login refused or a database that does not exist (those are the pipeline file's to fix)."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, psycopg.Error):
        if orig.sqlstate is not None:
            return orig.sqlstate.startswith(("08", "57P"))
        # libpq gives no SQLSTATE for a connection refused by the server itself, only its message: "FATAL" when
        # the server answered (a login refused, a database that does not exist), unless it was starting or stopping.
        said = str(orig)
        return "FATAL:" not in said or any(state in said for state in (
            "starting up", "shutting down", "in recovery", "too many clients"))
    code = orig.args[0] if orig.args and isinstance(orig.args[0], int) else None
    return code in (2002, 2003, 2006, 2013)  # MariaDB: cannot connect (socket, TCP), server gone, lost


def _kafka_reason(exc: KafkaException) -> str:
    error = exc.args[0] if exc.args else None
    return error.str() if isinstance(error, KafkaError) else str(exc)


def _broken(conn: Any) -> bool:
    """Whether a destination connection's session is gone (the driver knows it after a failure SQLAlchemy did not
    see: psycopg's `broken`, PyMySQL's `open`)."""
    if conn.invalidated or conn.closed:
        return True
    try:
        raw = conn.connection.dbapi_connection
    except Exception:  # noqa: BLE001 - no driver connection left
        return True
    return bool(getattr(raw, "broken", False) or getattr(raw, "closed", False) or getattr(raw, "open", True) is False)


def _session_ended(exc: BaseException) -> bool:
    """A destination error that means the session is gone (SQLSTATE class 08, connection exceptions; 57P01-03, the
    server shutting down or the backend terminated), whatever the driver made of it."""
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None) or ""
    if state.startswith("08") or state in ("57P01", "57P02", "57P03"):
        return True
    # MariaDB (PyMySQL): the server has gone away, lost connection, connection killed.
    code = orig.args[0] if getattr(orig, "args", None) and isinstance(orig.args[0], int) else None
    return code in (2006, 2013, 1927, 4031)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return " ".join(str(orig).split())[:500]


def _where(steps: list[Step]) -> str:
    events = [e for s in steps for e in s.events]
    if not events:
        return "an empty batch"
    tables = sorted({e.table for e in events})
    spans: dict[tuple[str, int], list[int]] = {}
    for e in events:
        spans.setdefault((e.topic, e.partition), []).extend((e.offset, e.last_offset))
    where = ", ".join(f"{t}[{p}]@{min(o)}-{max(o)}" for (t, p), o in sorted(spans.items())[:4])
    return f"{runs.count(events)} changes of {', '.join(tables)} ({where})"


def _event_json(event: ChangeEvent) -> str:
    return json.dumps({"table": event.table, "op": event.op, "key": event.key, "before": event.before,
                       "after": event.after, "lsn": event.lsn, "tx_id": event.tx_id}, default=str)


def quiet_garbage_collector(young: int = 100_000) -> None:
    """Called once an applier is prepared, before its loop: the objects of start-up (modules, SQLAlchemy's
    and pydantic's classes: a few hundred thousand) are moved out of the collector's reach, and the young generation
    is collected every `young` allocations instead of 700.

    Why: every Kafka message is a tracked object, and a poll keeps tens of thousands alive at once, so with the
    defaults they reach the oldest generation and trigger full collections that walk everything start-up left
    behind: a quarter of the reader's time at 1,000,000 changes. Reference counting frees the messages anyway;
    the collector is only needed for cycles, and still runs for them."""
    gc.freeze()  # no collection first: it would cost a tenth of a second, and start-up leaves few cycles behind
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)


def install_signal_handlers(applier: ReplicaApplier) -> None:
    """SIGINT/SIGTERM finish the batch in flight and stop; a second signal interrupts at once."""

    def handler(signum: int, frame: Any) -> None:
        if applier._stop.is_set():
            raise KeyboardInterrupt
        applier.stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


__all__ = ["ReplicaApplier", "ApplyError", "install_signal_handlers", "LSN_COLUMN"]
