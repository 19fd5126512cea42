"""Capture for a topology of sites: plan and apply every link's connector and topics, with each satellite's subset
cut at capture (a filtered publication, a filtered snapshot, excluded columns), and the master's site-owned tables
made ready to receive the satellites' rows.

Where the subset is cut, and why at capture: each satellite has a down pipeline of its own (its own connector,
slot, publication and topics), so a row outside its subset is never written to a topic of the satellite's. That is
the shape per-site Kafka ACLs need (a satellite may read its own topics and nothing else), and it needs no Java
transform: PostgreSQL's publication row filter (`... FOR TABLE t WHERE (predicate)`, PostgreSQL 15) filters the
stream, including an UPDATE that moves a row out of (a DELETE) or into (an INSERT) the subset; Debezium's
`snapshot.select.statement.overrides` filters the snapshot (the new satellite's full sync); Debezium's
`column.exclude.list` keeps a satellite's excluded columns out of its events.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from cdc.config import Pipeline
from cdc.errors import ConfigError
from cdc.topology import Link, SubsetTable, Topology
from producers import capture, debezium
from producers.source_admin import ensure_signal_table, psycopg_conninfo, split_table

LSN_COLUMN = "_cdc_lsn"


class SitesError(ConfigError):
    """A topology that does not fit its databases (a table or column that does not exist, a bad predicate): bad
    configuration, exit status 2."""


@dataclass
class LinkPlan:
    link: Link
    filters: dict[str, str] = field(default_factory=dict)  # table -> row predicate (publication and snapshot)
    excluded: dict[str, list[str]] = field(default_factory=dict)  # table -> columns kept from the satellite
    changes: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    state: str = "unchanged"  # "create", "update", "unchanged"

    def lines(self) -> list[str]:
        p = self.link.pipeline
        site = self.link.satellite
        arrow = f"{site} -> master" if self.link.direction == "up" else f"master -> {site}"
        out = [f"{p.pipeline} ({arrow}, sync {self._sync()}): {self.state}"
               + (f" (connector {p.connector_name}, {len(self.changes)} settings)" if self.state == "create" else "")]
        for table in p.source.tables:
            extra = []
            if table in self.filters:
                extra.append(f"rows where {self.filters[table]}")
            if self.excluded.get(table):
                extra.append(f"without columns {', '.join(self.excluded[table])}")
            out.append(f"  {table} -> {p.topic_of(table)}" + (f" ({'; '.join(extra)})" if extra else ""))
        for key, old, new in (self.changes if self.state == "update" else []):
            out.append(f"  {'+' if old is None else '-' if new is None else '~'} {key}: "
                       f"{old if old is not None else ''}{' -> ' if old is not None and new is not None else ''}"
                       f"{new if new is not None else ''}")
        return out

    def _sync(self) -> str:
        s = self.link.sync
        return f"every {s.minutes:g} min" if s.mode == "every" else s.mode


def _columns(conn: psycopg.Connection, table: str) -> list[str]:
    schema, name = split_table(table)
    return [r[0] for r in conn.execute(
        "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
        "order by ordinal_position", (schema, name)).fetchall()]


def _filters(topology: Topology, link: Link) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The row predicate and the excluded columns of each table the link captures, checked against its source."""
    filters: dict[str, str] = {}
    excluded: dict[str, list[str]] = {}
    source = link.pipeline.source.sqlalchemy_url
    with psycopg.connect(psycopg_conninfo(source), autocommit=True) as conn:
        for table in link.pipeline.source.tables:
            columns = _columns(conn, table)
            if not columns:
                raise SitesError(f"{table} does not exist at {link.pipeline.source.sqlalchemy_url.database} (the "
                                 f"source of link {link.pipeline.pipeline})")
            if link.direction == "up":
                column = topology.site_tables[table]
                if column not in columns:
                    raise SitesError(f"site_tables.{table}: {table} has no column {column!r}")
                filters[table] = f"{_quote(column)} = {topology.sites[link.satellite].sync_id}"
                continue
            subset: SubsetTable = topology.subset(link.satellite)[table]
            if subset.where:
                filters[table] = subset.where
                try:  # a wrong predicate is refused here, naming the table, not by the connector later
                    schema, name = split_table(table)
                    conn.execute(sql.SQL("select 1 from {} where ({}) limit 0").format(
                        sql.Identifier(schema, name), sql.SQL(subset.where)))
                except psycopg.Error as exc:
                    raise SitesError(f"subsets.{link.satellite}.{table}.where: {subset.where!r} is not a predicate "
                                     f"over {table}: {(exc.diag.message_primary or str(exc)).strip()}") from None
            if subset.columns:
                unknown = [c for c in subset.columns if c not in columns]
                if unknown:
                    raise SitesError(f"subsets.{link.satellite}.{table}.columns: {table} has no column "
                                     f"{', '.join(map(repr, unknown))}")
                keys = _primary_key(conn, table)
                missing = [k for k in keys if k not in subset.columns]
                if missing:
                    raise SitesError(f"subsets.{link.satellite}.{table}.columns: the primary key column "
                                     f"{', '.join(map(repr, missing))} must be received (rows are matched by it)")
                excluded[table] = [c for c in columns if c not in subset.columns]
                required = _not_null(conn, table, excluded[table])
                if required:
                    # The satellite's table has every column of the master's (the applier makes it from the
                    # source's shape); a column left out arrives as nothing, which a NOT NULL column refuses.
                    raise SitesError(f"subsets.{link.satellite}.{table}.columns: {', '.join(map(repr, required))} "
                                     "cannot be left out: NOT NULL at the master, and the satellite's table has the "
                                     "column (holding NULL where the subset leaves it out)")
    return filters, excluded


