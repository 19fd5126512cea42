"""Peak memory of the appliers: one very large source transaction, and a large backlog of small ones, on the real stack.

    .venv/bin/python -m benchmarks.memory_bench [--rows N] [--quick] [--no-write] [--phases P,...]

Starts the local stack (idempotent; never stops it) and measures, each applier as a `cdc` subprocess whose peak
resident memory is its own ru_maxrss from wait4 (details in benchmarks/README.md):

1. `transaction`: a fresh source database with `bench_item` (bigint key, text, integer, numeric, timestamptz) and
   ONE source transaction inserting N rows; once all N changes are in Kafka, `cdc run replica --until-caught-up`
   into a fresh PostgreSQL database, then `cdc run lake --until-caught-up` into an empty DuckDB file (and, with the
   `mariadb` phase, `cdc run maria --until-caught-up` into a fresh MariaDB database);
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
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg

from benchmarks.apply_bench import TARGET_RSS_MB
from benchmarks.common import (
    CDC,
    RESULTS,
    Session,
    attempt,
    details_head,
    finish,
    harness_parser,
    log,
    machine_cell,
    machine_info,
    mark,
    parse_rows,
    run_measured,
    session,
    write_section,
)
from benchmarks.workload import (
    CHECKSUM,
    BenchPipeline,
    Checksum,
    analytics,
    capture_timeout,
    checksum,
    duckdb_checksum,
    replica,
    said,
    settle,
    timeout_for,
    wait_for_topic,
)

LAKE = "lake"  # the analytics destination (DuckDB)
REPLICA = "replica"  # the PostgreSQL replica destination
MARIA = "maria"  # the MariaDB replica destination, phase `mariadb`
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


def mariadb_checksum(url: str) -> Checksum:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            count, qty, price = conn.exec_driver_sql(CHECKSUM).fetchone()
    finally:
        engine.dispose()
    return int(count), int(qty), Decimal(price)


class Pipeline(BenchPipeline):
    """A BenchPipeline with a DuckDB analytics destination, and, as asked, a fresh PostgreSQL replica and a fresh
    MariaDB replica (the session drops their databases)."""

    def __init__(self, run: Session, name: str, replica_db: bool, mariadb: bool = False) -> None:
        self.duck_path = run.work / f"{name}-lake.duckdb"
        self.replica_url = run.dbs.create(f"bench_replica_{name}") if replica_db else None
        self.maria_url = run.dbs.create_mariadb(f"bench_maria_{name}") if mariadb else None
        destinations = {LAKE: analytics(self.duck_path)}
        if self.replica_url:
            destinations[REPLICA] = replica(self.replica_url)
        if self.maria_url:
            destinations[MARIA] = replica(self.maria_url)
        super().__init__(run, name, destinations)


def run_applier(p: Pipeline, destination: str, label: str, rows: int,
                expected: Checksum) -> Run:
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
    elif destination == MARIA and p.maria_url:
        final = mariadb_checksum(p.maria_url)
    elif p.replica_url:
        final = checksum(p.replica_url)
    else:
        raise RuntimeError(f"{label}: the pipeline has no {destination} destination")
    if final != expected:
        raise RuntimeError(f"{label}: the destination differs from the source after catching up: "
                           f"{final} != {expected}")
    run = Run(label, f"cdc run {destination} --until-caught-up", result.wall_s, result.max_rss_kib / 1024,
              " ".join(said(result.output, "applied")), history, peak_split)
    log(f"{label}: {rows:,} changes in {run.wall_s:.2f} s = {rows / run.wall_s:,.0f} rows/s, peak RSS "
        f"{run.peak_rss_mb:.0f} MB ({run.ratio:.2f} x the {TARGET_RSS_MB:.0f} MB target); equal to the source; "
        f"it said: {run.said}")
    return run


def phase_transaction(report: Report, run: Session, pipelines: list[Pipeline], destinations: list[str]) -> None:
    p = Pipeline(run, f"{run.run_id}t", replica_db=REPLICA in destinations, mariadb="mariadb" in destinations)
    pipelines.append(p)
    rows = report.rows
    started = time.monotonic()
    load_one_transaction(p.source_url, rows)
    log(f"source: {rows:,} inserts committed in ONE transaction in {time.monotonic() - started:.1f} s")
    wait_for_topic(run.layout.kafka_bootstrap, p.topic, rows, timeout=capture_timeout(rows))
    report.capture_s["transaction"] = time.monotonic() - started
    log(f"capture: all {rows:,} changes are in {p.topic} after {report.capture_s['transaction']:.1f} s")
    expected = checksum(p.source_url)
    settle(p.source_url)
    for destination, key, label in ((REPLICA, "replica", "one transaction, PostgreSQL replica"),
                                    (LAKE, "analytics", "one transaction, DuckDB analytics"),
                                    (MARIA, "mariadb", "one transaction, MariaDB replica")):
        if key not in destinations:
            continue
        try:
            report.runs[key] = run_applier(p, destination, label, rows, expected)
        except Exception as exc:  # noqa: BLE001 - the other destination is still measured
            report.errors.append(f"{label}: {exc}")
            log(f"{label}: FAILED: {exc}")


def phase_ingest(report: Report, run: Session, pipelines: list[Pipeline]) -> None:
    p = Pipeline(run, f"{run.run_id}i", replica_db=False)
    pipelines.append(p)
    report.capture_s["ingest"] = p.load(report.rows)
    rows = report.rows
    expected = checksum(p.source_url)
    settle(p.source_url)
    report.runs["ingest"] = run_applier(p, LAKE, "backlog of small transactions, DuckDB analytics", rows, expected)


# ---------------------------------------------------------------------------------------------------------------
# the report


def _cell(run: Run | None) -> str:
    if run is None:
        return "-"
    return f"{run.peak_rss_mb:.0f} MB{mark(run.peak_rss_mb < TARGET_RSS_MB)} ({run.ratio:.2f}x), {run.wall_s:.1f} s"


TABLE_HEADER = (
    "| date (UTC) | machine | N | one transaction of N rows: PostgreSQL replica | one transaction: DuckDB analytics "
    "| N changes in transactions of 1,000: DuckDB ingestion | one transaction: MariaDB replica |\n"
    "|---|---|---|---|---|---|---|\n"
    f"| **target** | | | peak RSS < {TARGET_RSS_MB:.0f} MB | < {TARGET_RSS_MB:.0f} MB | < {TARGET_RSS_MB:.0f} MB "
    f"| < {TARGET_RSS_MB:.0f} MB |\n"
)


def table_row(r: Report) -> str:
    machine = machine_cell(r.machine)
    n = f"{r.rows:,}" + (" (quick)" if r.args.quick else "")
    cells = " | ".join(_cell(r.runs.get(k)) for k in ("replica", "analytics", "ingest", "mariadb"))
    return f"| {r.started.strftime('%Y-%m-%d %H:%M')} | {machine} | {n} | {cells} |\n"


def details(r: Report) -> str:
    lines = details_head("####", "memory_bench", r.started, r.rows, r.args.quick, r.machine)
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
                     f"{run.ratio:.2f} x the {TARGET_RSS_MB:.0f} MB target{mark(run.peak_rss_mb < TARGET_RSS_MB)}; "
                     f"equal to the source (count, sum(qty), sum(price)){history}; it said: \"{run.said}\"")
    for error in r.errors:
        lines.append(f"- error: {' '.join(error.split())[:1500]}")
    return "\n".join(lines) + "\n\n"


SECTION_PREAMBLE = """## Applier memory

