"""Peak memory of the appliers: one very large source transaction, and a large backlog of small ones, on the real stack.

    .venv/bin/python -m benchmarks.memory_bench [--rows N] [--quick] [--no-write] [--phases P,...]

Starts the local stack (idempotent; never stops it) and measures, each applier as a `cdc` subprocess whose peak
resident memory is its own ru_maxrss from wait4 (details in benchmarks/README.md):

1. `transaction`: a fresh source database with `bench_item` (bigint key, text, integer, numeric, timestamptz) and
   ONE source transaction inserting N rows; once all N changes are in Kafka, `cdc run replica --until-caught-up`
   into a fresh PostgreSQL database, then `cdc run lake --until-caught-up` into an empty DuckDB file (and, with the
   `mariadb` phase, `cdc run maria --until-caught-up` into a fresh MariaDB database: the general, per-row path);
   wall time, peak RSS, and the destination checked equal to the source (count, sum(qty), sum(price)).
2. `ingest`: another fresh source database and pipeline, N changes in transactions of 1,000 rows (80 % inserts,
   then updates, as replay_bench loads them), ingested by `cdc run lake --until-caught-up` into an empty DuckDB
   file: wall time and peak RSS, checked against the source.

A thread also reads the child's /proc status every 20 ms: at the highest resident size it saw, how much was
anonymous memory and how much file-backed (the shared libraries' code: pyarrow, polars, DuckDB...), a split of the
peak (ru_maxrss counts both).

Each peak is compared with the applier's target (300 MB, whatever the size of a transaction or of the backlog).
The figures are printed and written into their own section at the end of benchmarks/RESULTS.md (newest run
first). Everything the run created (databases, DuckDB files, connectors, slots, publications, topics, consumer
groups) is removed at the end; the stack stays up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import yaml

from benchmarks import apply_bench
from benchmarks.apply_bench import (
    CDC,
    REPO,
    RESULTS,
    SOURCE_SCHEMA,
    TABLE,
    TARGET_RSS_MB,
    TRANSACTION_ROWS,
    Databases,
    _delete_groups,
    _mark,
    checksum,
    load_source,
    log,
    machine_info,
    pipeline_data,
    run_measured,
    wait_for_topic,
)
from benchmarks.replay_bench import duckdb_checksum, said, settle, timeout_for

LAKE = "lake"  # the analytics destination (DuckDB)
REPLICA = "replica"  # the PostgreSQL replica destination
MARIA = "maria"  # the MariaDB replica destination (the general path), phase `mariadb`
PHASES = ("transaction", "ingest")

MARK_ROWS = "<!-- memory runs: written by benchmarks/memory_bench.py, newest first -->"
MARK_DETAILS = "<!-- memory details: written by benchmarks/memory_bench.py, newest first -->"


@dataclass
class Run:
    """One `cdc run DEST --until-caught-up`, checked against the source."""
    label: str
    command: str
    wall_s: float
    peak_rss_mb: float
    said: str
    history_rows: int | None = None  # DuckDB only
    split: tuple[float, float, float] | None = None  # at the sampled peak: resident, anonymous, file-backed MB

    @property
    def ratio(self) -> float:
        return self.peak_rss_mb / TARGET_RSS_MB


@dataclass
class Report:
    started: datetime
    args: argparse.Namespace
    machine: dict[str, str]
    rows: int
    capture_s: dict[str, float] = field(default_factory=dict)  # phase -> load + capture time
    runs: dict[str, Run] = field(default_factory=dict)  # "replica", "analytics", "mariadb" (one transaction), "ingest"
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# set-up and the measured runs


def load_one_transaction(url: str, rows: int) -> None:
    """N inserts in ONE source transaction (one statement in autocommit)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into bench_item (id, name, qty, price) select g, 'item ' || g, g %% 100, "
                     "(g %% 10000) / 100.0 from generate_series(1::bigint, %s::bigint) g", (rows,))


