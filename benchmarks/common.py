"""What every benchmark harness shares: the machine and the code measured, the local stack with the run's own
databases and work folder, timing a subprocess, the options every harness takes, and writing its runs into
benchmarks/RESULTS.md. The bench_item workload that apply, replay and memory measure is in benchmarks/workload.py."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
CDC = str(Path(sys.executable).parent / "cdc")

_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f} s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# the machine and the code measured


def machine_info() -> dict[str, str]:
    cpus = len(os.sched_getaffinity(0))
    mem_kib = 0
    model = platform.processor() or platform.machine()
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    load = os.getloadavg()
    return {
        "cpus": str(cpus),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "code": code_version(),
    }


def machine() -> str:
    """The machine as a results table's column shows it: `2 CPUs, 7.8 GiB`."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs, {mem:.1f} GiB"


def load_average() -> str:
    """Other work on the machine shows in a figure: noted beside it."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def commit() -> str:
    """The short commit checked out (`?` outside a git checkout)."""
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def code_version() -> str:
    """The commit measured, and whether the working tree differed from it where the measured code lives."""
    def git(*args: str) -> str:
        # Not stripped: porcelain lines start with a two-letter status that may begin with a space.
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", "consumers", "schemas", "producers", "cdc")
    except OSError:
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    if not dirty.strip():
        return head
    return head + " with uncommitted changes in " + ", ".join(sorted({line[3:].split("/")[0]
                                                                      for line in dirty.splitlines() if line}))


def machine_cell(m: dict[str, str]) -> str:
    """machine_info as a results table's machine column shows it."""
    return f"{m['cpus']} CPUs, {m['memory']}"


def details_head(heading: str, prog: str, started: datetime, rows: int, quick: bool, m: dict[str, str]) -> list[str]:
    """The first lines of a run's details in RESULTS.md: when, N, the machine (with its load) and the command."""
    return [f"{heading} {started.strftime('%Y-%m-%d %H:%M')} UTC, N = {rows:,}{' (quick)' if quick else ''}", "",
            f"- machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}, Python {m['python']}; "
            f"load average at start {m['load']} (the stack, and anything else running, share these CPUs)",
            f"- command: `{' '.join([f'python -m benchmarks.{prog}', *sys.argv[1:]])}`; code: {m['code']}"]


# ---------------------------------------------------------------------------------------------------------------
# figures


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def sustained_rate(samples: list[tuple[float, int]], total: int, low: float = 0.1,
                   high: float = 0.9) -> float | None:
    """Per second, from (when, count) samples: the slope between the first samples at `low` and at `high` of
    `total`."""
    start = next(((t, c) for t, c in samples if c >= total * low), None)
    end = next(((t, c) for t, c in samples if c >= total * high), None)
    if start is None or end is None or end[0] <= start[0]:
        return None
    return (end[1] - start[1]) / (end[0] - start[0])


def number(value: float | None, digits: int = 0) -> str:
    """A table cell: `-` for a figure not measured."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def mark(ok: bool | None) -> str:
    """✓ for a target met, ✗ for one missed, nothing where there is no target."""
    return "" if ok is None else (" ✓" if ok else " ✗")


# ---------------------------------------------------------------------------------------------------------------
# the stack, the run's databases and work folder


def start_stack(quiet: bool = False) -> Any:
    """The local stack (`infra.stack.up` is idempotent; a harness never stops it: others use it), under the
    repository's .cdc/ unless CDC_HOME says otherwise; its layout."""
    os.environ.setdefault("CDC_HOME", str(REPO / ".cdc"))
    from infra import stack

    return stack.up(echo=(lambda line: None) if quiet else (lambda line: log(f"stack: {line}")))


