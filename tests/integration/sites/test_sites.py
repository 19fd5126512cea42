"""Sites, first slice (issue 18): a master and three satellites on the shared stack, four PostgreSQL databases of the
test's own. Random workloads at all four; one satellite offline for a while (its links not run) then back; a third
satellite added to the topology later, catching up from a full sync of its subset. At the end, by plain SQL read
independently of the project's code: the master holds every site's rows plus its own, each satellite the master data
of its subset (rows by predicate, only its columns) and its own rows, and nothing else."""

from __future__ import annotations

import json
import random
import uuid

import psycopg
import pytest
import yaml

from cdc import topology as topology_mod
from producers import capture
from tests.integration.pipelines import CDC, fresh_database, purge, topic_messages

pytestmark = pytest.mark.integration

MASTER_SCHEMA = """
create table public.category (id int primary key, name text not null);
create table public.item (id int primary key, name text not null, region text not null, cost numeric(10,2));
create table public.sale (site_id int not null, id int not null, item_id int not null, qty int not null,
                          primary key (site_id, id));
"""
SATELLITE_SCHEMA = """
create table public.sale (site_id int not null, id int not null, item_id int not null, qty int not null,
                          primary key (site_id, id));
"""
REGIONS = ["all", "north", "south", "east"]
SATELLITES = {"north": 2, "south": 3, "east": 4}


@pytest.fixture
def databases(stack):
    gens = {name: fresh_database(stack, f"site_{name}") for name in ["hq", *SATELLITES]}
    names = {site: next(gen) for site, gen in gens.items()}
    yield {site: stack.postgres_url(db) for site, db in names.items()}
    for gen in gens.values():
        with pytest.raises(StopIteration):
            next(gen)


def topology_file(stack, tmp_path, urls, name, satellites):
    kafka = stack.urls()
    data = {
        "topology": name,
        "kafka": {"bootstrap_servers": stack.kafka_bootstrap, "schema_registry_url": kafka["schema_registry"],
                  "connect_url": kafka["connect"]},
        "sites": {"hq": {"sync_id": 1, "url": urls["hq"]},
                  **{s: {"sync_id": SATELLITES[s], "url": urls[s],
                         "sync": "continuous" if s != "south" else "every 1 minutes"} for s in satellites}},
        "master_tables": ["public.category", "public.item"],
        "site_tables": {"public.sale": "site_id"},
        "subsets": {
            # north: its region's items and the shared ones, without their cost; every category
            "north": {"public.item": {"where": "region in ('all', 'north')", "columns": ["id", "name", "region"]},
                      "public.category": None},
            # south: its items with every column, no categories
            "south": {"public.item": {"where": "region in ('all', 'south')"}},
            # east (added later): everything of the master's
        },
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cdc(path, *args, timeout=600):
    import subprocess

    return subprocess.run([CDC, *args, "-c", str(path)], capture_output=True, text=True, timeout=timeout)


def ok(run):
    assert run.returncode == 0, run.stdout + run.stderr
    return run


class Workload:
    """Random changes: master lists at the master, each site's own sales at that site (the master's with id 1)."""

    def __init__(self, urls, seed=18):
        self.urls = urls
        self.rng = random.Random(seed)
        self.next_id = {site: 1 for site in urls}

    def master_lists(self, n):
        with psycopg.connect(self.urls["hq"], autocommit=True) as conn:
            for _ in range(n):
                ids = [r[0] for r in conn.execute("select id from public.item").fetchall()]
                roll = self.rng.random()
                if roll < 0.5 or len(ids) < 5:
                    i = self.next_id["hq"]
                    self.next_id["hq"] += 1
                    with conn.transaction():
                        conn.execute("insert into public.item values (%s, %s, %s, %s)",
                                     (i, f"item {i}", self.rng.choice(REGIONS), self.rng.randint(1, 9999) / 100))
                        conn.execute("insert into public.category values (%s, %s) on conflict (id) do update "
                                     "set name = excluded.name", (i % 7, f"category {i % 7} v{i}"))
                elif roll < 0.85:
                    # an update may move an item into or out of a satellite's subset (its region changes)
                    conn.execute("update public.item set name = name || '+', region = %s, cost = %s where id = %s",
                                 (self.rng.choice(REGIONS), self.rng.randint(1, 9999) / 100, self.rng.choice(ids)))
                else:
                    conn.execute("delete from public.item where id = %s", (self.rng.choice(ids),))

    def sales(self, site, sync_id, n):
        with psycopg.connect(self.urls[site], autocommit=True) as conn:
            for _ in range(n):
                ids = [r[0] for r in conn.execute("select id from public.sale where site_id = %s",
                                                  (sync_id,)).fetchall()]
                roll = self.rng.random()
                if roll < 0.6 or len(ids) < 3:
                    i = self.next_id[site]
                    self.next_id[site] += 1
                    conn.execute("insert into public.sale values (%s, %s, %s, %s)",
                                 (sync_id, i, self.rng.randint(1, 50), self.rng.randint(1, 9)))
                elif roll < 0.85:
                    conn.execute("update public.sale set qty = qty + 1 where site_id = %s and id = %s",
                                 (sync_id, self.rng.choice(ids)))
                else:
                    conn.execute("delete from public.sale where site_id = %s and id = %s",
                                 (sync_id, self.rng.choice(ids)))

    def round(self, sites, n=25):
        self.master_lists(n)
        self.sales("hq", 1, n // 2)
        for site in sites:
            self.sales(site, SATELLITES[site], n)


def rows(url, query, *params):
    with psycopg.connect(url) as conn:
        return sorted(conn.execute(query, params).fetchall())


def columns(url, table):
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = 'public' and table_name = %s "
            "and column_name not like '\\_cdc\\_%%' order by ordinal_position", (table,)).fetchall()]


