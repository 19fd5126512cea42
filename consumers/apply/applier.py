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

The parts, one job each: consumers/apply/reader.py (ChangeReader: Kafka, positions, decoding; steps 1, 2 and 6),
consumers/apply/plan.py (what a batch writes, pure; step 4's collapsing and ordering), consumers/apply/writer.py
(DestinationWriter: the writer lock, destination transactions, tables, offsets; steps 4 and 5),
consumers/apply/source_follow.py (the source's table changes followed),
consumers/apply/dead_letters.py (DeadLetterSink). This
module runs them: the loop (step 3, reading overlapped with writing), the error policy, and recovery.

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
  (a replay) as it applies them (consumers/apply/source_follow.py, `_column_origin`).
- Tables without a primary key (captured with REPLICA IDENTITY FULL) are applied change by change: an insert adds
  a row, an update or delete changes exactly one row equal to the whole before image (duplicates stay duplicates),
  and one that matches no row stops. They have no per-row LSN guard: applying them once rests on the offsets stored
  in the same transaction, and, since Debezium re-sends transactions after a crash, on the record of the source
  transactions whose keyless changes were applied (DestinationWriter._keyless_once, `_cdc_applied_transactions`);
  a replay empties them first like every table. The analytics replica stores them the same way (a table without a
  key, duplicates as rows) beside their history.
"""

from __future__ import annotations

import gc
import json
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pyarrow as pa
from confluent_kafka import KafkaException
from sqlalchemy.exc import IntegrityError, OperationalError

from cdc.config import Destination, Pipeline
from cdc.errors import CdcError, DestinationBusy, ServiceUnavailable, Terminal, driver_reason
from cdc.source_tables import LSN_COLUMN, TableShape
from consumers.apply import runs
from consumers.apply.dead_letters import DeadLetterSink, event_json
from consumers.apply.dialects import Dialect
from consumers.apply.errors import ApplyError, DestinationLost, DestinationUnreachable
from consumers.apply.outage import Outage, clock
from consumers.apply.plan import NO_SCOPE, ReplayScope
from consumers.apply.reader import KAFKA_PROBE_S, ChangeReader, kafka_reason
from consumers.apply.source_follow import SourceFollower
from consumers.apply.transactions import COPIES_REMEMBERED, SourceUnit, TransactionAssembler, positions_after
from consumers.apply.writer import ApplierStats, DestinationWriter
from producers.source_admin import insert_watermark, psycopg_conninfo
from schemas.codec import RegistryClient

# Reconnecting to a destination that went away: the first wait, doubled each attempt up to the last.
RECONNECT_FIRST_S = 0.5
# Events held this long with no END record known to take them make the applier read back the END records in front of
# where it started on the transaction topic, once (`_look_back`).
LOOK_BACK_AFTER_S = 2.0
RECONNECT_MAX_S = 30.0


class ReplicaApplier:
    """One destination's applier: a ChangeReader feeding the TransactionAssembler, a DestinationWriter writing
    what it makes ready, and this loop between them (see the module's docstring). `scope`: what a replay asks of
    it (consumers.ops.replay); `writer`: a writer made (and its lock claimed) beforehand, by a replay."""

    def __init__(self, pipeline: Pipeline, destination_name: str, *, batch_events: int | None = None,
                 poll_messages: int = 5_000, echo: Callable[[str], None] | None = None,
                 scope: ReplayScope = NO_SCOPE, writer: DestinationWriter | None = None,
                 screen: Callable[[Any, list[Any], list[SourceUnit]], list[Any]] | None = None) -> None:
        self.pipeline = pipeline
        self.name = destination_name
        self.destination: Destination = pipeline.destinations[destination_name]
        self.policy = self.destination.on_error or "stop"
        self.scope = scope
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
        self.applied_positions: dict[tuple[str, int], int] = {}
        if writer is None:
            writer = DestinationWriter(pipeline, destination_name, scope=scope, stats=self.stats, stop=self._stop,
                                       echo=self._say, screen=screen)
        # The writer shares this applier's positions, scope, stats and stop (one made beforehand is adopted).
        writer.applied_positions = self.applied_positions
        writer.scope, writer.stats, writer._stop, writer.echo = scope, self.stats, self._stop, self._say
        self.writer = writer
        self.dead_letters = DeadLetterSink(pipeline, destination_name, self.registry, self._say)
        self.reader = ChangeReader(pipeline, destination_name, registry=self.registry, shapes=writer.shapes,
                                   columnar=writer.dialect.columnar, scope=scope, policy=self.policy,
                                   poll_messages=poll_messages, dead_letters=self.dead_letters,
                                   on_outage=self._outage_changed, stop=self._stop, echo=self._say)
        # Read ahead of END records: a batch in flight and the next one (see ChangeReader._hold_back).
        self.reader.read_ahead = 2 * self.batch_events
        writer.follower = SourceFollower(pipeline, destination_name, writer.dialect, writer.shapes,
                                         self.reader.converter, self._say)
        self._retry: list[SourceUnit] = []
        self._watermark: str | None = None
        self._watermark_applied = False
        # The transaction at the head of the commit order while it is incomplete and nothing else can be applied:
        # (xid, since when, each partition's end a second later, since when every partition was read to those ends).
        self._incomplete: tuple[str, float, dict[tuple[str, int], int] | None, float | None] | None = None
        # `blocked` says why nothing is applied meanwhile; the reader's outages (Kafka, the registry) are its own.
        self.destination_outage = Outage(f"destination {destination_name}")
        self._blocked_recorded: float | None = None  # the outage recorded in `_cdc_status` (its start)

    def _say(self, line: str) -> None:
        """The parts' way to say something: through `echo` as it is when they speak (a caller may set it later)."""
        self.echo(line)

    # -- what other modules use -----------------------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        return self.writer.engine

    @property
    def dialect(self) -> Dialect:
        return self.writer.dialect

    @property
    def shapes(self) -> dict[str, TableShape]:
        return self.writer.shapes

    @shapes.setter
    def shapes(self, shapes: Mapping[str, TableShape]) -> None:
        # One dict, shared by the reader, the writer and the source follower: filled, never replaced.
        if shapes is not self.writer.shapes:
            self.writer.shapes.clear()
            self.writer.shapes.update(shapes)

    @property
    def assembler(self) -> TransactionAssembler:
        return self.reader.assembler

    @property
    def consumer(self) -> Any:
        return self.reader.consumer

    @property
    def read_positions(self) -> dict[tuple[str, int], int]:
        return self.reader.read_positions

    @property
    def kafka(self) -> Outage:
        return self.reader.kafka

    @property
    def registry_outage(self) -> Outage:
        return self.reader.registry_outage

    @property
    def batch_events(self) -> int:
        """Changes per destination transaction at most (the dialect's choice unless the caller made one)."""
        return self._batch_events or self.writer.dialect.batch_events

    @property
    def group_id(self) -> str:
        return self.reader.group_id

    @property
    def topics(self) -> list[str]:
        return self.reader.topics

    @property
    def dead_letter_topic(self) -> str:
        return self.dead_letters.topic

    def claim(self) -> None:
        """Make this applier the destination's only writer until `close`, or raise DestinationBusy
        (DestinationWriter.claim)."""
        self.writer.claim()

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """Log-end offsets of every assigned partition."""
        return self.reader.end_offsets()

    def stop(self) -> None:
        self._stop.set()

    @property
    def blocked(self) -> str | None:
        """Why nothing can be applied right now (an outage), or None: for the progress line and `cdc lag`."""
        return (self.destination_outage.describe() or self.reader.kafka.describe()
                or self.reader.registry_outage.describe())

    @property
    def reading_paused(self) -> str | None:
        """'3 partition(s) paused (120,000 changes read ahead)' while the reader holds partitions back, else None:
        back-pressure, not a fault (the writer has what was read ahead to apply before more is read)."""
        paused = self.reader.paused
        if not paused:
            return None
        return f"{paused} partition(s) paused ({self.reader.assembler.held_in_memory:,} changes read ahead)"

    def lag_seconds(self) -> float:
        """Now minus the commit time of the oldest change not applied yet; 0 when none is waiting."""
        oldest = self.reader.assembler.oldest_commit_ts()
        return max(0.0, time.time() - oldest / 1000) if oldest else 0.0

    # -- outages, recorded at the destination ---------------------------------------------------------------------
    def _outage(self) -> Outage | None:
        """The outage of a service the applier reads from (Kafka first), if any: what `_cdc_status` says."""
        return next((o for o in (self.reader.kafka, self.reader.registry_outage) if o.down), None)

    def _outage_changed(self) -> None:
        """The reader's call after each poll and while it waits for the registry: record an outage that began or
        ended since the last record."""
        outage = self._outage()
        if self._blocked_recorded != (outage.since if outage else None):
            self._record_blocked()

    def _record_blocked(self) -> None:
        """Say in the destination's `_cdc_status` that an outage of Kafka or of the schema registry blocks this
        applier, for `cdc lag` (BLOCKED, consumers/lag/status.py reads the "blocked: " prefix), and clear it when the
        outage ends. Best effort."""
        outage = self._outage()
        try:
            self.writer.record_status(None if outage is None else
                                      f"blocked: {outage.describe()} UTC, retrying ({outage.detail})")
        except DestinationLost:
            raise  # `run` reconnects
        except Exception as exc:  # noqa: BLE001 - the outage line was printed; its record is a convenience
            self.echo(f"{self.name}: could not record the outage at the destination: {driver_reason(exc)}")
        self._blocked_recorded = outage.since if outage else None

    def _record_error(self, error: str) -> None:
        """Leave why this applier stopped in the destination, for `cdc lag` (best effort: it may be unreachable)."""
        try:
            self.writer.record_status(error)
        except Exception as exc:  # noqa: BLE001 - the error being raised matters more than its record
            self.echo(f"{self.name}: could not record the error at the destination: {driver_reason(exc)}")

    # -- set-up ---------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the offsets table and the replicated tables as needed, then position the consumer."""
        self.writer.claim()
        topics = self.reader.ask_topics()  # answered while the destination is prepared
        stored = self.writer.prepare()
        self.applied_positions.update(self.reader.assign(topics(), stored))

    def _recover(self, lost: BaseException, deadline: float | None) -> None:
        """The destination went away (DestinationLost): reconnect with backoff, a line per attempt (at most 30 s
        apart), take the writer lock again, and resume from the offsets the destination stored (what was read but
        not committed there is read again: a batch whose commit was cut off is found applied, or applied again).
        Another applier holding the lock by then stops this one: two must never write the same destination."""
        self.destination_outage.failed(driver_reason(lost))
        if isinstance(lost, DestinationUnreachable):
            self.echo(f"{self.name}: the destination does not answer ({driver_reason(lost.__cause__ or lost)}); "
                      "waiting for it: nothing is written until it answers and its writer lock is taken")
        else:
            self.echo(f"{self.name}: lost the destination ({driver_reason(lost.__cause__ or lost)}); its writer lock "
                      "went with its session, nothing is written until it is taken again; reconnecting")
        self.writer.unclaim()
        self.writer.release()
        self.reader.reset()
        self.applied_positions.clear()
        self._retry = []
        self._incomplete = None
        delay = RECONNECT_FIRST_S
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            try:
                self.prepare()
            except DestinationBusy as busy:
                raise CdcError(
                    f"destination {self.name}: this applier lost its writer lock when the destination's session "
                    f"ended ({driver_reason(lost.__cause__ or lost)}), and another applier holds it now; stopping so "
                    "that only one writes the destination",
                    hint="one applier at a time: two would write the same rows") from busy
            except (ServiceUnavailable, OperationalError, KafkaException) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise CdcError(f"destination {self.name} still unreachable at the end of the timeout: "
                                   f"{driver_reason(exc)}") from exc
                self.reader.reset()  # prepared up to the consumer, then failed
                self.echo(f"{self.name}: destination still unreachable (attempt {attempt}, down since "
                          f"{clock(self.destination_outage.since or time.time())} UTC): {driver_reason(exc)}; "
                          f"next attempt in {delay:.1f} s")
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            self.destination_outage.recovered()
            self.echo(f"{self.name}: reconnected to the destination (attempt {attempt}) and took its writer lock "
                      "again; resuming from its stored offsets")
            return

    # -- applying -------------------------------------------------------------------------------------------------
    def _offsets_after(self, steps: list[SourceUnit]) -> dict[tuple[str, int], int]:
        """Next offsets after these steps (data partitions and the transaction topic), computed once per batch."""
        offsets = positions_after(steps)
        markers = [s.marker_offset for s in steps if s.marker_offset is not None]
        if markers:
            offsets[self.pipeline.transaction_topic, 0] = max(markers) + 1
        return offsets

    def apply(self, steps: list[SourceUnit], *, more: bool = False) -> None:
        """Apply steps in one destination transaction, then acknowledge them to Kafka's group offsets. `more`: another
        batch is ready behind this one (a DuckDB file then stays open for it)."""
        offsets = self._offsets_after(steps)
        count = self.writer.apply(steps, offsets, more=more)
        self._acknowledge(steps, offsets)
        self.stats.rows += count
        self.stats.transactions += sum(1 for s in steps if s.xid is not None)
        self.stats.batches += 1
        self.stats.last_applied_at = time.time()
        commit_times = [s.commit_ts_ms for s in steps if s.commit_ts_ms]
        if commit_times:
            self.stats.last_commit_ts_ms = max(commit_times)

    def _acknowledge(self, steps: list[SourceUnit], offsets: dict[tuple[str, int], int]) -> None:
        self.applied_positions.update(offsets)
        if self._watermark is not None and any(s.xid == self._watermark for s in steps):
            self._watermark_applied = True
        self.reader.acknowledge(offsets)

    def _apply_with_policy(self, steps: list[SourceUnit], *, may_wait: bool = True, more: bool = False) -> None:
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
                        self.dead_letters.send(str(step_error), event.topic, event.partition, event.offset, None,
                                               None, event_json(event))
                    self._skip(step)
            self._retry = []

    def _skip(self, step: SourceUnit) -> None:
        """Record a dead-lettered step's offsets as applied, so that the stream goes on past it."""
        offsets = self._offsets_after([step])
        self.writer.store_offsets(offsets)
        self._acknowledge([step], offsets)

    # -- the loop -------------------------------------------------------------------------------------------------
    def caught_up(self, targets: Mapping[tuple[str, int], int]) -> bool:
        assembler = self.reader.assembler
        if assembler.buffered or assembler.waiting_for or self._retry:
            return False
        return self.reader.read_to_end(targets)

    def _caught_up_to_watermark(self) -> bool:
        """The watermark transaction is applied, and everything written to Kafka before it has been read."""
        return self._watermark_applied and self.caught_up(self.end_offsets())

    def run(self, *, until_caught_up: bool = False, timeout: float | None = None,
            progress: Callable[[ReplicaApplier], None] | None = None) -> None:
        """Apply until stopped (or caught up, or the timeout). A destination that goes away is waited for and
        reconnected to, its writer lock taken again (`_recover`); Kafka outages are waited out by the consumer."""
        deadline = time.monotonic() + timeout if timeout else None
        if self.reader.consumer is None:
            try:
                self._prepare_waiting_for_kafka(deadline, progress)
            except (DestinationLost, DestinationUnreachable) as lost:
                # The session ended while the destination was being prepared, or it was not up yet: an applier is a
                # service, started with or before its destination as often as after it. (A wrong login or database
                # name is not waited for.)
                self._recover(lost, deadline)
            if self.reader.consumer is None:  # stopped while waiting
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
                if self.reader.consumer is None:  # stopped while reconnecting
                    break
            except KafkaException as exc:
                # A request of ours Kafka refused (not the consumer's own errors, which come as outages): a broker
                # settling after a restart, mostly. Transient: `cdc run` starts this destination again after a
                # backoff, from the offsets stored with its rows.
                raise ServiceUnavailable(f"Kafka refused a request: {kafka_reason(exc)}") from exc
        self.reader.commit_group_offsets()
        if progress:
            progress(self)

    def _prepare_waiting_for_kafka(self, deadline: float | None,
                                   progress: Callable[[ReplicaApplier], None] | None) -> None:
        """`prepare`, waiting for a Kafka that does not answer (one line every 30 s, the progress line BLOCKED)
        rather than exiting: an applier is a service, started with or before the broker as often as after it."""
        while not self._stop.is_set():
            try:
                self.prepare()
            except KafkaException as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise ServiceUnavailable(f"Kafka at {self.pipeline.kafka.bootstrap_servers} did not answer: "
                                             f"{kafka_reason(exc)}") from exc
                line = self.reader.kafka.failed(kafka_reason(exc))
                if line:
                    self.echo(f"{self.name}: {line}")
                self._record_blocked()  # again each time: `prepare` clears the destination's status
                if progress:
                    progress(self)
                self._stop.wait(KAFKA_PROBE_S)
                continue
            self.reader.kafka_answered()
            if self._blocked_recorded is not None:
                self._record_blocked()
            return

    def _loop(self, *, until_caught_up: bool, deadline: float | None, timeout: float | None,
              progress: Callable[[ReplicaApplier], None] | None) -> None:
        reader, writer = self.reader, self.writer
        assert reader.consumer is not None
        last_progress = 0.0
        # A batch is written by a worker thread while this one reads and decodes the next: the destination's work
        # (the columnar path leaves little else to a write) overlaps ours. Only reading overlaps: the next steps are
        # taken once the batch in flight has committed or failed, so the retry and dead-letter decisions below see
        # its outcome exactly as if it had run here. Kafka is only touched from this thread.
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"apply-{self.name}")
        in_flight: Future | None = None
        arrived = False  # messages read since the last decision
        stranded_since: float | None = None  # since when events wait with no END record known (`_look_back`)
        try:
            while not self._stop.is_set():
                polled = reader.poll()
                assembler = reader.assembler
                arrived = arrived or polled > 0
                if assembler.late:
                    self._dead_letter_late()
                if assembler.superseded:
                    self._say_superseded()
                backlog = polled >= self.poll_messages and assembler.buffered < self.batch_events
                if in_flight is not None:
                    if not in_flight.done() and polled and assembler.buffered < self.batch_events:
                        continue  # keep reading while the destination writes
                    future, in_flight = in_flight, None
                    future.result()
                    reader.commit_group_offsets()
                if backlog and not self._retry:
                    continue  # fill the batch before writing (each write has a fixed cost)
                assembler.mark = self.writer.mark  # tells re-sent transactions (deliveries cut short) from new ones
                steps = self._retry + assembler.ready(self.batch_events)
                if steps or reader.looked_back or not assembler.stranded:
                    stranded_since = None
                elif stranded_since is None:
                    stranded_since = time.monotonic()
                elif time.monotonic() - stranded_since >= LOOK_BACK_AFTER_S:
                    steps = self._look_back()
                if not steps and not arrived and assembler.holes and assembler.waiting_for \
                        and reader.read_to_end():
                    # A transaction lost an undecodable (dead-lettered) event and nothing more is coming for it.
                    steps = assembler.force_next()
                if not steps and not self._retry and assembler.waiting_for:
                    steps = self._incomplete_transaction()
                else:
                    self._incomplete = None
                if steps and (not self._retry or arrived):
                    behind = polled >= self.poll_messages or assembler.buffered >= self.batch_events
                    in_flight = pool.submit(self._apply_with_policy, steps, more=behind)
                elif self._retry and not arrived and self.caught_up(self.end_offsets()):
                    self._retry = []
                    self._apply_with_policy(steps, may_wait=False)  # nothing more will come: the failure is real
                if in_flight is None:
                    if self.scope.skip_before_ms is not None:
                        self._store_read_past()
                    writer.release()  # nothing to write: readers may have the file
                    writer.check_lock()  # idle: a destination restarted meanwhile is noticed now, not at the next write
                arrived = False
                reader.commit_group_offsets()
                if progress and time.monotonic() - last_progress >= 1:
                    progress(self)
                    last_progress = time.monotonic()
                if until_caught_up and in_flight is None and self._watermark_applied \
                        and not reader.kafka.down and self._caught_up_to_watermark():
                    break
                if deadline and time.monotonic() > deadline:
                    raise CdcError(f"{self.name}: not caught up after {timeout:.0f} s "
                                   f"(waiting for source transaction {assembler.waiting_for or '-'}"
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
            pool.shutdown(wait=True)
            writer.release()

    def _look_back(self) -> list[SourceUnit]:
        """Events wait at the front of their partitions and no END record known takes them. They may be repeats of
        transactions this destination took before this run: Debezium re-sent them after a crash and was cut short
        again before their END records, which were read (and their offsets stored) by an earlier run. The END
        records in front of where this run started on the transaction topic tell; the assembler then takes those
        events as repeats, to skip (said as re-sent copies). Once per assignment: what this run reads it knows."""
        assembler = self.reader.assembler
        assembler.taken_before(self.reader.ends_before_start(COPIES_REMEMBERED))
        return assembler.ready(self.batch_events)

    def _store_read_past(self) -> None:
        """`cdc replay --from TIME` reads past the changes committed before TIME that the destination had applied
        (ReplayScope.skipped), and no step stores their offsets. Once nothing read waits in the assembler (every
        change read is applied or read past), the positions read are stored as applied: else the next `cdc run`
        reads them again, and copies Debezium re-sent at the end of a partition wait there for END records its
        stored offset of the transaction topic is already past. Called between batches, never with one in flight."""
        assembler = self.reader.assembler
        if assembler.buffered or assembler.waiting_for or self._retry:
            return
        ahead = {tp: position for tp, position in self.reader.read_positions.items()
                 if position > self.applied_positions.get(tp, 0)}
        if ahead:
            self.writer.store_offsets(ahead)
            self._acknowledge([], ahead)

    def _incomplete_transaction(self) -> list[SourceUnit]:
        """Called while the next source transaction to apply is missing events and nothing else can be applied.
        Once every partition has been read to its end with it still incomplete (its END record was read, so its
        events were written before what is at those ends), and the destination's grace period has passed, its
        missing events are not coming (routed to a topic this applier does not read, a topic holding another
        database's history...): stop naming them, or, under `on_error: dead-letter`, dead-letter what arrived of it
        and go on without it. Returns no steps: the dead-letter path applies what it must itself."""
        assembler = self.reader.assembler
        xid = assembler.waiting_for
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
            if not self.reader.read_to_end(targets):
                return []
            since = now
            self._incomplete = (xid, first_seen, targets, since)
        if now - since < self.destination.incomplete_transaction_grace_s:
            return []
        marker = assembler.head
        assert marker is not None
        missing = assembler.missing(marker)
        committed = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(marker.commit_ts_ms / 1000))
                     if marker.commit_ts_ms else "at an unknown time")
        reason = (f"source transaction {xid} (committed {committed}, END record at "
                  f"{self.pipeline.transaction_topic}[0]@{marker.offset}) cannot complete: every partition was read "
                  f"to its end and {self.destination.incomplete_transaction_grace_s:g} s passed, but it is missing "
                  + "; ".join(f"{expected - got} of {expected} events of {table} "
                              f"(topic {self.pipeline.topic_of(table)})" for table, (expected, got) in missing.items())
                  + ". Its events went to a topic this applier does not read, or the topics hold another source "
                  "database's history")
        self._incomplete = None
        if self.policy != "dead-letter":
            tables = list(missing)
            raise ApplyError(f"destination {self.name}: {reason}", table=tables[0] if len(tables) == 1 else None,
                             topic=self.pipeline.transaction_topic, partition=0,
                             offsets=(marker.offset, marker.offset))
        steps = assembler.force_next()
        given_up = steps.pop()  # the transaction's own step comes last, after snapshot reads before it
        for event in runs.expand(given_up.events):
            self.dead_letters.send(reason, event.topic, event.partition, event.offset, None, None, event_json(event))
        # The END record too: a transaction none of whose events arrived still leaves a trace.
        self.dead_letters.send(reason, self.pipeline.transaction_topic, 0, marker.offset, None, None,
                               json.dumps({"status": marker.status, "id": marker.xid,
                                           "event_counts": dict(marker.event_counts), "ts_ms": marker.commit_ts_ms}))
        if steps:
            self._apply_with_policy(steps, may_wait=False)
        self._skip(given_up)
        return []

    def _say_superseded(self) -> None:
        """Events of a delivery cut short by a crash were set aside for their transaction's copy (see
        consumers.apply.transactions): said, naming the transactions, since a copy that never came would be a loss."""
        assembler = self.reader.assembler
        superseded, assembler.superseded = assembler.superseded, {}
        # One line per poll, not per transaction: a broker SIGKILL set aside changes of 80 transactions at once.
        named = ", ".join(f"{xid} ({count})" for xid, count in list(superseded.items())[:5])
        more = f" and {len(superseded) - 5} more" if len(superseded) > 5 else ""
        self.echo(f"{self.name}: {sum(superseded.values())} change(s) of deliveries cut short (Connect or the broker "
                  f"stopped before their END records) set aside, of source transaction(s) {named}{more}; Debezium "
                  "re-sends each whole and the copy is applied")

    def _dead_letter_late(self) -> None:
        """Events of a transaction given up that arrived after all: dead-lettered, never applied out of order."""
        assembler = self.reader.assembler
        late, assembler.late = assembler.late, []
        for event in runs.expand(late):
            if event.xid in assembler.orphaned:
                reason = (f"an event of source transaction {event.xid}, whose END record was lost (a record of "
                          f"{self.pipeline.transaction_topic} did not decode and was dead-lettered): it cannot be "
                          "known complete, so it is dead-lettered, not applied")
            else:
                reason = (f"an event of source transaction {event.xid}, which was dead-lettered as incomplete, "
                          "arrived after it was given up")
            self.dead_letters.send(reason, event.topic, event.partition, event.offset, None, None, event_json(event))

    def close(self) -> None:
        self.reader.close(self.applied_positions)
        self.dead_letters.close()
        self.writer.close()
        self.registry.close()


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


__all__ = ["ReplicaApplier", "ApplierStats", "ApplyError", "DestinationLost", "DestinationUnreachable", "ReplayScope",
           "install_signal_handlers", "quiet_garbage_collector", "LSN_COLUMN"]
