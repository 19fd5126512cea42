"""Partitions attached, detached or dropped after capture began: followed through an event trigger on the source.

PostgreSQL writes no change event for the rows a partition brings when it is ATTACHed, nor for the rows it takes
away when it is DETACHed or DROPped: they were never inserted into (or deleted from) the partitioned table. The
replication stream alone would leave the destinations without the first and with the second, in silence.

`connectors apply` installs, per pipeline whose tables include partitioned ones, an event trigger (which needs a
superuser) that runs after every CREATE, ALTER or DROP TABLE, compares each captured partitioned table's leaf
partitions with the ones it knew, and, in the DDL's own transaction:
- for a partition that appeared with rows (ATTACH PARTITION): sends Debezium an `execute-snapshot` signal for the
  partitioned table, limited to that partition's rows (`tableoid = <oid>`), so the rows travel the normal path;
  blocking for hierarchy members and tables without a key (an incremental snapshot de-duplicates by record key);
  and gives the partition REPLICA IDENTITY FULL where the table needs it (PostgreSQL does not pass it on);
- for a partition that left (DETACH PARTITION, DROP TABLE): records it in `cdc_partition_log`, with its row count,
  and warns the session that ran the DDL. `cdc connectors status` names it (exit 1) for every destination that has
  not been verified equal on that table since: `cdc verify --fix --tables <table>` deletes the rows that exist only
  at a destination, and a verify that finds the table equal there marks the entry resolved for that destination.
Everything is bookkept beside the signalling table: `cdc_partitions` (the partitions known per pipeline) and
`cdc_partition_log` (what happened, when, the snapshot signal sent, the destinations verified since).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from producers.source_admin import one_row, split_table

KNOWN_TABLE = "cdc_partitions"
LOG_TABLE = "cdc_partition_log"


@dataclass(frozen=True)
class Parent:
    """A captured partitioned table, and how the rows of a partition attached to it are to be snapshotted."""

    name: str  # schema-qualified, as in source.tables
    blocking: bool  # hierarchy members and tables without a key: a blocking snapshot (see module docstring)
    full_identity: bool  # its partitions need REPLICA IDENTITY FULL


@dataclass(frozen=True)
class Departure:
    """A partition that left a captured table after capture began, taking rows the destinations still hold."""

    parent: str
    partition: str
    event: str  # detached | dropped
    rows: int | None  # None: dropped (its rows are gone)
    at: datetime
    pending: tuple[str, ...]  # the destinations not verified equal on `parent` since

    def describe(self) -> str:
        held = "its rows" if self.rows is None else f"its {self.rows} row(s)"
        return (f"partition {self.partition} was {self.event} from {self.parent} at {self.at:%Y-%m-%d %H:%M:%S %Z}: "
                f"PostgreSQL wrote no delete for {held}, which destination(s) {', '.join(self.pending)} may still "
                f"hold; `cdc verify DEST --fix --tables {self.parent}` deletes them there")


def partitioned(conn: psycopg.Connection, tables: list[str]) -> list[str]:
    """The partitioned tables among `tables` (schema-qualified names)."""
    if not tables:
        return []
    rows = conn.execute(
        "select t.name from unnest(%s::text[]) as t(name) join pg_namespace n on n.nspname = split_part(t.name, "
        "'.', 1) join pg_class c on c.relnamespace = n.oid and c.relname = substr(t.name, length(split_part(t.name, "
        "'.', 1)) + 2) where c.relkind = 'p' order by 1", (tables,)).fetchall()
    return [r[0] for r in rows]


def can_install(conn: psycopg.Connection) -> bool:
    """Event triggers need a superuser."""
    row = conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()
    return bool(row and row[0])


def _names(pipeline: str, signal_table: str) -> tuple[sql.Identifier, sql.Identifier, sql.Identifier, str]:
    """The trigger function (in the signalling table's schema), the two bookkeeping tables, the trigger's name."""
    schema, _ = split_table(signal_table)
    tag = hashlib.sha1(pipeline.encode()).hexdigest()[:12]
    return (sql.Identifier(schema, f"cdc_partitions_{tag}"), sql.Identifier(schema, KNOWN_TABLE),
            sql.Identifier(schema, LOG_TABLE), f"cdc_partitions_{tag}")


# The leaf partitions (plain tables) under each captured partitioned table, at any depth.
_LEAVES = """
select pa.parent, pa.blocking, pa.full_identity, t.relid::oid as part,
       quote_ident(cn.nspname) || '.' || quote_ident(c.relname) as name,
       quote_ident(split_part(pa.parent, '.', 1)) || '.' ||
           quote_ident(substr(pa.parent, length(split_part(pa.parent, '.', 1)) + 2)) as parent_sql
from {parents} as pa(parent, blocking, full_identity)
cross join lateral pg_partition_tree(to_regclass(quote_ident(split_part(pa.parent, '.', 1)) || '.' ||
    quote_ident(substr(pa.parent, length(split_part(pa.parent, '.', 1)) + 2)))) as t
join pg_class c on c.oid = t.relid
join pg_namespace cn on cn.oid = c.relnamespace
where t.level > 0 and c.relkind = 'r'
"""

_FUNCTION = """
create or replace function {function}() returns event_trigger language plpgsql
set search_path = pg_catalog, pg_temp as $cdc$
declare
    p record;
    n bigint;
    signal text;
begin
    for p in
        with now_ as ({leaves}),
        known as (select parent, partition as part, partition_name as name from {known} where pipeline = {pipeline})
        select coalesce(n.parent, k.parent) as parent, n.parent_sql, n.blocking, n.full_identity,
               coalesce(n.part, k.part) as part,
               coalesce(n.name, k.name) as name, n.part is not null as present
        from now_ n full join known k on k.part = n.part and k.parent = n.parent
        where n.part is null or k.part is null
    loop
        if p.present then
            insert into {known} (pipeline, parent, partition, partition_name) values ({pipeline}, p.parent, p.part,
                p.name);
            if p.full_identity and (select relreplident from pg_class where oid = p.part) <> 'f' then
                -- (fires this trigger again: by then the partition is known, so that run finds nothing to do)
                execute format('alter table %s replica identity full', p.part::regclass);
            end if;
            execute format('select count(*) from %s', p.part::regclass) into n;
            if n > 0 then
                signal := 'cdc-partition-' || md5(random()::text || clock_timestamp()::text);
                insert into {signal_table} (id, type, data) values (signal, 'execute-snapshot', json_build_object(
                    'data-collections', json_build_array(p.parent),
                    'type', case when p.blocking then 'blocking' else 'incremental' end,
                    -- (an incremental snapshot takes a condition, a blocking one a whole statement)
                    'additional-conditions', json_build_array(json_build_object(
                        'data-collection', p.parent, 'filter', case when p.blocking
                            then format('SELECT * FROM %s WHERE tableoid = %s', p.parent_sql, p.part)
                            else format('tableoid = %s', p.part) end)))::text);
                insert into {log} (pipeline, parent, partition, event, rows, signal_id)
                    values ({pipeline}, p.parent, p.name, 'attached', n, signal);
            end if;
        else
            delete from {known} where pipeline = {pipeline} and partition = p.part;
            if exists (select from pg_class where oid = p.part) then
                execute format('select count(*) from %s', p.part::regclass) into n;
                insert into {log} (pipeline, parent, partition, event, rows)
                    values ({pipeline}, p.parent, p.name, 'detached', n);
            else
                n := null;
                insert into {log} (pipeline, parent, partition, event, rows)
                    values ({pipeline}, p.parent, p.name, 'dropped', null);
            end if;
            if n is null or n > 0 then
                raise warning 'cdc pipeline %: partition % left %; PostgreSQL writes no delete for its rows, which '
                    'the destinations still hold: run `cdc verify --fix --tables %` for each destination',
                    {pipeline}, p.name, p.parent, p.parent;
            end if;
        end if;
    end loop;
end
$cdc$
"""


def install(conn: psycopg.Connection, pipeline: str, signal_table: str, parents: list[Parent]) -> bool:
    """Create or refresh the pipeline's event trigger and bookkeeping; the partitions there now are known (their
    rows came with the snapshot or the stream). Without partitioned tables, remove it. True when installed."""
    function, known, log, trigger = _names(pipeline, signal_table)
    if not parents:
        uninstall(conn, pipeline, signal_table)
        return False
    conn.execute(sql.SQL("create table if not exists {} (pipeline text not null, parent text not null, "
                         "partition oid not null, partition_name text not null, primary key (pipeline, partition))")
                 .format(known))
    conn.execute(sql.SQL("create table if not exists {} (id bigint generated always as identity primary key, "
                         "pipeline text not null, at timestamptz not null default now(), parent text not null, "
                         "partition text not null, event text not null, rows bigint, signal_id text, "
                         "resolved_by text[] not null default '{{}}')").format(log))
    values = sql.SQL("(values {})").format(sql.SQL(", ").join(
        sql.SQL("({}, {}, {})").format(sql.Literal(p.name), sql.Literal(p.blocking), sql.Literal(p.full_identity))
        for p in parents))
    leaves = sql.SQL(_LEAVES).format(parents=values)
    with conn.transaction():
        conn.execute(sql.SQL("delete from {} where pipeline = %s").format(known), (pipeline,))
        conn.execute(sql.SQL("insert into {} (pipeline, parent, partition, partition_name) "
                             "select %s, parent, part, name from ({}) as leaves").format(known, leaves), (pipeline,))
        conn.execute(sql.SQL(_FUNCTION).format(function=function, leaves=leaves, known=known, log=log,
                                               pipeline=sql.Literal(pipeline),
                                               signal_table=sql.Identifier(*split_table(signal_table))))
        conn.execute(sql.SQL("drop event trigger if exists {}").format(sql.Identifier(trigger)))
        conn.execute(sql.SQL("create event trigger {} on ddl_command_end when tag in ('CREATE TABLE', "
                             "'ALTER TABLE', 'DROP TABLE') execute function {}()").format(
            sql.Identifier(trigger), function))
    return True


def uninstall(conn: psycopg.Connection, pipeline: str, signal_table: str) -> bool:
    """Drop the pipeline's event trigger and its bookkeeping rows (the log stays: it is history)."""
    function, known, _, trigger = _names(pipeline, signal_table)
    if conn.execute("select 1 from pg_event_trigger where evtname = %s", (trigger,)).fetchone() is None:
        return False
    with conn.transaction():
        conn.execute(sql.SQL("drop event trigger if exists {}").format(sql.Identifier(trigger)))
        conn.execute(sql.SQL("drop function if exists {}()").format(function))
        conn.execute(sql.SQL("delete from {} where pipeline = %s").format(known), (pipeline,))
    return True