def tables(url):
    with psycopg.connect(url) as conn:
        return sorted(r[0] for r in conn.execute(
            "select table_name from information_schema.tables where table_schema = 'public' "
            "and table_name not like '\\_cdc\\_%%' and table_name not like 'cdc\\_signal%%'").fetchall())


def assert_converged(urls, satellites):
    hq = urls["hq"]
    # the master: its own sales and every satellite's, nothing else
    expected = rows(hq, "select site_id, id, item_id, qty from public.sale where site_id = 1")
    for site in satellites:
        expected += rows(urls[site], "select site_id, id, item_id, qty from public.sale")
    assert rows(hq, "select site_id, id, item_id, qty from public.sale") == sorted(expected)
    for site in satellites:
        url = urls[site]
        # its own sales only (none of another site's came back)
        assert rows(url, "select distinct site_id from public.sale") in ([], [(SATELLITES[site],)])
        items = rows(url, "select id, name, region from public.item")
        if site == "north":
            assert items == rows(hq, "select id, name, region from public.item where region in ('all', 'north')")
            # the cost never left the master for north: the column holds nothing there
            assert rows(url, "select count(*) from public.item where cost is not null") == [(0,)]
            assert rows(url, "select id, name from public.category") == rows(hq, "select id, name from "
                                                                               "public.category")
            assert tables(url) == ["category", "item", "sale"]
        elif site == "south":
            assert rows(url, "select id, name, region, cost from public.item") == rows(
                hq, "select id, name, region, cost from public.item where region in ('all', 'south')")
            assert tables(url) == ["item", "sale"]  # no categories in south's subset
        else:
            assert rows(url, "select id, name, region, cost from public.item") == rows(
                hq, "select id, name, region, cost from public.item")
            assert rows(url, "select id, name from public.category") == rows(hq, "select id, name from "
                                                                               "public.category")


def assert_north_topic_holds_its_subset_only(stack, decoder, name):
    """What reached Kafka for north (its topic of public.item, from the start): rows of its subset only, and never
    the cost; a row that left the subset arrives as a delete (an `after` of null)."""
    topic = f"{name}-north-down.public.item"
    seen = 0
    for message in topic_messages(stack, [topic]):
        record = decoder.decode(message.value())
        if record is None:
            continue
        for image in (record.get("before"), record.get("after")):
            if image is None:
                continue
            seen += 1
            assert "cost" not in image, image
            if image is record.get("after"):
                assert image["region"] in ("all", "north"), record
    assert seen > 0


