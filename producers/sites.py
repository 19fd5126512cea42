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

from cdc import kafka as kafka_clients
from cdc.config import KafkaSasl, Pipeline
from cdc.errors import CdcError, ConfigError
from cdc.topology import MARKER_TABLE, Link, SubsetTable, Topology
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
    # Connect's per-connector client overrides: an up link's connector writes as its satellite's Kafka user.
    overrides: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        p = self.link.pipeline
        site = self.link.satellite
        arrow = f"{site} -> master" if self.link.direction == "up" else f"master -> {site}"
        out = [f"{p.name} ({arrow}, sync {self._sync()}): {self.state}"
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
            if table == MARKER_TABLE:
                excluded[table] = [LSN_COLUMN]  # made by `apply` (prepare_two_way)
                continue
            columns = _columns(conn, table)
            if not columns:
                raise SitesError(f"{table} does not exist at {link.pipeline.source.sqlalchemy_url.database} (the "
                                 f"source of link {link.pipeline.name})")
            if table in topology.shared_tables:
                if not _primary_key(conn, table):
                    raise SitesError(f"shared_tables[{table!r}]: {table} has no primary key at "
                                     f"{link.pipeline.source.sqlalchemy_url.database} (a two-way table's rows are "
                                     "matched by it)")
                # Each site's own applier's bookkeeping, not data (consumers/sites/screen.py).
                excluded[table] = [LSN_COLUMN]
                continue
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


def _extra_config(pipeline: Pipeline, filters: dict[str, str], excluded: dict[str, list[str]],
                  overrides: dict[str, str] | None = None) -> dict[str, str]:
    extra: dict[str, str] = dict(overrides or {})
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
    extra = _extra_config(plan.link.pipeline, plan.filters, plan.excluded, plan.overrides)

    def config(pipeline, tables, secrets=None):  # noqa: ANN001, ANN202 - the wrapped function's own signature
        out = original(pipeline, tables, secrets=secrets)
        if pipeline.name == plan.link.pipeline.name:
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
    # The connector of a link carrying two-way tables captures the marker table too, which must exist for its
    # configuration to be made: the topology's own bookkeeping tables (empty; nothing of the user's) are created at
    # every site, the one thing `plan` does.
    ensure_bookkeeping(topology)
    for link in topology.links():
        if satellites and link.satellite not in satellites:
            continue
        filters, excluded = _filters(topology, link)
        p = LinkPlan(link, filters, excluded, overrides=connector_overrides(topology, link))
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
        # Filtered tables, and every two-way table (conflicts are found by the before image's version).
        for table in [*filters, *(t for t in pipeline.source.tables if t not in filters and _is_two_way(conn, t))]:
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


def _is_two_way(conn: psycopg.Connection, table: str) -> bool:
    if table == MARKER_TABLE:
        return True
    schema, name = split_table(table)
    return bool(conn.execute("select 1 from information_schema.columns where table_schema = %s and table_name = %s "
                             "and column_name = '_cdc_site'", (schema, name)).fetchone())


# -- two-way tables: what every site holds (consumers/sites/screen.py, docs/sites.md "Two-way tables") -------------
SITE_OBJECTS = """
create table if not exists public._cdc_origin (
    pipeline text not null, xid text not null, origin int not null, origin_ts bigint,
    applied_at timestamptz not null default now(), _cdc_lsn bigint not null default 0, primary key (pipeline, xid));
alter table public._cdc_origin replica identity full;
create table if not exists public._cdc_conflicts (
    id bigserial primary key, table_name text not null, key jsonb, policy text not null, decision text not null,
    state text not null, local jsonb, incoming jsonb, incoming_op text, local_site int, local_at timestamptz,
    incoming_site int, incoming_at timestamptz, reason text, pipeline text, xid text,
    detected_at timestamptz not null default now(), resolved_at timestamptz, resolved_as text);
"""
# A local write of a two-way table stamps the row's version: this site's sync id, and when (microseconds). Rows a
# topology's applier writes keep the version they came with (it sets cdc.applying for its transaction).
STAMP_FUNCTION = """
create or replace function public._cdc_stamp() returns trigger language plpgsql as $$
begin
    if coalesce(current_setting('cdc.applying', true), '') = '' then
        new._cdc_site := {sync_id};
        new._cdc_at := (extract(epoch from clock_timestamp()) * 1000000)::bigint;
    end if;
    return new;
end $$;
"""
# A master-owned table edited at a satellite: refused (reject) or kept and recorded (report), unless the satellite's
# applier is writing it.
GUARD_FUNCTION = """
create or replace function public._cdc_master_owned() returns trigger language plpgsql as $$
begin
    if coalesce(current_setting('cdc.applying', true), '') <> '' then
        return coalesce(new, old);
    end if;
    if tg_argv[0] = 'reject' then
        raise exception '%.% is owned by the master (topology {topology}): edit it at the master, not at site {site}',
            tg_table_schema, tg_table_name using errcode = 'insufficient_privilege';
    end if;
    insert into public._cdc_conflicts (table_name, policy, decision, state, local, incoming, incoming_op,
                                       local_site, local_at, reason)
    values (tg_table_schema || '.' || tg_table_name, 'on_satellite_edit', 'reported', 'reported',
            case when tg_op = 'DELETE' then null else to_jsonb(new) - '_cdc_lsn' end,
            case when tg_op = 'INSERT' then null else to_jsonb(old) - '_cdc_lsn' end, lower(left(tg_op, 1)),
            {sync_id}, clock_timestamp(),
            tg_op || ' of a master-owned table at a satellite: kept here, never sent to the master');
    return coalesce(new, old);
end $$;
"""


# A site-owned row written at a satellite with another site's id (or none) would be silently left out of capture (the
# up link's row filter keeps the satellite's own id only): refused at the satellite instead. The column and the sync
# id are the trigger's arguments (one function for every table of every topology at the site).
SITE_ROWS_FUNCTION = """
create or replace function public._cdc_site_owned() returns trigger language plpgsql as $$
declare
    site text := to_jsonb(new) ->> tg_argv[0];
begin
    if site is distinct from tg_argv[1] then
        raise exception '%.% holds each site''s own rows: %.% = % is not this site''s sync id (%); write it at its own '
            'site, or it would never reach the master', tg_table_schema, tg_table_name, tg_table_name, tg_argv[0],
            coalesce(site, 'null'), tg_argv[1] using errcode = 'check_violation';
    end if;
    return new;
end $$;
"""


def guard_site_rows(topology: Topology, satellites: list[str] | None = None) -> list[str]:
    """At each satellite, its site-owned tables refuse a row whose site column is not the satellite's sync id
    (idempotent; a table not made yet at the satellite is skipped: the up link's plan names it)."""
    done = []
    for name in topology.satellites:
        if satellites and name not in satellites or not topology.site_tables:
            continue
        site = topology.sites[name]
        with psycopg.connect(psycopg_conninfo(site.sqlalchemy_url), autocommit=True) as conn:
            conn.execute(SITE_ROWS_FUNCTION)
            for table, column in topology.site_tables.items():
                if not _columns(conn, table):
                    continue
                schema, tname = split_table(table)
                existed = conn.execute("select 1 from pg_trigger where tgrelid = to_regclass(%s) "
                                       "and tgname = '_cdc_site_owned'",
                                       (sql.Identifier(schema, tname).as_string(conn),)).fetchone()
                conn.execute(sql.SQL("create or replace trigger _cdc_site_owned before insert or update on {} "
                                     "for each row execute function public._cdc_site_owned({}, {})").format(
                    sql.Identifier(schema, tname), sql.Literal(column), sql.Literal(str(site.sync_id))))
                if not existed:
                    done.append(f"{name}: {table} refuses rows whose {column} is not {site.sync_id}")
    return done


def ensure_bookkeeping(topology: Topology) -> None:
    """The marker and conflicts tables at every site of a topology with two-way tables (idempotent)."""
    if not topology.shared_tables:
        return
    for site in topology.sites.values():
        with psycopg.connect(psycopg_conninfo(site.sqlalchemy_url), autocommit=True) as conn:
            conn.execute(SITE_OBJECTS)


def guard_master_owned(conn: psycopg.Connection, tables: list[str], policy: str, sync_id: int,
                       topology: str = "") -> list[str]:
    """The on_satellite_edit trigger on a satellite's master-owned tables that exist (the down link's applier makes
    them on its first run, and installs it then: consumers/sites/screen.py)."""
    done = []
    conn.execute(GUARD_FUNCTION.replace("{topology}", topology.replace("'", "")).replace("{site}", str(sync_id))
                 .replace("{sync_id}", str(sync_id)))
    for table in tables:
        if not _columns(conn, table):
            continue
        schema, name = split_table(table)
        conn.execute(sql.SQL("create or replace trigger _cdc_master_owned before insert or update or delete on {} "
                             "for each row execute function public._cdc_master_owned({})").format(
            sql.Identifier(schema, name), sql.Literal(policy)))
        done.append(f"{table}: a satellite's edit is {'refused' if policy == 'reject' else 'reported'}")
    return done


def unguard_master_owned(site, tables: list[str]) -> list[str]:  # noqa: ANN001 - a cdc.topology.Site
    """on_satellite_edit taken out of the file: the guard triggers an earlier `apply` installed are dropped (nothing
    is done at a satellite that never had them)."""
    done = []
    with psycopg.connect(psycopg_conninfo(site.sqlalchemy_url), autocommit=True) as conn:
        if not conn.execute("select to_regproc('public._cdc_master_owned') is not null").fetchone()[0]:
            return []
        for table in tables:
            if not _columns(conn, table):
                continue
            schema, name = split_table(table)
            conn.execute(sql.SQL("drop trigger if exists _cdc_master_owned on {}").format(
                sql.Identifier(schema, name)))
            done.append(f"{table}: a satellite's edit is no longer watched")
    return done


def prepare_two_way(topology: Topology, satellites: list[str] | None = None) -> list[str]:
    """Every site of a topology with two-way tables gets the marker and conflicts tables, and each two-way table its
    bookkeeping columns (`_cdc_lsn` for the applier; the version, `_cdc_site` and `_cdc_at`), REPLICA IDENTITY FULL
    and the trigger stamping local writes. Satellites with on_satellite_edit get the guard of their master-owned
    tables. Idempotent."""
    done: list[str] = []
    for name, site in sorted(topology.sites.items(), key=lambda kv: kv[1].sync_id):
        if satellites and name != topology.master and name not in satellites:
            continue
        satellite = site.sync_id != topology.sites[topology.master].sync_id
        guard = satellite and topology.on_satellite_edit is not None
        if satellite and not guard:
            done.extend(f"{name}: {line}" for line in unguard_master_owned(site, list(topology.subset(name))))
        if not topology.shared_tables and not guard:
            continue
        with psycopg.connect(psycopg_conninfo(site.sqlalchemy_url), autocommit=True) as conn:
            conn.execute(SITE_OBJECTS)
            if guard:
                for line in guard_master_owned(conn, list(topology.subset(name)), str(topology.on_satellite_edit),
                                               site.sync_id, topology.topology):
                    done.append(f"{name}: {line}")
            if not topology.shared_tables:
                continue
            conn.execute(STAMP_FUNCTION.replace("{sync_id}", str(site.sync_id)))
            for table in topology.shared_tables:
                columns = _columns(conn, table)
                if not columns:
                    raise SitesError(f"shared_tables[{table!r}]: {table} does not exist at site {name} "
                                     f"({site.sqlalchemy_url.database}); a two-way table is made at every site")
                schema, tname = split_table(table)
                ident = sql.Identifier(schema, tname)
                added = [c for c in (LSN_COLUMN, "_cdc_site", "_cdc_at") if c not in columns]
                conn.execute(sql.SQL("alter table {} add column if not exists {} bigint not null default 0, "
                                     "add column if not exists _cdc_site int, add column if not exists _cdc_at bigint"
                                     ).format(ident, sql.Identifier(LSN_COLUMN)))
                conn.execute(sql.SQL("alter table {} replica identity full").format(ident))
                conn.execute(sql.SQL("create or replace trigger _cdc_stamp before insert or update on {} for each row "
                                     "execute function public._cdc_stamp()").format(ident))
                if added:
                    done.append(f"{name}: {table} gained {', '.join(added)} (two-way: its version and bookkeeping)")
    return done


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
    for line in prepare_two_way(topology, satellites):
        say(line)
    for line in guard_site_rows(topology, satellites):
        say(line)
    # The satellites' users and ACLs first: a connector writing as its satellite's user logs in once it starts.
    for line in apply_access(topology, satellites):
        say(line)
    relogin = write_connector_logins(topology, plans)
    for p in plans:
        for line in p.lines():
            say(line)
        _publication(p.link.pipeline, p.filters)
        existed = p.state != "create"
        with _with_subset(p):
            report = capture.apply(p.link.pipeline, echo=None)
        if existed and p.link.pipeline.connector_name in relogin and not p.changes:
            # Same configuration (a reference), a new password behind it: Connect reads it when the task starts.
            from producers.connect import ConnectClient

            with ConnectClient(p.link.pipeline.kafka.connect_url) as connect:
                connect.restart(p.link.pipeline.connector_name)
            say(f"  connector {p.link.pipeline.connector_name}: restarted to log in with its new Kafka password")
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
    # First its Kafka access: a satellite taken away can no longer log in, nor read or write anything.
    done.extend(remove_access(topology, satellite))
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


# ---------------------------------------------------------------------------------------------------------------
# Authenticated and authorised links: each satellite's Kafka user, its ACLs, its connector's login

# The setting of an up link's connector that holds the satellite's login (a JAAS line with its password): stored as a
# connector secret (`.cdc/secrets/<connector>/`), the configuration holds only the reference.
JAAS_KEY = "producer.override.sasl.jaas.config"
SCRAM_ITERATIONS = 8192
# Debezium's default heartbeat topic prefix (topic.heartbeat.prefix): `__debezium-heartbeat.<topic.prefix>`.
HEARTBEAT_TOPIC_PREFIX = "__debezium-heartbeat"


def jaas_config(user: KafkaSasl) -> str:
    """The JAAS line of a SCRAM login (Kafka's Java clients), quotes and backslashes escaped."""
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return (f"org.apache.kafka.common.security.scram.ScramLoginModule required username={quoted(user.username)} "
            f"password={quoted(user.password.get_secret_value())};")


def connector_overrides(topology: Topology, link: Link) -> dict[str, str]:
    """An up link's connector (capturing at the satellite) writes its topics as the satellite's Kafka user, at the
    authenticated listener: Connect's `producer.override.*` (the worker's default override policy, All, allows
    them). The login is a reference to a connector secret, never the password itself. Down links' connectors act
    for the master and keep the worker's own client."""
    user = topology.sites[link.satellite].kafka_user
    if link.direction != "up" or user is None:
        return {}
    return {
        "producer.override.bootstrap.servers": str(topology.site_bootstrap_servers),
        "producer.override.security.protocol": kafka_clients.SECURITY_PROTOCOL,
        "producer.override.sasl.mechanism": kafka_clients.SASL_MECHANISM,
        JAAS_KEY: debezium.secret_reference(str(capture.secrets_directory(link.pipeline)), JAAS_KEY),
    }


@dataclass(frozen=True)
class Grant:
    """One ACL: a user may do `operation` on a topic or group, named literally or by prefix."""

    resource: str  # "topic" or "group"
    name: str
    pattern: str  # "literal" or "prefixed"
    operation: str  # "read", "write", "describe"

    def line(self) -> str:
        what = f"{self.resource}s {self.name}*" if self.pattern == "prefixed" else f"{self.resource} {self.name}"
        return f"{self.operation} {what}"


def site_grants(topology: Topology, satellite: str) -> list[Grant]:
    """What a satellite's Kafka user may do, and nothing else: write (and describe) its up link's topics (the data
    and transaction topics under `<up link>.`, its connector's heartbeat topic); read (and describe) its down link's
    topics, in its applier's consumer group; write its down applier's dead-letter topic."""
    grants: list[Grant] = []
    for link in topology.links():
        if link.satellite != satellite:
            continue
        name = link.pipeline.name
        if link.direction == "up":
            for op in ("write", "describe"):
                grants.append(Grant("topic", f"{name}.", "prefixed", op))
                grants.append(Grant("topic", f"{HEARTBEAT_TOPIC_PREFIX}.{name}", "literal", op))
        else:
            for op in ("read", "describe"):
                grants.append(Grant("topic", f"{name}.", "prefixed", op))
                # The applier's group (consumers/apply/reader.py: `cdc-<pipeline>-<destination>`), literally: a prefix
                # could match another satellite's group when one's name starts with another's.
                grants.append(Grant("group", f"cdc-{name}-{link.destination}", "literal", op))
            grants.append(Grant("topic", f"{name}.{link.destination}.dead-letter", "literal", "write"))
    return grants


def _binding(user: str, grant: Grant):  # noqa: ANN202 - confluent_kafka's AclBinding
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    return AclBinding(ResourceType.TOPIC if grant.resource == "topic" else ResourceType.GROUP, grant.name,
                      ResourcePatternType.PREFIXED if grant.pattern == "prefixed" else ResourcePatternType.LITERAL,
                      f"User:{user}", "*", AclOperation[grant.operation.upper()], AclPermissionType.ALLOW)


def _grant_of(binding) -> Grant | None:  # noqa: ANN001 - confluent_kafka's AclBinding
    from confluent_kafka.admin import AclPermissionType, ResourcePatternType, ResourceType

    if binding.permission_type != AclPermissionType.ALLOW or binding.host != "*" or \
            binding.restype not in (ResourceType.TOPIC, ResourceType.GROUP) or \
            binding.resource_pattern_type not in (ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED):
        return None
    return Grant("topic" if binding.restype == ResourceType.TOPIC else "group", binding.name,
                 "prefixed" if binding.resource_pattern_type == ResourcePatternType.PREFIXED else "literal",
                 binding.operation.name.lower())


def _result(future, what: str, timeout: float = 30.0):  # noqa: ANN001, ANN202 - a confluent_kafka future
    from confluent_kafka import KafkaException

    try:
        return future.result(timeout)
    except KafkaException as exc:
        error = exc.args[0]
        raise CdcError(f"Kafka: {what} failed: {error.str() if hasattr(error, 'str') else error}") from None


def apply_access(topology: Topology, satellites: list[str] | None = None) -> list[str]:
    """Each satellite's Kafka user (its SCRAM-SHA-256 credential, set to the topology's password every time) and its
    ACLs: the ones `site_grants` lists are created, any other ACL of that user is deleted (a user may do what the
    topology says and nothing else). Done through `kafka:` (the broker's own listener, a super user there)."""
    from confluent_kafka.admin import (
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    chosen = [s for s in topology.satellites if topology.sites[s].kafka_user is not None
              and (not satellites or s in satellites)]
    if not chosen:
        return []
    admin = kafka_clients.admin(topology.kafka, {"log_level": 3})
    done: list[str] = []
    for satellite in chosen:
        user = topology.sites[satellite].kafka_user
        assert user is not None
        upsert = UserScramCredentialUpsertion(
            user.username, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, SCRAM_ITERATIONS),
            user.password.get_secret_value().encode())
        for future in admin.alter_user_scram_credentials([upsert]).values():
            _result(future, f"setting Kafka user {user.username!r}'s password")
        done.append(f"kafka user {user.username} ({satellite}): SCRAM-SHA-256 credential set")
        principal = f"User:{user.username}"
        mine = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, principal, None, AclOperation.ANY,
                                AclPermissionType.ANY)
        existing = _result(admin.describe_acls(mine), f"reading {principal}'s ACLs") or []
        wanted = site_grants(topology, satellite)
        have = {_grant_of(b): b for b in existing}
        extra = [b for g, b in have.items() if g is None or g not in wanted]
        for binding in extra:
            exact = AclBindingFilter(binding.restype, binding.name, binding.resource_pattern_type, binding.principal,
                                     binding.host, binding.operation, binding.permission_type)
            for future in admin.delete_acls([exact]).values():
                _result(future, f"deleting an ACL of {principal}")
            grant = _grant_of(binding)
            done.append(f"  - {principal}: {grant.line() if grant else binding} (not the topology's)")
        missing = [g for g in wanted if g not in have]
        if missing:
            for future in admin.create_acls([_binding(user.username, g) for g in missing]).values():
                _result(future, f"creating {principal}'s ACLs")
        for grant in missing:
            done.append(f"  + {principal}: {grant.line()}")
    return done


