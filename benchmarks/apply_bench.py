"""Throughput, latency and memory of the replica applier, with the Debezium JDBC sink on the same topic as baseline.

    .venv/bin/python -m benchmarks.apply_bench [--rows N] [--latency-rate R] [--latency-seconds S] [--quick]

Starts the local stack (idempotent; never stops it), builds a fresh source database, pipeline and connector, and
measures (details in benchmarks/README.md):

1. throughput: N changes are loaded into the source and captured into Kafka first; then our applier (`cdc run
   --until-caught-up` as a subprocess, so its peak RSS is the real process's) and the Debezium JDBC sink (one
   fresh destination database per batch size tried) each read the same topic from the beginning into a fresh
   PostgreSQL database, timed until the destination holds the source's rows;
2. latency: our applier runs continuously while a writer commits small transactions at a steady rate, and a
   poller on the destination notes when each row becomes visible.

The figures are printed and prepended to benchmarks/RESULTS.md (newest run first). Everything the run created
(databases, connectors, slot, publication, topics, consumer groups) is removed at the end; the stack stays up.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy.engine import make_url

from benchmarks.common import (
    CDC,
    MARK_DETAILS,
    MARK_ROWS,
    RESULTS,
    RESULTS_PREAMBLE,
    Databases,
    attempt,
    delete_groups,
    details_head,
    finish,
    harness_parser,
    log,
    machine_cell,
    machine_info,
    mark,
    number,
    parse_rows,
    percentile,
    run_measured,
    session,
    sustained_rate,
)
from benchmarks.workload import (
    CHECKSUM,
    TRANSACTION_ROWS,
    BenchPipeline,
    Checksum,
    capture_timeout,
    checksum,
    inserted_rows,
    replica,
    timeout_for,
)

# The goals this harness checks (they live here, never in tests: a test must not fail on a slow machine).
TARGET_ROWS_PER_S = 50_000
TARGET_RATIO = 10.0
TARGET_P99_MS = 500.0
TARGET_LATENCY_RATE = 2_000
TARGET_RSS_MB = 300.0

LATENCY_BASE = 1_000_000_000  # ids written by the latency phase, clear of the throughput rows
JDBC_SINK = "io.debezium.connector.jdbc.JdbcSinkConnector"

# ---------------------------------------------------------------------------------------------------------------
# results


@dataclass
class OursResult:
    wall_s: float
    rows_per_s: float
    peak_rss_mb: float
    first_row_s: float | None  # when the destination first showed a row, from the start of the process
    matched_s: float | None  # when the destination's checksum first equalled the source's
    overhead_s: float | None  # wall time of a second run with nothing to apply (start-up, watermark, close)
    applied_line: str
    sustained: float | None = None  # rows/s of the insert phase at the destination (Watcher.sustained)


@dataclass
class JdbcResult:
    label: str
    batch_size: int
    unnest: bool
    seconds: float | None = None
    rows_per_s: float | None = None
    first_row_s: float | None = None
    error: str | None = None
    sustained: float | None = None


@dataclass
class LatencyResult:
    rate: float  # target rows/s
    achieved_rate: float
    seconds: float
    rows: int
    rows_per_transaction: int
    seen: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    capture_p50_ms: float | None  # commit -> the record's Kafka timestamp (Debezium and Connect)
    capture_p99_ms: float | None
    apply_p50_ms: float | None  # Kafka timestamp -> visible at the destination (our applier)
    apply_p99_ms: float | None
    applier_rss_mb: float
    applier_exit: int


@dataclass
class Report:
    started: datetime
    args: argparse.Namespace
    machine: dict[str, str]
    rows: int
    capture_s: float | None = None
    ours: OursResult | None = None
    jdbc: list[JdbcResult] = field(default_factory=list)
    latency: LatencyResult | None = None
    profile: str | None = None
    source_poll_ms: str = "?"  # Debezium's poll.interval.ms as the run's connector had it
    errors: list[str] = field(default_factory=list)

    @property
    def best_jdbc(self) -> JdbcResult | None:
        done = [j for j in self.jdbc if j.rows_per_s]
        return max(done, key=lambda j: j.rows_per_s or 0) if done else None


# ---------------------------------------------------------------------------------------------------------------
# watching a destination


class Watcher(threading.Thread):
    """Polls a destination's count and checksum; notes when a first row appears and when it equals the source's."""

    def __init__(self, url: str, expected: Checksum, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url, self.expected, self.interval = url, expected, interval
        self.first_row: float | None = None
        self.matched: float | None = None
        self.last: Checksum | None = None
        self.samples: list[tuple[float, int]] = []  # (when, row count)
        self._halt = threading.Event()

    def run(self) -> None:
        conn = None
        while not self._halt.is_set() and self.matched is None:
            try:
                if conn is None:
                    conn = psycopg.connect(self.url, autocommit=True)
                now = time.monotonic()
                count, qty, price = conn.execute(CHECKSUM).fetchone()
                self.last = (int(count), int(qty), Decimal(price))
                self.samples.append((now, int(count)))
                if count and self.first_row is None:
                    self.first_row = now
                if self.last == self.expected:
                    self.matched = now
            except psycopg.errors.UndefinedTable:
                pass  # not created yet
            except psycopg.OperationalError:
                conn = None  # the database is being set up or dropped; try again
            self._halt.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def sustained(self, rows: int, low: float = 0.1, high: float = 0.9) -> float | None:
        """Rows/s while the destination's row count went from `low` to `high` of `rows` (the inserts): the steady
        rate, without start-up or the last batch's tail. Measured the same way for every consumer."""
        return sustained_rate(self.samples, rows, low, high)


