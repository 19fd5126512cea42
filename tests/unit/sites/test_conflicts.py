"""The decision logic of two-way tables (consumers/sites/conflicts.py): when a change conflicts, which version each
policy keeps, and that a master and satellites deciding by it converge whatever order the changes reach them in
(a simulation of the hub's exchanges, with the screen's echo rule). Pure: nothing runs."""

from __future__ import annotations

import random

import pytest

from consumers.sites.conflicts import HOLD, KEEP_LOCAL, TAKE_INCOMING, Version, conflicts, decide

V0 = Version(1, 1_000)
NORTH = Version(2, 2_000)
SOUTH = Version(3, 3_000)


@pytest.mark.parametrize("op, before, after, local, expected", [
    ("u", V0, NORTH, V0, False),  # the row as the change's site last saw it: no conflict
    ("u", V0, NORTH, SOUTH, True),  # changed here since
    ("u", V0, NORTH, None, True),  # deleted here since
    ("d", V0, None, V0, False),
    ("d", V0, None, SOUTH, True),
    ("d", V0, None, None, False),  # gone both sides: nothing to decide
    ("c", None, NORTH, None, False),
    ("c", None, NORTH, NORTH, False),  # the same version already here
    ("c", None, NORTH, SOUTH, True),  # the same key inserted at two sites
    ("r", None, NORTH, SOUTH, True),  # a snapshot read meeting another version
    ("u", Version(None, None), NORTH, Version(None, None), False),  # rows from before the topology: unstamped
])
def test_when_a_change_conflicts(op, before, after, local, expected):
    assert conflicts(op, before, after, local) is expected


def test_newer_wins_and_a_tie_goes_to_the_lower_sync_id():
    assert decide("newer", NORTH, SOUTH, at_master=True).take == TAKE_INCOMING
    assert decide("newer", SOUTH, NORTH, at_master=True).take == KEEP_LOCAL
    tie = decide("newer", Version(3, 5), Version(2, 5), at_master=False)
    assert tie.take == TAKE_INCOMING and "lower sync id (2)" in tie.reason
    assert decide("newer", Version(2, 5), Version(3, 5), at_master=False).take == KEEP_LOCAL
    # unstamped rows (written before the topology) are the oldest
    assert decide("newer", Version(None, None), NORTH, at_master=True).take == TAKE_INCOMING


def test_priority_follows_the_site_order_then_the_newer():
    order = [3, 1, 2]  # south, then the master, then north
    assert decide("priority", SOUTH, NORTH, priority=order, at_master=True).take == KEEP_LOCAL  # north is later
    assert decide("priority", NORTH, Version(3, 1), priority=order, at_master=True).take == TAKE_INCOMING
    decision = decide("priority", Version(1, 9), Version(3, 1), priority=order, at_master=False)
    assert decision.take == TAKE_INCOMING and decision.reason == "priority: site 3 comes before site 1"
    # a site the order does not name comes after those it names
    assert decide("priority", Version(4, 9), Version(2, 1), priority=order, at_master=True).take == TAKE_INCOMING
    # one site's two versions: the newer
    assert decide("priority", Version(2, 1), Version(2, 9), priority=order, at_master=True).take == TAKE_INCOMING


def test_a_delete_wins_a_conflict_with_an_update():
    for policy in ("newer", "priority"):
        assert decide(policy, SOUTH, None, priority=[2, 3], at_master=True).take == TAKE_INCOMING
        assert decide(policy, None, NORTH, priority=[2, 3], at_master=True).take == KEEP_LOCAL


def test_manual_holds_at_the_master_and_satellites_take_the_masters_version():
    held = decide("manual", NORTH, SOUTH, at_master=True)
    assert held.take == HOLD and "cdc conflicts resolve" in held.reason
    assert decide("manual", SOUTH, NORTH, at_master=False).take == TAKE_INCOMING
    assert decide("manual", None, NORTH, at_master=True).take == HOLD


# -- a hub's exchanges, simulated ------------------------------------------------------------------------------------
class Site:
    def __init__(self, sync_id):
        self.id = sync_id
        self.row = V0  # one row, its version (None: deleted)
        self.out = []  # captured transactions: (before, after, marker origin or None)
        self.conflicts = 0


def apply(site, change, policy, priority, *, from_master):
    before, after, marker = change
    if site.id == 1 and marker is not None:
        return  # the master drops what a satellite's applier wrote (an echo)
    # a satellite does not drop what came from itself at first: it may have moved on since (a delete won there, then
    # the row came back), and then needs it; where it has not, the change is a no-op (below) and goes no further
    op = "d" if after is None else "u"
    local = site.row
    if conflicts(op, before, after, local):
        site.conflicts += 1
        if decide(policy, local, after, priority=priority, at_master=site.id == 1).take != TAKE_INCOMING:
            return
    if local == after:
        return
    site.row = after
    origin = marker if marker is not None else (1 if from_master else None)
    # what the destination's capture sees: the change with its marker (the site it came from at first)
    site.out.append((local, after, origin if site.id != 1 else (marker or change_origin(change))))


def change_origin(change):
    return change[3] if len(change) > 3 else None


@pytest.mark.parametrize("policy", ["newer", "priority"])
@pytest.mark.parametrize("seed", range(40))
def test_a_master_and_satellites_converge_whatever_the_order(policy, seed):
    rng = random.Random(seed)
    sites = {i: Site(i) for i in (1, 2, 3, 4)}
    priority = [3, 1, 2, 4]
    clock = 10_000
    for _ in range(rng.randint(2, 8)):
        # local edits: each site may write or delete the row (a version stamped with its id and the time)
        for site in sites.values():
            if rng.random() < 0.5:
                clock += rng.randint(0, 3)  # equal times happen: the tie rule decides
                old = site.row
                new = None if rng.random() < 0.15 else Version(site.id, clock)
                if old is None and new is None:
                    continue
                site.row = new
                site.out.append((old, new, None))
        # an exchange in a random order: some satellites up, the master down to some
        for _ in range(rng.randint(1, 6)):
            satellite = sites[rng.choice([2, 3, 4])]
            if rng.random() < 0.5:
                sent, satellite.out = satellite.out, []
                for before, after, marker in sent:
                    # the master records the satellite as the origin of what it applies from it
                    master = sites[1]
                    count = len(master.out)
                    apply(master, (before, after, marker), policy, priority, from_master=False)
                    master.out[count:] = [(b, a, satellite.id) for b, a, _ in master.out[count:]]
            else:
                satellite.pending = getattr(satellite, "pending", 0)
                for before, after, marker in sites[1].out[satellite.pending:]:
                    apply(satellite, (before, after, marker), policy, priority, from_master=True)
                satellite.pending = len(sites[1].out)
    # then everyone syncs until nothing moves
    for _ in range(6):
        for sid in (2, 3, 4):
            satellite = sites[sid]
            sent, satellite.out = satellite.out, []
            for before, after, marker in sent:
                count = len(sites[1].out)
                apply(sites[1], (before, after, marker), policy, priority, from_master=False)
                sites[1].out[count:] = [(b, a, sid) for b, a, _ in sites[1].out[count:]]
        for sid in (2, 3, 4):
            satellite = sites[sid]
            satellite.pending = getattr(satellite, "pending", 0)
            for before, after, marker in sites[1].out[satellite.pending:]:
                apply(satellite, (before, after, marker), policy, priority, from_master=True)
            satellite.pending = len(sites[1].out)
    rows = {sid: site.row for sid, site in sites.items()}
    assert len(set(rows.values())) == 1, rows
