"""Sites, two-way tables (issue 18): a master and three satellites on the shared stack (four PostgreSQL databases of
the test's own), three shared tables edited at all four, one per conflict policy (newer, priority, manual), and a
master-owned table whose satellite edits are refused. Random workloads at every site, one satellite offline for a
while (its links not run) then back, and concurrent edits of the same rows at two sites for each policy, the manual
one resolved with `cdc conflicts resolve`. At the end, by plain SQL read independently of the project's code: every
site holds the same rows of every shared table, each conflict was decided per its policy and recorded, and nothing
echoes (a further sync applies nothing; the master never applied its own change back)."""

from __future__ import annotations

import json
import random
import re
import time
import uuid

import psycopg
import pytest
import yaml

from cdc import topology as topology_mod
from producers import capture
from tests.integration.pipelines import CDC, fresh_database, purge

pytestmark = pytest.mark.integration

SHARED_SCHEMA = """
create table public.contact (id int primary key, name text not null, phone text);
create table public.deal (id int primary key, amount int not null, stage text not null);
create table public.note (id int primary key, body text not null);
"""
MASTER_SCHEMA = SHARED_SCHEMA + "create table public.item (id int primary key, name text not null);"
SITES = {"hq": 1, "north": 2, "south": 3, "east": 4}
SATELLITES = ["north", "south", "east"]
SHARED = {"public.contact": "id, name, phone", "public.deal": "id, amount, stage", "public.note": "id, body"}
# Rows the random workload leaves alone: the deliberate conflicts' (id 1 of each table).
FIXED = 1


@pytest.fixture
def databases(stack):
    gens = {name: fresh_database(stack, f"two_{name}") for name in SITES}
    names = {site: next(gen) for site, gen in gens.items()}
    yield {site: stack.postgres_url(db) for site, db in names.items()}
    for gen in gens.values():
        with pytest.raises(StopIteration):
            next(gen)