class PeakSplit(threading.Thread):
    """Reads the status of this process's newest child (the `cdc` run_measured starts) every 20 ms and keeps, at the
    highest resident size seen, its anonymous and file-backed parts (MB). Sampling can miss the exact peak: the peak
    itself is wait4's; this says what it was made of."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.best: tuple[float, float, float] | None = None
        self._halt = threading.Event()
        self._known = set(self._children())

    @staticmethod
    def _children() -> list[int]:
        me = str(os.getpid())
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[1] == me:
                            found.append(int(entry))
                except (OSError, IndexError):
                    continue
        return found

    def run(self) -> None:
        pid = None
        while not self._halt.is_set() and pid is None:
            pid = next((c for c in self._children() if c not in self._known), None)
            self._halt.wait(0.02)
        while not self._halt.is_set() and pid is not None:
            try:
                with open(f"/proc/{pid}/status") as f:
                    kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                          if k in ("VmRSS", "RssAnon", "RssFile")}
            except (OSError, ValueError):
                return  # the child has exited
            if len(kb) == 3 and (self.best is None or kb["VmRSS"] / 1024 > self.best[0]):
                self.best = (kb["VmRSS"] / 1024, kb["RssAnon"] / 1024, kb["RssFile"] / 1024)
            self._halt.wait(0.02)

    def stop(self) -> tuple[float, float, float] | None:
        self._halt.set()
        self.join(5)
        return self.best


class MariaDatabase:
    """A fresh MariaDB database for the `mariadb` phase, dropped by drop()."""

    def __init__(self, layout: Any, name: str) -> None:
        from sqlalchemy import create_engine

        self.layout, self.name = layout, name
        self.admin = create_engine(layout.mariadb_url())
        with self.admin.begin() as conn:
            conn.exec_driver_sql(f"create database `{name}`")
        self.url = layout.mariadb_url(name)

    def checksum(self) -> tuple[int, int, Decimal]:
        from sqlalchemy import create_engine

        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                count, qty, price = conn.exec_driver_sql(
                    "select count(*), coalesce(sum(qty), 0), coalesce(sum(price), 0) from bench_item").fetchone()
        finally:
            engine.dispose()
        return int(count), int(qty), Decimal(price)

    def drop(self) -> None:
        try:
            with self.admin.begin() as conn:
                conn.exec_driver_sql(f"drop database if exists `{self.name}`")
        except Exception as exc:  # noqa: BLE001 - clean up what can be cleaned up
            log(f"cleanup: dropping MariaDB database {self.name} failed: {exc}")
        self.admin.dispose()


class Pipeline:
    """A fresh source database with bench_item, a pipeline file with the given destinations and its connector; all
    of it removed by cleanup()."""

    def __init__(self, layout: Any, dbs: Databases, work: Path, name: str, replica: bool,
                 mariadb: bool = False) -> None:
        from cdc import config
        from producers import capture

        self.layout, self.work, self.name = layout, work, name
        self.duck_path = work / f"{name}-lake.duckdb"
        self.pipeline = None
        self.maria: MariaDatabase | None = None
        self.source_url = dbs.create(f"bench_src_{name}")
        self.replica_url = dbs.create(f"bench_replica_{name}") if replica else None
        with psycopg.connect(self.source_url, autocommit=True) as conn:
            conn.execute(SOURCE_SCHEMA)
        data = pipeline_data(layout, f"bench{name}", self.source_url,
                             {REPLICA: self.replica_url} if replica else {})
        data["destinations"][LAKE] = {"kind": "analytics", "url": f"duckdb:///{self.duck_path}"}
        if mariadb:
            self.maria = MariaDatabase(layout, f"bench_maria_{name}")
            data["destinations"][MARIA] = {"kind": "replica", "url": self.maria.url}
        self.config_path = work / f"{name}-pipeline.yaml"
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.pipeline = config.load(self.config_path, env={})
        self.topic = self.pipeline.topic_of(TABLE)
        log(f"pipeline {self.pipeline.pipeline}: creating topics and the Debezium connector")
        capture.apply(self.pipeline)

    def cleanup(self) -> None:
        from producers import capture
        from producers.topics import admin_client, delete_topics

        if self.maria is not None:
            self.maria.drop()
        p = self.pipeline
        if p is None:
            return
        try:
            capture.delete(p, purge=True)
        except Exception as exc:  # noqa: BLE001 - clean up what can be cleaned up
            log(f"cleanup: deleting the source connector failed: {exc}")
        try:
            delete_topics(admin_client(self.layout.kafka_bootstrap),
                          [*p.data_topics, p.transaction_topic, p.signal_topic, p.notification_topic,
                           f"__debezium-heartbeat.{p.pipeline}",
                           *(f"{p.pipeline}.{d}.dead-letter" for d in (LAKE, REPLICA, MARIA))])
        except Exception as exc:  # noqa: BLE001
            log(f"cleanup: deleting topics failed: {exc}")
        _delete_groups(self.layout.kafka_bootstrap, [f"cdc-{p.pipeline}-{LAKE}", f"cdc-{p.pipeline}-{REPLICA}",
                                                     f"cdc-{p.pipeline}-{MARIA}", f"{p.pipeline}-signal"])


def run_applier(p: Pipeline, destination: str, label: str, rows: int,
                expected: tuple[int, int, Decimal]) -> Run:
    """`cdc run DEST --until-caught-up` as a subprocess: wall time, peak RSS; the destination must then equal the
    source."""
    timeout = timeout_for(rows)
    argv = [CDC, "-c", str(p.config_path), "run", destination, "--until-caught-up", "--timeout", f"{timeout:.0f}"]
    log(f"{label}: {' '.join(argv[1:])}")
    split = PeakSplit()
    result = run_measured(argv, timeout + 60, on_start=split.start)
    peak_split = split.stop()
    if result.returncode != 0:
        raise RuntimeError(f"`cdc run {destination}` exited with {result.returncode}:\n{result.output[-3000:]}")
    history = None
    if destination == LAKE:
        final, history = duckdb_checksum(p.duck_path)
    elif destination == MARIA:
        assert p.maria is not None
        final = p.maria.checksum()
    else:
        final = checksum(p.replica_url)
    if final != expected:
        raise RuntimeError(f"{label}: the destination differs from the source after catching up: "
                           f"{final} != {expected}")
    run = Run(label, f"cdc run {destination} --until-caught-up", result.wall_s, result.max_rss_kib / 1024,
              " ".join(said(result.output, "applied")), history, peak_split)
    log(f"{label}: {rows:,} changes in {run.wall_s:.2f} s = {rows / run.wall_s:,.0f} rows/s, peak RSS "
        f"{run.peak_rss_mb:.0f} MB ({run.ratio:.2f} x the {TARGET_RSS_MB:.0f} MB target); equal to the source; "
        f"it said: {run.said}")
    return run


def phase_transaction(report: Report, layout: Any, dbs: Databases, work: Path, run_id: str,
                      pipelines: list[Pipeline], destinations: list[str]) -> None:
    p = Pipeline(layout, dbs, work, f"{run_id}t", replica=REPLICA in destinations, mariadb="mariadb" in destinations)
    pipelines.append(p)
    rows = report.rows
    started = time.monotonic()
    load_one_transaction(p.source_url, rows)
    log(f"source: {rows:,} inserts committed in ONE transaction in {time.monotonic() - started:.1f} s")
    wait_for_topic(layout.kafka_bootstrap, p.topic, rows, timeout=max(600.0, rows / 100))
    report.capture_s["transaction"] = time.monotonic() - started
    log(f"capture: all {rows:,} changes are in {p.topic} after {report.capture_s['transaction']:.1f} s")
    expected = checksum(p.source_url)
    settle(p.source_url)
    for destination, key, label in ((REPLICA, "replica", "one transaction, PostgreSQL replica"),
                                    (LAKE, "analytics", "one transaction, DuckDB analytics"),
                                    (MARIA, "mariadb", "one transaction, MariaDB replica (general path)")):
        if key not in destinations:
            continue
        try:
            report.runs[key] = run_applier(p, destination, label, rows, expected)
        except Exception as exc:  # noqa: BLE001 - the other destination is still measured
            report.errors.append(f"{label}: {exc}")
            log(f"{label}: FAILED: {exc}")


def phase_ingest(report: Report, layout: Any, dbs: Databases, work: Path, run_id: str,
                 pipelines: list[Pipeline]) -> None:
    p = Pipeline(layout, dbs, work, f"{run_id}i", replica=False)
    pipelines.append(p)
    rows = report.rows
    started = time.monotonic()
    inserts, updates = load_source(p.source_url, rows)
    log(f"source: {inserts:,} inserts and {updates:,} updates committed in transactions of {TRANSACTION_ROWS:,}")
    wait_for_topic(layout.kafka_bootstrap, p.topic, rows, timeout=max(600.0, rows / 100))
    report.capture_s["ingest"] = time.monotonic() - started
    expected = checksum(p.source_url)
    settle(p.source_url)
    report.runs["ingest"] = run_applier(p, LAKE, "backlog of small transactions, DuckDB analytics", rows, expected)


# ---------------------------------------------------------------------------------------------------------------
# the report


def _cell(run: Run | None) -> str:
    if run is None:
        return "-"
    return f"{run.peak_rss_mb:.0f} MB{_mark(run.peak_rss_mb < TARGET_RSS_MB)} ({run.ratio:.2f}x), {run.wall_s:.1f} s"


TABLE_HEADER = (
    "| date (UTC) | machine | N | one transaction of N rows: PostgreSQL replica | one transaction: DuckDB analytics "
    "| N changes in transactions of 1,000: DuckDB ingestion | one transaction: MariaDB replica (general path) |\n"
    "|---|---|---|---|---|---|---|\n"
    f"| **target** | | | peak RSS < {TARGET_RSS_MB:.0f} MB | < {TARGET_RSS_MB:.0f} MB | < {TARGET_RSS_MB:.0f} MB "
    f"| < {TARGET_RSS_MB:.0f} MB |\n"
)


def table_row(r: Report) -> str:
    machine = f"{r.machine['cpus']} CPUs, {r.machine['memory']}"
    n = f"{r.rows:,}" + (" (quick)" if r.args.quick else "")
    cells = " | ".join(_cell(r.runs.get(k)) for k in ("replica", "analytics", "ingest", "mariadb"))
    return f"| {r.started.strftime('%Y-%m-%d %H:%M')} | {machine} | {n} | {cells} |\n"


def details(r: Report) -> str:
    m = r.machine
    lines = [f"#### {r.started.strftime('%Y-%m-%d %H:%M')} UTC, N = {r.rows:,}{' (quick)' if r.args.quick else ''}",
             ""]
    lines.append(f"- machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}, Python {m['python']}; "
                 f"load average at start {m['load']} (the stack, and anything else running, share these CPUs)")
    lines.append(f"- command: `{' '.join(['python -m benchmarks.memory_bench', *sys.argv[1:]])}`; code: {m['code']}")
    for phase, text in (("transaction", "one source transaction of"), ("ingest", "transactions of 1,000 rows,")):
        if phase in r.capture_s:
            lines.append(f"- capture ({text} {r.rows:,} changes; load + Debezium into Kafka, not a figure): "
                         f"{r.capture_s[phase]:.1f} s")
    for run in r.runs.values():
        history = f"; history table {run.history_rows:,} rows" if run.history_rows is not None else ""
        split = (f" (at the highest sample, {run.split[0]:.0f} MB: {run.split[1]:.0f} MB anonymous, "
                 f"{run.split[2]:.0f} MB file-backed)" if run.split else "")
        lines.append(f"- {run.label}: `{run.command}` as a subprocess, {run.wall_s:.2f} s wall from spawn to exit "
                     f"({r.rows / run.wall_s:,.0f} rows/s); peak RSS {run.peak_rss_mb:.0f} MB (wait4 ru_maxrss)"
                     f"{split}, "
                     f"{run.ratio:.2f} x the {TARGET_RSS_MB:.0f} MB target{_mark(run.peak_rss_mb < TARGET_RSS_MB)}; "
                     f"equal to the source (count, sum(qty), sum(price)){history}; it said: \"{run.said}\"")
    for error in r.errors:
        lines.append(f"- error: {' '.join(error.split())[:1500]}")
    return "\n".join(lines) + "\n\n"


SECTION_PREAMBLE = """## Applier memory

