"""How long `cdc sync apply` takes on a scope of 100,000 rows over 10 tables (issue 17: under 30 s, backup included).

Two fresh PostgreSQL databases of the stack get the same ten tables, a chain of foreign keys (t1 references t0, t2
references t1, ...), 10,000 rows in the reserved id range per table at the source. The destination holds a production
state of the same scope: 30% of the rows changed, 10% missing, 1,000 rows per table deleted at the source, and 1,000
rows per table outside the range that must stay. The figure is the wall time of `apply` (source read, plan, backup,
rows, history) from the command's entry point; the run fails unless the destination's scope equals the source's
afterwards (count and md5 of every row, by SQL) and the out-of-range rows are untouched.

Run: .venv/bin/python -m benchmarks.sync_bench [--rows-per-table 10000] [--tables 10] [--no-record]
"""

from __future__ import annotations

import argparse
import platform
import time
import uuid
from datetime import UTC, datetime

import psycopg

from benchmarks.common import RESULTS, Databases, commit, load_average, machine, record_row, start_stack
from cdc import config
from consumers.sync import apply as sync_apply

R = 1_000_000_000
TARGET_S = 30.0
RUNS = "<!-- sync runs: written by benchmarks/sync_bench.py, newest first -->"
HEADER = ("| date (UTC) | machine | scope | changes | apply (backup included) | source read, planned, backed up "
          "after | plan alone (dry run) | checked |")
SECTION = f"""
## Configuration sync

Written by `.venv/bin/python -m benchmarks.sync_bench` (what is measured: its docstring). Newest run first.
The time is the wall time of `cdc sync apply` (consumers.sync.apply.apply): source read in one snapshot, plan,
backup of the destination's scope, rows written in one transaction, history entry. ✓ under the {TARGET_S:.0f} s target.

{RUNS}
{HEADER}
|---|---|---|---|---|---|---|---|
| **target** | | 100,000 rows, 10 tables | | < {TARGET_S:.0f} s | | | |
"""


def schema(tables: int) -> str:
    ddl = ["create table t0 (id bigint primary key, label text not null, qty int, note text)"]
    for i in range(1, tables):
        ddl.append(f"create table t{i} (id bigint primary key, parent_id bigint not null references t{i - 1}(id), "
                   "label text not null, qty int, note text)")
    return ";\n".join(ddl)


def fill(conn: psycopg.Connection, tables: int, n: int, *, production: bool) -> None:
    for i in range(tables):
        parent = "" if i == 0 else f"{R} + 1 + (g - 1) % {n}, "
        if not production:
            conn.execute(f"insert into t{i} select {R} + g, {parent}'label ' || g, g % 97, 'configuration row' "
                         f"from generate_series(1, {n}) g")
            continue
        # 30% changed, 10% missing (g % 10 = 3), 1,000 extra rows in the range, 1,000 rows outside it.
        conn.execute(f"insert into t{i} select {R} + g, {parent}case when g % 10 < 3 then 'old label ' || g else "
                     f"'label ' || g end, g % 97, 'configuration row' from generate_series(1, {n}) g "
                     "where g % 10 <> 3")
        extra_parent = "" if i == 0 else f"{R} + {n} + g, "
        conn.execute(f"insert into t{i} select {R} + {n} + g, {extra_parent}'deleted at the source', 0, null "
                     "from generate_series(1, 1000) g")
        local_parent = "" if i == 0 else "g, "
        conn.execute(f"insert into t{i} select g, {local_parent}'production row ' || g, 1, 'local' "
                     "from generate_series(1, 1000) g")


def fingerprint(url: str, tables: int, where: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return [conn.execute(f"select count(*), md5(coalesce(string_agg(t::text, ',' order by id), '')) from t{i} t "
                             f"where {where}").fetchone() for i in range(tables)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-table", type=int, default=10_000)
    parser.add_argument("--tables", type=int, default=10)
    parser.add_argument("--no-record", action="store_true", help="Print the figure only.")
    args = parser.parse_args()
    n, tables = args.rows_per_table, args.tables
    load = load_average()
    layout = start_stack(quiet=True)
    dbs = Databases(layout)
    source, destination = (dbs.create(name) for name in (f"sb_src_{uuid.uuid4().hex[:8]}",
                                                         f"sb_dst_{uuid.uuid4().hex[:8]}"))
    print(f"sync_bench on {platform.node()} ({machine()}): {n * tables:,} rows over {tables} tables", flush=True)
    try:
        for url, production in ((source, False), (destination, True)):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(schema(tables))
                fill(conn, tables, n, production=production)
                conn.execute("vacuum analyze")
        scope = f"id between {R} and {2 * R - 1}"
        pipeline = config.parse({
            "pipeline": "syncbench",
            "kafka": {"bootstrap_servers": layout.kafka_bootstrap, "schema_registry_url": layout.urls()[
                "schema_registry"], "connect_url": layout.urls()["connect"]},
            "source": {"url": source, "tables": ["public.t0"]},
            "syncs": {"bench": {"source": source, "destination": destination,
                                "tables": {f"public.t{i}": {"where": scope} for i in range(tables)}}}},
            "sync_bench")
        local_before = fingerprint(destination, tables, f"not ({scope})")
        started = time.perf_counter()
        planned = sync_apply.dry_run("bench", pipeline.syncs["bench"])
        plan_s = time.perf_counter() - started
        phases: dict[str, float] = {}

        def echo(line: str) -> None:
            phases[line.split(":")[0].split(" ")[0]] = time.perf_counter() - started
            print(f"  {phases[line.split(':')[0].split(' ')[0]]:6.2f} s  {line}", flush=True)

        started = time.perf_counter()
        done = sync_apply.apply(pipeline, "bench", echo=echo)
        apply_s = time.perf_counter() - started
        backup_s = phases.get("backup", 0.0)
        equal = fingerprint(source, tables, scope) == fingerprint(destination, tables, scope)
        untouched = fingerprint(destination, tables, f"not ({scope})") == local_before
        changes = planned.changes
        ok = "✓" if apply_s < TARGET_S else "✗"
        print(f"apply: {apply_s:.2f} s {ok} (target < {TARGET_S:.0f} s; source read, planned and backed up after "
              f"{backup_s:.2f} s); plan alone {plan_s:.2f} s; {changes:,} changes "
              f"(history {done.entry.id if done.entry else '?'}); scope equal to the source: {equal}; out-of-range "
              f"rows untouched: {untouched}", flush=True)
        if not (equal and untouched):
            raise SystemExit("sync_bench: the destination does not hold what it should; no figure recorded")
        if not args.no_record:
            counts = {k: sum(p.counts()[k] for p in planned.tables.values()) for k in ("deleted", "inserted",
                                                                                       "updated")}
            row = (f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {machine()} | {n * tables:,} rows, {tables} tables | "
                   f"-{counts['deleted']:,} +{counts['inserted']:,} ~{counts['updated']:,} | {apply_s:.2f} s {ok} | "
                   f"{backup_s:.2f} s | {plan_s:.2f} s | scope equal by SQL, out-of-range untouched; load average at "
                   f"start {load} (code {commit()}) |")
            record_row(RESULTS, RUNS, SECTION, row, header_lines=3)  # under the header, separator and target
            print(f"recorded in {RESULTS}")
    finally:
        from confluent_kafka.admin import AdminClient

        # The sync's topic of this run is the benchmark's own: not left behind.
        AdminClient({"bootstrap.servers": layout.kafka_bootstrap}).delete_topics(["syncbench.sync.bench"])
        dbs.drop_all()


if __name__ == "__main__":
    main()
