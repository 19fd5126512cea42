"""Triggered sync of a topology's link (sync: {after_change: N}): `cdc sites run` left running syncs a satellite by
itself N seconds after a change began waiting in its topics, and not before; a forced full sync (`cdc sites resync`).
Checked by plain SQL at the satellite."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
import uuid

import psycopg
import pytest
import yaml

from cdc import topology as topology_mod
from producers import capture
from tests.integration.pipelines import CDC, fresh_database, purge

pytestmark = pytest.mark.integration

MASTER_SCHEMA = """
create table public.item (id int primary key, name text not null, region text not null);
insert into public.item select i, 'item ' || i, case when i % 2 = 0 then 'north' else 'south' end
  from generate_series(1, 6) i;
"""
DELAY = 8.0


@pytest.fixture
def two_databases(stack):
    gens = {name: fresh_database(stack, f"trig_{name}") for name in ("hq", "north")}
    names = {site: next(gen) for site, gen in gens.items()}
    yield {site: stack.postgres_url(db) for site, db in names.items()}
    for gen in gens.values():
        with pytest.raises(StopIteration):
            next(gen)


def write_topology(stack, tmp_path, urls, name, sync):
    kafka = stack.urls()
    data = {
        "topology": name,
        "kafka": {"bootstrap_servers": stack.kafka_bootstrap, "schema_registry_url": kafka["schema_registry"],
                  "connect_url": kafka["connect"]},
        "sites": {"hq": {"sync_id": 1, "url": urls["hq"]},
                  "north": {"sync_id": 2, "url": urls["north"], "sync": sync}},
        "master_tables": ["public.item"],
        "subsets": {"north": {"public.item": {"where": "region = 'north'"}}},
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cdc(path, *args, timeout=600):
    return subprocess.run([CDC, *args, "-c", str(path)], capture_output=True, text=True, timeout=timeout)


def ok(run):
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def items(url):
    with psycopg.connect(url) as conn:
        if conn.execute("select to_regclass('public.item')").fetchone()[0] is None:
            return []
        return sorted(conn.execute("select id, name, region from public.item").fetchall())


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what}")


def cleanup(path):
    topo = topology_mod.load(path, env={})
    for link in topo.links():
        try:
            purge(link.pipeline)
        except Exception:  # noqa: BLE001 - the connector of a link never applied
            capture.delete(link.pipeline, purge=True)


def test_an_after_change_link_syncs_by_itself_after_its_delay_and_not_before(stack, connect, two_databases,
                                                                              tmp_path):
    urls = two_databases
    with psycopg.connect(urls["hq"], autocommit=True) as conn:
        conn.execute(MASTER_SCHEMA)
    name = f"t{uuid.uuid4().hex[:6]}"
    path = write_topology(stack, tmp_path, urls, name, {"after_change": f"{DELAY:g}s"})
    expected = lambda: items(urls["hq"]) and [r for r in items(urls["hq"]) if r[2] == "north"]  # noqa: E731
    runner = None
    try:
        ok(cdc(path, "topology", "apply"))
        log = (tmp_path / "run.log").open("w")
        runner = subprocess.Popen([CDC, "sites", "run", "-c", str(path)], stdout=log, stderr=subprocess.STDOUT,
                                  text=True)
        # the full sync (the snapshot waiting in north's topic) is a change like any other: applied after the delay
        wait_for(lambda: items(urls["north"]) == expected(), 180, "north holds its subset after the snapshot")
        # and that round is over: a change made while it still runs is applied by it, with no delay of its own
        wait_for(lambda: f"{name}-north-down: applied" in (tmp_path / "run.log").read_text(), 120,
                 "the snapshot's round ended")

        with psycopg.connect(urls["hq"], autocommit=True) as conn:
            before = time.monotonic()
            conn.execute("insert into public.item values (100, 'new', 'north'), (101, 'other', 'south')")
            conn.execute("update public.item set name = 'renamed' where id = 2")
        time.sleep(DELAY / 2)
        assert (100, "new", "north") not in items(urls["north"])  # waiting: not before its delay
        assert (2, "item 2", "north") in items(urls["north"])
        arrived = wait_for(lambda: items(urls["north"]) == expected(), 90, "north has the change after the delay")
        assert arrived - before >= DELAY - 1.0, arrived - before  # the delay counts from the commit (same clock)
        assert (100, "new", "north") in items(urls["north"]) and (2, "renamed", "north") in items(urls["north"])
        assert runner.poll() is None  # still running, waiting for the next change
        runner.send_signal(signal.SIGTERM)
        runner.wait(120)
        log.close()
        out = (tmp_path / "run.log").read_text()
        assert runner.returncode == 0, out
        assert f"{name}-north-down: sync (a change waiting {DELAY:g}s)" in out, out
        assert "not started" not in out and "failed" not in out, out

        status = ok(cdc(path, "sites", "status", "--json")).stdout
        assert '"sync": "after change 8s, when back online"' in status, status
    finally:
        if runner is not None and runner.poll() is None:
            runner.kill()
            runner.wait(30)
        cleanup(path)


def test_a_forced_full_sync_makes_the_satellite_equal_to_its_subset(stack, connect, two_databases, tmp_path):
    urls = two_databases
    with psycopg.connect(urls["hq"], autocommit=True) as conn:
        conn.execute(MASTER_SCHEMA)
        conn.execute("alter table public.item add column cost numeric(8,2)")
        conn.execute("update public.item set cost = id * 1.5")
        conn.execute("create table public.category (id int primary key, name text not null)")
        conn.execute("insert into public.category values (1, 'one'), (2, 'two')")
    name = f"t{uuid.uuid4().hex[:6]}"
    path = write_topology(stack, tmp_path, urls, name, "on_demand")
    data = yaml.safe_load(path.read_text())
    data["master_tables"] = ["public.item", "public.category"]
    data["subsets"]["north"] = {"public.item": {"where": "region = 'north'", "columns": ["id", "name", "region"]},
                                "public.category": None}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        ok(cdc(path, "topology", "apply"))
        ok(cdc(path, "sites", "run", "--until-caught-up", "--timeout", "240", timeout=400))
        subset = "select id, name, region from public.item where region = 'north' order by id"
        with psycopg.connect(urls["hq"]) as conn:
            master = conn.execute(subset).fetchall()
        assert items(urls["north"]) == master and len(master) == 3

        # the satellite's copy damaged by hand: a row gone, one changed, one that the master never had
        with psycopg.connect(urls["north"], autocommit=True) as conn:
            conn.execute("delete from public.item where id = 2")
            conn.execute("update public.item set name = 'damaged' where id = 4")
            conn.execute("insert into public.item (id, name, region, _cdc_lsn) values (999, 'stray', 'north', 0)")
            conn.execute("delete from public.category")
        # and the master moves on meanwhile: the full sync carries its current rows
        with psycopg.connect(urls["hq"], autocommit=True) as conn:
            conn.execute("update public.item set name = 'moved on' where id = 6")
            master = conn.execute(subset).fetchall()

        run = cdc(path, "sites", "resync", "north", "--table", "public.item", "--json", timeout=400)
        assert run.returncode == 0, run.stdout + run.stderr
        doc = json.loads(run.stdout)
        assert doc["tables"] == [{"table": "public.item", "master_rows": 3, "deleted": 1, "equal": True,
                                  "differences": []}], doc
        assert items(urls["north"]) == master  # by plain SQL: the subset's rows, nothing else
        with psycopg.connect(urls["north"]) as conn:
            assert conn.execute("select count(*) from public.item where cost is not null").fetchone() == (0,)
            assert conn.execute("select count(*) from public.category").fetchone() == (0,)  # --table: item only

        # the whole subset: every table of it
        run = ok(cdc(path, "sites", "resync", "north", timeout=400))
        assert "public.item: equal" in run.stdout and "public.category: equal (2 rows" in run.stdout, run.stdout
        with psycopg.connect(urls["north"]) as conn:
            assert conn.execute("select id, name from public.category order by id").fetchall() == [(1, "one"),
                                                                                                  (2, "two")]
        # a table outside the subset is refused, naming it
        bad = cdc(path, "sites", "resync", "north", "--table", "public.sale")
        assert bad.returncode == 2 and "--table: public.sale is not in north's subset" in bad.stderr, bad.stderr

        # the sites in Prometheus and on the page: one real scrape of `cdc sites serve`
        serve = subprocess.Popen([CDC, "sites", "serve", "--port", "0", "--interval", "2", "-c", str(path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            first = serve.stdout.readline()
            assert "metrics http://127.0.0.1:" in first, first + (serve.stdout.read() if serve.poll() else "")
            base = first.split("metrics ")[1].strip().rsplit("/metrics", 1)[0]
            metrics = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
            link = f"{name}-north-down"
            for line in (f'cdc_site_status{{link="",site="north",status="OK",topology="{name}"}} 1.0',
                         f'cdc_site_status{{link="{link}",site="north",status="OK",topology="{name}"}} 1.0',
                         f'cdc_site_lag_messages{{link="{link}",site="north",topology="{name}"}} 0.0',
                         f'cdc_site_conflicts_waiting{{site="north",topology="{name}"}} 0.0',
                         f'cdc_site_sync_blocked{{link="{link}",site="north",topology="{name}"}} 0.0',
                         f'cdc_sites_sample_errors_total{{topology="{name}"}} 0.0'):
                assert line in metrics.splitlines(), (line, metrics)
            assert f'cdc_site_last_sync_timestamp_seconds{{link="{link}",site="north"' in metrics
            feed = json.loads(urllib.request.urlopen(base + "/api/sites", timeout=30).read())
            assert [s["site"] for s in feed["sites"]["sites"]] == ["hq", "north"], feed
            assert 'data-feed="/api/sites"' in urllib.request.urlopen(base + "/", timeout=30).read().decode()
        finally:
            serve.send_signal(signal.SIGINT)
            serve.wait(60)
    finally:
        cleanup(path)


def test_a_satellite_refuses_a_site_owned_row_of_another_site(stack, connect, two_databases, tmp_path):
    urls = two_databases
    sale = ("create table public.sale (site_id int, id int not null, qty int not null, "
            "primary key (id))")
    with psycopg.connect(urls["hq"], autocommit=True) as conn:
        conn.execute(MASTER_SCHEMA)
        conn.execute(sale)
    with psycopg.connect(urls["north"], autocommit=True) as conn:
        conn.execute(sale)
    name = f"t{uuid.uuid4().hex[:6]}"
    path = write_topology(stack, tmp_path, urls, name, "on_demand")
    data = yaml.safe_load(path.read_text())
    data["site_tables"] = {"public.sale": "site_id"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        applied = ok(cdc(path, "topology", "apply"))
        assert "north: public.sale refuses rows whose site_id is not 2" in applied.stdout, applied.stdout
        again = ok(cdc(path, "topology", "apply"))  # idempotent, and said once
        assert "refuses rows" not in again.stdout, again.stdout
        with psycopg.connect(urls["north"], autocommit=True) as conn:
            conn.execute("insert into public.sale values (2, 1, 5)")  # its own: taken
            for statement in ("insert into public.sale values (3, 2, 5)",
                              "insert into public.sale values (null, 3, 5)",
                              "update public.sale set site_id = 1 where id = 1"):
                with pytest.raises(psycopg.errors.CheckViolation) as info:
                    conn.execute(statement)
                assert "public.sale holds each site's own rows: sale.site_id = " in str(info.value), info.value
                assert "is not this site's sync id (2)" in str(info.value)
            rows_north = conn.execute("select site_id, id, qty from public.sale").fetchall()
        assert rows_north == [(2, 1, 5)]
        ok(cdc(path, "sites", "run", "--until-caught-up", "--timeout", "240", timeout=400))
        with psycopg.connect(urls["hq"]) as conn:  # what the satellite holds reached the master, nothing lost
            assert conn.execute("select site_id, id, qty from public.sale").fetchall() == [(2, 1, 5)]
    finally:
        cleanup(path)
