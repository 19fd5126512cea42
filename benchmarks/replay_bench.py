"""Analytics ingestion into DuckDB, and full replays of a destination from the topics, on the real stack.

    .venv/bin/python -m benchmarks.replay_bench [--rows N] [--quick] [--no-write] [--replay-no-backup]
                                                [--ingest-runs K]

Starts the local stack (idempotent; never stops it), builds a fresh source database with one standalone table, a
pipeline with two destinations (`lake`: `kind: analytics`, a DuckDB file; `replica`: `kind: replica`, a fresh
PostgreSQL database) and its Debezium connector, loads N changes and waits until they are all in Kafka, then
measures (details in benchmarks/README.md):

1. analytics ingestion: `cdc run lake --until-caught-up` as a subprocess (wall time, peak RSS), checked against the
   source, three times into an empty file (the median is the figure), and once more with nothing to apply (the
   fixed cost inside the figure); while it runs, the applier's consumer-group offsets (committed only after each
   destination commit) give the sustained rate;
2. full replay into PostgreSQL: `cdc run replica --until-caught-up` first (not timed), then `cdc replay replica`
   as a subprocess, checked against the source;
3. replay into DuckDB: `cdc replay lake`, recorded as "not supported" when the command says so.

The figures are printed and written into their own section of benchmarks/RESULTS.md (newest run first), after
apply_bench's sections. Everything the run created (databases, DuckDB file, connector, slot, publication, topics,
consumer groups) is removed at the end; the stack stays up.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from benchmarks.common import (
    CDC,
    RESULTS,
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
    run_measured,
    session,
    sustained_rate,
    write_section,
)
from benchmarks.workload import (
    TRANSACTION_ROWS,
    BenchPipeline,
    Checksum,
    analytics,
    checksum,
    duckdb_checksum,
    inserted_rows,
    replica,
    said,
    settle,
    timeout_for,
)

# The goals this harness checks (they live here, never in tests: a test must not fail on a slow machine).
TARGET_DUCKDB_ROWS_PER_S = 200_000
TARGET_REPLAY_S = 30.0  # for TARGET_REPLAY_ROWS rows; scaled linearly for other N
TARGET_REPLAY_ROWS = 1_000_000

LAKE = "lake"  # the analytics destination (DuckDB)
REPLICA = "replica"  # the PostgreSQL replica destination
# A replay that the command refuses for this kind of destination (consumers/ops/replay.py's wording, and a few likely
# future ones): recorded as "not supported" instead of a failure.
NOT_SUPPORTED = re.compile(r"not supported|not implemented|destinations only|only so far|no replica destination",
                           re.IGNORECASE)

MARK_ROWS = "<!-- replay runs: written by benchmarks/replay_bench.py, newest first -->"
MARK_DETAILS = "<!-- replay details: written by benchmarks/replay_bench.py, newest first -->"


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclass
class IngestRun:
    """One `cdc run lake --until-caught-up` into an empty DuckDB file."""
    wall_s: float
    sustained: float | None  # changes/s applied between 10 % and 90 % of them (AppliedWatcher)
    peak_rss_mb: float


@dataclass
class IngestResult:
    """The ingestion runs of a benchmark: the figures are their medians (the machine's run-to-run spread is about
    ±20 %, more than most changes one would want to measure), the peak RSS their largest."""
    rows: int
    runs: list[IngestRun]
    overhead_s: float | None  # wall time of one more run with nothing to apply
    history_rows: int
    said: str

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def sustained(self) -> float | None:
        rates = [r.sustained for r in self.runs if r.sustained is not None]
        return statistics.median(rates) if rates else None

    @property
    def peak_rss_mb(self) -> float:
        return max(r.peak_rss_mb for r in self.runs)

    @property
    def net_rows_per_s(self) -> float | None:
        if self.overhead_s is None or self.wall_s <= self.overhead_s:
            return None
        return self.rows / (self.wall_s - self.overhead_s)


@dataclass
class ReplayResult:
    supported: bool = True
    wall_s: float | None = None
    rows_per_s: float | None = None
    peak_rss_mb: float | None = None
    said: list[str] = field(default_factory=list)  # what the command printed that tells what it did
    refusal: str | None = None  # the command's message when not supported
    history_rows: int | None = None  # DuckDB only


@dataclass
class Report:
    started: datetime
    args: argparse.Namespace
    machine: dict[str, str]
    rows: int
    capture_s: float | None = None
    ingest: IngestResult | None = None
    catch_up_s: float | None = None  # PostgreSQL replica brought up to date before the replay (not a figure)
    pg_replay: ReplayResult | None = None
    duck_replay: ReplayResult | None = None
    replay_flags: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def replay_target_s(self) -> float:
        return TARGET_REPLAY_S * self.rows / TARGET_REPLAY_ROWS


# ---------------------------------------------------------------------------------------------------------------
# helpers


def no_stdin(argv: list[str]) -> list[str]:
    """The command with its standard input on /dev/null: a confirmation prompt then fails at once instead of
    waiting for an answer (run_measured lets the child inherit ours)."""
    return ["sh", "-c", 'exec "$@" </dev/null', "sh", *argv]


def replay_flags(no_backup: bool) -> list[str]:
    """Flags for `cdc replay`: a --yes style flag when the command has one (so it does not ask), --no-backup if
    asked for."""
    help_text = subprocess.run([CDC, "replay", "--help"], capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "200"}).stdout
    flags = [flag for flag in ("--yes", "--assume-yes") if re.search(rf"{flag}\b", help_text)][:1]
    if no_backup:
        flags.append("--no-backup")
    return flags


# ---------------------------------------------------------------------------------------------------------------
# the phases


class AppliedWatcher(threading.Thread):
    """Samples how many changes of a topic a consumer group has committed, every 0.1 s. The applier commits its
    group's offsets only after the destination committed the changes, so this is the destination's progress; a
    DuckDB file cannot be counted from outside while the applier writes it."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int]] = []
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 3})
        metadata = self._consumer.list_topics(topic, timeout=10)
        self._partitions = [TopicPartition(topic, p) for p in metadata.topics[topic].partitions]
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                committed = self._consumer.committed(self._partitions, timeout=5)
                self.samples.append((time.monotonic(), sum(max(tp.offset, 0) for tp in committed)))
            except Exception:  # noqa: BLE001 - a sample missed; the next one counts
                pass
            self._halt.wait(0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self._consumer.close()


def bench_ingest(config_path: Path, duck_path: Path, rows: int, expected: Checksum,
                 bootstrap: str, group: str, topic: str, repeat: int) -> IngestResult:
    """`repeat` ingestions of all the changes, each into an empty DuckDB file and under a consumer group emptied
    first (the sustained rate is read from it); then one more run with nothing to apply (the fixed cost)."""
    from consumers.ops.backups import remove_database

    timeout = timeout_for(rows)
    argv = [CDC, "-c", str(config_path), "run", LAKE, "--until-caught-up", "--timeout", f"{timeout:.0f}"]
    runs: list[IngestRun] = []
    history, applied = 0, ""
    for round_ in range(1, repeat + 1):
        remove_database(duck_path)
        delete_groups(bootstrap, [group])
        watcher = AppliedWatcher(bootstrap, group, topic)
        log(f"duckdb ingestion {round_}/{repeat}: {' '.join(argv[1:])}")
        try:
            result = run_measured(argv, timeout + 60, on_start=watcher.start)
        finally:
            watcher.stop()
        if result.returncode != 0:
            raise RuntimeError(f"`cdc run {LAKE}` exited with {result.returncode}:\n{result.output[-3000:]}")
        final, history = duckdb_checksum(duck_path)
        if final != expected:
            raise RuntimeError(f"the DuckDB replica differs from the source after catching up: {final} != {expected}")
        run = IngestRun(result.wall_s, sustained_rate(watcher.samples, rows), result.max_rss_kib / 1024)
        runs.append(run)
        applied = " ".join(said(result.output, "applied"))
        log(f"duckdb ingestion {round_}/{repeat}: {rows:,} changes in {run.wall_s:.2f} s = "
            f"{rows / run.wall_s:,.0f} rows/s, sustained {number(run.sustained)} rows/s, "
            f"peak RSS {run.peak_rss_mb:.0f} MB "
            f"({applied}); history holds {history:,} rows")
    # The same command with nothing left to apply: the fixed cost inside the figure above (interpreter and
    # imports, reflection, opening the file, consumer assignment, the watermark's trip through Debezium, close).
    again = run_measured(argv, 300)
    overhead = again.wall_s if again.returncode == 0 else None
    log(f"duckdb ingestion: a run with nothing to apply took {again.wall_s:.2f} s (exit {again.returncode})")
    return IngestResult(rows=rows, runs=runs, overhead_s=overhead, history_rows=history, said=applied)


def catch_up_replica(config_path: Path, url: str, expected: Checksum, rows: int) -> float:
    timeout = timeout_for(rows)
    argv = [CDC, "-c", str(config_path), "run", REPLICA, "--until-caught-up", "--timeout", f"{timeout:.0f}"]
    log(f"postgresql replica, catching up (not timed): {' '.join(argv[1:])}")
    result = run_measured(argv, timeout + 60)
    if result.returncode != 0:
        raise RuntimeError(f"`cdc run {REPLICA}` exited with {result.returncode}:\n{result.output[-3000:]}")
    final = checksum(url)
    if final != expected:
        raise RuntimeError(f"the PostgreSQL replica differs from the source after catching up: {final} != {expected}")
    log(f"postgresql replica: caught up in {result.wall_s:.2f} s")
    return result.wall_s


def bench_replay(config_path: Path, destination: str, flags: list[str], rows: int) -> ReplayResult:
    """`cdc replay DEST` as a subprocess: wall time and peak RSS, or "not supported" when the command refuses this
    kind of destination. The caller checks the destination afterwards."""
    timeout = timeout_for(rows)
    argv = [CDC, "-c", str(config_path), "replay", destination, *flags, "--timeout", f"{timeout:.0f}"]
    log(f"replay {destination}: {' '.join(argv[1:])}")
    result = run_measured(no_stdin(argv), timeout + 60)
    if result.returncode != 0:
        refusal = next((line.strip() for line in result.output.splitlines() if line.startswith("error:")), "")
        if refusal and NOT_SUPPORTED.search(refusal):
            log(f"replay {destination}: not supported (exit {result.returncode}): {refusal}")
            return ReplayResult(supported=False, refusal=refusal)
        hint = " (it asked for a confirmation: give the harness its --yes flag)" if "Abort" in result.output else ""
        raise RuntimeError(f"`cdc replay {destination}` exited with {result.returncode}{hint}:\n"
                           f"{result.output[-3000:]}")
    lines = said(result.output, "backup", "emptied", "applied")
    out = ReplayResult(wall_s=result.wall_s, rows_per_s=rows / result.wall_s, peak_rss_mb=result.max_rss_kib / 1024,
                       said=lines)
    log(f"replay {destination}: {rows:,} changes in {result.wall_s:.2f} s = {out.rows_per_s:,.0f} rows/s, "
        f"peak RSS {out.peak_rss_mb:.0f} MB ({'; '.join(lines)})")
    return out


# ---------------------------------------------------------------------------------------------------------------
# the report


TABLE_HEADER = (
    "| date (UTC) | machine | N | DuckDB ingestion rows/s | net of fixed cost / sustained, rows/s | "
    "PostgreSQL full replay | DuckDB replay | peak RSS: ingestion / PG replay |\n"
    "|---|---|---|---|---|---|---|---|\n"
    f"| **target** | | | ≥ {TARGET_DUCKDB_ROWS_PER_S:,} | ≥ {TARGET_DUCKDB_ROWS_PER_S:,} | "
    f"< {TARGET_REPLAY_S:.0f} s for {TARGET_REPLAY_ROWS:,} rows (scaled linearly for other N) | | |\n"
)


def _replay_cell(r: ReplayResult | None, target_s: float | None, rows: int) -> str:
    if r is None:
        return "failed"
    if not r.supported:
        return "not supported"
    cell = f"{r.wall_s:.2f} s ({number(r.rows_per_s)} rows/s)"
    if target_s is not None:
        cell += mark(r.wall_s < target_s)
        if rows != TARGET_REPLAY_ROWS:
            cell += f" (target < {target_s:.2f} s for {rows:,})"
    return cell


def table_row(r: Report) -> str:
    machine = machine_cell(r.machine)
    n = f"{r.rows:,}" + (" (quick)" if r.args.quick else "")
    if r.ingest is None:
        ingest = net = "failed"
    else:
        ingest = f"{number(r.ingest.rows_per_s)}{mark(r.ingest.rows_per_s >= TARGET_DUCKDB_ROWS_PER_S)}"
        sustained = r.ingest.sustained
        net = (f"{number(r.ingest.net_rows_per_s)} / {number(sustained)}"
               + (mark(sustained >= TARGET_DUCKDB_ROWS_PER_S) if sustained is not None else ""))
    pg = _replay_cell(r.pg_replay, r.replay_target_s, r.rows)
    if r.pg_replay and r.pg_replay.supported and "--no-backup" in r.replay_flags:
        pg += " (--no-backup)"
    duck = _replay_cell(r.duck_replay, None, r.rows)
    rss_pg = r.pg_replay.peak_rss_mb if r.pg_replay and r.pg_replay.supported else None
    rss = f"{number(r.ingest.peak_rss_mb if r.ingest else None)} / {number(rss_pg)} MB"
    date = r.started.strftime("%Y-%m-%d %H:%M")
    return f"| {date} | {machine} | {n} | {ingest} | {net} | {pg} | {duck} | {rss} |\n"


def details(r: Report) -> str:
    lines = details_head("####", "replay_bench", r.started, r.rows, r.args.quick, r.machine)
    if r.capture_s is not None:
        lines.append(f"- capture (load + Debezium into Kafka, not part of any figure): {r.rows:,} changes in "
                     f"{r.capture_s:.1f} s ({r.rows / r.capture_s:,.0f} rows/s); {inserted_rows(r.rows):,} inserts "
                     f"then the rest as updates, {TRANSACTION_ROWS:,} rows per source transaction")
    if r.ingest:
        i = r.ingest
        history = ("" if i.history_rows == r.rows else
                   f" (NOTE: {r.rows:,} expected, one per change)")
        each = "; ".join(f"{run.wall_s:.2f} s = {r.rows / run.wall_s:,.0f} rows/s, sustained {number(run.sustained)}, "
                         f"{run.peak_rss_mb:.0f} MB" for run in i.runs)
        lines.append(f"- DuckDB ingestion: `cdc run {LAKE} --until-caught-up` as a subprocess, {len(i.runs)} time(s), "
                     f"each into an empty file ({each}); median {i.wall_s:.2f} s wall from spawn to exit = "
                     f"{i.rows_per_s:,.0f} rows/s; a run with nothing to apply took "
                     f"{number(i.overhead_s, 2)} s, so net of that fixed cost {number(i.net_rows_per_s)} rows/s; "
                     f"sustained (median) {number(i.sustained)} rows/s (the consumer group's committed offsets, "
                     f"sampled every 0.1 s, "
                     f"from 10 % to 90 % of the changes); current "
                     f"state equal to the source (count, sum(qty), sum(price)) after every run; history table "
                     f"{i.history_rows:,} rows{history}; peak RSS {i.peak_rss_mb:.0f} MB, the largest (wait4 "
                     f"ru_maxrss); it said: \"{i.said}\"")
    if r.catch_up_s is not None:
        lines.append(f"- PostgreSQL replica brought up to date first (`cdc run {REPLICA} --until-caught-up`, not a "
                     f"figure): {r.catch_up_s:.2f} s")
    flags = " ".join(r.replay_flags)
    for label, dest, res, target in (("PostgreSQL", REPLICA, r.pg_replay, r.replay_target_s),
                                     ("DuckDB", LAKE, r.duck_replay, None)):
        command = f"`cdc replay {dest}{' ' + flags if flags else ''}`"
        if res is None:
            continue
        if not res.supported:
            lines.append(f"- {label} replay: {command} is not supported yet: \"{res.refusal}\"")
            continue
        goal = ""
        if target is not None:
            goal = (f" (target < {target:.2f} s{mark(res.wall_s < target)}"
                    + (f", {TARGET_REPLAY_S:.0f} s for {TARGET_REPLAY_ROWS:,} scaled linearly to N" if
                       r.rows != TARGET_REPLAY_ROWS else "") + ")")
        extra = f"; history table {res.history_rows:,} rows" if res.history_rows is not None else ""
        lines.append(f"- {label} replay: {command} as a subprocess, {res.wall_s:.2f} s wall from spawn to exit "
                     f"(backup, emptying and re-applying every change from offset 0 included) = "
                     f"{res.rows_per_s:,.0f} rows/s{goal}; destination equal to the source afterwards{extra}; "
                     f"peak RSS {res.peak_rss_mb:.0f} MB; it said: \"{' / '.join(res.said)}\"")
    for error in r.errors:
        lines.append(f"- error: {' '.join(error.split())[:1500]}")
    return "\n".join(lines) + "\n\n"


SECTION_PREAMBLE = """## Replay and analytics ingestion

Written by `.venv/bin/python -m benchmarks.replay_bench` (what is measured and how: `benchmarks/README.md`).
Newest run first. Figures marked ✓ meet their target, ✗ miss it. Rows/s count source changes (inserts and
updates) per second of wall time of the whole command, start-up included (from 2026-11-30 on, the median of three
ingestions, each into an empty file; before, one); "net" takes out the wall time of the same command with nothing
to apply; "sustained" is the rate while the applier's committed offsets went from 10 %
to 90 % of the changes (rows older than that column give the net figure alone). The replay target is 30 s for
1,000,000 changes, scaled linearly for other N (so small runs, where the fixed cost dominates, are judged harshly).

"""
DETAILS_HEADING = "### Replay and analytics ingestion: details\n\n"


def write_results(report: Report, path: Path = RESULTS) -> None:
    """Add the run at the top of this harness's own section, which sits after apply_bench's details.

    apply_bench.write_results rewrites the file from its own two markers and keeps everything after its details
    marker as the older details (its new details go in front of them), so a section placed after them survives
    its runs untouched. Here only the text between this harness's own markers is rewritten."""
    write_section(path, (MARK_ROWS, MARK_DETAILS), SECTION_PREAMBLE, TABLE_HEADER, DETAILS_HEADING,
                              table_row(report), details(report))


# ---------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness_parser("replay_bench", __doc__ or "", "changes to load (default 1,000,000; 50,000 with --quick)")
    p.add_argument("--replay-no-backup", action="store_true", help="time `cdc replay --no-backup` (default: the "
                   "command as it runs by default, backup of the tables included)")
    p.add_argument("--ingest-runs", type=int, help="DuckDB ingestions to take the median of (default 3; 1 with "
                   "--quick)")
    args = parse_rows(p, argv, quick=50_000, full=1_000_000)
    if args.ingest_runs is None:
        args.ingest_runs = 1 if args.quick else 3
    if args.ingest_runs < 1:
        p.error("--ingest-runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(datetime.now(UTC), args, machine_info(), args.rows)
    log(f"machine: {report.machine}")
    with session("replay") as run:
        duck_path = run.work / "lake.duckdb"
        pipeline: BenchPipeline | None = None
        try:
            replica_url = run.dbs.create(f"bench_replica_{run.run_id}")
            pipeline = BenchPipeline(run, run.run_id, {REPLICA: replica(replica_url), LAKE: analytics(duck_path)})
            config_path = pipeline.config_path
            report.capture_s = pipeline.load(args.rows)
            expected = checksum(pipeline.source_url)
            settle(pipeline.source_url)
            report.replay_flags = replay_flags(args.replay_no_backup)

            def replay(destination: str, label: str, final: Callable[[ReplayResult], tuple]) -> ReplayResult:
                result = bench_replay(config_path, destination, report.replay_flags, args.rows)
                got = final(result) if result.supported else expected
                if got != expected:
                    raise RuntimeError(f"the {label} replica differs from the source after the replay: "
                                       f"{got} != {expected}")
                return result

            def duck_final(result: ReplayResult) -> tuple:
                final, result.history_rows = duckdb_checksum(duck_path)
                return final

            group = f"cdc-{pipeline.pipeline.name}-{LAKE}"
            report.ingest = attempt("duckdb ingestion", report.errors, lambda: bench_ingest(
                config_path, duck_path, args.rows, expected, run.layout.kafka_bootstrap, group, pipeline.topic,
                args.ingest_runs))
            report.catch_up_s = attempt("postgresql catch-up", report.errors,
                                        lambda: catch_up_replica(config_path, replica_url, expected, args.rows))
            if report.catch_up_s is not None:
                report.pg_replay = attempt("postgresql replay", report.errors,
                                           lambda: replay(REPLICA, "PostgreSQL", lambda r: checksum(replica_url)))
            report.duck_replay = attempt("duckdb replay", report.errors, lambda: replay(LAKE, "DuckDB", duck_final))
        except Exception as exc:  # noqa: BLE001 - report what was measured before the failure
            report.errors.append(f"setup: {exc}")
            log(f"FAILED: {exc}")
        finally:
            # The session then drops the databases and removes the work folder (the DuckDB file, its .wal, the
            # pipeline file).
            log("cleanup: connector, slot, publication, topics, consumer groups, databases and DuckDB file of this "
                "run")
            if pipeline is not None:
                pipeline.cleanup()

    return finish(args.no_write, TABLE_HEADER + table_row(report), details(report), lambda: write_results(report),
                  bool(report.errors))


if __name__ == "__main__":
    sys.exit(main())
