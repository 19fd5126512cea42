"""A forced full sync of a satellite (`cdc sites resync SATELLITE [--table T]`): the master re-sends the satellite's
subset of its master-owned tables through the satellite's down link, and the satellite ends equal to that subset.

How: an incremental snapshot requested through the down link's own signalling table at the master (Debezium's
`execute-snapshot` signal, as `cdc resync` sends it: producers.source_admin.send_incremental_snapshot, with
consumers.ops.resync's names), its additional condition the subset's row predicate, so no row outside the subset
reaches the satellite's topics (the columns outside the subset are cut by the connector's `column.exclude.list` as
always). The rows travel the normal path, in order with the master's other changes, and the link's own applier
(run here, with the sites' screen) writes them. A snapshot emits no deletes: once the satellite has applied
everything up to now, its rows whose keys are no longer in the master's subset are deleted (with the applier
stopped, so that no newer change races the delete).

Not `consumers.ops.resync.resync` itself: its per-key check compares every column, and a column subset leaves the
columns it cuts empty at the satellite; and it names keys (an IN list) where a whole subset is one predicate.
Equality here is checked on the subset's columns, by plain SQL at both ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdc.errors import CdcError, ConfigError, first_line
from cdc.topology import Link, Topology
from consumers.ops.resync import _java_regex, check_debezium_name
from consumers.sites.screen import APPLYING
from producers.source_admin import psycopg_conninfo, send_incremental_snapshot, split_table


@dataclass
class TableResync:
    table: str
    master_rows: int = 0
    deleted: int = 0  # rows at the satellite outside the master's subset, deleted
    equal: bool = False
    differences: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"table": self.table, "master_rows": self.master_rows, "deleted": self.deleted, "equal": self.equal,
                "differences": self.differences}


def _down_link(topology: Topology, satellite: str) -> Link:
    site = topology.site(satellite)
    if site.sync_id == topology.sites[topology.master].sync_id:
        raise ConfigError(f"sites resync: {satellite} is the master; a full sync is for a satellite")
    link = next((li for li in topology.links() if li.satellite == satellite and li.direction == "down"), None)
    if link is None:
        raise ConfigError(f"sites resync: {satellite} receives no master-owned table (subsets.{satellite} is empty)")
    return link


def _columns(conn: psycopg.Connection, table: str) -> tuple[list[str], list[str]]:
    """The table's columns (without the applier's `_cdc_` ones) and its primary key, in order."""
    schema, name = split_table(table)
    cols = [r[0] for r in conn.execute(
        "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
        "and column_name not like '\\_cdc\\_%%' order by ordinal_position", (schema, name)).fetchall()]
    key = [r[0] for r in conn.execute(
        "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid "
        "and a.attnum = any(i.indkey) where i.indrelid = to_regclass(%s) and i.indisprimary "
        "order by array_position(i.indkey::int2[], a.attnum)",
        (sql.Identifier(schema, name).as_string(conn),)).fetchall()]
    return cols, key


def _rows(conn: psycopg.Connection, table: str, columns: list[str], where: str | None) -> dict[tuple, tuple]:
    query = sql.SQL("select {} from {}").format(sql.SQL(", ").join(map(sql.Identifier, columns)),
                                                sql.Identifier(*split_table(table)))
    if where:
        query = sql.SQL("{} where ({})").format(query, sql.SQL(where))  # the topology's own predicate, validated
    return {tuple(r): tuple(r) for r in conn.execute(query).fetchall()}


def resync_satellite(topology: Topology, satellite: str, table: str | None = None, *, wait: float = 300.0,
                     echo: Callable[[str], None] = lambda line: None) -> list[TableResync]:
    """Re-send the satellite's subset of `table` (every table of its subset by default) and make the satellite equal
    to it; one result per table (equal or the differences left after `wait` seconds)."""
    from consumers.sites import SitesRunner  # the runner runs the link's applier with the sites' screen

    link = _down_link(topology, satellite)
    subset = topology.subset(satellite)
    if table is not None and table not in subset:
        raise ConfigError(f"--table: {table} is not in {satellite}'s subset (its master-owned tables: "
                          f"{', '.join(subset) or 'none'})")
    tables = [table] if table is not None else list(subset)
    pipeline = link.pipeline
    master_url = psycopg_conninfo(topology.sites[topology.master].sqlalchemy_url)
    site_url = psycopg_conninfo(topology.site(satellite).sqlalchemy_url)
    shapes: dict[str, tuple[list[str], list[str]]] = {}
    with psycopg.connect(master_url, autocommit=True) as conn:
        for t in tables:
            check_debezium_name(t)
            cols, key = _columns(conn, t)
            if not cols:
                raise ConfigError(f"sites resync: {t} does not exist at the master")
            wanted = list(subset[t].columns) if subset[t].columns else cols
            shapes[t] = ([c for c in cols if c in wanted], key)
        for t in tables:
            pattern = _java_regex(t)
            condition = {"data-collection": pattern, "filter": subset[t].where} if subset[t].where else None
            send_incremental_snapshot(conn, pipeline.source.signal_table, [pattern],
                                      [condition] if condition else None)
            echo(f"{pipeline.name}: full sync of {t} requested"
                 + (f" (rows where {subset[t].where})" if subset[t].where else ""))

    runner = SitesRunner([link], echo, topology=topology)
    thread = threading.Thread(target=runner._once, args=(link,), kwargs={"until_caught_up": False},
                              name=f"resync-{pipeline.name}")
    thread.start()
    results = {t: TableResync(t) for t in tables}
    deadline = time.monotonic() + wait
    try:
        # the snapshot's rows arrive (every master row of the subset present and equal at the satellite)
        while True:
            pending = [t for t in tables if not _arrived(master_url, site_url, t, shapes[t], subset[t].where)]
            if not pending or time.monotonic() > deadline or not thread.is_alive():
                break
            time.sleep(1.0)
    finally:
        runner.stop()
        thread.join(120)
    if thread.is_alive():
        raise CdcError(f"{pipeline.name}: its applier did not stop within 120 s")
    # everything committed up to now applied, then the rows the master's subset no longer holds deleted: the applier
    # is stopped, so nothing newer can race the delete
    caught = SitesRunner([link], echo, topology=topology, timeout=max(30.0, deadline - time.monotonic()))
    try:
        caught._once(link, until_caught_up=True)
    except CdcError as exc:
        raise CdcError(f"{pipeline.name}: the satellite did not catch up after the full sync: "
                       f"{first_line(exc)}") from exc
    with psycopg.connect(master_url) as master, psycopg.connect(site_url) as site:
        for t in tables:
            cols, key = shapes[t]
            result = results[t]
            want = _rows(master, t, cols, subset[t].where)
            key_at = [cols.index(k) for k in key if k in cols]
            want_keys = {tuple(r[i] for i in key_at) for r in want}
            have = _rows(site, t, cols, None)
            extra = [r for r in have if tuple(r[i] for i in key_at) not in want_keys]
            if extra:
                with site.transaction():
                    # the satellite's edit guard (on_satellite_edit) lets the sites' own writes through
                    site.execute("select set_config(%s, 'resync', true)", (APPLYING,))
                    for row in extra:
                        site.execute(sql.SQL("delete from {} where {}").format(
                            sql.Identifier(*split_table(t)),
                            sql.SQL(" and ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in key)),
                            [row[i] for i in key_at])
                result.deleted = len(extra)
                echo(f"{satellite}: deleted {len(extra)} rows of {t} outside its subset at the master")
                have = _rows(site, t, cols, None)
            result.master_rows = len(want)
            missing = [r for r in want if r not in have]
            surplus = [r for r in have if r not in want]
            result.equal = not missing and not surplus
            result.differences = [f"missing or different at {satellite}: {list(r)}" for r in missing[:10]] + \
                [f"not at the master: {list(r)}" for r in surplus[:10]]
    return [results[t] for t in tables]


def _arrived(master_url: str, site_url: str, table: str, shape: tuple[list[str], list[str]],
             where: str | None) -> bool:
    cols, _ = shape
    with psycopg.connect(master_url) as master:
        want = _rows(master, table, cols, where)
    try:
        with psycopg.connect(site_url) as site:
            have = _rows(site, table, cols, None)
    except psycopg.errors.UndefinedTable:
        return False  # not made yet at the satellite
    return all(r in have for r in want)
