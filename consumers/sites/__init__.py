"""Applying a topology of sites: every link's replica applier run per its sync mode (`cdc sites run`), and each
site's state (`cdc sites status`): last sync, lag and errors of the links that feed it and that it feeds.

A link is an ordinary pipeline with one destination (cdc.topology), so this module only schedules ReplicaAppliers
and reads LagProbe samples; it formats nothing for people (the command line does).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from cdc.errors import CdcError, first_line
from cdc.topology import Link, Topology
from consumers.apply.applier import ReplicaApplier
from consumers.lag import status as lag_rules
from consumers.lag.probe import LagProbe
from consumers.sites.schedule import ErrorBook, LinkState, due
from consumers.sites.screen import SiteScreen


def chosen_links(topology: Topology, sites: list[str] | None, *, include_on_demand: bool) -> list[Link]:
    """The links to run: those of the named satellites (every satellite's by default). On-demand links run only
    when asked for: their satellite named, or a one-off catch-up (`include_on_demand`)."""
    for name in sites or []:
        topology.site(name)  # a ConfigError naming the known sites
    out = []
    for link in topology.links():
        if sites and link.satellite not in sites:
            continue
        if link.sync.mode == "on_demand" and not (sites or include_on_demand):
            continue
        out.append(link)
    return out


class SitesRunner:
    """One thread per link. continuous: the applier runs until stopped; on demand: it catches up once; every N
    minutes and triggered (after_start, after_change, back online): a round (catch up, stop) each time
    `schedule.due` says so, checked every `tick` seconds. With `until_caught_up`, every link catches up once,
    whatever its mode, and the run ends (a sync now).

    `book` keeps the links whose last round ended in an error: a scheduled link in it is not started by itself
    until its satellite is named (`by_hand`: `cdc sites run SITE`), which clears the error and syncs at once."""

    def __init__(self, links: list[Link], echo: Callable[[str], None], *, until_caught_up: bool = False,
                 timeout: float | None = None, topology: Topology | None = None, book: ErrorBook | None = None,
                 by_hand: list[str] | None = None, tick: float = 1.0, recheck: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.links = links
        self.book = book
        self.by_hand = set(by_hand or ())
        self.tick = tick
        self.recheck = recheck  # how often a scheduled link asks whether its satellite answers (seconds)
        self.clock = clock
        self._probes: dict[str, LagProbe] = {}
        self._seen: dict[str, float] = {}
        self._idle: set[str] = set()  # scheduled links between rounds
        # With two-way tables or a satellite-edit policy, every applier runs the sites' screen
        # (consumers/sites/screen.py).
        self.topology = topology if topology is not None and (
            topology.shared_tables or topology.on_satellite_edit) else None
        self.echo = echo
        self.until_caught_up = until_caught_up
        self.timeout = timeout
        self._stop = threading.Event()
        self._current: dict[str, ReplicaApplier] = {}
        self._lock = threading.Lock()
        self.errors: dict[str, BaseException] = {}
        self.rounds: dict[str, int] = {}

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for applier in self._current.values():
                applier.stop()

    def _once(self, link: Link, *, until_caught_up: bool) -> None:
        name = link.pipeline.name
        # site_pipeline: a down link's applier acts for its satellite (its Kafka user, when it has one).
        screen = SiteScreen(self.topology, link) if self.topology is not None else None
        if screen is None:
            applier = ReplicaApplier(link.site_pipeline, link.destination, echo=self.echo)
        else:
            applier = ReplicaApplier(link.site_pipeline, link.destination, echo=self.echo, screen=screen)
            screen.convert = applier.writer.follower.convert
        with self._lock:
            if self._stop.is_set():
                applier.close()
                return
            self._current[name] = applier
        try:
            applier.run(until_caught_up=until_caught_up, timeout=self.timeout)
        finally:
            with self._lock:
                self._current.pop(name, None)
            self.rounds[name] = self.rounds.get(name, 0) + 1
            self.echo(f"{name}: applied {applier.stats.rows} rows in {applier.stats.transactions} source "
                      "transactions")
            if screen is not None and (screen.echoes or screen.decided):
                held = sum(1 for d in screen.decided if d["decision"] == "held")
                self.echo(f"{name}: {screen.echoes} echoed transaction(s) dropped, {len(screen.decided)} conflict(s) "
                          f"decided ({held} held for `cdc conflicts resolve`)")
            applier.close()

    def _work(self, link: Link) -> None:
        name = link.pipeline.name
        try:
            if self.until_caught_up or link.sync.mode == "on_demand":
                self._once(link, until_caught_up=True)
                if self.book is not None:
                    self.book.clear(name)  # a sync that went through clears the link's last error
            elif link.sync.mode == "continuous":
                self._once(link, until_caught_up=False)
            else:
                self._scheduled(link)
        except BaseException as exc:  # noqa: BLE001 - reported by run(); the other links go on
            self.errors[name] = exc
            self.echo(f"{name}: stopped: {first_line(exc)}")
            # a one-off sync's failure is recorded too (a scheduled link records its own, in _scheduled)
            if self.book is not None and (self.until_caught_up or link.sync.mode == "on_demand"):
                self.book.record(name, first_line(exc))
        finally:
            probe = self._probes.pop(name, None)
            if probe is not None:
                probe.close()

    # -- scheduled links ----------------------------------------------------------------------------------------
    def _scheduled(self, link: Link) -> None:
        """Rounds when `schedule.due` says so; a round that fails blocks the link (recorded in the book) unless the
        satellite turned out to be unreachable, which only waits for it to answer again."""
        name = link.pipeline.name
        state = LinkState(started_at=self.clock())
        asked = link.satellite in self.by_hand
        if self.book is not None:
            if asked:
                old = self.book.error(name)
                if old is not None:
                    self.book.clear(name)
                    self.echo(f"{name}: its last error cleared, run by hand ({old})")
            else:
                state.error = self.book.error(name)
                if state.error is not None:
                    self.echo(f"{name}: not started: its last sync ended in an error ({state.error}); "
                              f"`cdc sites run {link.satellite}` syncs it again")
        failure: str | None = None
        checked = float("-inf")
        while not self._stop.is_set():
            if state.error is not None:
                # blocked; the error clears when someone runs the satellite by hand (another process)
                if self.book is not None and self.book.error(name) is None:
                    self.echo(f"{name}: its error was cleared; scheduled again")
                    state.error, failure = None, None
                self._idle.add(name)
                self._stop.wait(self.tick)
                continue
            now = self.clock()
            if now >= checked + self.recheck:  # not a connection every tick: the satellite's answer every few s
                online, checked = self.reachable(link), now
            else:
                online = state.online
            if online != state.online:
                self.echo(f"{name}: {link.satellite} " + ("answers again: syncing" if online else
                                                          "does not answer; its sync waits until it does"))
                state.back_online = online
            state.online = online
            oldest = self.oldest_waiting(link) if online and link.sync.after_change is not None else None
            now = self.clock()
            reason = "asked by hand" if asked and online else due(link.sync, state, now, oldest)
            if reason is None:
                self._idle.add(name)
                self._stop.wait(self.tick)
                continue
            asked, state.back_online, state.last_round_at = False, False, now
            self._seen.pop(name, None)  # what waited is applied by this round: a later change waits from its own time
            self.echo(f"{name}: sync ({reason})")
            try:
                self._once(link, until_caught_up=True)
            except Exception as exc:  # noqa: BLE001 - the link is blocked, the other links go on
                if self._stop.is_set():
                    break
                if not self.reachable(link):
                    state.online, checked = False, self.clock()
                    self.echo(f"{name}: {link.satellite} does not answer ({first_line(exc)}); its sync waits until "
                              "it does")
                    continue
                failure = state.error = first_line(exc)
                if self.book is not None:
                    self.book.record(name, failure)
                self.echo(f"{name}: sync failed, not started again automatically until `cdc sites run "
                          f"{link.satellite}`: {failure}")
            else:
                if self.book is not None:
                    self.book.clear(name)
        if failure is not None:
            raise CdcError(f"link {name}: its last sync failed: {failure}")

    def reachable(self, link: Link) -> bool:
        """Does the link's satellite database answer (a connection and `select 1`, 5 s at most)?"""
        import psycopg

        from producers.source_admin import psycopg_conninfo

        site_db = link.pipeline.source.sqlalchemy_url if link.direction == "up" \
            else link.pipeline.destinations[link.destination].sqlalchemy_url
        try:
            with psycopg.connect(psycopg_conninfo(site_db), connect_timeout=5) as conn:
                conn.execute("select 1")
            return True
        except psycopg.Error:
            return False

    def oldest_waiting(self, link: Link) -> float | None:
        """The commit time (epoch seconds) of the oldest change waiting in the link's topics, from the lag probe;
        None when nothing waits, or when it cannot be read now (said on a line)."""
        name = link.pipeline.name
        try:
            probe = self._probes.get(name)
            if probe is None:
                probe = self._probes[name] = LagProbe(link.pipeline)
            samples, _ = probe.sample()
        except Exception as exc:  # noqa: BLE001 - Kafka or the destination away for now: no trigger, said
            self.echo(f"{name}: its lag cannot be read now: {first_line(exc)}")
            return None
        sample = samples.get(link.destination)
        if sample is None or sample.lag_messages <= 0:
            self._seen.pop(name, None)
            return None
        oldest = sample.oldest_unapplied_ts_ms
        if oldest is None:  # waiting, its commit time unreadable: counted from when it was first seen waiting
            return self._seen.setdefault(name, self.clock())
        return oldest / 1000.0

    def _wait_prepared(self, link: Link, thread: threading.Thread, patience: float = 120.0) -> None:
        """Links are started one after the other, each once the one before has prepared its destination: several
        links feed the master, and two appliers creating the same bookkeeping tables (`_cdc_offsets`) at once
        collide in PostgreSQL's catalog. (A `prepared` event on ReplicaApplier would say it without looking at
        its reader.)"""
        deadline = time.monotonic() + patience
        name = link.pipeline.name
        while thread.is_alive() and time.monotonic() < deadline and not self._stop.is_set():
            with self._lock:
                applier = self._current.get(name)
            if applier is not None:
                reader = getattr(applier, "reader", None)
                if reader is None:  # an applier without a reader to look at: a fixed pause instead
                    self._stop.wait(5.0)
                    return
                if getattr(reader, "consumer", None) is not None:
                    return
            if self.rounds.get(name) or name in self._idle:
                return  # a round already ended, or a scheduled link waiting for its first round
            time.sleep(0.1)

    def run(self) -> int:
        threads = [threading.Thread(target=self._work, args=(link,), name=f"link-{link.pipeline.name}")
                   for link in self.links]
        for link, t in zip(self.links, threads):
            t.start()
            self._wait_prepared(link, t)
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)
        if self.errors:
            name, exc = next(iter(self.errors.items()))
            if isinstance(exc, CdcError):
                raise exc
            raise CdcError(f"link {name} failed: {exc!r}") from exc
        return 0


