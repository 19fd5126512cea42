"""The topology file (cdc/topology.py): validation with messages naming the file and the field, and the pipelines
(links) and subset settings a topology implies. Pure: nothing runs."""

from __future__ import annotations

import copy

import pytest
import yaml

from cdc import topology
from cdc.errors import ConfigError
from consumers.sites import chosen_links
from producers.sites import LinkPlan, _extra_config
from tests.unit.samples import TOPOLOGY, TOPOLOGY_ENV

BASE = TOPOLOGY
ENV = TOPOLOGY_ENV


def parse(data, env=ENV):
    return topology.parse(data, "topo.yaml", env)


def broken(mutate) -> str:
    data = copy.deepcopy(BASE)
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse(data)
    return str(info.value)


def test_a_valid_topology_and_its_links():
    topo = parse(BASE)
    assert topo.master == "hq" and topo.satellites == ["north", "south"]
    links = {(link.satellite, link.direction): link for link in topo.links()}
    assert set(links) == {("north", "up"), ("north", "down"), ("south", "up"), ("south", "down")}
    up = links["north", "up"].pipeline
    assert up.name == "shop-north-up" and up.source.tables == ("public.sale",)
    assert up.source.sqlalchemy_url.database == "north"
    assert list(up.destinations) == ["hq"]
    assert up.destinations["hq"].sqlalchemy_url.password == "s3cret"  # the credential by reference, resolved
    down = links["north", "down"].pipeline
    assert down.source.tables == ("public.item",)  # north's subset only
    assert down.source.sqlalchemy_url.database == "hq" and list(down.destinations) == ["north"]
    # south has no subset: every master-owned table
    assert links["south", "down"].pipeline.source.tables == ("public.item", "public.category")
    # a signalling table per link: the master is the source of every down link
    assert len({link.pipeline.source.signal_table for link in topo.links()}) == 4
    assert links["north", "up"].sync.mode == "every" and links["north", "up"].sync.minutes == 15
    assert links["south", "down"].sync.mode == "on_demand"


def test_the_password_is_never_shown():
    assert "s3cret" not in repr(parse(BASE))


def test_a_missing_credential_names_the_field_and_the_variable():
    with pytest.raises(ConfigError, match=r"topo.yaml: sites.hq.url: environment variable HQ_PASSWORD is not set"):
        parse(BASE, env={})


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["sites"]["north"].update(sync_id=1), "topo.yaml: sites.north.sync_id: sync id 1 is already site 'hq'"),
    (lambda d: d["sites"]["north"].update(sync_id=65), "sites.north.sync_id: Input should be less than or equal to 64"),
    (lambda d: d["sites"]["north"].update(sync_id=0), "sites.north.sync_id"),
    (lambda d: d["sites"]["hq"].update(sync_id=9), "topo.yaml: sites: no site has sync id 1 (the master)"),
    (lambda d: d["sites"]["north"].update(url="mysql://x@h/db"), "sites.north.url: a site's database is PostgreSQL"),
    (lambda d: d["sites"]["north"].update(sync="every"), "sites.north.sync: mode `every` needs `minutes`"),
    (lambda d: d["sites"]["north"].update(sync="hourly"), "sites.north.sync.mode"),
    (lambda d: d["sites"]["north"].update(colour="red"), "sites.north.colour: is not a known setting"),
    (lambda d: d["site_tables"].update({"public.item": "site_id"}),
     "site_tables: public.item also in master_tables"),
    (lambda d: d["master_tables"].append("item"), "master_tables: 'item' is not schema-qualified"),
    (lambda d: d["site_tables"].update({"public.x": "not a column"}), "site_tables: 'public.x': the "
                                                                      "site column must be a column name"),
    (lambda d: d["subsets"].update(west={"public.item": None}), "subsets.west: no site named 'west'"),
    (lambda d: d["subsets"].update(hq={"public.item": None}), "subsets.hq: the master holds everything"),
    (lambda d: d["subsets"]["north"].update({"public.sale": None}),
     "subsets.north.public.sale: is not a master-owned table"),
    (lambda d: d["subsets"]["north"]["public.item"].update(where="1=1; drop table x"),
     "a predicate is one SQL expression, without ';'"),
    (lambda d: d["subsets"]["north"]["public.item"].update(columns=["id", "id"]), "lists a column twice"),
    (lambda d: d.update(topology="a shop"), "topology: String should match pattern"),
], ids=["duplicate sync id", "sync id 65", "sync id 0", "no master", "not postgres", "every without minutes",
        "unknown mode", "unknown setting", "owned twice", "unqualified", "bad site column", "unknown subset site",
        "master subset", "site table in a subset", "semicolon", "column twice", "bad name"])