Written by `.venv/bin/python -m benchmarks.memory_bench` (what is measured and how: `benchmarks/README.md`).
Newest run first. Each cell: the applier's peak resident memory (its own `ru_maxrss` from `wait4`), ✓ under the
300 MB target or ✗ over it, the ratio to the target, and the wall time of the `cdc run --until-caught-up` process
(start-up included). Every destination was checked equal to its source afterwards.

"""
DETAILS_HEADING = "### Applier memory: details\n\n"


def write_results(report: Report, path: Path = RESULTS) -> None:
    """Add the run at the top of this harness's own section, at the end of the file. The other harnesses' writers
    keep whatever follows their own sections, so this one survives their runs; only the text between this
    harness's markers is rewritten here."""
    apply_bench.write_section(path, (MARK_ROWS, MARK_DETAILS), SECTION_PREAMBLE, TABLE_HEADER, DETAILS_HEADING,
                              table_row(report), details(report))


# ---------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="rows of the one transaction, and changes of the backlog (default "
                   "1,000,000; 50,000 with --quick)")
    p.add_argument("--quick", action="store_true", help="a short run to check that everything works")
    p.add_argument("--no-write", action="store_true", help="print the results without touching RESULTS.md")
    p.add_argument("--phases", default="replica,analytics,ingest,mariadb",
                   help="what to measure, comma-separated: replica, analytics and mariadb (the one transaction into "
                        "PostgreSQL, DuckDB and MariaDB), ingest (the backlog of small transactions into DuckDB); "
                        "default all")
    args = p.parse_args(argv)
    if args.rows is None:
        args.rows = 50_000 if args.quick else 1_000_000
    if args.rows < 1:
        p.error("--rows must be at least 1")
    args.phase_list = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(args.phase_list) - {"replica", "analytics", "ingest", "mariadb"}
    if unknown or not args.phase_list:
        p.error(f"--phases: unknown {', '.join(sorted(unknown)) or '(none given)'}; "
                f"choose among replica, analytics, ingest, mariadb")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("CDC_HOME", str(REPO / ".cdc"))
    from infra import stack

    report = Report(datetime.now(UTC), args, machine_info(), args.rows)
    log(f"machine: {report.machine}")
    layout = stack.up(echo=lambda line: log(f"stack: {line}"))
    run_id = uuid.uuid4().hex[:8]
    work = Path(os.environ["CDC_HOME"]) / "bench" / f"memory-{run_id}"
    work.mkdir(parents=True, exist_ok=True)
    dbs = Databases(layout)
    pipelines: list[Pipeline] = []
    try:
        destinations = [d for d in ("replica", "analytics", "mariadb") if d in args.phase_list]
        if destinations:
            try:
                phase_transaction(report, layout, dbs, work, run_id, pipelines, destinations)
            except Exception as exc:  # noqa: BLE001 - report it; the other phase still runs
                report.errors.append(f"one transaction: {exc}")
                log(f"one transaction: FAILED: {exc}")
        if "ingest" in args.phase_list:
            try:
                phase_ingest(report, layout, dbs, work, run_id, pipelines)
            except Exception as exc:  # noqa: BLE001
                report.errors.append(f"ingestion: {exc}")
                log(f"ingestion: FAILED: {exc}")
    finally:
        log("cleanup: connectors, slots, publications, topics, consumer groups, databases and DuckDB files of this run")
        for p in pipelines:
            p.cleanup()
        dbs.drop_all()
        shutil.rmtree(work, ignore_errors=True)

    apply_bench.print_summary(TABLE_HEADER + table_row(report), details(report))
    if not args.no_write:
        write_results(report)
        log(f"results written to {RESULTS.relative_to(REPO)}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
