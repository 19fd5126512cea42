"""The sites' sync triggers (consumers/sites/schedule.py and the runner's scheduled links): when a round starts
(after start, every N minutes, a change waiting, back online), and that a link whose last round failed is not started
again by itself until its satellite is run by hand. Pure: a made-up clock, appliers that only record their runs."""

from __future__ import annotations

import copy
import threading
import time
import types

import pytest

import consumers.sites as sites_mod
from cdc import topology
from cdc.errors import CdcError, ConfigError
from cdc.topology import SyncMode
from consumers.sites import SitesRunner, chosen_links
from consumers.sites.schedule import ErrorBook, LinkState, due
from tests.unit.samples import TOPOLOGY, TOPOLOGY_ENV


def sync(**kw):
    return SyncMode.model_validate(kw)


# -- the rule -------------------------------------------------------------------------------------------------------
def test_after_start_waits_its_delay_once():
    s = sync(after_start="30s")
    state = LinkState(started_at=1000.0)
    assert due(s, state, 1029.9, None) is None
    assert due(s, state, 1030.0, None) == "after start"
    state.last_round_at = 1030.0
    assert due(s, state, 5000.0, None) is None  # once: nothing waits, no other trigger


def test_after_change_counts_from_the_oldest_waiting_change():
    s = sync(after_change="10s")
    state = LinkState(started_at=0.0)
    assert due(s, state, 100.0, None) is None  # nothing waits
    assert due(s, state, 109.0, 100.0) is None  # the change arrived 9 s ago
    assert due(s, state, 110.0, 100.0) == "a change waiting 10s"


def test_every_combines_with_triggers():
    s = sync(every="15 minutes", after_change=5, after_start="1 minute")
    assert (s.mode, s.minutes, s.after_change, s.after_start) == ("every", 15, 5.0, 60.0)
    state = LinkState(started_at=0.0)
    assert due(s, state, 10.0, None) is None  # after_start delays the first round
    assert due(s, state, 10.0, 4.0) is None  # ... and holds back the change trigger until it has run
    assert due(s, state, 60.0, None) == "after start"
    state.last_round_at = 60.0
    assert due(s, state, 100.0, None) is None
    assert due(s, state, 100.0, 90.0) == "a change waiting 5s"
    assert due(s, state, 60.0 + 900, None) == "every 15 min"
    # without after_start, `every` starts at once (as before)
    assert due(sync(every=2), LinkState(started_at=0.0), 0.0, None) == "every 2 min"


def test_never_while_the_last_round_failed_nor_while_the_satellite_is_away():
    s = sync(after_change="1s")
    state = LinkState(started_at=0.0, error="lock timeout")
    assert due(s, state, 100.0, 1.0) is None
    state = LinkState(started_at=0.0, online=False)
    assert due(s, state, 100.0, 1.0) is None
    state = LinkState(started_at=0.0, back_online=True)
    assert due(s, state, 1.0, None) == "back online"  # at once, nothing waiting or not


@pytest.mark.parametrize("given,message", [
    ({"after_change": "soon"}, "topo.yaml: sites.north.sync: after_change: 'soon' is not a delay"),
    ({"mode": "continuous", "after_change": "10s"}, "mode 'continuous' takes none"),
    ({"mode": "on_demand", "after_start": 5}, "mode 'on_demand' takes none"),
    ({"mode": "triggered"}, "mode `triggered` needs after_start and/or after_change"),
    ({"after_change": -1}, "sites.north.sync.after_change"),
    ({"every": "often"}, "every: 'often': write `every: N minutes`"),
])
def test_a_bad_trigger_names_the_file_and_the_field(given, message):
    data = copy.deepcopy(TOPOLOGY)
    data["sites"]["north"]["sync"] = given
    with pytest.raises(ConfigError) as info:
        topology.parse(data, "topo.yaml", TOPOLOGY_ENV)
    assert str(info.value).startswith("topo.yaml: ") and message in str(info.value)


def test_triggers_parse_and_describe():
    data = copy.deepcopy(TOPOLOGY)
    data["sites"]["north"]["sync"] = {"after_start": "30s", "after_change": 10}
    topo = topology.parse(data, "topo.yaml", TOPOLOGY_ENV)
    s = topo.sites["north"].sync
    assert (s.mode, s.after_start, s.after_change, s.scheduled) == ("triggered", 30.0, 10.0, True)
    assert s.describe() == "after start 30s, after change 10s, when back online"
    # a triggered satellite runs without being named (it is not on demand)
    assert {li.satellite for li in chosen_links(topo, None, include_on_demand=False)} == {"north"}


# -- the runner -----------------------------------------------------------------------------------------------------
class Applier:
    """Stands in for ReplicaApplier: records its runs; fails while `failing` is set."""

    runs: list[str] = []
    failing = False

    def __init__(self, pipeline, destination, echo=None, screen=None):
        self.pipeline = pipeline
        self.stats = types.SimpleNamespace(rows=0, transactions=0)
        self.reader = types.SimpleNamespace(consumer=object())

    def run(self, *, until_caught_up=False, timeout=None):
        assert until_caught_up  # a scheduled round catches up and stops
        Applier.runs.append(self.pipeline.name)
        if Applier.failing:
            raise CdcError("relation public.item: permission denied")

    def stop(self):
        pass

    def close(self):
        pass


