"""Two-way tables: when an incoming change conflicts with a destination row, and which version a table's policy keeps
(pure: no I/O; consumers/sites/screen.py reads the rows and records the decisions).

Every row of a shared table carries its version: the sync id of the site that last wrote it (`_cdc_site`) and when
(`_cdc_at`, microseconds since the epoch by that site's clock). A local write stamps them (a trigger `cdc topology
apply` installs); an applied change carries them over from the site it came from, as data. So the same version reads
the same at every site, and every site decides a conflict between two versions the same way: that is what makes the
sites converge whatever order the changes reach them in.

A conflict: the row was changed at the destination since the incoming change's site last saw it. An update or a
delete conflicts when its before image's version is not the destination row's (or the row is gone); an insert (or a
snapshot read) when a row with its key and another version is there already.

Deciding, per table (cdc.topology.SharedTable):
- `newer`: the version written later wins; at the same microsecond, the lower sync id.
- `priority`: the version written at the site first in the table's order wins; two versions of one site: the newer.
- `manual`: the master keeps its row and holds the incoming version in its queue (`cdc conflicts resolve`); a
  satellite takes the master's version, the master being the one place that decides (its decision then reaches the
  satellites as an ordinary change).
- A delete in conflict with an update wins, in `newer` and `priority` alike: a deleted row keeps no version, so a site
  that deleted a row cannot tell when; deletes winning everywhere is the one rule every site can apply the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

TAKE_INCOMING = "incoming"
KEEP_LOCAL = "local"
HOLD = "held"


@dataclass(frozen=True)
class Version:
    """Who wrote a row's current state, and when (None, None: a row written before the topology stamped it)."""

    site: int | None
    at: int | None  # microseconds since the epoch

    @property
    def order(self) -> tuple[int, int]:
        # Later first; at the same time, the lower sync id first (ordered as a "greater is better" pair).
        return (self.at or 0, -(self.site or 0))


@dataclass(frozen=True)
class Decision:
    take: str  # TAKE_INCOMING, KEEP_LOCAL or HOLD
    reason: str


def conflicts(op: str, before: Version | None, after: Version | None, local: Version | None) -> bool:
    """Whether an incoming change (op c, r, u or d; `before`/`after` its images' versions, None for no image) conflicts
    with the destination's row (`local`, None when there is none)."""
    if op in ("c", "r"):
        return local is not None and local != after
    if op == "u":
        return local != before
    if op == "d":
        return local is not None and local != before
    return False


def decide(policy: str, local: Version | None, incoming: Version | None, *, priority: Sequence[int] = (),
           at_master: bool) -> Decision:
    """Which version wins a conflict: `local` (None: the destination deleted the row) against `incoming` (None: the
    change is a delete)."""
    if policy == "manual":
        if at_master:
            return Decision(HOLD, "manual: held for `cdc conflicts resolve`, the master's row kept meanwhile")
        return Decision(TAKE_INCOMING, "manual: a satellite takes the master's version (the master decides)")
    if incoming is None:
        return Decision(TAKE_INCOMING, "the delete wins a conflict with an update")
    if local is None:
        return Decision(KEEP_LOCAL, "the delete (here) wins a conflict with an update")
    if policy == "priority":
        rank = {site: n for n, site in enumerate(priority)}
        mine, theirs = rank.get(local.site or 0, len(rank)), rank.get(incoming.site or 0, len(rank))
        if mine != theirs:
            if theirs < mine:
                return Decision(TAKE_INCOMING, f"priority: site {incoming.site} comes before site {local.site}")
            return Decision(KEEP_LOCAL, f"priority: site {local.site} comes before site {incoming.site}")
        # one site's two versions: the newer
    if incoming.order > local.order:
        return Decision(TAKE_INCOMING, _newer("incoming", incoming, local))
    return Decision(KEEP_LOCAL, _newer("local", local, incoming))


def _newer(which: str, winner: Version, loser: Version) -> str:
    if (winner.at or 0) == (loser.at or 0):
        return f"newer: written at the same time; the lower sync id ({winner.site}) wins"
    return f"newer: the {which} version was written later (site {winner.site})"
