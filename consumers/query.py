"""`cdc query`: one read-only statement on an analytics replica, DuckDB or PostgreSQL.

DuckDB files are opened read-only. PostgreSQL is read as the destination's read-only role, in a READ ONLY
transaction. Why a statement cannot write on PostgreSQL, although the connection logs in as the applier's user:
- it runs in a transaction begun READ ONLY, after `SET LOCAL ROLE <read-only role>`. PostgreSQL refuses to make a
  transaction read-write once a query has taken its snapshot, and every statement that could write takes one
  before it runs, so nothing inside the statement (a DO block that resets the role, `set_config(...)`) lifts it;
- it is sent with the extended query protocol (a prepared statement), which takes exactly one statement, so
  `RESET ROLE; DELETE ...` or `COMMIT; DELETE ...` is refused whole before anything runs;
- the transaction is never committed.
The role narrows what can be read to the replicated tables and their histories. It is not a security boundary
against whoever runs `cdc query`: they hold the destination URL, the applier's credentials, anyway.
"""

from __future__ import annotations

from typing import Any

from cdc.config import Destination, masked_url
from cdc.errors import CdcError, ConfigError, ServiceUnavailable

READ_ONLY = "the analytics replica is read-only"


def run(name: str, destination: Destination, statement: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of one read-only statement on an analytics destination."""
    if destination.kind != "analytics":
        raise ConfigError(f"destinations.{name}: `cdc query` reads analytics destinations, this one is a "
                          f"{destination.kind}")
    backend = destination.sqlalchemy_url.get_backend_name()
    if backend == "duckdb":
        return _duckdb(destination, statement)
    if backend == "postgresql":
        return _postgres(name, destination, statement)
    raise ConfigError(f"destinations.{name}: `cdc query` reads DuckDB and PostgreSQL replicas, not {backend!r}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# How long `cdc query` waits for the applier to let go of a DuckDB file.
WRITER_PATIENCE_S = 30.0


def _duckdb(destination: Destination, statement: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    import duckdb

    from consumers.dialects.duckdb import when_free

    url = destination.sqlalchemy_url
    try:
        # The applier holds the file while it writes a batch (about a second at most): wait for it.
        conn = when_free(lambda: duckdb.connect(url.database or ":memory:", read_only=True), WRITER_PATIENCE_S)
    except duckdb.Error as exc:
        raise CdcError(f"cannot open the analytics replica {url.database}: {exc}") from None
    try:
        result = conn.execute(statement)
        columns = [d[0] for d in result.description or []]
        return columns, result.fetchall() if columns else []
    except duckdb.Error as exc:
        message = _first_line(exc)
        if "read-only" in message:
            raise CdcError(f"{READ_ONLY}: {message}") from None
        raise CdcError(f"query failed: {message}") from None
    finally:
        conn.close()


def _postgres(name: str, destination: Destination, statement: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    import psycopg
    from psycopg import errors, sql

    from producers.source_admin import psycopg_conninfo

    url = destination.sqlalchemy_url
    role = destination.read_only_role
    assert role is not None  # cdc.config gives every PostgreSQL analytics destination one
    try:
        conn = psycopg.connect(psycopg_conninfo(url), connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise ServiceUnavailable(f"cannot connect to the analytics replica {masked_url(url)}: "
                                 f"{_first_line(exc)}") from None
    try:
        conn.read_only = True  # the transaction psycopg opens on the first statement is BEGIN READ ONLY
        try:
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        except errors.InvalidParameterValue as exc:  # the role does not exist (yet)
            raise CdcError(f"destinations.{name}: cannot take the read-only role {role}: {_first_line(exc)}",
                           hint=f"`cdc run {name}` creates it when it prepares the destination") from None
        cursor = conn.cursor()
        try:
            cursor.execute(statement, prepare=True)  # prepared: the extended protocol, one statement only
            columns = [d.name for d in cursor.description or []]
            return columns, cursor.fetchall() if columns else []
        except errors.ReadOnlySqlTransaction as exc:
            raise CdcError(f"{READ_ONLY}: {_first_line(exc)}") from None
        except errors.SyntaxError as exc:
            if "multiple commands" in str(exc):
                raise CdcError(f"`cdc query` runs one statement at a time: {_first_line(exc)}") from None
            raise CdcError(f"query failed: {_first_line(exc)}") from None
        except psycopg.Error as exc:
            raise CdcError(f"query failed: {_first_line(exc)}") from None
    finally:
        conn.close()  # without a commit: the server rolls the transaction back
