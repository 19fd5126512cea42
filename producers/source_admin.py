"""Source-side administration: the captured tables (cdc/source_tables.py), slots, publications, signals."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Protocol, TypeVar

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL

from cdc.errors import ConfigError, ServiceUnavailable
from cdc.source_tables import TableShape, reflect_tables

_Row = TypeVar("_Row", covariant=True)


class _Cursor(Protocol[_Row]):
    def fetchone(self) -> _Row | None: ...


def one_row(cursor: _Cursor[_Row], what: str) -> _Row:
    """The row of a query that returns exactly one (an aggregate, a select of expressions, the current database);
    none means the object it reads vanished, which is said with `what` rather than as a TypeError on None."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError(f"no row for {what}")
    return row


def split_table(table: str) -> tuple[str, str]:
    schema, _, name = table.partition(".")
    return schema, name


def describe_tables(url: URL, tables: tuple[str, ...] | list[str], source: str = "source.tables", *,
                    catalog: bool = False) -> dict[str, TableShape]:
    """The captured tables (cdc/source_tables.py; capture needs keys, column names and types, and partition parents,
    the catalog's type descriptions only to refuse what a destination cannot hold); a table that does not exist is a
    configuration error naming it, a source that does not answer ServiceUnavailable."""
    try:
        return reflect_tables(url, tables, catalog=catalog, field_name=source)
    except ConfigError:
        raise
    except Exception as exc:
        raise ServiceUnavailable(f"cannot read the source database {url.render_as_string()}: {exc}") from exc


def psycopg_conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def drop_slot(conn: psycopg.Connection, slot: str, *, wait: float = 30.0) -> bool:
    """Drop a replication slot once its reader has let go of it; False when there was no such slot.

    A deleted connector's task releases the slot a moment after Connect acknowledges the delete, so we wait
    for it to turn inactive rather than fail.
    """
    deadline = time.monotonic() + wait
    while True:
        row = conn.execute("select active from pg_replication_slots where slot_name = %s", (slot,)).fetchone()
        if row is None:
            return False
        if not row[0] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    conn.execute("select pg_drop_replication_slot(%s)", (slot,))
    return True


def drop_publication(conn: psycopg.Connection, publication: str) -> bool:
    existed = conn.execute("select 1 from pg_publication where pubname = %s", (publication,)).fetchone()
    conn.execute(sql.SQL("drop publication if exists {}").format(sql.Identifier(publication)))
    return existed is not None


def slots_of_database(conn: psycopg.Connection, database: str) -> list[str]:
    return [r[0] for r in conn.execute("select slot_name from pg_replication_slots where database = %s", (database,))]


def ensure_signal_table(conn: psycopg.Connection, table: str) -> bool:
    """Create Debezium's signalling table (the source channel for ad-hoc snapshots); True when created."""
    schema, name = split_table(table)
    exists = conn.execute("select 1 from information_schema.tables where table_schema = %s and table_name = %s",
                          (schema, name)).fetchone()
    if exists:
        return False
    conn.execute(sql.SQL("create table {} (id varchar(64) primary key, type varchar(32) not null, "
                         "data varchar(4096))").format(sql.Identifier(schema, name)))
    return True


def send_incremental_snapshot(conn: psycopg.Connection, signal_table: str, tables: list[str],
                              conditions: list[dict[str, str]] | None = None, *, kind: str = "incremental") -> str:
    """Ask the connector for a snapshot of `tables` through the signalling table: incremental (interleaved with
    streaming), or blocking (streaming pauses while it runs)."""
    signal_id = f"cdc-{uuid.uuid4()}"
    data: dict[str, object] = {"data-collections": tables, "type": kind}
    if conditions:
        data["additional-conditions"] = conditions
    schema, name = split_table(signal_table)
    conn.execute(sql.SQL("insert into {} (id, type, data) values (%s, 'execute-snapshot', %s)").format(
        sql.Identifier(schema, name)), (signal_id, json.dumps(data)))
    return signal_id


