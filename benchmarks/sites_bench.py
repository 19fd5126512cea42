"""Changes per second from the master to its satellites, with four sites (issue 18): a master and three satellites,
each satellite with its subset of the master's `item` table (north and south: their region's rows and the shared ones,
north without the cost column; east: every row).

Four fresh PostgreSQL databases of the stack; the topology is applied (three down links, three up links) and
`cdc sites run`'s runner is started, continuous, before the workload. The workload, at the master: `--rows` item
inserts in transactions of 50 rows, then `--rows / 2` updates (half of which move a row into or out of a subset).
The figure is end to end: from the first write at the master until every satellite holds exactly its subset of
the master (checked by SQL, polled every 0.5 s): master changes per second, and the rows the satellites hold at the
end (summed over the three) per second. The run fails, recording nothing, unless every satellite ends equal to its
subset within `--timeout` seconds.

With `--two-way`: one shared (two-way) table, `contact`, policy `newer`, edited at all four sites at once: each site
inserts `--rows / 4` rows of its own id range in transactions of 50, then updates half of them (transactions of 100).
The figure is end to end: from the first write until all four sites hold the same rows with the same versions
(checked by SQL, polled every 0.5 s): changes made at all sites per second, each reaching the three others through the
master (a satellite's change: up, then down to two satellites; the master's: down to three).

Run: .venv/bin/python -m benchmarks.sites_bench [--rows 20000] [--two-way] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import yaml

from benchmarks.sync_bench import commit, machine
from cdc import topology as topology_mod
from consumers.sites import SitesRunner, chosen_links
from infra import stack
from producers import capture, sites, topics

RESULTS = Path(__file__).with_name("RESULTS.md")
RUNS = "<!-- sites runs: written by benchmarks/sites_bench.py, newest first -->"
HEADER = ("| date (UTC) | machine | sites | master changes | end to end | master changes/s | satellite rows "
          "(final) / s | checked |")
SECTION = f"""
## Sites: master to satellites

Written by `.venv/bin/python -m benchmarks.sites_bench` (what is measured: its docstring). Newest run first.
A master and three satellites on the one machine (four PostgreSQL databases, six connectors, six appliers):
end to end from the first master write until every satellite holds exactly its subset. Satellite rows (final): the
rows the three satellites hold at the end, summed, per second of the run.

{RUNS}
{HEADER}
|---|---|---|---|---|---|---|---|
"""
SUBSETS = {"north": "region in ('all', 'north')", "south": "region in ('all', 'south')", "east": "true"}
REGIONS = ["all", "north", "south", "east"]
SCHEMA = ("create table public.item (id int primary key, name text not null, region text not null, cost numeric);"
          "create table public.sale (site_id int not null, id int not null, qty int not null, "
          "primary key (site_id, id))")


TWO_WAY_RUNS = "<!-- sites two-way runs: written by benchmarks/sites_bench.py --two-way, newest first -->"
TWO_WAY_HEADER = "| date (UTC) | machine | sites | changes (all sites) | end to end | changes/s | checked |"
TWO_WAY_SECTION = f"""
## Sites: a two-way table edited at every site