def test_mistakes_name_the_file_and_field(mutate, expected):
    message = broken(mutate)
    assert expected in message, message


def test_load_reads_yaml_and_refuses_duplicate_keys(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert topology.load(path, env=ENV).topology == "shop"
    path.write_text("topology: a\ntopology: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'topology'"):
        topology.load(path, env=ENV)
    with pytest.raises(ConfigError, match="file not found"):
        topology.load(tmp_path / "none.yaml", env=ENV)


def test_subset_settings_for_the_connector():
    topo = parse(BASE)
    link = next(li for li in topo.links() if (li.satellite, li.direction) == ("north", "down"))
    extra = _extra_config(link.pipeline, {"public.item": "region = 'north'"}, {"public.item": ["region", "cost"]})
    assert extra["snapshot.select.statement.overrides"] == "public.item"
    assert extra["snapshot.select.statement.overrides.public.item"] == \
        'SELECT * FROM "public"."item" WHERE (region = \'north\')'
    assert extra["column.exclude.list"] == r"public\.item\.region,public\.item\.cost"
    assert _extra_config(link.pipeline, {}, {}) == {}
    lines = LinkPlan(link, {"public.item": "region = 'north'"}, {"public.item": ["cost"]}, state="create").lines()
    assert lines[0].startswith("shop-north-down (master -> north, sync every 15 min): create")
    assert lines[1] == ("  public.item -> shop-north-down.public.item (rows where region = 'north'; without columns "
                        "cost)")


def test_on_demand_links_run_only_when_asked():
    topo = parse(BASE)
    assert {li.satellite for li in chosen_links(topo, None, include_on_demand=False)} == {"north"}
    assert {li.satellite for li in chosen_links(topo, None, include_on_demand=True)} == {"north", "south"}
    assert {li.satellite for li in chosen_links(topo, ["south"], include_on_demand=False)} == {"south"}
    with pytest.raises(ConfigError, match="no site named 'west'"):
        chosen_links(topo, ["west"], include_on_demand=False)


class FakeApplier:
    """Stands in for ReplicaApplier in the runner's scheduling test: records how it was run."""

    runs: list[tuple[str, bool]] = []

    def __init__(self, pipeline, destination, echo=None):
        import threading
        import types

        self.pipeline = pipeline
        self.stats = types.SimpleNamespace(rows=0, transactions=0)
        self.reader = types.SimpleNamespace(consumer=object())
        self._stop = threading.Event()

    def run(self, *, until_caught_up=False, timeout=None):
        FakeApplier.runs.append((self.pipeline.name, until_caught_up))
        if not until_caught_up:
            self._stop.wait(5)

    def stop(self):
        self._stop.set()

    def close(self):
        pass


def test_the_runner_follows_each_links_sync_mode(monkeypatch):
    import threading
    import time

    import consumers.sites as sites_mod

    data = copy.deepcopy(BASE)
    data["sites"]["north"]["sync"] = {"mode": "every", "minutes": 0.001}  # every 60 ms
    data["sites"]["south"]["sync"] = "continuous"
    topo = parse(data)
    monkeypatch.setattr(sites_mod, "ReplicaApplier", FakeApplier)
    monkeypatch.setattr(sites_mod.SitesRunner, "reachable", lambda self, link: True)
    FakeApplier.runs = []
    runner = sites_mod.SitesRunner(chosen_links(topo, None, include_on_demand=False), lambda line: None, tick=0.01)
    thread = threading.Thread(target=runner.run)
    thread.start()
    time.sleep(0.6)
    runner.stop()
    thread.join(10)
    assert not thread.is_alive() and not runner.errors
    north = [caught for name, caught in FakeApplier.runs if name.startswith("shop-north-")]
    south = [caught for name, caught in FakeApplier.runs if name.startswith("shop-south-")]
    assert len(north) >= 6 and all(north)  # both links, round after round, each round until caught up
    assert south == [False, False]  # continuous: each link's applier started once, running until stopped

    # a sync now: every link once, until caught up, whatever its mode
    FakeApplier.runs = []
    runner = sites_mod.SitesRunner(chosen_links(topo, None, include_on_demand=True), lambda line: None,
                                   until_caught_up=True)
    assert runner.run() == 0
    assert sorted(FakeApplier.runs) == [("shop-north-down", True), ("shop-north-up", True),
                                        ("shop-south-down", True), ("shop-south-up", True)]


# -- two-way (shared) tables ---------------------------------------------------------------------------------------
def shared(**tables):
    data = copy.deepcopy(BASE)
    data["shared_tables"] = tables
    return data


def test_shared_tables_travel_both_ways_with_the_marker_table():
    topo = parse(shared(**{"public.contact": "newer", "public.deal": {"priority": ["south", "hq"]},
                           "public.note": "manual", "public.price": "master wins"}))
    policies = {t: (s.policy, s.priority) for t, s in topo.shared_tables.items()}
    assert policies == {"public.contact": ("newer", None), "public.deal": ("priority", ("south", "hq")),
                        "public.note": ("manual", None), "public.price": ("priority", ("<master>",))}
    # sites the order does not name come after it, by sync id
    assert topo.priority_order("public.deal") == [3, 1, 2]
    assert topo.priority_order("public.price") == [1, 2, 3]
    links = {(link.satellite, link.direction): link.pipeline for link in topo.links()}
    shared_and_marker = ("public.contact", "public.deal", "public.note", "public.price", topology.MARKER_TABLE)
    assert links["north", "up"].source.tables == ("public.sale", *shared_and_marker)
    assert links["north", "down"].source.tables == ("public.item", *shared_and_marker)
    assert links["south", "down"].source.tables == ("public.item", "public.category", *shared_and_marker)


def test_a_topology_of_shared_tables_only():
    data = shared(**{"public.contact": None})
    data["master_tables"], data["site_tables"], data["subsets"] = [], {}, {}
    topo = parse(data)
    assert topo.shared_tables["public.contact"].policy == "newer"
    assert len(topo.links()) == 4
    assert topo.on_satellite_edit is None
    data["on_satellite_edit"] = "reject"
    assert parse(data).on_satellite_edit == "reject"


@pytest.mark.parametrize("tables, extra, expected", [
    ({"public.contact": "oldest"}, {}, "topo.yaml: shared_tables['public.contact'].policy: Input should be 'newer', "
                                      "'priority' or 'manual'"),
    ({"public.contact": {"policy": "priority"}}, {}, "topo.yaml: shared_tables['public.contact']: policy `priority` "
                                                     "needs `priority:`"),
    ({"public.contact": {"policy": "newer", "priority": ["hq"]}}, {}, "`priority` only goes with policy `priority`"),
    ({"public.contact": {"priority": ["hq", "west"]}}, {}, "topo.yaml: shared_tables['public.contact'].priority: no "
                                                           "site named 'west'"),
    ({"public.contact": {"priority": ["hq", "hq"]}}, {}, "shared_tables['public.contact'].priority: lists a site "
                                                         "twice"),
    ({"public.item": "newer"}, {}, "topo.yaml: shared_tables['public.item']: is also in master_tables"),
    ({"public.sale": "newer"}, {}, "topo.yaml: shared_tables['public.sale']: is also in site_tables"),
    ({"contact": "newer"}, {}, "topo.yaml: shared_tables: 'contact' is not schema-qualified"),
    ({"public._cdc_origin": "newer"}, {}, "shared_tables: public._cdc_origin is the topology's own marker table"),
    ({"public.contact": "newer"}, {"on_satellite_edit": "ignore"}, "topo.yaml: on_satellite_edit: Input should be "
                                                                   "'reject' or 'report'"),
], ids=["unknown policy", "priority without order", "order without priority", "unknown site", "site twice",
        "master-owned", "site-owned", "unqualified", "marker table", "bad satellite edit policy"])
def test_shared_table_mistakes_name_the_file_and_field(tables, extra, expected):
    data = shared(**tables)
    data.update(extra)
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert expected in str(info.value), str(info.value)