def partitions_not_full(conn: psycopg.Connection, tables: list[str]) -> list[tuple[str, str]]:
    """(partition, partitioned table) for every partition, at any depth, of `tables` whose replica identity is not
    FULL. PostgreSQL does not pass a partitioned table's replica identity on to its partitions (nor to one attached
    or created later), and a row's old image comes from the partition it sits in."""
    if not tables:
        return []
    rows = conn.execute(
        "select pn.nspname || '.' || p.relname, t.name from unnest(%s::text[]) as t(name) "
        "cross join lateral pg_partition_tree(to_regclass(quote_ident(split_part(t.name, '.', 1)) || '.' || "
        "quote_ident(substr(t.name, length(split_part(t.name, '.', 1)) + 2)))) as tree "
        "join pg_class p on p.oid = tree.relid join pg_namespace pn on pn.oid = p.relnamespace "
        "where tree.level > 0 and p.relkind = 'r' and p.relreplident <> 'f' order by 1", (tables,)).fetchall()
    return [(r[0], r[1]) for r in rows]


def set_replica_identity_full(conn: psycopg.Connection, tables: list[str]) -> None:
    for table in tables:
        conn.execute(sql.SQL("alter table {} replica identity full").format(sql.Identifier(*split_table(table))))


def ensure_publication(conn: psycopg.Connection, publication: str, tables: list[str]) -> bool:
    """Create the pipeline's filtered publication, or set its tables; True when something changed.

    We manage it rather than Debezium: its own CREATE PUBLICATION does not quote a table name holding a
    double quote, and a filtered publication (not FOR ALL TABLES) needs no superuser.

    `publish_via_partition_root`: a partitioned table's changes are published under its own name (the one
    Debezium's include list holds), not under the partition a row sits in, for partitions attached later too.
    """
    wanted = sql.SQL(", ").join(sql.Identifier(*split_table(t)) for t in tables)
    row = conn.execute("select pubviaroot from pg_publication where pubname = %s", (publication,)).fetchone()
    if row is None:
        conn.execute(sql.SQL("create publication {} for table {} with (publish_via_partition_root = true)").format(
            sql.Identifier(publication), wanted))
        return True
    changed = False
    if not row[0]:
        conn.execute(sql.SQL("alter publication {} set (publish_via_partition_root = true)").format(
            sql.Identifier(publication)))
        changed = True
    # pg_publication_tables lists a published partitioned table's partitions, not the table, under pubviaroot
    # false, and the table itself under true; pg_publication_rel holds what was named.
    current = conn.execute(
        "select n.nspname, c.relname from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid "
        "join pg_class c on c.oid = pr.prrelid join pg_namespace n on n.oid = c.relnamespace where p.pubname = %s",
        (publication,)).fetchall()
    if {f"{s}.{t}" for s, t in current} != set(tables):
        conn.execute(sql.SQL("alter publication {} set table {}").format(sql.Identifier(publication), wanted))
        changed = True
    return changed


@dataclass(frozen=True)
class SourceIdentity:
    """Which database a pipeline's topics hold the history of: a re-created database has another oid, another
    cluster (a restored or re-initialised one) another system identifier."""

    system_identifier: str
    database_oid: int
    database: str

    def describe(self) -> str:
        return f"database {self.database!r} (oid {self.database_oid}) of cluster {self.system_identifier}"


def source_identity(conn: psycopg.Connection) -> SourceIdentity:
    row = one_row(conn.execute("select (select system_identifier::text from pg_control_system()), d.oid::bigint, "
                               "d.datname from pg_database d where d.datname = current_database()"),
                  "the current database in pg_database")
    return SourceIdentity(row[0], int(row[1]), row[2])


def insert_watermark(conn: psycopg.Connection, signal_table: str) -> str:
    """Commit a tiny source transaction (a `log` signal, which Debezium just logs) and return its id.

    Its END record in the transaction topic comes after every change committed before it: an applier that has
    applied it has applied all of them. That is what `cdc run --until-caught-up` waits for.
    """
    schema, name = split_table(signal_table)
    with conn.transaction():
        xid = one_row(conn.execute("select txid_current() % 4294967296"), "txid_current()")[0]
        conn.execute(sql.SQL("insert into {} (id, type, data) values (%s, 'log', %s)").format(
            sql.Identifier(schema, name)),
            (f"cdc-watermark-{uuid.uuid4()}", json.dumps({"message": f"cdc watermark {xid}"})))
    return str(xid)