# ---------------------------------------------------------------------------------------------------------------
# the connector's polling


def set_source_poll_interval(pipeline: Any, milliseconds: int) -> None:
    """Override Debezium's poll.interval.ms (500 by default) on this run's connector only, to show its share of the
    latency; the product's configuration (producers/debezium.py) is not touched."""
    from producers.connect import ConnectClient

    name = pipeline.connector_name
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        current = {k: v for k, v in (connect.config(name) or {}).items() if k != "name"}
        # Stopped first, as `cdc connectors apply` does, so that what runs afterwards is surely the new config.
        connect.stop(name)
        connect.wait_state(name, "STOPPED")
        connect.put_config(name, {**current, "poll.interval.ms": str(milliseconds)})
        connect.resume(name)
        connect.wait_running(name, timeout=120)


def source_poll_interval(pipeline: Any) -> str:
    from producers.connect import ConnectClient

    with ConnectClient(pipeline.kafka.connect_url) as connect:
        config = connect.config(pipeline.connector_name) or {}
    return config.get("poll.interval.ms", "500 (Debezium's default)")


# ---------------------------------------------------------------------------------------------------------------
# throughput: our applier


def bench_ours(config_path: Path, url: str, rows: int, expected: Checksum) -> OursResult:
    timeout = timeout_for(rows)
    argv = [CDC, "-c", str(config_path), "run", "replica", "--until-caught-up", "--timeout", f"{timeout:.0f}"]
    watcher = Watcher(url, expected)
    started: dict[str, float] = {}

    def on_start() -> None:
        started["t"] = time.monotonic()
        watcher.start()

    log(f"ours: {' '.join(argv[1:])}")
    result = run_measured(argv, timeout + 60, on_start)
    watcher.stop()
    if result.returncode != 0:
        raise RuntimeError(f"our applier exited with {result.returncode}:\n{result.output[-3000:]}")
    final = checksum(url)
    if final != expected:
        raise RuntimeError(f"our destination differs from the source after catching up: {final} != {expected}")
    applied = next((line for line in result.output.splitlines() if "applied" in line), "")
    log(f"ours: {rows:,} changes in {result.wall_s:.2f} s = {rows / result.wall_s:,.0f} rows/s, "
        f"peak RSS {result.max_rss_kib / 1024:.0f} MB ({applied.strip()})")
    # The same command with nothing left to apply: its wall time is the fixed cost inside the figure above
    # (interpreter and imports, reflection, consumer assignment, the watermark's trip through Debezium, close).
    again = run_measured(argv, 300)
    overhead = again.wall_s if again.returncode == 0 else None
    log(f"ours: a second run with nothing to apply took {again.wall_s:.2f} s (exit {again.returncode})")
    t0 = started["t"]
    return OursResult(
        wall_s=result.wall_s, rows_per_s=rows / result.wall_s, peak_rss_mb=result.max_rss_kib / 1024,
        first_row_s=watcher.first_row - t0 if watcher.first_row else None,
        matched_s=watcher.matched - t0 if watcher.matched else None,
        overhead_s=overhead, applied_line=applied.strip(), sustained=watcher.sustained(inserted_rows(rows)))