def triggered_topology():
    data = copy.deepcopy(TOPOLOGY)
    data["sites"]["north"]["sync"] = {"after_change": "2s"}
    del data["sites"]["south"]
    return topology.parse(data, "topo.yaml", TOPOLOGY_ENV)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run_for(runner, seconds):
    thread = threading.Thread(target=runner.run)
    thread.start()
    time.sleep(seconds)
    runner.stop()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(sites_mod, "ReplicaApplier", Applier)
    Applier.runs, Applier.failing = [], False


def test_a_waiting_change_syncs_its_link_after_the_delay_and_not_before(fakes, monkeypatch, tmp_path):
    topo = triggered_topology()
    clock = Clock()
    waiting = {"shop-north-down": 999.5}  # a change for the satellite since 999.5; nothing for the master
    monkeypatch.setattr(SitesRunner, "reachable", lambda self, link: True)
    monkeypatch.setattr(SitesRunner, "oldest_waiting", lambda self, link: waiting.get(link.pipeline.name))
    runner = SitesRunner(chosen_links(topo, None, include_on_demand=False), lambda line: None,
                         book=ErrorBook(tmp_path / "book.json"), tick=0.01, clock=clock)
    run_for(runner, 0.3)
    assert Applier.runs == []  # 0.5 s of the 2 s
    clock.now = 1001.5
    runner = SitesRunner(runner.links, lambda line: None, book=runner.book, tick=0.01, clock=clock)
    run_for(runner, 0.3)
    assert Applier.runs and set(Applier.runs) == {"shop-north-down"}  # only the link with a change waiting


def test_a_failed_round_blocks_the_link_until_it_is_run_by_hand(fakes, monkeypatch, tmp_path):
    topo = triggered_topology()
    monkeypatch.setattr(SitesRunner, "reachable", lambda self, link: True)
    monkeypatch.setattr(SitesRunner, "oldest_waiting", lambda self, link: 0.0)  # always a change waiting
    book = ErrorBook(tmp_path / "book.json")
    lines: list[str] = []
    links = chosen_links(topo, None, include_on_demand=False)
    Applier.failing = True
    runner = SitesRunner(links, lines.append, book=book, tick=0.01)
    with pytest.raises(CdcError, match="permission denied"):
        run_for_raising(runner, 0.3)
    assert sorted(Applier.runs) == ["shop-north-down", "shop-north-up"]  # one round each, not retried
    assert book.error("shop-north-down") == "relation public.item: permission denied"
    assert any("not started again automatically until `cdc sites run north`" in line for line in lines)

    # a new run does not start it either, and says why
    Applier.runs, lines[:] = [], []
    Applier.failing = False
    runner = SitesRunner(links, lines.append, book=book, tick=0.01)
    run_for(runner, 0.3)
    assert Applier.runs == []
    assert any("not started: its last sync ended in an error" in line for line in lines)

    # `cdc sites run north`: cleared, synced at once, then scheduled again
    runner = SitesRunner(links, lines.append, book=book, tick=0.01, by_hand=["north"])
    run_for(runner, 0.3)
    assert "shop-north-down" in Applier.runs and book.read() == {}


def run_for_raising(runner, seconds):
    result: dict[str, BaseException] = {}

    def target():
        try:
            runner.run()
        except BaseException as exc:  # noqa: BLE001
            result["exc"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    time.sleep(seconds)
    runner.stop()
    thread.join(10)
    if "exc" in result:
        raise result["exc"]


def test_a_satellite_back_online_syncs_at_once_and_an_unreachable_one_is_not_an_error(fakes, monkeypatch, tmp_path):
    topo = triggered_topology()
    answers = {"north": False}
    monkeypatch.setattr(SitesRunner, "reachable", lambda self, link: answers[link.satellite])
    monkeypatch.setattr(SitesRunner, "oldest_waiting", lambda self, link: None)  # nothing waits
    book = ErrorBook(tmp_path / "book.json")
    lines: list[str] = []
    runner = SitesRunner(chosen_links(topo, None, include_on_demand=False), lines.append, book=book, tick=0.01,
                         recheck=0.0)
    thread = threading.Thread(target=runner.run)
    thread.start()
    time.sleep(0.2)
    assert Applier.runs == []  # away: nothing runs, nothing recorded as an error
    answers["north"] = True
    time.sleep(0.3)
    runner.stop()
    thread.join(10)
    assert sorted(Applier.runs) == ["shop-north-down", "shop-north-up"]  # once each: back online
    assert book.read() == {} and not runner.errors
    assert any("north does not answer" in line for line in lines)
    assert any("north answers again" in line for line in lines)


def test_status_says_a_link_is_blocked(monkeypatch, tmp_path):
    topo = triggered_topology()
    ok = {"status": "OK", "reason": "caught up", "lag_messages": 0, "lag_seconds": 0.0, "last_sync_at": 5.0,
          "connector_state": "RUNNING", "error": None}
    monkeypatch.setattr(sites_mod, "link_status", lambda link: {"pipeline": link.pipeline.name,
                                                                "direction": link.direction, **ok})
    book = ErrorBook(tmp_path / "book.json")
    book.record("shop-north-up", "relation public.sale: permission denied")
    doc = sites_mod.status(topo, book)
    north = next(s for s in doc["sites"] if s["site"] == "north")
    up = next(li for li in north["links"] if li["direction"] == "up")
    assert up["status"] == "ERROR" and up["sync_blocked"] == "relation public.sale: permission denied"
    assert north["status"] == "ERROR"
    assert north["errors"] == ["shop-north-up: last sync failed: not started automatically until `cdc sites run "
                               "north`: relation public.sale: permission denied"]