def _not_null(conn: psycopg.Connection, table: str, columns: list[str]) -> list[str]:
    schema, name = split_table(table)
    return [r[0] for r in conn.execute(
        "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
        "and is_nullable = 'NO' and column_name = any(%s) order by ordinal_position",
        (schema, name, columns)).fetchall()]


def _primary_key(conn: psycopg.Connection, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey) "
        "where i.indrelid = %s::regclass and i.indisprimary", (table,)).fetchall()]


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _extra_config(pipeline: Pipeline, filters: dict[str, str], excluded: dict[str, list[str]]) -> dict[str, str]:
    extra: dict[str, str] = {}
    if filters:
        tables = sorted(filters)
        extra["snapshot.select.statement.overrides"] = ",".join(tables)
        for table in tables:
            schema, name = split_table(table)
            extra[f"snapshot.select.statement.overrides.{table}"] = (
                f"SELECT * FROM {_quote(schema)}.{_quote(name)} WHERE ({filters[table]})")
    columns = [f"{re.escape(t)}\\.{re.escape(c)}" for t, cols in sorted(excluded.items()) for c in cols]
    if columns:
        extra["column.exclude.list"] = ",".join(columns)
    return extra


@contextlib.contextmanager
def _with_subset(plan: LinkPlan) -> Iterator[None]:
    """capture's connector configuration, plus the subset's keys, while `plan`'s link is planned or applied.

    capture.apply has no place for keys of a caller's own yet (a `connector_config(..., extra=)` hook would do);
    until it does, its call of debezium.connector_config is wrapped for the link's pipeline only."""
    original = debezium.connector_config
    extra = _extra_config(plan.link.pipeline, plan.filters, plan.excluded)

    def config(pipeline, tables, secrets=None):  # noqa: ANN001, ANN202 - the wrapped function's own signature
        out = original(pipeline, tables, secrets=secrets)
        if pipeline.pipeline == plan.link.pipeline.pipeline:
            out.update(extra)
        return out

    debezium.connector_config = config
    try:
        yield
    finally:
        debezium.connector_config = original


def plan(topology: Topology, satellites: list[str] | None = None) -> list[LinkPlan]:
    """What `apply` would do for each link (every satellite's, or the named ones'), changing nothing."""
    plans = []
    for link in topology.links():
        if satellites and link.satellite not in satellites:
            continue
        filters, excluded = _filters(topology, link)
        p = LinkPlan(link, filters, excluded)
        with _with_subset(p):
            p.changes = capture.diff(link.pipeline)
        current = _current(link.pipeline)
        p.state = "create" if current is None else ("update" if p.changes else "unchanged")
        plans.append(p)
    return plans