def profile_ours(data: dict[str, Any], dbs: Databases, run_id: str, rows: int, out_dir: Path) -> str:
    """The throughput phase again, in-process under pyinstrument, into a fresh database: where the time goes."""
    try:
        from pyinstrument import Profiler
        from pyinstrument.renderers import ConsoleRenderer
    except ImportError:
        return "pyinstrument is not installed (.venv/bin/pip install pyinstrument)"
    from cdc import config
    from consumers.apply.applier import ReplicaApplier

    url = dbs.create(f"bench_prof_{run_id}")
    pipeline = config.parse({**data, "destinations": {"profile": {"kind": "replica", "url": url}}}, "profile")
    applier = ReplicaApplier(pipeline, "profile")
    profiler = Profiler(interval=0.001)
    try:
        profiler.start()
        started = time.monotonic()
        applier.run(until_caught_up=True, timeout=timeout_for(rows))
        elapsed = time.monotonic() - started
        profiler.stop()
    finally:
        applier.close()
    header = (f"in-process under pyinstrument: {applier.stats.rows:,} rows in {elapsed:.2f} s "
              f"({applier.stats.rows / elapsed:,.0f} rows/s), {applier.stats.batches} batches, "
              f"{applier.stats.transactions} source transactions\n")
    tree = profiler.output(ConsoleRenderer(unicode=False, color=False, show_all=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile-{run_id}.txt").write_text(header + "\n" + tree)
    (out_dir / f"profile-{run_id}.html").write_text(profiler.output_html())
    log(f"profile: {header.strip()}; written to {out_dir}/profile-{run_id}.txt and .html")
    dbs.drop(f"bench_prof_{run_id}")
    # The call tree, without pyinstrument's banner (everything up to its "Profile at" line). Its flat view is
    # not used: it lumps every function's "[self]" time of one file together.
    lines = tree.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("Profile at")), 0)
    return header + "\n".join(line for line in lines[start:] if line.strip())


# ---------------------------------------------------------------------------------------------------------------
# throughput: the Debezium JDBC sink


def jdbc_config(layout: Any, database: str, topic: str, batch_size: int, unnest: bool, tasks: int) -> dict[str, str]:
    from producers import debezium

    url = make_url(layout.postgres_url(database))
    registry = debezium.registry_native_url(layout.urls()["schema_registry"])
    return {
        "connector.class": JDBC_SINK,
        "tasks.max": str(tasks),
        "topics": topic,
        "connection.url": f"jdbc:postgresql://{url.host}:{url.port}/{database}",
        "connection.username": url.username or "",
        "connection.password": url.password or "",
        # The sink reads Debezium's envelopes natively: no ExtractNewRecordState.
        "insert.mode": "upsert",
        "primary.key.mode": "record_key",
        "delete.enabled": "true",
        "schema.evolution": "basic",
        "collection.name.format": "bench_item",
        "batch.size": str(batch_size),
        "dialect.postgres.unnest.insert.enabled": "true" if unnest else "false",
        # Connect's sink consumer returns 500 records per poll by default, which would cap every batch at 500.
        "consumer.override.max.poll.records": str(max(batch_size, 5_000)),
        "consumer.override.auto.offset.reset": "earliest",
        # The same converter settings the source connector writes with (Confluent framing, content ids).
        **debezium._avro_converter("key.converter", registry, per_record=False),
        **debezium._avro_converter("value.converter", registry, per_record=True),
    }