def topology_file(stack, tmp_path, urls, name):
    kafka = stack.urls()
    data = {
        "topology": name,
        "kafka": {"bootstrap_servers": stack.kafka_bootstrap, "schema_registry_url": kafka["schema_registry"],
                  "connect_url": kafka["connect"]},
        "sites": {site: {"sync_id": sync_id, "url": urls[site]} for site, sync_id in SITES.items()},
        "master_tables": ["public.item"],
        "shared_tables": {"public.contact": "newer",
                          "public.deal": {"priority": ["south", "hq"]},  # then north, east (by sync id)
                          "public.note": "manual"},
        "on_satellite_edit": "reject",
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


def rows(url, query, *params):
    with psycopg.connect(url) as conn:
        return sorted(conn.execute(query, params).fetchall())


def sync(path, *satellites, rounds=8):
    """`cdc sites run --until-caught-up` until a round applies nothing anywhere: a change from a satellite needs two
    rounds to reach the others (up, then down), and what the appliers wrote comes back once to be dropped. A loop
    would never settle."""
    applied = []
    for _ in range(rounds):
        run = ok(cdc(path, "sites", "run", *satellites, "--until-caught-up", "--timeout", "240", timeout=400))
        applied = [int(n) for n in re.findall(r": applied (\d+) rows", run.stdout)]
        assert applied, run.stdout
        if not any(applied):
            return run
    raise AssertionError(f"still applying after {rounds} rounds: {applied}")


class Workload:
    """Random transactions at a site on the shared tables: inserts under the site's own id range, updates of any row
    but the deliberate conflicts' (so concurrent edits of one row also happen at random), deletes of the site's own
    rows."""

    def __init__(self, urls, seed=15):
        self.urls = urls
        self.rng = random.Random(seed)
        self.next_id = {site: 1 for site in urls}

    def run(self, site, n):
        base = SITES[site] * 100_000
        with psycopg.connect(self.urls[site], autocommit=True) as conn:
            for _ in range(n):
                table = self.rng.choice(list(SHARED))
                ids = [r[0] for r in conn.execute(f"select id from {table} where id <> %s", (FIXED,)).fetchall()]
                roll = self.rng.random()
                with conn.transaction():
                    if roll < 0.45 or len(ids) < 3:
                        i = base + self.next_id[site]
                        self.next_id[site] += 1
                        self.insert(conn, table, i, site)
                    elif roll < 0.85:
                        self.update(conn, table, self.rng.choice(ids), site)
                    else:
                        own = [i for i in ids if base <= i < base + 100_000]
                        if own:
                            conn.execute(f"delete from {table} where id = %s", (self.rng.choice(own),))
                        else:
                            self.update(conn, table, self.rng.choice(ids), site)

    def insert(self, conn, table, i, site):
        if table == "public.contact":
            conn.execute("insert into public.contact (id, name, phone) values (%s, %s, %s)", (i, f"{site} {i}", None))
        elif table == "public.deal":
            conn.execute("insert into public.deal (id, amount, stage) values (%s, %s, 'open')",
                         (i, self.rng.randint(1, 999)))
        else:
            conn.execute("insert into public.note (id, body) values (%s, %s)", (i, f"note by {site}"))

    def update(self, conn, table, i, site):
        if table == "public.contact":
            conn.execute("update public.contact set phone = %s where id = %s", (f"{site}-{self.rng.randint(1, 99)}", i))
        elif table == "public.deal":
            conn.execute("update public.deal set amount = %s where id = %s", (self.rng.randint(1, 999), i))
        else:
            conn.execute("update public.note set body = body || %s where id = %s", (f" +{site}", i))


def shared_rows(url):
    """Every shared table's rows with their version (site and time written), as an independent reader sees them."""
    return {table: rows(url, f"select {columns}, _cdc_site, _cdc_at from {table}") for table, columns in SHARED.items()}


def assert_same_everywhere(urls):
    master = shared_rows(urls["hq"])
    assert all(master.values())
    for site in SATELLITES:
        mine = shared_rows(urls[site])
        for table in SHARED:
            assert mine[table] == master[table], (site, table, sorted(set(mine[table]) ^ set(master[table]))[:10])


def conflicts_at(url, table, key_id):
    return rows(url, "select policy, decision, state, local ->> %s, incoming ->> %s, local_site, incoming_site "
                "from public._cdc_conflicts where table_name = %s and key = jsonb_build_object('id', %s)",
                "name" if table == "public.contact" else "amount" if table == "public.deal" else "body",
                "name" if table == "public.contact" else "amount" if table == "public.deal" else "body",
                table, key_id)


def test_two_way_tables_with_conflicts(stack, connect, databases, tmp_path):
    urls = databases
    name = f"w{uuid.uuid4().hex[:6]}"
    with psycopg.connect(urls["hq"], autocommit=True) as conn:
        conn.execute(MASTER_SCHEMA)
        for i in range(1, 11):
            conn.execute("insert into public.contact values (%s, %s, null)", (i, f"contact {i}"))
            conn.execute("insert into public.deal values (%s, %s, 'open')", (i, 100 + i))
            conn.execute("insert into public.note values (%s, %s)", (i, f"note {i}"))
            conn.execute("insert into public.item values (%s, %s)", (i, f"item {i}"))
    for site in SATELLITES:
        with psycopg.connect(urls[site], autocommit=True) as conn:
            conn.execute(SHARED_SCHEMA)

    path = topology_file(stack, tmp_path, urls, name)
    try:
        planned = ok(cdc(path, "topology", "plan"))
        assert f"public.contact -> {name}-north-up.public.contact" in planned.stdout, planned.stdout
        assert f"public.note -> {name}-east-down.public.note" in planned.stdout, planned.stdout
        applied = ok(cdc(path, "topology", "apply"))
        assert "north: public.contact gained _cdc_lsn, _cdc_site, _cdc_at" in applied.stdout, applied.stdout

        sync(path)  # the full sync: the master's rows reach every satellite
        assert_same_everywhere(urls)
        assert rows(urls["east"], "select count(*) from public.note") == [(10,)]

        # a master-owned table edited at a satellite: refused, naming the table (on_satellite_edit: reject)
        with psycopg.connect(urls["north"], autocommit=True) as conn, pytest.raises(psycopg.Error) as refused:
            conn.execute("update public.item set name = 'mine' where id = 1")
        assert "public.item is owned by the master" in str(refused.value), str(refused.value)

        work = Workload(urls)
        for site in SITES:
            work.run(site, 15)
        sync(path)
        assert_same_everywhere(urls)

        # concurrent edits of the same rows at two sites, nothing exchanged in between; east offline meanwhile
        def edit(site, statement, *params):
            with psycopg.connect(urls[site], autocommit=True) as conn:
                conn.execute(statement, params)
            time.sleep(0.05)  # versions are stamped to the microsecond: these are ordered

        edit("north", "update public.contact set name = 'north wrote first' where id = 1")
        edit("south", "update public.contact set name = 'south wrote later' where id = 1")  # newer: south's wins
        edit("south", "update public.deal set amount = 333 where id = 1")  # priority: south before north
        edit("north", "update public.deal set amount = 222 where id = 1")
        edit("north", "update public.note set body = 'north''s note' where id = 1")  # manual
        edit("east", "update public.note set body = 'east''s note' where id = 1")
        for site in SITES:
            work.run(site, 10)
        sync(path, "north", "south")  # east offline: its links are not run
        status = json.loads(ok(cdc(path, "sites", "status", "--json")).stdout)
        east = next(s for s in status["sites"] if s["site"] == "east")
        assert east["lag_messages"] > 0, east
        for site in SITES:
            work.run(site, 10)
        sync(path)  # east back
        assert_same_everywhere(urls)

        # newer: south's later write everywhere; priority: south's although north wrote later
        for site in SITES:
            assert rows(urls[site], "select name from public.contact where id = 1") == [("south wrote later",)]
            assert rows(urls[site], "select amount from public.deal where id = 1") == [(333,)]
            # manual: the master kept north's (which reached it first); east took the master's version
            assert rows(urls[site], "select body from public.note where id = 1") == [("north's note",)]
        # each conflict recorded per its policy: the master saw the second of each pair arrive on a changed row
        contact = conflicts_at(urls["hq"], "public.contact", 1) + conflicts_at(urls["north"], "public.contact", 1)
        assert ("newer", "incoming", "decided", "north wrote first", "south wrote later", 2, 3) in contact or \
            ("newer", "local", "decided", "south wrote later", "north wrote first", 3, 2) in contact, contact
        deal = conflicts_at(urls["hq"], "public.deal", 1) + conflicts_at(urls["north"], "public.deal", 1)
        assert ("priority", "incoming", "decided", "222", "333", 2, 3) in deal or \
            ("priority", "local", "decided", "333", "222", 3, 2) in deal, deal
        assert conflicts_at(urls["hq"], "public.note", 1) == [
            ("manual", "held", "waiting", "north's note", "east's note", 2, 4)]
        assert ("manual", "incoming", "decided", "east's note", "north's note", 4, 2) in conflicts_at(
            urls["east"], "public.note", 1)

        # the manual queue: the deliberate conflict, and those the random edits of notes made, all at the master
        waiting = json.loads(ok(cdc(path, "conflicts", "list", "--waiting", "--json")).stdout)
        assert all((c["site"], c["table_name"], c["policy"]) == ("hq", "public.note", "manual") for c in waiting), \
            waiting
        mine = [c for c in waiting if c["key"] == {"id": 1}]
        assert [(c["incoming"]["body"], c["incoming_site"], c["local"]["body"]) for c in mine] == [
            ("east's note", 4, "north's note")], mine
        shown = ok(cdc(path, "sites", "status")).stdout.splitlines()
        assert f"{len(waiting)} conflict(s) waiting" in shown[0], shown
        listed = ok(cdc(path, "conflicts", "list", "--site", "hq")).stdout
        assert f"hq #{mine[0]['id']} public.note {{\"id\": 1}}: waiting, held (manual)" in listed, listed
        wrong = cdc(path, "conflicts", "resolve", "999999", "--keep", "incoming")
        assert wrong.returncode == 2 and "no conflict 999999 at site hq" in wrong.stderr, wrong.stderr
        resolved = ok(cdc(path, "conflicts", "resolve", str(mine[0]["id"]), "--keep", "incoming"))
        assert "resolved, incoming version kept" in resolved.stdout, resolved.stdout
        again = cdc(path, "conflicts", "resolve", str(mine[0]["id"]), "--keep", "local")
        assert again.returncode == 2 and "is not waiting" in again.stderr, again.stderr
        for c in waiting:
            if c is not mine[0]:
                ok(cdc(path, "conflicts", "resolve", str(c["id"]), "--keep", "local"))
        sync(path)
        assert_same_everywhere(urls)
        for site in SITES:
            # the held version, with the site and time it was written at east
            assert rows(urls[site], "select body, _cdc_site from public.note where id = 1") == [("east's note", 4)]
        assert json.loads(ok(cdc(path, "conflicts", "list", "--waiting", "--json")).stdout) == []

        # no echo: the master never applied a change of its own back, and a satellite's transactions reached the
        # master once each (the markers' primary key: pipeline and source transaction)
        assert rows(urls["hq"], "select count(*) from public._cdc_origin where origin = 1") == [(0,)]
        for site in SATELLITES:
            origins = rows(urls["hq"], "select distinct origin from public._cdc_origin where pipeline = %s",
                           f"{name}-{site}-up")
            assert origins == [(SITES[site],)], (site, origins)
        status = json.loads(ok(cdc(path, "sites", "status", "--json")).stdout)
        for site in status["sites"]:
            assert site["lag_messages"] == 0 and site["conflicts_waiting"] == 0 and not site["errors"], site
    finally:
        topo = topology_mod.load(path, env={})
        for link in topo.links():
            try:
                purge(link.pipeline)
            except Exception:  # noqa: BLE001 - the connector of a link never applied
                capture.delete(link.pipeline, purge=True)


def test_site_objects_stamp_local_writes_and_report_satellite_edits(stack, databases, tmp_path):
    """What `cdc topology apply` installs at each site, on PostgreSQL alone: a local write of a shared table is
    stamped with the site's sync id and time, an applier's (cdc.applying set) keeps the version it carries; with
    on_satellite_edit: report, a satellite's edit of a master-owned table is kept and recorded, and listed."""
    from producers.sites import prepare_two_way

    urls = databases
    for site in SITES:
        with psycopg.connect(urls[site], autocommit=True) as conn:
            conn.execute(MASTER_SCHEMA if site == "hq" else SHARED_SCHEMA + "create table public.item "
                         "(id int primary key, name text not null);")
    path = topology_file(stack, tmp_path, urls, f"w{uuid.uuid4().hex[:6]}")
    data = yaml.safe_load(path.read_text())
    data["on_satellite_edit"] = "report"
    path.write_text(yaml.safe_dump(data))
    topo = topology_mod.load(path, env={})
    done = prepare_two_way(topo)
    assert "north: public.item: a satellite's edit is reported" in done, done
    assert prepare_two_way(topo) == [line for line in done if "edit is" in line]  # idempotent: nothing gained again

    with psycopg.connect(urls["north"], autocommit=True) as conn:
        conn.execute("insert into public.contact (id, name) values (1, 'local')")
        with conn.transaction():
            conn.execute("select set_config('cdc.applying', 'test', true)")
            conn.execute("insert into public.contact (id, name, _cdc_site, _cdc_at) values (2, 'applied', 3, 42)")
            conn.execute("insert into public.item values (1, 'from the master')")  # the applier: not reported
        conn.execute("update public.item set name = 'edited at north' where id = 1")
    stamped = rows(urls["north"], "select id, _cdc_site, _cdc_at from public.contact")
    assert stamped[0][:2] == (1, 2) and stamped[0][2] > 1_700_000_000_000_000, stamped  # microseconds, now
    assert stamped[1] == (2, 3, 42)
    assert rows(urls["north"], "select table_name, state, local ->> 'name', incoming ->> 'name', local_site "
                "from public._cdc_conflicts") == [("public.item", "reported", "edited at north", "from the master", 2)]
    listed = json.loads(ok(cdc(path, "conflicts", "list", "--site", "north", "--json")).stdout)
    assert [(c["site"], c["table_name"], c["state"], c["policy"]) for c in listed] == [
        ("north", "public.item", "reported", "on_satellite_edit")]
    bad = cdc(path, "conflicts", "resolve", str(listed[0]["id"]), "--keep", "theirs", "--site", "north")
    assert bad.returncode == 2 and "--keep: 'theirs' is not local or incoming" in bad.stderr, bad.stderr

    # the policy taken out of the file: the next apply drops the guard, and an edit is no longer recorded
    del data["on_satellite_edit"]
    path.write_text(yaml.safe_dump(data))
    assert "north: public.item: a satellite's edit is no longer watched" in prepare_two_way(
        topology_mod.load(path, env={}))
    with psycopg.connect(urls["north"], autocommit=True) as conn:
        conn.execute("update public.item set name = 'edited again' where id = 1")
    assert rows(urls["north"], "select count(*) from public._cdc_conflicts") == [(1,)]


def test_the_screen_on_a_real_destination(stack, databases, tmp_path):
    """The sites' screen (consumers/sites/screen.py) called as the applier calls it, on the master's real database
    (no Kafka): a satellite's change is kept, its marker written and its position raised above the row's; a re-sent
    copy is dropped; a transaction a satellite's applier wrote (it carries a marker) is an echo, dropped; a conflict
    is decided per the table's policy and recorded."""
    from types import SimpleNamespace

    from consumers.apply.events import ChangeEvent
    from consumers.apply.transactions import SourceUnit
    from consumers.sites.screen import SiteScreen
    from producers.sites import prepare_two_way

    urls = databases
    for site in SITES:
        with psycopg.connect(urls[site], autocommit=True) as conn:
            conn.execute(MASTER_SCHEMA if site == "hq" else SHARED_SCHEMA)
    path = topology_file(stack, tmp_path, urls, f"w{uuid.uuid4().hex[:6]}")
    topo = topology_mod.load(path, env={})
    prepare_two_way(topo)
    link = next(li for li in topo.links() if li.satellite == "north" and li.direction == "up")
    screen = SiteScreen(topo, link)
    with psycopg.connect(urls["hq"], autocommit=True) as conn:
        conn.execute("insert into public.contact (id, name) values (1, 'hq'), (2, 'hq')")
        conn.execute("update public.contact set _cdc_lsn = 9000 where id = 2")  # written by another link
    hq = {r[0]: {"id": r[0], "name": r[1], "phone": None, "_cdc_site": r[2], "_cdc_at": r[3]}
          for r in rows(urls["hq"], "select id, name, _cdc_site, _cdc_at from public.contact")}
    assert hq[1]["_cdc_site"] == 1

    def event(xid, key, before, name, at, *, table="public.contact", after=None, op="u", lsn=5000):
        image = after if after is not None else {**before, "name": name, "_cdc_site": 2, "_cdc_at": at}
        return ChangeEvent(f"{link.pipeline.name}.{table}", 0, 0, table, op, {"id": key}, before, image, lsn,
                           f"{xid}:{lsn}", 1, 1_800_000_000_000, False)

    def screened(*events):
        with psycopg.connect(urls["hq"]) as conn:
            out = screen(SimpleNamespace(connection=SimpleNamespace(driver_connection=conn)), list(events),
                         [SourceUnit(list(events), xid=events[0].xid, commit_ts_ms=1_800_000_000_000)])
            conn.commit()
        return out

    later = hq[1]["_cdc_at"] + 1_000_000
    kept = screened(event("100", 1, hq[1], "north", later), event("100", 2, hq[2], "north", later))
    assert [(e.before["id"], e.lsn) for e in kept] == [(1, 5001), (2, 9001)]  # above the rows' stored positions
    assert rows(urls["hq"], "select pipeline, xid, origin from public._cdc_origin") == [
        (link.pipeline.name, "100", 2)]
    assert screened(event("100", 1, hq[1], "north", later)) == [] and screen.copies == 1  # a re-sent copy

    marker = {"pipeline": "x", "xid": "7", "origin": 1, "origin_ts": 1, "applied_at": None}
    echo = screened(event("101", 1, hq[1], "north", later),
                    event("101", 0, None, "", 0, table="public._cdc_origin", after=marker, op="c"))
    assert echo == [] and screen.echoes == 1

    # the master's row changed since north last saw it: north's older write loses, a newer one wins (newer)
    with psycopg.connect(urls["hq"], autocommit=True) as conn:
        conn.execute("update public.contact set name = 'hq again' where id = 1")
    assert screened(event("102", 1, hq[1], "north stale", hq[1]["_cdc_at"] + 1)) == []
    newest = 4_000_000_000_000_000
    assert len(screened(event("103", 1, hq[1], "north newest", newest))) == 1
    assert rows(urls["hq"], "select policy, decision, state, local ->> 'name', incoming ->> 'name', xid "
                "from public._cdc_conflicts") == [  # (sorted)
        ("newer", "incoming", "decided", "hq again", "north newest", "103"),
        ("newer", "local", "decided", "hq again", "north stale", "102")]
    # a marker only for the transactions whose rows are written
    assert rows(urls["hq"], "select xid from public._cdc_origin") == [("100",), ("103",)]