Written by `.venv/bin/python -m benchmarks.memory_bench` (what is measured and how: `benchmarks/README.md`).
Newest run first. Each cell: the applier's peak resident memory (its own `ru_maxrss` from `wait4`), ✓ under the
300 MB target or ✗ over it, the ratio to the target, and the wall time of the `cdc run --until-caught-up` process
(start-up included). Every destination was checked equal to its source afterwards. The MariaDB replica took the
general (per-row) path until 2026-12-01, the columnar path since.

"""
DETAILS_HEADING = "### Applier memory: details\n\n"


def write_results(report: Report, path: Path = RESULTS) -> None:
    """Add the run at the top of this harness's own section, at the end of the file. The other harnesses' writers
    keep whatever follows their own sections, so this one survives their runs; only the text between this
    harness's markers is rewritten here."""
    write_section(path, (MARK_ROWS, MARK_DETAILS), SECTION_PREAMBLE, TABLE_HEADER, DETAILS_HEADING,
                              table_row(report), details(report))


# ---------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness_parser("memory_bench", __doc__ or "", "rows of the one transaction, and changes of the backlog "
                       "(default 1,000,000; 50,000 with --quick)")
    p.add_argument("--phases", default="replica,analytics,ingest,mariadb",
                   help="what to measure, comma-separated: replica, analytics and mariadb (the one transaction into "
                        "PostgreSQL, DuckDB and MariaDB), ingest (the backlog of small transactions into DuckDB); "
                        "default all")
    args = parse_rows(p, argv, quick=50_000, full=1_000_000)
    args.phase_list = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(args.phase_list) - {"replica", "analytics", "ingest", "mariadb"}
    if unknown or not args.phase_list:
        p.error(f"--phases: unknown {', '.join(sorted(unknown)) or '(none given)'}; "
                f"choose among replica, analytics, ingest, mariadb")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(datetime.now(UTC), args, machine_info(), args.rows)
    log(f"machine: {report.machine}")
    with session("memory") as run:
        pipelines: list[Pipeline] = []
        try:
            destinations = [d for d in ("replica", "analytics", "mariadb") if d in args.phase_list]
            if destinations:
                attempt("one transaction", report.errors,
                        lambda: phase_transaction(report, run, pipelines, destinations))
            if "ingest" in args.phase_list:
                attempt("ingestion", report.errors, lambda: phase_ingest(report, run, pipelines))
        finally:
            # The session then drops the databases and removes the work folder (DuckDB files, pipeline files).
            log("cleanup: connectors, slots, publications, topics, consumer groups, databases and DuckDB files of "
                "this run")
            for p in pipelines:
                p.cleanup()

    return finish(args.no_write, TABLE_HEADER + table_row(report), details(report), lambda: write_results(report),
                  bool(report.errors))


if __name__ == "__main__":
    sys.exit(main())