def test_master_and_three_satellites(stack, connect, databases, decoder, tmp_path):
    urls = databases
    name = f"s{uuid.uuid4().hex[:6]}"
    with psycopg.connect(urls["hq"], autocommit=True) as conn:
        conn.execute(MASTER_SCHEMA)
    for site in SATELLITES:
        with psycopg.connect(urls[site], autocommit=True) as conn:
            conn.execute(SATELLITE_SCHEMA)
    work = Workload(urls)
    work.round(["north", "south", "east"], n=20)  # data before anything is applied: the snapshots carry it

    path = topology_file(stack, tmp_path, urls, name, ["north", "south"])
    try:
        planned = ok(cdc(path, "topology", "plan"))
        assert f"{name}-north-down (master -> north, sync continuous): create" in planned.stdout
        assert "public.item -> " in planned.stdout and "rows where region in ('all', 'north')" in planned.stdout
        assert "without columns cost" in planned.stdout
        ok(cdc(path, "topology", "apply"))
        again = ok(cdc(path, "topology", "plan"))
        assert ": create" not in again.stdout and ": update" not in again.stdout, again.stdout

        work.round(["north", "south", "east"])
        ok(cdc(path, "sites", "run", "--until-caught-up", "--timeout", "240", timeout=400))
        assert_converged(urls, ["north", "south"])

        # continuous links run in the background while every site works; south is offline meanwhile (its links
        # not run), then north catches up on what is left
        import signal
        import subprocess
        import time

        background = subprocess.Popen([CDC, "sites", "run", "north", "-c", str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(3):
                work.round(["north", "south", "east"], n=15)
                time.sleep(1)
        finally:
            background.send_signal(signal.SIGTERM)
            out, _ = background.communicate(timeout=120)
        assert background.returncode == 0, out
        assert f"{name}-north-down: applied" in out, out
        ok(cdc(path, "sites", "run", "north", "--until-caught-up", "--timeout", "240", timeout=400))
        status = json.loads(ok(cdc(path, "sites", "status", "--json")).stdout)
        south = next(s for s in status["sites"] if s["site"] == "south")
        assert south["lag_messages"] > 0 and south["status"] != "OK", south
        work.round(["north", "south", "east"])

        # east joins: the topology gains it, its links start with a full sync of its subset
        path = topology_file(stack, tmp_path, urls, name, ["north", "south", "east"])
        applied = ok(cdc(path, "topology", "apply", "east"))
        assert f"{name}-east-down" in applied.stdout
        work.round(["north", "south", "east"])
        ok(cdc(path, "sites", "run", "--until-caught-up", "--timeout", "240", timeout=400))
        assert_converged(urls, ["north", "south", "east"])
        assert_north_topic_holds_its_subset_only(stack, decoder, name)

        status = json.loads(ok(cdc(path, "sites", "status", "--json")).stdout)
        assert [s["site"] for s in status["sites"]] == ["hq", "north", "south", "east"]
        for site in status["sites"]:
            assert site["status"] == "OK" and site["lag_messages"] == 0 and not site["errors"], json.dumps(site)
            assert site["last_sync_at"] is not None, site

        shown = ok(cdc(path, "sites", "status")).stdout.splitlines()
        assert [line.split()[:4] for line in shown] == [["1", "hq", "master", "OK"], ["2", "north", "satellite", "OK"],
                                                        ["3", "south", "satellite", "OK"],
                                                        ["4", "east", "satellite", "OK"]], shown
        assert all("lag 0 messages / 0.0 s" in line and "last sync never" not in line for line in shown), shown

        # east taken away again: its links' connectors, slots, publications and signalling tables go
        removed = ok(cdc(path, "topology", "remove", "east", "--purge"))
        topo = topology_mod.load(path, env={})
        for link in [li for li in topo.links() if li.satellite == "east"]:
            p = link.pipeline
            assert f"connector {p.connector_name}: deleted" in removed.stdout, removed.stdout
            assert connect.status(p.connector_name) is None
            source = topo.sites["hq" if link.direction == "down" else "east"].url.get_secret_value()
            assert rows(source, "select slot_name from pg_replication_slots where slot_name = %s", p.slot_name) == []
            assert rows(source, "select pubname from pg_publication where pubname = %s", p.publication_name) == []
            assert rows(source, "select to_regclass(%s) is null", p.source.signal_table) == [(True,)]
        assert connect.status(f"{name}-north-down-source") is not None  # the others stay
    finally:
        topo = topology_mod.load(path, env={})
        for link in topo.links():
            try:
                purge(link.pipeline)
            except Exception:  # noqa: BLE001 - the connector of a link never applied
                capture.delete(link.pipeline, purge=True)


@pytest.mark.parametrize("subset, expected", [
    ({"public.item": {"where": "colour = 'red'"}},
     "subsets.north.public.item.where: \"colour = 'red'\" is not a predicate over public.item: column \"colour\" "
     "does not exist"),
    ({"public.item": {"columns": ["id", "nope"]}}, "subsets.north.public.item.columns: public.item has no column "
                                                   "'nope'"),
    ({"public.item": {"columns": ["name", "region"]}}, "subsets.north.public.item.columns: the primary key column "
                                                       "'id' must be received"),
    ({"public.item": {"columns": ["id", "region"]}}, "subsets.north.public.item.columns: 'name' cannot be left out: "
                                                     "NOT NULL at the master"),
], ids=["bad predicate", "unknown column", "key left out", "not null left out"])
def test_a_subset_that_does_not_fit_the_master_is_refused_before_anything_changes(stack, connect, databases,
                                                                                   tmp_path, subset, expected):
    urls = databases
    with psycopg.connect(urls["hq"], autocommit=True) as conn:
        conn.execute(MASTER_SCHEMA)
    with psycopg.connect(urls["north"], autocommit=True) as conn:
        conn.execute(SATELLITE_SCHEMA)
    name = f"s{uuid.uuid4().hex[:6]}"
    path = topology_file(stack, tmp_path, urls, name, ["north"])
    data = yaml.safe_load(path.read_text())
    data["subsets"] = {"north": subset}
    path.write_text(yaml.safe_dump(data))
    for command in ("plan", "apply"):
        run = cdc(path, "topology", command)
        assert run.returncode == 2, run.stdout + run.stderr
        assert f"error: {path}: {expected}" in run.stderr, run.stderr
    assert connect.status(f"{name}-north-down-source") is None
    assert connect.status(f"{name}-north-up-source") is None
    # nothing changed at the master either (its site-owned table did not gain _cdc_lsn)
    assert rows(urls["hq"], "select column_name from information_schema.columns where table_name = 'sale'") == [
        ("id",), ("item_id",), ("qty",), ("site_id",)]
