"""The destination side of the replica applier: its engine and dialect, the writer lock, destination transactions
(and a DuckDB file's holds), preparing the tables, and writing one batch of source transactions with its offsets."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from cdc.config import Destination, Pipeline
from cdc.errors import DestinationBusy, ServiceUnavailable, driver_reason
from cdc.source_tables import LSN_COLUMN, TableShape, reflect_tables
from consumers.apply import columnar, commit_mark, plan, runs, values
from consumers.apply.copies import CommitMark, describe, split_copies
from consumers.apply.dialects import Dialect, dialect_class, dialect_for
from consumers.apply.dialects.base import NoMatchingRow
from consumers.apply.dialects.duckdb import when_free
from consumers.apply.errors import (
    ApplyError,
    DestinationLost,
    DestinationUnreachable,
    located,
    session_ended,
    unreachable,
    where,
)
from consumers.apply.events import ChangeEvent
from consumers.apply.plan import NO_SCOPE, ReplayScope, dependency_order, net_changes, self_referencing_order
from consumers.apply.source_follow import SourceFollower
from consumers.apply.transactions import SourceUnit

# How long a write waits for readers to let go of a DuckDB file before the applier gives up.
LOCK_PATIENCE_S = 60.0
# While behind, consecutive batches into a DuckDB file share one connection: opening costs ~20 ms and closing
# checkpoints the file, ~100 ms a batch (2.7 of 8.5 s applying 1,000,000 changes). For at most this long, then the
# file is closed for READER_WINDOW_S, so that readers waiting for it (they try every 50 ms) get their turn.
HOLD_S = 5.0
READER_WINDOW_S = 0.2
# How often an idle applier makes sure the session holding its writer lock is still alive: a destination restarted
# while nothing was written must be noticed (and the lock re-taken) before a second applier can take it.
LOCK_CHECK_S = 1.0


@dataclass
class ApplierStats:
    """What an applier has done since it started (the progress line, `cdc run`'s summary, metrics)."""

    rows: int = 0
    transactions: int = 0
    batches: int = 0
    columnar_rows: int = 0  # changes written by the columnar path (consumers.apply.columnar), counted by the writer
    started: float = field(default_factory=time.monotonic)
    last_commit_ts_ms: int | None = None
    last_applied_at: float | None = None  # wall-clock time of the last committed batch

    @property
    def rows_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0


class DestinationWriter:
    """Everything the applier does to its destination. Shares with the applier (and its reader) the `shapes` of
    the source tables, the `applied_positions` the destination holds, and the replay `scope`. A replay makes one
    first, to claim the destination and empty its tables, and hands it to the applier it then runs."""

    def __init__(self, pipeline: Pipeline, name: str, *, scope: ReplayScope = NO_SCOPE,
                 stats: ApplierStats | None = None, stop: threading.Event | None = None,
                 echo: Callable[[str], None] | None = None,
                 screen: Callable[[Any, list[ChangeEvent], list[SourceUnit]], list[ChangeEvent]] | None = None) -> None:
        self.pipeline = pipeline
        self.name = name
        # A topology of sites' look at each batch's ordered events inside the destination transaction, before
        # anything is written (consumers/sites/screen.py: echoes dropped, conflicts decided and recorded).
        self.screen = screen
        self.destination: Destination = pipeline.destinations[name]
        self.shapes: dict[str, TableShape] = {}  # never rebound: the reader and the source follower hold this dict
        self.order: list[str] = []
        self.applied_positions: dict[tuple[str, int], int] = {}  # the applier's, once it adopts this writer
        self.scope = scope
        self.stats = stats or ApplierStats()
        self._stop = stop or threading.Event()
        self.echo = echo or (lambda line: None)
        self.follower: SourceFollower  # set by the applier once its reader (the converters) exists
        url = self.destination.driver_url
        # A DuckDB file: one process may write it, or several read it, so the applier holds it only while writing.
        self.holds_file = dialect_class(url, self.destination.kind).holds_file
        if self.holds_file:
            # No pool: batches open and close the file (`begin`), so that readers can open it between them
            # (DuckDB lets one process write, or several read).
            # A checkpoint when the connection closes (HOLD_S at most), not one whenever 16 MB of log has built up:
            # applying 1,000,000 changes took 5.7 s instead of 6.3.
            self.engine: Engine = create_engine(url, poolclass=NullPool,
                                                connect_args={"config": {"checkpoint_threshold": "1GB"}})
        else:
            self.engine = create_engine(url, pool_size=2, pool_pre_ping=True)
        self.dialect: Dialect = dialect_for(self.engine, self.destination.kind)
        self.dialect.limit_memory()  # bounded where the database allows (DuckDB); raised when a batch needs more
        self._writer_lock: Any = None  # the connection whose session holds the destination's writer lock (claim)
        # A connection kept open between batches (`begin`), and since when; no new one before `_reopen_at`.
        self._held: Any = None
        self._held_since = 0.0
        self._reopen_at = 0.0
        # The writer lock's session is also the one every write goes through (`begin`), one transaction at a time:
        # a write can then never happen without the lock (if the session dies, so does the write).
        self._lock_guard = threading.RLock()
        self._lock_checked = 0.0
        self._applied_pruned_at = 0.0  # when `_keyless_once` last pruned the applied-transactions records
        # The last source commit applied here (consumers/apply/copies.py): re-sent copies of transactions up to it
        # are skipped whole. Read by `prepare`, moved by each batch once it commits.
        self.mark: CommitMark | None = None
        self._next_mark: CommitMark | None = None

    # -- the writer lock --------------------------------------------------------------------------------------------
    def claim(self) -> None:
        """Make this applier the destination's only writer until `close`, or raise DestinationBusy.

        Two appliers on one destination (a `cdc run` left running in another terminal, a `cdc replay` started
        beside it) would write the same rows, and a replay would empty tables under the other. PostgreSQL and
        MariaDB: a lock of the database session (an advisory lock; a user lock), named after the pipeline and the
        destination, which the database releases when the session ends, however the process ends. A DuckDB file
        admits one writing process by itself.

        The session that holds the lock is also the one the applier writes through (`begin`): if it ends (the
        destination restarted, the backend was terminated), the lock and any transaction in flight end with it, so
        no write can happen without the lock; `run` then reconnects and takes the lock again (the applier's
        `_recover`)."""
        if self._writer_lock is not None or self.dialect.writer_lock_sql is None:
            return
        with self._lock_guard:
            try:
                conn = self.engine.connect()
            except OperationalError as exc:
                error = DestinationUnreachable if unreachable(exc) else ServiceUnavailable
                raise error(f"destination {self.name} did not answer: {driver_reason(exc)}") from exc
            try:
                free = self.dialect.try_writer_lock(conn, self.pipeline.name, self.name)
                conn.commit()  # the lock is the session's: not left idle in a transaction
            except OperationalError as exc:
                conn.invalidate()
                conn.close()
                raise ServiceUnavailable(f"destination {self.name} did not answer: {driver_reason(exc)}") from exc
            except BaseException:
                conn.invalidate()
                conn.close()
                raise
            if not free:
                conn.invalidate()
                conn.close()
                raise DestinationBusy(self.name, self.pipeline.name)
            self._writer_lock = conn
            self._lock_checked = time.monotonic()

    def unclaim(self) -> None:
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

    def check_lock(self) -> None:
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
                self.unclaim()
                raise DestinationLost(f"destination {self.name}: the session holding its writer lock ended "
                                      f"({driver_reason(exc)})") from exc
            self._lock_checked = time.monotonic()
        finally:
            self._lock_guard.release()

    # -- destination transactions -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def begin(self, *, hold: bool = False) -> Iterator[Any]:
        """A destination transaction (committed when the block ends, rolled back if it raises). With `hold`, the
        connection stays open for the next one (a DuckDB file only, for at most HOLD_S; see `release`).

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
                    if getattr(exc, "connection_invalidated", False) or session_ended(exc) or _broken(conn):
                        self.unclaim()
                        raise DestinationLost(f"destination {self.name}: its session ended "
                                              f"({driver_reason(exc)})") from exc
                    raise
                self._lock_checked = time.monotonic()  # the session just answered
            return
        # One at a time here too: the reader thread records outages (`record_status`) while a batch may be
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
            if hold and self.holds_file and time.monotonic() - self._held_since < HOLD_S:
                self._held = conn
            else:
                conn.close()
                if self.holds_file and time.monotonic() - self._held_since >= HOLD_S:
                    self._reopen_at = time.monotonic() + READER_WINDOW_S

    def release(self) -> None:
        """Close a connection held between batches."""
        with self._lock_guard:
            conn, self._held = self._held, None
            if conn is not None:
                conn.close()

    def _connect(self) -> Any:
        """A destination connection. A DuckDB file is someone else's while a reader has it open: wait for it, up to
        LOCK_PATIENCE_S, rather than stop replicating."""
        return when_free(self.engine.connect, LOCK_PATIENCE_S, stop=self._stop.is_set)

    # -- preparing ----------------------------------------------------------------------------------------------
    def prepare(self) -> dict[tuple[str, int], int]:
        """Reflect the source tables, create (or follow) them at the destination; the destination's stored
        offsets."""
        fresh = reflect_tables(self.pipeline.source.sqlalchemy_url, self.pipeline.source.tables)
        self.shapes.clear()
        self.shapes.update(fresh)
        try:
            with self.begin() as conn:
                self.dialect.ensure_offsets_table(conn)
                stored = self.dialect.load_offsets(conn, self.pipeline.name)
                commit_mark.ensure(conn)
                mark = commit_mark.load(conn, self.pipeline.name)
                # Void once a replay or a restore moved the offsets back before the END record that set it.
                self.mark = mark if mark and mark.counts(stored.get((self.pipeline.transaction_topic, 0))) else None
                # Tables made elsewhere are taken over only on the pipeline's first run here: the snapshot that
                # refills them is at the start of the topics.
                self.dialect.adopt = (None if not self.destination.adopt_existing_tables else
                                      "" if not stored else
                                      f"pipeline {self.pipeline.name} has already applied changes here, so the "
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
                        self.follower.fill_new_column(conn, self.shapes[table], column)
                if self.destination.read_only_role:  # PostgreSQL analytics destinations (cdc.config)
                    password = self.destination.read_only_password
                    for action in self.dialect.grant_read_only(conn, self.destination.read_only_role,
                                                               password.get_secret_value() if password else None):
                        self.echo(f"{self.name}: {action}")
                self.dialect.record_error(conn, self.pipeline.name, None)  # running again: no longer stopped
        except OperationalError as exc:
            raise ServiceUnavailable(f"destination {self.name} did not answer: {driver_reason(exc)}") from exc
        except DBAPIError as exc:
            raise ApplyError(f"destination {self.name}: preparing its tables failed: {driver_reason(exc)}") from exc
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

    # -- writing ----------------------------------------------------------------------------------------------------
    def apply(self, steps: list[SourceUnit], offsets: dict[tuple[str, int], int], *, more: bool = False) -> int:
        """Write steps and their next `offsets` in one destination transaction; the changes written. `more`:
        another batch is ready behind this one (a DuckDB file then stays open for it). Raises ApplyError naming
        the batch's tables and Kafka positions, ServiceUnavailable (or DestinationLost) when the destination
        failed."""
        attempt = 1
        columnar_rows = self.stats.columnar_rows  # a batch applied again counts its rows once
        while True:
            try:
                try:
                    with self.begin(hold=more) as conn:
                        self.dialect.begin_batch(conn, snapshot=any(s.xid is None for s in steps))
                        written = self._write(conn, steps, offsets)
                    self.mark = self._next_mark  # committed
                    return written
                except Exception as exc:
                    # DuckDB out of its memory limit (rolled back): the limit is raised and the batch tried again.
                    raised = self.dialect.memory_exhausted(exc)
                    if not raised:
                        raise
                    self.echo(f"{self.name}: {raised}")
                    self.stats.columnar_rows = columnar_rows
                    continue
            except (OperationalError, psycopg.OperationalError) as exc:
                raise ServiceUnavailable(f"destination {self.name} failed: {driver_reason(exc)}") from exc
            except (DBAPIError, NoMatchingRow, psycopg.Error, *_duckdb_errors()) as exc:
                if attempt == 1 and self.follower.changed_under(steps, exc, self.begin):
                    attempt = 2
                    self.stats.columnar_rows = columnar_rows
                    continue
                raise ApplyError(f"destination {self.name}: applying {where(steps)} failed: "
                                 f"{driver_reason(exc)}", **located(steps)) from exc

    def _write(self, conn: Any, steps: list[SourceUnit], offsets: dict[tuple[str, int], int]) -> int:
        steps, copies, self._next_mark = split_copies(steps, self.mark)
        if copies:
            # Debezium re-sent them after a restart (at least once): applied again, a copy of an update could
            # re-create a row a later transaction deleted. Their offsets are stored all the same.
            self.echo(f"{self.name}: skipped {describe(copies)}")
        entries = plan.scoped_entries(steps, self.scope)
        self.follower.check_columns(conn, [item for _, item in entries])
        count = runs.count(item for _, item in entries)
        if self.dialect.columnar and self.screen is None:  # a screen sees every event: no columnar path
            entries = self._write_columnar(conn, entries, steps)
        events = plan.ordered_events(entries, steps)
        if self.screen is not None:
            events = self.screen(conn, events, steps)
        # Keyless changes Debezium re-sent: out of both (`events` keeps, for the history, those applied earlier).
        events, state_events = self._keyless_once(conn, events, steps)
        convert = self.follower.convert
        phases = net_changes(state_events, self.shapes, convert)
        if self.dialect.keeps_history:
            for table, appended in plan.history_rows(events, self.shapes, convert).items():
                self.dialect.append_history(conn, self.shapes[table], appended)
        for phase in phases:
            for table in phase.truncate_first:
                self.dialect.truncate(conn, self.shapes[table])
            for table in self.order:
                changes = phase.changes.get(table)
                if changes and changes.upserts:
                    self._upsert(conn, self.shapes[table], list(changes.upserts.values()))
                keyless = phase.keyless.get(table)
                if keyless:
                    # A table without a key, every change in order, where its upserts would go (parents first):
                    # its inserts need their parents, and nothing can reference its rows (no key to reference).
                    self.dialect.apply_keyless(conn, self.shapes[table], keyless)
            for table in reversed(self.order):
                changes = phase.changes.get(table)
                if changes and changes.deletes:
                    keys = list(changes.deletes.values())
                    if not self.dialect.supports_deferred_constraints:
                        keys = list(reversed(self_referencing_order(self.shapes[table], keys)))
                    self.dialect.delete(conn, self.shapes[table], keys)
        self.dialect.end_batch(conn)
        self.dialect.store_offsets(conn, self.pipeline.name, offsets)
        if self._next_mark is not None and self._next_mark != self.mark:
            commit_mark.store(conn, self.pipeline.name, self._next_mark)
        return count

    def _keyless_once(self, conn: Any, events: list[ChangeEvent],
                      steps: list[SourceUnit]) -> tuple[list[ChangeEvent], list[ChangeEvent]]:
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
        pipeline = self.pipeline.name
        xids = plan.keyless_xids(events, self.shapes)
        records = [plan.AppliedRecord(r.source_table, r.xid, r.first_lsn, r.last_lsn, r.end_offset)
                   for r in self.dialect.load_applied(conn, pipeline, xids)]
        state, skipped = plan.already_applied(events, self.shapes, records, self._applied_position)
        self.dialect.record_applied(conn, pipeline,
                                    plan.applied_records(state, self.shapes, plan.end_record_offsets(steps)))
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
        replay left the table as it was (ReplayScope.applied_position)."""
        topic = self.pipeline.transaction_topic
        return self.scope.applied_position(table, topic, self.applied_positions.get((topic, 0), 0))

    def _write_columnar(self, conn: Any, entries: list[tuple[int, Any]],
                        steps: list[SourceUnit]) -> list[tuple[int, Any]]:
        """Write what the columnar path takes, table by table (in any order: the dialects with a columnar path
        have no foreign keys, check them at commit, or in `end_batch`); returns the entries (step number, events
        or runs) left for the general path."""
        if any(item.op == "t" for _, item in entries if isinstance(item, ChangeEvent)):
            return entries  # a truncate orders the batch into phases: the general path's job, whole
        by_table: dict[str, list[tuple[int, runs.ChangeRun]]] = {}
        for n, item in entries:
            by_table.setdefault(item.table, []).append((n, item))
        done: set[int] = set()
        snapshot_steps = {n for n, step in enumerate(steps) if step.xid is None}
        for table, changes in by_table.items():
            shape = self.shapes.get(table)
            schema_ids = {item.schema_id for _, item in changes}
            if shape is None or len(schema_ids) != 1 or not all(isinstance(i, runs.ChangeRun) for _, i in changes):
                continue
            converter = self.follower.converter(schema_ids.pop(), table)
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

    def store_offsets(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Store offsets alone, in a transaction of their own (a dead-lettered step's: the stream goes on past it)."""
        with self.begin() as conn:
            self.dialect.store_offsets(conn, self.pipeline.name, dict(offsets))

    def record_status(self, error: str | None) -> None:
        """Say in the destination's `_cdc_status` why this applier stopped or is blocked (None: it runs), for
        `cdc lag`."""
        with self.begin() as conn:
            self.dialect.record_error(conn, self.pipeline.name, error)

    def close(self) -> None:
        self.release()
        self.unclaim()
        self.engine.dispose()


def _duckdb_errors() -> tuple[type[BaseException], ...]:
    import duckdb

    return (duckdb.Error,)


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