def _has_log(conn: psycopg.Connection, signal_table: str) -> bool:
    schema, _ = split_table(signal_table)
    log = sql.Identifier(schema, LOG_TABLE).as_string(conn)
    return one_row(conn.execute("select to_regclass(%s)", (log,)), "to_regclass")[0] is not None


def departures(conn: psycopg.Connection, pipeline: str, signal_table: str, destinations: list[str]) -> list[Departure]:
    """Partitions that left a captured table, with the destinations that may still hold their rows (those not
    verified equal on the table since)."""
    _, _, log, _ = _names(pipeline, signal_table)
    if not destinations or not _has_log(conn, signal_table):
        return []
    rows = conn.execute(sql.SQL("select parent, partition, event, rows, at, resolved_by from {} where pipeline = %s "
                                "and event in ('detached', 'dropped') and coalesce(rows, 1) > 0 and not "
                                "(resolved_by @> %s::text[]) order by at").format(log),
                        (pipeline, destinations)).fetchall()
    return [Departure(parent, partition, event, n, at, tuple(d for d in destinations if d not in resolved))
            for parent, partition, event, n, at, resolved in rows]


def mark_resolved(conn: psycopg.Connection, pipeline: str, signal_table: str, destination: str,
                  tables: list[str]) -> int:
    """`destination` was verified equal to the source on `tables`: their departures are resolved there. How many."""
    _, _, log, _ = _names(pipeline, signal_table)
    if not tables or not _has_log(conn, signal_table):
        return 0
    return conn.execute(sql.SQL("update {} set resolved_by = array_append(resolved_by, %s) where pipeline = %s and "
                                "parent = any(%s) and event in ('detached', 'dropped') and not (%s = any(resolved_by))")
                        .format(log), (destination, pipeline, tables, destination)).rowcount