def bench_jdbc(layout: Any, dbs: Databases, run_id: str, topic: str, rows: int, expected: Checksum,
               batch_size: int, unnest: bool, tasks: int) -> JdbcResult:
    from producers.connect import ConnectClient

    label = f"batch {batch_size}" + (", unnest" if unnest else "")
    slug = f"b{batch_size}{'u' if unnest else ''}"
    result = JdbcResult(label, batch_size, unnest)
    database = f"bench_jdbc_{run_id}_{slug}"
    url = dbs.create(database)
    name = f"bench-jdbc-{run_id}-{slug}"  # also names the sink's consumer group (connect-<name>): fresh per run
    timeout = capture_timeout(rows)
    watcher = Watcher(url, expected)
    with ConnectClient(layout.urls()["connect"]) as connect:
        try:
            watcher.start()
            started = time.monotonic()
            connect.put_config(name, jdbc_config(layout, database, topic, batch_size, unnest, tasks))
            last_report = started
            while watcher.matched is None:
                watcher.join(timeout=2)
                status = connect.status(name)
                if status is not None and (status.state == "FAILED" or status.failed_traces):
                    trace = (status.failed_traces or [status.state])[0]
                    causes = [line for line in trace.splitlines() if line.startswith("Caused by:")]
                    result.error = (causes[-1] if causes else trace.splitlines()[0] if trace else "FAILED")[:300]
                    log(f"jdbc {label}: failed: {result.error}")
                    break
                if time.monotonic() - started > timeout:
                    result.error = f"not caught up after {timeout:.0f} s ({watcher.last})"
                    break
                if time.monotonic() - last_report > 10:
                    log(f"jdbc {label}: {watcher.last[0] if watcher.last else 0:,} rows at the destination")
                    last_report = time.monotonic()
            if watcher.matched is not None:
                result.seconds = watcher.matched - started
                result.rows_per_s = rows / result.seconds
                result.first_row_s = watcher.first_row - started if watcher.first_row else None
                result.sustained = watcher.sustained(inserted_rows(rows))
                log(f"jdbc {label}: {rows:,} changes in {result.seconds:.2f} s = {result.rows_per_s:,.0f} rows/s "
                    f"(first row after {result.first_row_s or 0:.1f} s)")
        finally:
            # The connector goes first: a sink still running would re-create a deleted topic by subscribing to it.
            connect.delete(name)
            _wait_gone(connect, name)
            watcher.stop()
    dbs.drop(database)
    delete_groups(layout.kafka_bootstrap, [f"connect-{name}"])
    return result