class Databases:
    """The databases a run creates (PostgreSQL, or MariaDB), so that each is dropped at the end whatever happens."""

    def __init__(self, layout: Any) -> None:
        self.layout = layout
        self.created: list[tuple[str, str]] = []  # (kind, name)

    def create(self, name: str) -> str:
        """A fresh PostgreSQL database of the stack; its URL."""
        with psycopg.connect(self.layout.postgres_url(), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        self.created.append(("postgresql", name))
        return self.layout.postgres_url(name)

    def create_mariadb(self, name: str) -> str:
        """A fresh MariaDB database of the stack; its URL."""
        with self._mariadb() as conn:
            conn.exec_driver_sql(f"create database `{name}`")
        self.created.append(("mariadb", name))
        return self.layout.mariadb_url(name)

    @contextlib.contextmanager
    def _mariadb(self) -> Iterator[Any]:
        from sqlalchemy import create_engine

        admin = create_engine(self.layout.mariadb_url())
        try:
            with admin.begin() as conn:
                yield conn
        finally:
            admin.dispose()

    def drop(self, name: str) -> None:
        kind = next((k for k, n in self.created if n == name), "postgresql")
        if kind == "mariadb":
            with self._mariadb() as conn:
                conn.exec_driver_sql(f"drop database if exists `{name}`")
        else:
            from producers.source_admin import drop_slot, slots_of_database

            with psycopg.connect(self.layout.postgres_url(), autocommit=True) as conn:
                # A slot still pointing at a database prevents dropping it.
                for slot in slots_of_database(conn, name):
                    drop_slot(conn, slot)
                conn.execute(f'drop database if exists "{name}" with (force)')
        if (kind, name) in self.created:
            self.created.remove((kind, name))

    def drop_all(self) -> None:
        for _, name in list(reversed(self.created)):
            try:
                self.drop(name)
            except Exception as exc:  # noqa: BLE001 - clean up what can be cleaned up
                log(f"cleanup: dropping database {name} failed: {exc}")


@dataclass
class Session:
    """One run of a harness on the stack: its id (in every name it creates), its work folder and its databases."""

    layout: Any
    run_id: str
    work: Path
    dbs: Databases


@contextlib.contextmanager
def session(label: str, *, keep_work: bool = False, quiet: bool = False) -> Iterator[Session]:
    """Start the stack and give the run an id, a work folder (.cdc/bench/<label>-<id>) and a Databases; at the end,
    whatever happened, its databases are dropped and (unless keep_work) the folder removed. What else the run made
    (connectors, topics) its own `finally` removes first."""
    layout = start_stack(quiet)
    run_id = uuid.uuid4().hex[:8]
    work = Path(os.environ["CDC_HOME"]) / "bench" / (f"{label}-{run_id}" if label else run_id)
    work.mkdir(parents=True, exist_ok=True)
    dbs = Databases(layout)
    try:
        yield Session(layout, run_id, work, dbs)
    finally:
        dbs.drop_all()
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


def delete_groups(bootstrap: str, groups: list[str]) -> None:
    from producers.topics import admin_client

    admin = admin_client(bootstrap)  # kept referenced: the futures never complete once the client is collected
    try:
        for future in admin.delete_consumer_groups(groups, request_timeout=15).values():
            with contextlib.suppress(Exception):  # a group that never committed does not exist
                future.result(timeout=30)
    except Exception as exc:  # noqa: BLE001 - hygiene only
        log(f"cleanup: deleting consumer groups {groups} failed: {exc}")


def attempt(label: str, errors: list[str], work: Callable[[], Any]) -> Any:
    """Run one measured phase; a failure is noted in `errors` and logged, and the other phases still run."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: what was measured is still printed
        errors.append(f"{label}: {exc}")
        log(f"{label}: FAILED: {exc}")
        return None


# ---------------------------------------------------------------------------------------------------------------
# timing a subprocess


@dataclass
class Measured:
    returncode: int
    wall_s: float
    max_rss_kib: int
    output: str


def run_measured(argv: list[str], timeout: float, on_start: Callable[[], None] | None = None) -> Measured:
    """Run a command to its end; wall time, exit status, and the child's own peak RSS from wait4's rusage
    (exact, unlike sampling /proc/<pid>/status, which can miss a short peak)."""
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        if on_start:
            on_start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        out.seek(0)
        return Measured(proc.returncode, wall, usage.ru_maxrss, out.read().decode(errors="replace"))


# ---------------------------------------------------------------------------------------------------------------
# options


def harness_parser(prog: str, doc: str, rows_help: str) -> argparse.ArgumentParser:
    """The options every timed harness takes: --rows, --quick (a short run to check that it all works) and
    --no-write (print the figures, leave RESULTS.md alone)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{prog}", description=doc.split("\n\n")[0])
    p.add_argument("--rows", type=int, help=rows_help)
    p.add_argument("--quick", action="store_true", help="a short run to check that everything works")
    p.add_argument("--no-write", action="store_true", help="print the results without touching RESULTS.md")
    return p


def parse_rows(p: argparse.ArgumentParser, argv: list[str] | None, *, quick: int, full: int) -> argparse.Namespace:
    """Parse; --rows defaults to `quick` with --quick, else `full`, and must be at least 1."""
    args = p.parse_args(argv)
    if args.rows is None:
        args.rows = quick if args.quick else full
    if args.rows < 1:
        p.error("--rows must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# RESULTS.md

# The file's first section is apply_bench's: its writer rewrites the file's head from these two markers and keeps
# what follows its details marker, so the other harnesses' sections, placed after it, survive its runs.
RESULTS_PREAMBLE = """# Benchmark results

Written by `.venv/bin/python -m benchmarks.apply_bench` (what is measured and how: `benchmarks/README.md`).
Newest run first: each run adds a row at the top of the table and a section at the top of the details.
Figures marked ✓ meet their target, ✗ miss it. Rows/s count source changes (inserts and updates) applied per
second of wall time, start-up included.
"""
MARK_ROWS = "<!-- runs: written by benchmarks/apply_bench.py, newest first -->"
MARK_DETAILS = "<!-- details: written by benchmarks/apply_bench.py, newest first -->"


def write_section(path: Path, marks: tuple[str, str], preamble: str, table_header: str, details_heading: str,
                  row: str, details_text: str) -> None:
    """Add a run at the top of a harness's own section of RESULTS.md (between its two `marks`, after apply_bench's
    details, which apply_bench's writer keeps as they are): a new section at the end of the file the first time,
    else its table gains `row` on top and its details `details_text` on top."""
    mark_rows, mark_details = marks
    if not path.exists():  # apply_bench's skeleton first, so that its writer finds its markers later
        path.write_text(RESULTS_PREAMBLE + "\n" + MARK_ROWS + "\n\n## Details\n\n" + MARK_DETAILS + "\n")
    text = path.read_text()
    if MARK_ROWS not in text or MARK_DETAILS not in text:
        raise RuntimeError(f"{path} lacks apply_bench's markers; move it away and run again")
    if mark_rows not in text or mark_details not in text:
        text = (text.rstrip("\n") + "\n\n" + preamble + mark_rows + "\n" + table_header + row + "\n"
                + details_heading + mark_details + "\n\n" + details_text)
    else:
        before, rest = text.split(mark_rows, 1)
        table, after = rest.split(mark_details, 1)
        old_rows = [line + "\n" for line in table.splitlines() if line.startswith("|")][3:]  # header, -, target
        text = (before + mark_rows + "\n" + table_header + row + "".join(old_rows) + "\n" + details_heading
                + mark_details + "\n\n" + details_text + after.lstrip("\n"))
    path.write_text(text.rstrip("\n") + "\n")


def record_row(path: Path, marker: str, section: str, row: str, header_lines: int) -> None:
    """Put `row` at the top of the table under `marker` (after its `header_lines` lines: header, separator and
    any target row); the first time, `section` (which holds the marker and the table's head) goes at the end."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if marker not in text:
        text = text.rstrip("\n") + "\n" + section
    head, tail = text.split(marker, 1)
    lines = tail.split("\n")
    lines.insert(header_lines + 1, row)  # lines[0] is what follows the marker on its own line
    path.write_text(head + marker + "\n".join(lines))


def print_summary(table: str, details_text: str) -> None:
    """A run's results table and details on standard output."""
    print()
    print(table, end="")
    print()
    print(details_text, end="")


def finish(no_write: bool, table: str, details_text: str, write: Callable[[], None], errors: bool) -> int:
    """Print the run's figures, write them into RESULTS.md unless --no-write; the exit status (1 when a phase
    failed: what was measured is printed and written all the same)."""
    print_summary(table, details_text)
    if not no_write:
        write()
        log(f"results written to {RESULTS.relative_to(REPO)}")
    return 1 if errors else 0