def link_status(link: Link) -> dict[str, Any]:
    """One link's lag (the `cdc lag --json` arithmetic and status rules, from one sample)."""
    probe = LagProbe(link.pipeline)
    try:
        samples, source = probe.sample()
    finally:
        probe.close()
    doc = lag_rules.report({n: [s] for n, s in samples.items()}, source, pipeline=link.pipeline.name)
    dest = doc["destinations"][0]
    return {"pipeline": link.pipeline.name, "direction": link.direction, "destination": link.destination,
            "sync": link.sync.describe(),
            "status": dest["status"], "reason": dest["reason"], "lag_messages": dest["lag_messages"],
            "lag_seconds": dest["lag_seconds"], "last_sync_at": dest["last_applied_at"],
            "connector_state": doc["source"]["connector_state"], "error": doc["source"]["error"]}


def status(topology: Topology, book: ErrorBook | None = None) -> dict[str, Any]:
    """Per site: its links' state; a satellite's `last_sync_at` is the older of its two links' last applied batch
    (both ways exchanged by then), its status the worst of theirs. The master's is the worst of every up link.
    A link whose last sync ended in an error (`book`) is ERROR with `sync_blocked` holding that error: it is not
    started automatically until its satellite is run by hand."""
    sites = []
    links = topology.links()
    blocked = book.read() if book is not None else {}
    by_site: dict[str, list[dict[str, Any]]] = {}
    for link in links:
        try:
            state = link_status(link)
        except CdcError as exc:
            state = {"pipeline": link.pipeline.name, "direction": link.direction, "destination": link.destination,
                     "sync": link.sync.describe(), "status": "ERROR", "reason": first_line(exc), "lag_messages": None,
                     "lag_seconds": None, "last_sync_at": None, "connector_state": None, "error": first_line(exc)}
        entry = blocked.get(link.pipeline.name)
        state["sync_blocked"] = entry.get("error") if entry else None
        if state["sync_blocked"]:
            state["status"] = "ERROR"
            state["reason"] = (f"last sync failed: not started automatically until `cdc sites run {link.satellite}`"
                               f": {state['sync_blocked']}")
        by_site.setdefault(link.satellite, []).append(state)
    from consumers.sites.queue import waiting

    waiting_at = waiting(topology) if topology.shared_tables or topology.on_satellite_edit else {}
    for name, site in sorted(topology.sites.items(), key=lambda kv: kv[1].sync_id):
        if name == topology.master:
            mine = [s for states in by_site.values() for s in states if s["direction"] == "up"]
            role = "master"
        else:
            mine = by_site.get(name, [])
            role = "satellite"
        times = [s["last_sync_at"] for s in mine]
        errors = [f"{s['pipeline']}: {s['reason'] if s.get('sync_blocked') else s['error'] or s['reason']}"
                  for s in mine if s["status"] == "ERROR"]
        sites.append({
            "site": name, "sync_id": site.sync_id, "role": role,
            "status": lag_rules.worst(s["status"] for s in mine) if mine else "OK",
            "last_sync_at": (min(times) if times and None not in times else None),
            "lag_messages": sum(s["lag_messages"] or 0 for s in mine),
            "lag_seconds": max((s["lag_seconds"] or 0 for s in mine), default=0.0),
            "errors": errors, "links": mine,
            # Conflicts held for `cdc conflicts resolve` (and satellite edits reported) at the site; None: unreadable.
            "conflicts_waiting": waiting_at.get(name, 0) if waiting_at else 0,
        })
    return {"topology": topology.topology, "sites": sites}