def _current(pipeline: Pipeline) -> dict | None:
    from producers.connect import ConnectClient

    with ConnectClient(pipeline.kafka.connect_url) as connect:
        return connect.config(pipeline.connector_name)


def _publication(pipeline: Pipeline, filters: dict[str, str]) -> None:
    """The link's publication, each table with its row filter (created before capture.apply, which keeps a
    publication naming the right tables as it is). A row filter over columns outside the replica identity makes
    PostgreSQL refuse UPDATE and DELETE on the table, so filtered tables get REPLICA IDENTITY FULL."""
    tables = [*pipeline.source.tables, pipeline.source.signal_table]
    parts = []
    for table in tables:
        schema, name = split_table(table)
        part = sql.SQL("TABLE {}").format(sql.Identifier(schema, name))
        if table in filters:
            part = sql.SQL("{} WHERE ({})").format(part, sql.SQL(filters[table]))
        parts.append(part)
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        ensure_signal_table(conn, pipeline.source.signal_table)
        for table in filters:
            schema, name = split_table(table)
            conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(sql.Identifier(schema, name)))
        exists = conn.execute("select 1 from pg_publication where pubname = %s",
                              (pipeline.publication_name,)).fetchone()
        if exists:
            conn.execute(sql.SQL("ALTER PUBLICATION {} SET {}").format(
                sql.Identifier(pipeline.publication_name), sql.SQL(", ").join(parts)))
        else:
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR {} WITH (publish_via_partition_root = true)").format(
                sql.Identifier(pipeline.publication_name), sql.SQL(", ").join(parts)))


def prepare_master(topology: Topology) -> list[str]:
    """The master's site-owned tables receive the satellites' rows through replica appliers, which write only into
    tables they can follow (holding `_cdc_lsn`): the column is added, 0 for the master's own rows (an applied row
    holds its source position; site rows never collide, as each site's rows carry its own sync id)."""
    done = []
    master = topology.sites[topology.master]
    with psycopg.connect(psycopg_conninfo(master.sqlalchemy_url), autocommit=True) as conn:
        for table in topology.site_tables:
            columns = _columns(conn, table)
            if not columns:
                raise SitesError(f"site_tables: {table} does not exist at the master "
                                 f"({master.sqlalchemy_url.database})")
            if LSN_COLUMN not in columns:
                schema, name = split_table(table)
                conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint NOT NULL DEFAULT 0").format(
                    sql.Identifier(schema, name), sql.Identifier(LSN_COLUMN)))
                done.append(f"master {topology.master}: {table} gained {LSN_COLUMN} (0 for the master's own rows)")
    return done


def apply(topology: Topology, satellites: list[str] | None = None,
          echo: Callable[[str], None] | None = None) -> list[LinkPlan]:
    """Create or update every link's publication, connector and topics (idempotent). A new satellite's down
    connector starts with a snapshot of its subset (its full sync), then streams."""
    say = echo or (lambda line: None)
    plans = plan(topology, satellites)  # every refusal before anything changes
    for line in prepare_master(topology):
        say(line)
    for p in plans:
        for line in p.lines():
            say(line)
        _publication(p.link.pipeline, p.filters)
        with _with_subset(p):
            report = capture.apply(p.link.pipeline, echo=None)
        for warning in report.warnings:
            say(f"  warning: {warning}")
        if report.topics_created:
            say(f"  topics created: {', '.join(report.topics_created)}")
    return plans


def remove(topology: Topology, satellite: str, *, purge: bool) -> list[str]:
    """Delete a satellite's links' connectors (with purge: their slots, publications and signalling tables too).
    Topics are kept, as `cdc connectors delete` keeps them: they are the event log."""
    topology.site(satellite)
    done = []
    for link in topology.links():
        if link.satellite != satellite:
            continue
        done.extend(capture.delete(link.pipeline, purge=purge))
        if purge:
            pipeline = link.pipeline
            try:
                with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
                    schema, name = split_table(pipeline.source.signal_table)
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, name)))
                    done.append(f"signalling table {pipeline.source.signal_table}: dropped")
            except psycopg.OperationalError as exc:
                done.append(f"source database not reachable, {pipeline.source.signal_table} left: "
                            f"{str(exc).strip()}")
    return done