Written by `.venv/bin/python -m benchmarks.sites_bench --two-way` (what is measured: its docstring). Newest run first.
A master and three satellites editing one shared table at once (policy `newer`; six connectors, six appliers, each
running the sites' screen): end to end from the first write until all four sites hold the same rows and versions.

{TWO_WAY_RUNS}
{TWO_WAY_HEADER}
|---|---|---|---|---|---|---|
"""


def record(row: str, runs: str = RUNS, section: str = SECTION) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if runs not in text:
        text = text.rstrip("\n") + "\n" + section
    head, tail = text.split(runs, 1)
    lines = tail.split("\n")
    lines.insert(3, row)  # under the header and its separator
    RESULTS.write_text(head + runs + "\n".join(lines))


def subset_rows(url: str, where: str, columns: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(f"select {columns} from public.item where {where} order by id").fetchall()


def converged(urls: dict[str, str]) -> bool:
    for site, where in SUBSETS.items():
        cols = "id, name, region" if site == "north" else "id, name, region, cost"
        try:
            if subset_rows(urls[site], "true", cols) != subset_rows(urls["hq"], where, cols):
                return False
        except psycopg.errors.UndefinedTable:
            return False
    return True


CONTACT = "create table public.contact (id int primary key, name text not null, phone text)"
TWO_WAY_SITES = {"hq": 1, "north": 2, "south": 3, "east": 4}


def contacts(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("select id, name, phone, _cdc_site, _cdc_at from public.contact order by id").fetchall()


def two_way(args: argparse.Namespace, layout: stack.StackLayout, load: str) -> None:
    """The --two-way figure (the module's docstring)."""
    name = f"sw{uuid.uuid4().hex[:6]}"
    dbs = {site: f"sites_bench_{site}_{uuid.uuid4().hex[:6]}" for site in TWO_WAY_SITES}
    with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
        for db in dbs.values():
            conn.execute(f'create database "{db}"')
    urls = {site: layout.postgres_url(db) for site, db in dbs.items()}
    for url in urls.values():
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(CONTACT)
    endpoints = layout.urls()
    data = {"topology": name,
            "kafka": {"bootstrap_servers": layout.kafka_bootstrap, "schema_registry_url": endpoints["schema_registry"],
                      "connect_url": endpoints["connect"]},
            "sites": {s: {"sync_id": i, "url": urls[s]} for s, i in TWO_WAY_SITES.items()},
            "shared_tables": {"public.contact": "newer"}}
    topo = topology_mod.parse(yaml.safe_load(yaml.safe_dump(data)), "sites_bench", env={})
    runner = None

    def equal() -> bool:
        first = contacts(urls["hq"])
        return all(contacts(urls[s]) == first for s in TWO_WAY_SITES if s != "hq")

    def work(site: str, per_site: int) -> None:
        base = TWO_WAY_SITES[site] * 10_000_000
        with psycopg.connect(urls[site]) as conn:
            for first in range(1, per_site + 1, 50):
                with conn.transaction():
                    conn.execute("insert into public.contact (id, name) select %s + g, %s || g from "
                                 "generate_series(%s::int, %s::int) g", (base, site + " ", first,
                                                                         min(per_site, first + 49)))
            for first in range(1, per_site + 1, 200):
                with conn.transaction():
                    conn.execute("update public.contact set phone = %s where id between %s and %s and id %% 2 = 0",
                                 (site, base + first, base + first + 199))

    try:
        sites.apply(topo)
        runner = SitesRunner(chosen_links(topo, None, include_on_demand=True), lambda line: None, topology=topo)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        time.sleep(5)  # the appliers prepared (their destinations' tables are there already)
        per_site = args.rows // 4
        changes = 4 * (per_site + per_site // 2)
        print(f"sites_bench --two-way: {name}, master + 3 satellites, each {per_site:,} inserts and "
              f"{per_site // 2:,} updates of one shared table, at once", flush=True)
        started = time.monotonic()
        writers = [threading.Thread(target=work, args=(s, per_site)) for s in TWO_WAY_SITES]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        written = time.monotonic() - started
        while not (len(contacts(urls["hq"])) == 4 * per_site and equal()):
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"sites_bench --two-way: the sites are not equal after {args.timeout:.0f} s; no "
                                 "figure recorded")
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        rate = f"{changes / elapsed:,.0f}"
        print(f"written in {written:.1f} s; all four sites equal after {elapsed:.1f} s: {rate} changes/s", flush=True)
        if not args.no_record:
            record(f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {machine()} | master + 3 satellites | {changes:,} "
                   f"({per_site:,} inserts and {per_site // 2:,} updates at each) | {elapsed:.1f} s | {rate} | all "
                   f"four sites equal by SQL (rows and versions); written in {written:.1f} s; load average at start "
                   f"{load} (code {commit()}) |", TWO_WAY_RUNS, TWO_WAY_SECTION)
            print(f"recorded in {RESULTS}")
    finally:
        if runner is not None:
            runner.stop()
            time.sleep(2)
        for link in topo.links():
            capture.delete(link.pipeline, purge=True)
        admin = topics.admin_client(layout.kafka_bootstrap)
        mine = [t for t in topics.existing_topics(admin) if t.startswith(name + "-") or t.endswith(name)]
        if mine:
            admin.delete_topics(mine, operation_timeout=30)
        with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
            for db in dbs.values():
                conn.execute(f'drop database if exists "{db}" with (force)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--two-way", action="store_true", help="One shared table edited at all four sites.")
    parser.add_argument("--no-record", action="store_true", help="Print the figures only.")
    args = parser.parse_args()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    layout = stack.up(echo=lambda line: None)
    if args.two_way:
        two_way(args, layout, load)
        return
    name = f"sb{uuid.uuid4().hex[:6]}"
    dbs = {site: f"sites_bench_{site}_{uuid.uuid4().hex[:6]}" for site in ["hq", *SUBSETS]}
    with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
        for db in dbs.values():
            conn.execute(f'create database "{db}"')
    urls = {site: layout.postgres_url(db) for site, db in dbs.items()}
    for url in urls.values():
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SCHEMA if url == urls["hq"] else SCHEMA.split(";")[1])
    endpoints = layout.urls()
    data = {"topology": name,
            "kafka": {"bootstrap_servers": layout.kafka_bootstrap, "schema_registry_url": endpoints["schema_registry"],
                      "connect_url": endpoints["connect"]},
            "sites": {"hq": {"sync_id": 1, "url": urls["hq"]},
                      **{s: {"sync_id": i + 2, "url": urls[s]} for i, s in enumerate(SUBSETS)}},
            "master_tables": ["public.item"], "site_tables": {"public.sale": "site_id"},
            "subsets": {"north": {"public.item": {"where": SUBSETS["north"], "columns": ["id", "name", "region"]}},
                        "south": {"public.item": {"where": SUBSETS["south"]}}}}
    topo = topology_mod.parse(yaml.safe_load(yaml.safe_dump(data)), "sites_bench", env={})
    runner = None
    try:
        sites.apply(topo)
        runner = SitesRunner(chosen_links(topo, None, include_on_demand=True), lambda line: None)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        ready = time.monotonic()
        while not converged(urls):  # the (empty) snapshots applied: every satellite has its table
            if time.monotonic() - ready > args.timeout:
                raise SystemExit("sites_bench: the satellites' tables were not made; no figure recorded")
            time.sleep(0.5)
        n = args.rows
        print(f"sites_bench: {name}, master + 3 satellites; {n:,} inserts and {n // 2:,} updates at the master",
              flush=True)
        started = time.monotonic()
        with psycopg.connect(urls["hq"]) as conn:
            for first in range(1, n + 1, 50):
                with conn.transaction():
                    conn.execute("insert into public.item select g, 'item ' || g, (array['all','north','south',"
                                 "'east'])[1 + g %% 4], g / 100.0 from generate_series(%s::int, %s::int) g",
                                 (first, min(n, first + 49)))
            for first in range(1, n + 1, 100):
                with conn.transaction():
                    conn.execute("update public.item set name = name || '+', region = (array['all','north',"
                                 "'south','east'])[1 + (id / 2) %% 4] where id between %s and %s and id %% 2 = 0",
                                 (first, first + 99))
        written = time.monotonic() - started
        while not converged(urls):
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"sites_bench: the satellites are not equal to their subsets after {args.timeout:.0f} "
                                 "s; no figure recorded")
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        changes = n + n // 2
        applied = sum(len(subset_rows(urls["hq"], where, "id")) for where in SUBSETS.values())
        rates = f"{changes / elapsed:,.0f}", f"{applied / elapsed:,.0f}"
        print(f"written in {written:.1f} s; every satellite equal to its subset after {elapsed:.1f} s: "
              f"{rates[0]} master changes/s, {rates[1]} satellite rows/s (final rows: {applied:,})", flush=True)
        if not args.no_record:
            record(f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {machine()} | master + 3 satellites | {n:,} inserts, "
                   f"{n // 2:,} updates | {elapsed:.1f} s | {rates[0]} | {rates[1]} | every satellite equal to its "
                   f"subset by SQL; written in {written:.1f} s; load average at start {load} (code {commit()}) |")
            print(f"recorded in {RESULTS}")
    finally:
        if runner is not None:
            runner.stop()
            time.sleep(2)
        for link in topo.links():
            capture.delete(link.pipeline, purge=True)
        admin = topics.admin_client(layout.kafka_bootstrap)
        mine = [t for t in topics.existing_topics(admin) if t.startswith(name + "-") or t.endswith(name)]
        if mine:
            admin.delete_topics(mine, operation_timeout=30)
        with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
            for db in dbs.values():
                conn.execute(f'drop database if exists "{db}" with (force)')


if __name__ == "__main__":
    main()
