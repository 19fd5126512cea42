"""Source-side administration: what the captured tables look like (SQLAlchemy reflection), slots, publications, signals."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import psycopg
from psycopg import sql
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL

from cdc.errors import ConfigError, ServiceUnavailable


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # the type as the database names it, lower case (e.g. "bigint", "integer", "text")
    nullable: bool


@dataclass(frozen=True)
class TableInfo:
    name: str  # schema-qualified
    primary_key: tuple[str, ...]
    columns: dict[str, Column]


def split_table(table: str) -> tuple[str, str]:
    schema, _, name = table.partition(".")
    return schema, name


def describe_tables(url: URL, tables: tuple[str, ...] | list[str], source: str = "source.tables") -> dict[str, TableInfo]:
    """Reflect the captured tables; a table that does not exist is a configuration error naming it."""
    engine = create_engine(url.set(drivername="postgresql+psycopg"), pool_pre_ping=False)
    try:
        insp = inspect(engine)
        found: dict[str, TableInfo] = {}
        missing = []
        for table in tables:
            schema, name = split_table(table)
            if not insp.has_table(name, schema=schema):
                missing.append(table)
                continue
            columns = {
                c["name"]: Column(c["name"], str(c["type"]).lower(), bool(c["nullable"]))
                for c in insp.get_columns(name, schema=schema)
            }
            pk = tuple(insp.get_pk_constraint(name, schema=schema).get("constrained_columns") or ())
            found[table] = TableInfo(table, pk, columns)
    except Exception as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ServiceUnavailable(f"cannot read the source database {url.render_as_string()}: {exc}") from exc
    finally:
        engine.dispose()
    if missing:
        raise ConfigError(f"{source}: {', '.join(repr(t) for t in missing)} "
                          f"{'does' if len(missing) == 1 else 'do'} not exist at the source ({url.database})")
    return found


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


def ensure_publication(conn: psycopg.Connection, publication: str, tables: list[str]) -> bool:
    """Create the pipeline's filtered publication, or set its tables; True when something changed.

    We manage it rather than Debezium: its own CREATE PUBLICATION does not quote a table name holding a
    double quote, and a filtered publication (not FOR ALL TABLES) needs no superuser.
    """
    wanted = sql.SQL(", ").join(sql.Identifier(*split_table(t)) for t in tables)
    current = conn.execute(
        "select schemaname, tablename from pg_publication_tables where pubname = %s", (publication,)).fetchall()
    exists = conn.execute("select 1 from pg_publication where pubname = %s", (publication,)).fetchone()
    if not exists:
        conn.execute(sql.SQL("create publication {} for table {}").format(sql.Identifier(publication), wanted))
        return True
    if {f"{s}.{t}" for s, t in current} != set(tables):
        conn.execute(sql.SQL("alter publication {} set table {}").format(sql.Identifier(publication), wanted))
        return True
    return False


def insert_watermark(conn: psycopg.Connection, signal_table: str) -> str:
    """Commit a tiny source transaction (a `log` signal, which Debezium just logs) and return its id.

    Its END record in the transaction topic comes after every change committed before it: an applier that has
    applied it has applied all of them. That is what `cdc run --until-caught-up` waits for.
    """
    schema, name = split_table(signal_table)
    with conn.transaction():
        xid = conn.execute("select txid_current() % 4294967296").fetchone()[0]
        conn.execute(sql.SQL("insert into {} (id, type, data) values (%s, 'log', %s)").format(
            sql.Identifier(schema, name)),
            (f"cdc-watermark-{uuid.uuid4()}", json.dumps({"message": f"cdc watermark {xid}"})))
    return str(xid)
