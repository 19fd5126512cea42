"""The screen a topology's appliers run over each batch, inside the destination transaction, before anything is
written (DestinationWriter's `screen` hook): echoes dropped, re-sent transactions dropped, conflicts of two-way tables
decided (consumers/sites/conflicts.py) and recorded in the destination's `_cdc_conflicts`, and a marker row written
for every source transaction applied.

How changes flow both ways without loops (docs/sites.md, "Two-way tables"): every transaction an applier of the
topology applies gets a row in the destination's `public._cdc_origin` (the link's pipeline, the source transaction's
id, the site it came from at first and when), written in the same destination transaction as its rows. That table is
captured with the shared tables, so the marker travels in the same source transaction as the rows when the
destination is in turn captured (Debezium's transaction metadata groups them by transaction id). Then:
- the master's appliers (up links) drop every transaction carrying a marker: at a satellite, an applier only ever
  applies what came from the master, which the master has had (or has moved on from, in its own stream);
- a change the destination holds already (the row's version is the change's; a delete of a row not there) is no
  change: nothing is written, so nothing is captured and nothing travels further. That is how a satellite's own
  change, coming back from the master to it, stops there. Not by dropping it for its marker's origin: the satellite
  may have moved on since (a delete from elsewhere won there, then the row was inserted again), and then it needs
  it (tests/unit/sites/test_conflicts.py simulates such histories).
A row-level origin column filtered at capture would not do for deletes: a delete's old row carries the last
writer's origin, not the deleting site's.

The `_cdc_lsn` guard (an older change never overwrites a newer one) compares positions of one source; a shared
table's rows are written by every link into it, from sources whose positions have nothing in common. So a kept change
of a shared table gets a position just above the row's stored one, and re-sent transactions are recognised by their
marker instead (pipeline and transaction id).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from psycopg import sql

from cdc.topology import MARKER_TABLE, MASTER_ID, Link, Topology
from consumers.sites.conflicts import HOLD, TAKE_INCOMING, Version, conflicts, decide

SITE_COLUMN = "_cdc_site"
AT_COLUMN = "_cdc_at"
CONFLICTS_TABLE = "public._cdc_conflicts"
# The setting a topology's applier sets for its destination transaction (set_config(..., is_local => true)): the
# triggers of the site then leave the rows alone (no version stamped, no master-owned edit refused or reported).
APPLYING = "cdc.applying"

Row = Mapping[str, Any]


def to_json(row: Row | None) -> str | None:
    """A row as JSON PostgreSQL's jsonb_populate_record can turn back into the table's row."""
    if row is None:
        return None

    def value(v: Any) -> Any:
        if isinstance(v, (bytes, bytearray, memoryview)):
            return "\\x" + bytes(v).hex()
        if isinstance(v, Decimal):
            return str(v)
        if isinstance(v, datetime):
            return v.isoformat()
        return str(v)

    return json.dumps(dict(row), default=value, sort_keys=True)


def version_of(row: Row | None) -> Version | None:
    if row is None:
        return None
    return Version(row.get(SITE_COLUMN), row.get(AT_COLUMN))


def stamp(at_us: int | None) -> datetime | None:
    return datetime.fromtimestamp(at_us / 1_000_000, tz=UTC) if at_us is not None else None


class SiteScreen:
    """The screen of one link's applier (one destination): see the module's docstring."""

    def __init__(self, topology: Topology, link: Link) -> None:
        self.topology = topology
        self.pipeline = link.pipeline.name
        self.up = link.direction == "up"
        master = topology.sites[topology.master].sync_id
        satellite = topology.sites[link.satellite].sync_id
        self.here = master if self.up else satellite  # the destination's sync id
        self.source = satellite if self.up else master  # the link's source's
        self.at_master = self.here == MASTER_ID
        self.shared = dict(topology.shared_tables)
        self.priority = {t: topology.priority_order(t) for t, s in self.shared.items() if s.policy == "priority"}
        # A satellite's down link: the master-owned tables it receives, guarded by a trigger once they exist.
        self.guarded: list[str] = [] if self.up or topology.on_satellite_edit is None else \
            list(topology.subset(link.satellite))
        self._keys: dict[str, list[str]] = {}
        # The applier's row converter (images to the destination's values), set once the applier exists
        # (SitesRunner); the images as they came without it.
        self.convert: Callable[[Any, Row | None], dict[str, Any] | None] | None = None
        self.echoes = 0
        self.copies = 0
        self.decided: list[dict[str, Any]] = []  # this screen's conflicts, for the runner to report

    # -- the hook ---------------------------------------------------------------------------------------------------
    def __call__(self, conn: Any, events: list[Any], steps: list[Any]) -> list[Any]:
        raw = conn.connection.driver_connection  # psycopg
        raw.execute("select set_config(%s, %s, true)", (APPLYING, self.pipeline))
        if self.guarded:
            from producers.sites import guard_master_owned

            guard_master_owned(raw, self.guarded, self.topology.on_satellite_edit or "report", self.here)
            self.guarded = []
        if not self.shared:
            return events
        markers: dict[str | None, list[Row]] = {}
        touched: dict[str | None, bool] = {}
        for e in events:
            if e.table == MARKER_TABLE:
                if e.after is not None:
                    markers.setdefault(e.xid, []).append(e.after)
            elif e.table in self.shared:
                touched[e.xid] = True
        # At the master: what a satellite's applier wrote (an echo of the master's own stream), dropped whole.
        echo = {xid for xid in markers if xid is not None} if self.up else set()
        applied = self._applied(raw, [x for x in touched if x is not None and x not in echo])
        self.echoes += len(echo & set(touched))
        self.copies += len(applied)
        drop = echo | applied
        kept = [e for e in events if e.table != MARKER_TABLE and e.xid not in drop]
        written: set[str | None] = set()
        if any(e.table in self.shared for e in kept):
            kept = self._decide(raw, kept, markers, written)
        commit_ts = {s.xid: s.commit_ts_ms for s in steps if s.xid is not None}
        # A marker for each source transaction whose shared rows are written here (none for one that changed nothing:
        # its own change come back, a conflict the destination's row won).
        fresh = [x for x in touched if x is not None and x not in drop and x in written]
        if fresh:
            rows = []
            for xid in fresh:
                origin, origin_ts = self.source, commit_ts.get(xid)
                for m in markers.get(xid, []):  # relayed by the master: the site it came from at first
                    origin, origin_ts = m.get("origin", origin), m.get("origin_ts", origin_ts)
                rows.append((self.pipeline, xid, origin, origin_ts))
            with raw.cursor() as cur:
                cur.executemany("insert into public._cdc_origin (pipeline, xid, origin, origin_ts) values "
                                "(%s, %s, %s, %s) on conflict do nothing", rows)
        return kept

    def _applied(self, raw: Any, xids: list[str]) -> set[str]:
        if not xids:
            return set()
        found = raw.execute("select xid from public._cdc_origin where pipeline = %s and xid = any(%s)",
                            (self.pipeline, xids)).fetchall()
        return {r[0] for r in found}

    # -- conflicts --------------------------------------------------------------------------------------------------
    def _key_columns(self, raw: Any, table: str) -> list[str]:
        if table not in self._keys:
            rows = raw.execute(
                "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid "
                "and a.attnum = any(i.indkey) where i.indrelid = %s::regclass and i.indisprimary "
                "order by array_position(i.indkey, a.attnum)", (table,)).fetchall()
            if not rows:
                raise ValueError(f"{table}: a shared table needs a primary key (rows are matched by it)")
            self._keys[table] = [r[0] for r in rows]
        return self._keys[table]

    def _image(self, event: Any, image: Row | None) -> dict[str, Any] | None:
        if image is None:
            return None
        return self.convert(event, image) if self.convert is not None else dict(image)

    def _current(self, raw: Any, table: str, keys: list[tuple]) -> dict[tuple, tuple[dict[str, Any], int]]:
        """The destination's rows of `table` with these keys: key -> (row as JSON-able values, stored _cdc_lsn)."""
        columns = self._key_columns(raw, table)
        schema, name = table.split(".", 1)
        found: dict[tuple, tuple[dict[str, Any], int]] = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            match = sql.SQL(" OR ").join(
                sql.SQL("({})").format(sql.SQL(" AND ").join(
                    sql.SQL("{} = %s").format(sql.Identifier(c)) for c in columns)) for _ in part)
            query = sql.SQL("select to_jsonb(t) - '_cdc_lsn', t._cdc_lsn from {} as t where {} for update").format(
                sql.Identifier(schema, name), match)
            for doc, lsn in raw.execute(query, [v for key in part for v in key]).fetchall():
                found[tuple(doc.get(c) for c in columns)] = (doc, lsn)
        return found

    def _decide(self, raw: Any, events: list[Any], markers: dict[str | None, list[Row]],
                written: set[str | None]) -> list[Any]:
        images: dict[int, tuple[dict | None, dict | None]] = {}
        wanted: dict[str, set[tuple]] = {}
        for e in events:
            if e.table not in self.shared:
                continue
            before, after = self._image(e, e.before), self._image(e, e.after)
            images[id(e)] = (before, after)
            columns = self._key_columns(raw, e.table)
            for image in (before, after):
                if image is not None:
                    wanted.setdefault(e.table, set()).add(self._key(image, columns))
        # The rows as the batch goes: loaded once, then as each kept change leaves them.
        state: dict[tuple[str, tuple], dict[str, Any] | None] = {}
        lsns: dict[tuple[str, tuple], int] = {}
        for table, keys in wanted.items():
            current = self._current(raw, table, sorted(keys, key=repr))
            for key in keys:
                found = current.get(self._json_key(key))
                state[table, key] = found[0] if found else None
                lsns[table, key] = found[1] if found else 0
        kept = []
        for e in events:
            if e.table not in self.shared:
                kept.append(e)
                continue
            before, after = images[id(e)]
            columns = self._key_columns(raw, e.table)
            key = self._key(after if after is not None else before, columns)
            local = state.get((e.table, key))
            if self._no_change(e.op, local, after):
                if not self.up and any(m.get("origin") == self.here for m in markers.get(e.xid, [])):
                    self.echoes += 1  # this site's own change, back from the master
                continue
            if conflicts(e.op, version_of(before), version_of(after), version_of(local)):
                incoming_version = version_of(after) if e.op != "d" else None
                policy = self.shared[e.table].policy
                decision = decide(policy, version_of(local), incoming_version,
                                  priority=self.priority.get(e.table, ()), at_master=self.at_master)
                self._record(raw, e, key, columns, local, after, decision.take, decision.reason, policy, markers)
                if decision.take != TAKE_INCOMING:
                    continue
            if before is not None and e.op == "u":
                old = self._key(before, columns)
                if old != key:
                    state[e.table, old] = None
            state[e.table, key] = None if e.op == "d" else after
            if e.lsn is not None:
                # Just above the row's stored position, whichever source wrote it (the module's docstring).
                position = max(lsns.get((e.table, key), 0), e.lsn) + 1
                lsns[e.table, key] = position
                e = dataclasses.replace(e, lsn=position)
            written.add(e.xid)
            kept.append(e)
        return kept

    @staticmethod
    def _no_change(op: str, local: Row | None, after: Row | None) -> bool:
        """The destination holds the change already: the row with the change's version (a stamped one: rows from
        before the topology all read the same), or no row for a delete."""
        if op == "d":
            return local is None
        mine, theirs = version_of(local), version_of(after)
        return mine is not None and mine == theirs and mine.at is not None

    @staticmethod
    def _key(image: Row, columns: list[str]) -> tuple:
        return tuple(image.get(c) for c in columns)

    @staticmethod
    def _json_key(key: tuple) -> tuple:
        # to_jsonb gives numbers as int/float/Decimal-free values, text as str: compare keys in those terms.
        return tuple(json.loads(json.dumps(v, default=str)) if not isinstance(v, str) else v for v in key)

    def _record(self, raw: Any, event: Any, key: tuple, columns: list[str], local: Row | None, incoming: Row | None,
                take: str, reason: str, policy: str, markers: dict[str | None, list[Row]]) -> None:
        local_v, incoming_v = version_of(local), version_of(incoming)
        incoming_site = incoming_v.site if incoming_v else None
        incoming_at = stamp(incoming_v.at) if incoming_v else None
        if event.op == "d":  # a delete keeps no version: its site and time are its transaction's
            origin = next(iter(markers.get(event.xid, [])), {})
            incoming_site = origin.get("origin", self.source)
            ts = origin.get("origin_ts", event.commit_ts_ms)
            incoming_at = datetime.fromtimestamp(ts / 1000, tz=UTC) if ts else None
        state = "waiting" if take == HOLD else "decided"
        raw.execute(
            f"insert into {CONFLICTS_TABLE} (table_name, key, policy, decision, state, local, incoming, incoming_op, "
            "local_site, local_at, incoming_site, incoming_at, reason, pipeline, xid) values "
            "(%s, %s::jsonb, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s)",
            (event.table, to_json(dict(zip(columns, key))), policy, take, state, to_json(local),
             to_json(incoming), event.op, local_v.site if local_v else None, stamp(local_v.at) if local_v else None,
             incoming_site, incoming_at, reason, self.pipeline, event.xid))
        self.decided.append({"table": event.table, "key": list(key), "decision": take, "reason": reason})