def _wait_gone(connect: Any, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while connect.status(name) is not None and time.monotonic() < deadline:
        time.sleep(0.3)


# ---------------------------------------------------------------------------------------------------------------
# latency


class KafkaStamps(threading.Thread):
    """Reads the data topic from its current end and notes each id's Kafka record timestamp (the time Connect's
    producer sent it), which splits the end-to-end latency into capture and apply."""

    def __init__(self, layout: Any, topic: str) -> None:
        super().__init__(daemon=True)
        from schemas.codec import AvroDecoder, RegistryClient

        self.registry = RegistryClient(layout.urls()["schema_registry"])
        self.decoder = AvroDecoder(self.registry)
        self.consumer = Consumer({"bootstrap.servers": layout.kafka_bootstrap, "log_level": 3,
                                  "group.id": f"bench-stamps-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        assignment = []
        for p in partitions:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            assignment.append(TopicPartition(topic, p, high))
        self.consumer.assign(assignment)
        self.stamps: dict[int, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for msg in self.consumer.consume(1000, 0.1):
                if msg.error() is None and msg.key() is not None:
                    self.stamps[int(self.decoder.decode(msg.key())["id"])] = msg.timestamp()[1] / 1000

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

        self.consumer.close()
        self.registry.close()


def bench_latency(layout: Any, config_path: Path, topic: str, source_url: str, destination_url: str, rate: float,
                  seconds: float, rows_per_transaction: int) -> LatencyResult:
    out = tempfile.TemporaryFile()  # noqa: SIM115 - the applier's output, read and closed once it exits
    applier = subprocess.Popen([CDC, "-c", str(config_path), "run", "replica"], stdout=out, stderr=subprocess.STDOUT)
    stamps: KafkaStamps | None = None
    try:
        # A probe row, so that measuring starts with the applier running and caught up.
        with psycopg.connect(source_url, autocommit=True) as src, \
                psycopg.connect(destination_url, autocommit=True) as dst:
            src.execute("insert into bench_item (id, name, qty, price) values (%s, 'probe', 0, 0)", (LATENCY_BASE,))
            deadline = time.monotonic() + 180
            while not dst.execute("select 1 from bench_item where id = %s", (LATENCY_BASE,)).fetchone():
                if applier.poll() is not None:
                    raise RuntimeError(f"the applier exited with {applier.returncode} before the latency run")
                if time.monotonic() > deadline:
                    raise RuntimeError("the probe row did not reach the destination within 180 s")
                time.sleep(0.05)
        log("latency: applier running and caught up")
        stamps = KafkaStamps(layout, topic)
        stamps.start()
        transactions = max(1, round(rate * seconds / rows_per_transaction))
        committed: dict[int, float] = {}
        seen: dict[int, float] = {}
        writer_done = threading.Event()
        writer_span: dict[str, float] = {}

        def writer() -> None:
            with psycopg.connect(source_url, autocommit=True) as conn:  # each statement is one transaction
                start = time.monotonic()
                writer_span["start"] = start
                for i in range(transactions):
                    due = start + i * rows_per_transaction / rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    first = LATENCY_BASE + 1 + i * rows_per_transaction
                    last = first + rows_per_transaction - 1
                    conn.execute("insert into bench_item (id, name, qty, price) select g, 'latency', 0, 0 "
                                 "from generate_series(%s::bigint, %s::bigint) g", (first, last))
                    now = time.time()  # the commit has returned
                    for row_id in range(first, last + 1):
                        committed[row_id] = now
                writer_span["end"] = time.monotonic()
            writer_done.set()

        def poller() -> None:
            expected = transactions * rows_per_transaction
            low = LATENCY_BASE  # every id up to here has been seen
            with psycopg.connect(destination_url, autocommit=True) as conn:
                give_up = None
                while len(seen) < expected:
                    began = time.time()  # the snapshot is taken when the query starts: visible by then
                    for (row_id,) in conn.execute("select id from bench_item where id > %s order by id", (low,)):
                        seen.setdefault(row_id, began)
                    while low + 1 in seen:
                        low += 1
                    if writer_done.is_set():
                        give_up = give_up or time.monotonic() + 60
                        if time.monotonic() > give_up:
                            break
                    time.sleep(max(0.0, 0.01 - (time.time() - began)))

        threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=poller, daemon=True)]
        log(f"latency: writing {transactions * rows_per_transaction:,} rows at {rate:,.0f} rows/s "
            f"in transactions of {rows_per_transaction}")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stamps.stop()
    finally:
        if applier.poll() is None:
            applier.send_signal(signal.SIGTERM)
        killer = threading.Timer(60, applier.kill)
        killer.start()
        _, status, usage = os.wait4(applier.pid, 0)
        killer.cancel()
        applier.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read().decode(errors="replace")
        out.close()
        if stamps is not None and stamps.is_alive():
            stamps.stop()
    log(f"latency: applier stopped with SIGTERM, exit {applier.returncode}; "
        f"{output.strip().splitlines()[-1] if output.strip() else ''}")
    latencies = sorted((seen[i] - committed[i]) * 1000 for i in committed if i in seen)
    capture = sorted((stamps.stamps[i] - committed[i]) * 1000 for i in committed if i in stamps.stamps)
    apply = sorted((seen[i] - stamps.stamps[i]) * 1000 for i in committed if i in seen and i in stamps.stamps)
    span = writer_span["end"] - writer_span["start"]
    result = LatencyResult(
        rate=rate, achieved_rate=len(committed) / span if span > 0 else math.nan, seconds=seconds,
        rows=len(committed), rows_per_transaction=rows_per_transaction, seen=len(latencies),
        p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] if latencies else math.nan,
        capture_p50_ms=percentile(capture, 50) if capture else None,
        capture_p99_ms=percentile(capture, 99) if capture else None,
        apply_p50_ms=percentile(apply, 50) if apply else None, apply_p99_ms=percentile(apply, 99) if apply else None,
        applier_rss_mb=usage.ru_maxrss / 1024, applier_exit=applier.returncode)
    log(f"latency: {result.seen:,} of {result.rows:,} rows seen; p50 {result.p50_ms:.0f} ms, "
        f"p99 {result.p99_ms:.0f} ms, max {result.max_ms:.0f} ms at {result.achieved_rate:,.0f} rows/s")
    if result.seen < result.rows:
        raise RuntimeError(f"latency: only {result.seen} of {result.rows} rows reached the destination")
    if applier.returncode != 0:
        raise RuntimeError(f"latency: the applier exited with {applier.returncode} on SIGTERM:\n{output[-2000:]}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# the report


TABLE_HEADER = (
    "| date (UTC) | machine | N | ours rows/s | JDBC sink rows/s, best (each tried) | ours / JDBC | "
    "sustained: ours / JDBC (ratio) | our peak RSS | latency p50 / p99 / max |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
    f"| **target** | | | ≥ {TARGET_ROWS_PER_S:,} | | ≥ {TARGET_RATIO:.0f}x | ≥ {TARGET_ROWS_PER_S:,} | "
    f"< {TARGET_RSS_MB:.0f} MB | "
    f"p99 < {TARGET_P99_MS:.0f} ms at {TARGET_LATENCY_RATE:,} rows/s |\n"
)


def table_row(r: Report) -> str:
    machine = machine_cell(r.machine)
    n = f"{r.rows:,}" + (" (quick)" if r.args.quick else "")
    ours = "failed" if r.ours is None else f"{number(r.ours.rows_per_s)}{mark(r.ours.rows_per_s >= TARGET_ROWS_PER_S)}"
    best = r.best_jdbc
    tried = "; ".join(f"{j.label}: {number(j.rows_per_s) if j.rows_per_s else 'failed'}" for j in r.jdbc)
    jdbc = f"{number(best.rows_per_s)} ({tried})" if best else (f"failed ({tried})" if r.jdbc else "not run")
    if r.ours and best and best.rows_per_s:
        ratio_value = r.ours.rows_per_s / best.rows_per_s
        ratio = f"{ratio_value:.1f}x{mark(ratio_value >= TARGET_RATIO)}"
    else:
        ratio = "-"
    rss = "-" if r.ours is None else f"{r.ours.peak_rss_mb:.0f} MB{mark(r.ours.peak_rss_mb < TARGET_RSS_MB)}"
    ours_steady = r.ours.sustained if r.ours else None
    jdbc_steady = max((j.sustained for j in r.jdbc if j.sustained), default=None)
    steady = (f"{number(ours_steady)}{mark(ours_steady >= TARGET_ROWS_PER_S) if ours_steady else ''} / "
              f"{number(jdbc_steady)}")
    if ours_steady and jdbc_steady:
        steady += f" ({ours_steady / jdbc_steady:.1f}x)"
    if r.latency is None:
        latency = "not run" if r.args.latency_seconds <= 0 else "failed"
    else:
        lat = r.latency
        ok = lat.p99_ms < TARGET_P99_MS if lat.rate >= TARGET_LATENCY_RATE else None
        latency = (f"{number(lat.p50_ms)} / {number(lat.p99_ms)} / {number(lat.max_ms)} ms at {lat.rate:,.0f} rows/s"
                   f"{mark(ok)}")
        if r.args.source_poll_ms:
            latency += f" (Debezium poll.interval.ms overridden: {r.args.source_poll_ms})"
    date = r.started.strftime("%Y-%m-%d %H:%M")
    return f"| {date} | {machine} | {n} | {ours} | {jdbc} | {ratio} | {steady} | {rss} | {latency} |\n"


def details(r: Report) -> str:
    lines = details_head("###", "apply_bench", r.started, r.rows, r.args.quick, r.machine)
    if r.capture_s is not None:
        lines.append(f"- capture (load + Debezium into Kafka, not part of any figure): {r.rows:,} changes in "
                     f"{r.capture_s:.1f} s ({r.rows / r.capture_s:,.0f} rows/s); "
                     f"{inserted_rows(r.rows):,} inserts then the rest as updates, "
                     f"{TRANSACTION_ROWS:,} rows per source transaction")
    if r.ours:
        o = r.ours
        net = (r.rows / (o.wall_s - o.overhead_s)) if o.overhead_s and o.wall_s > o.overhead_s else None
        lines.append(f"- ours: `cdc run --until-caught-up` as a subprocess, {o.wall_s:.2f} s wall from spawn to exit "
                     f"= {o.rows_per_s:,.0f} rows/s; destination first showed rows after "
                     f"{number(o.first_row_s, 1)} s and "
                     f"matched the source after {number(o.matched_s, 1)} s; a second run with nothing to apply took "
                     f"{number(o.overhead_s, 2)} s, so net of that fixed cost {number(net)} rows/s; "
                     f"sustained {number(o.sustained)} rows/s (the destination's row count from 10 % to 90 % of the "
                     f"inserts, sampled every 250 ms); peak RSS {o.peak_rss_mb:.0f} MB (wait4 ru_maxrss); "
                     f"it said: \"{o.applied_line}\"")
    for j in r.jdbc:
        if j.rows_per_s:
            lines.append(f"- JDBC sink {j.label}: {j.seconds:.2f} s from registering the connector until the "
                         f"destination matched the source = {j.rows_per_s:,.0f} rows/s (first row after "
                         f"{number(j.first_row_s, 1)} s), sustained {number(j.sustained)} rows/s; "
                         f"tasks.max={r.args.jdbc_tasks}, insert.mode=upsert")
        else:
            lines.append(f"- JDBC sink {j.label}: failed: {j.error}")
    if r.latency:
        lat = r.latency
        lines.append(f"- latency: {lat.rows:,} rows in transactions of {lat.rows_per_transaction} at "
                     f"{lat.achieved_rate:,.0f} rows/s achieved ({lat.rate:,.0f} asked) for {lat.seconds:.0f} s; "
                     f"commit to visible p50 {number(lat.p50_ms)} ms, p99 {number(lat.p99_ms)} ms, "
                     f"max {number(lat.max_ms)} ms; "
                     f"of which commit to Kafka (Debezium + Connect producer) p50 {number(lat.capture_p50_ms)} / "
                     f"p99 {number(lat.capture_p99_ms)} ms and Kafka to visible (our applier) p50 "
                     f"{number(lat.apply_p50_ms)} / "
                     f"p99 {number(lat.apply_p99_ms)} ms; applier peak RSS {lat.applier_rss_mb:.0f} MB, exit "
                     f"{lat.applier_exit} on SIGTERM; the connector's poll.interval.ms: {r.source_poll_ms}"
                     f"{' (overridden by --source-poll-ms)' if r.args.source_poll_ms else ''}")
    for error in r.errors:
        lines.append(f"- error: {error}")
    if r.profile:
        lines += ["", "Profile of the throughput phase (in-process):", "", "```", r.profile.rstrip(), "```"]
    return "\n".join(lines) + "\n\n"


def _widen(row: str) -> str:
    """A row written before the sustained column existed gets "-" there."""
    cells = row.split("|")
    if len(cells) == 10:  # 8 columns
        cells.insert(7, " - ")
    return "|".join(cells)


def write_results(report: Report, path: Path = RESULTS) -> None:
    """Rewrite the preamble and the table header, put the new row and details first, keep older runs below."""
    old_rows: list[str] = []
    old_details = ""
    if path.exists():
        text = path.read_text()
        if MARK_ROWS not in text or MARK_DETAILS not in text:
            raise RuntimeError(f"{path} lacks its markers; move it away and run again")
        table = text.split(MARK_ROWS, 1)[1].split(MARK_DETAILS, 1)[0]
        lines = [line for line in table.splitlines() if line.startswith("|")]
        old_rows = [_widen(line) + "\n" for line in lines[3:]]  # after the header, separator and target rows
        old_details = text.split(MARK_DETAILS, 1)[1].lstrip("\n")
    text = (RESULTS_PREAMBLE + "\n" + MARK_ROWS + "\n" + TABLE_HEADER + table_row(report) + "".join(old_rows)
            + "\n## Details\n\n" + MARK_DETAILS + "\n\n" + details(report) + old_details)
    path.write_text(text.rstrip("\n") + "\n")


# ---------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness_parser("apply_bench", __doc__ or "", "changes to load and apply (default 200,000; 20,000 with --quick)")
    p.add_argument("--latency-rate", type=float, default=TARGET_LATENCY_RATE, help="rows/s the writer commits")
    p.add_argument("--latency-seconds", type=float, help="how long the writer writes (default 30; 10 with --quick; "
                   "0 skips the latency phase)")
    p.add_argument("--latency-transaction-rows", type=int, default=10, help="rows per source transaction in the "
                   "latency phase (default 10)")
    p.add_argument("--batch-sizes", default="500,5000", help="JDBC sink batch.size values to try (comma-separated)")
    # Off by default: in Debezium 3.6 the unnest writer fails on a batch holding two changes of one key ("ON
    # CONFLICT DO UPDATE command cannot affect row a second time"), which this workload's updates produce.
    p.add_argument("--jdbc-unnest", action=argparse.BooleanOptionalAction, default=False,
                   help="also try the largest batch size with dialect.postgres.unnest.insert.enabled")
    p.add_argument("--jdbc-tasks", type=int, default=1, help="tasks.max of the JDBC sink (default 1, like our one "
                   "applier process)")
    p.add_argument("--skip-jdbc", action="store_true", help="measure our applier only")
    p.add_argument("--source-poll-ms", type=int, help="override Debezium's poll.interval.ms on this run's connector "
                   "(the pipeline's own value otherwise), to see how much of the latency is the capture side's")
    p.add_argument("--profile", action="store_true", help="also run the throughput phase in-process under "
                   "pyinstrument and report where the time goes")
    args = parse_rows(p, argv, quick=20_000, full=200_000)
    if args.latency_seconds is None:
        args.latency_seconds = 10.0 if args.quick else 30.0
    try:
        args.batch_sizes = [int(s) for s in str(args.batch_sizes).split(",") if s.strip()]
    except ValueError:
        p.error("--batch-sizes must be comma-separated integers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(datetime.now(UTC), args, machine_info(), args.rows)
    log(f"machine: {report.machine}")
    # The work folder is kept: --profile writes its call trees there.
    with session("", keep_work=True) as run:
        layout, run_id, dbs = run.layout, run.run_id, run.dbs
        pipeline: BenchPipeline | None = None
        try:
            ours_url = dbs.create(f"bench_ours_{run_id}")
            pipeline = BenchPipeline(run, run_id, {"replica": replica(ours_url)})
            topic = pipeline.topic
            if args.source_poll_ms:
                log(f"pipeline {pipeline.pipeline.name}: Debezium poll.interval.ms set to {args.source_poll_ms} "
                    "for this run")
                set_source_poll_interval(pipeline.pipeline, args.source_poll_ms)
            report.source_poll_ms = source_poll_interval(pipeline.pipeline)
            report.capture_s = pipeline.load(args.rows)
            expected = checksum(pipeline.source_url)

            report.ours = attempt("ours", report.errors,
                                  lambda: bench_ours(pipeline.config_path, ours_url, args.rows, expected))
            if args.profile:
                report.profile = attempt("profile", report.errors,
                                         lambda: profile_ours(pipeline.data, dbs, run_id, args.rows, run.work))

            if not args.skip_jdbc:
                variants = [(size, False) for size in args.batch_sizes]
                if args.jdbc_unnest and args.batch_sizes:
                    variants.append((max(args.batch_sizes), True))
                for size, unnest in variants:
                    try:
                        report.jdbc.append(bench_jdbc(layout, dbs, run_id, topic, args.rows, expected, size, unnest,
                                                      args.jdbc_tasks))
                    except Exception as exc:  # noqa: BLE001
                        report.jdbc.append(JdbcResult(f"batch {size}" + (", unnest" if unnest else ""), size, unnest,
                                                      error=str(exc)[:300]))
                        log(f"jdbc: FAILED: {exc}")

            if args.latency_seconds > 0 and report.ours is not None:
                report.latency = attempt("latency", report.errors, lambda: bench_latency(
                    layout, pipeline.config_path, topic, pipeline.source_url, ours_url, args.latency_rate,
                    args.latency_seconds, args.latency_transaction_rows))
        except Exception as exc:  # noqa: BLE001 - report what was measured before the failure
            report.errors.append(f"setup: {exc}")
            log(f"FAILED: {exc}")
        finally:
            log("cleanup: connector, slot, publication, topics, consumer groups and databases of this run")
            if pipeline is not None:
                pipeline.cleanup(groups=(f"cdc-{pipeline.pipeline.name}-profile",))

    return finish(args.no_write, TABLE_HEADER + table_row(report), details(report), lambda: write_results(report),
                  bool(report.errors or any(j.error for j in report.jdbc)))


if __name__ == "__main__":
    sys.exit(main())