def write_connector_logins(topology: Topology, plans: list[LinkPlan]) -> list[str]:
    """Store each up link's connector login (the JAAS line) as a connector secret before the connector starts;
    returns the connectors whose stored login changed (a running one must restart to log in again)."""
    from producers.connect import write_secrets

    changed = []
    for p in plans:
        if JAAS_KEY not in p.overrides:
            continue
        user = topology.sites[p.link.satellite].kafka_user
        assert user is not None
        if write_secrets(capture.secrets_directory(p.link.pipeline), {JAAS_KEY: jaas_config(user)}):
            changed.append(p.link.pipeline.connector_name)
    return changed


def remove_access(topology: Topology, satellite: str) -> list[str]:
    """A satellite's Kafka user deleted with every ACL of it (nothing when it has no kafka_user)."""
    from confluent_kafka.admin import (
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
        ScramMechanism,
        UserScramCredentialDeletion,
    )

    user = topology.site(satellite).kafka_user
    if user is None:
        return []
    admin = kafka_clients.admin(topology.kafka, {"log_level": 3})
    principal = f"User:{user.username}"
    mine = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, principal, None, AclOperation.ANY,
                            AclPermissionType.ANY)
    deleted = 0
    for future in admin.delete_acls([mine]).values():
        deleted += len(_result(future, f"deleting {principal}'s ACLs") or [])
    done = [f"kafka user {user.username} ({satellite}): {deleted} ACLs deleted"]
    deletion = UserScramCredentialDeletion(user.username, ScramMechanism.SCRAM_SHA_256)
    from confluent_kafka import KafkaError, KafkaException

    for future in admin.alter_user_scram_credentials([deletion]).values():
        try:
            future.result(30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.RESOURCE_NOT_FOUND:
                raise CdcError(f"Kafka: deleting Kafka user {user.username!r} failed: {exc.args[0].str()}") from None
            return [*done, f"kafka user {user.username} ({satellite}): had no credential"]
    return [*done, f"kafka user {user.username} ({satellite}): credential deleted"]
