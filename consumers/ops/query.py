"""`cdc query`: one read-only statement on an analytics replica (DuckDB or PostgreSQL), behind walls it cannot climb.

Whoever types the statement is treated as hostile: it may read the replicated tables and their histories, nothing
else, and change nothing, on the destination or on the machine.

PostgreSQL: the statement runs in a session that logs in as the destination's read-only role, with that role's own
password (the pipeline file's `read_only_password`, else the one `cdc run` generated for it, kept in a file of the
state directory readable by its owner only). It is never a session of the applier's user, so no `SET ROLE`,
`set_config('role', ...)`, `RESET` or DO block inside the statement leads back to that user's rights: the session's
own user is the read-only role, which holds SELECT on those tables and nothing more (no superuser, no membership of
`pg_read_server_files` and the like; checked before every statement). Beyond that:
- the transaction is begun READ ONLY (and the role's sessions default to it), and never committed;
- the statement is sent with the extended query protocol (a prepared statement), which takes exactly one statement,
  so `RESET ROLE; DELETE ...` or `COMMIT; DELETE ...` is refused whole before anything runs;
- a statement timeout (`--timeout`, 60 s by default) ends a statement that would hold the server.

DuckDB: the file is opened read-only with the engine's own walls up: `enable_external_access = false` (no file but the
database's own: no COPY TO, EXPORT, read_text/read_csv/glob, ATTACH, INSTALL/LOAD) and `lock_configuration = true`
(no SET/RESET/PRAGMA that changes a setting, so the first wall cannot be lowered). A second wall of our own: the text
is parsed with DuckDB's `extract_statements`, and only one statement, a SELECT (DESCRIBE, SHOW, SUMMARIZE, FROM ...)
or an EXPLAIN of one, is run; ATTACH, COPY, SET, PRAGMA, CALL and the rest are refused by name. The same timeout
interrupts a statement that runs too long.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from cdc.config import Destination, masked_url
from cdc.errors import CdcError, ConfigError, ServiceUnavailable, first_line
from consumers.apply.dialects import dialect_class

READ_ONLY = "the analytics replica is read-only"
# How long one statement may run, unless `cdc query --timeout` says otherwise.
DEFAULT_TIMEOUT_S = 60.0


class QueryRefused(CdcError):
    """The statement was refused before it ran, or stopped by the replica's walls (exit status 1)."""


def run(name: str, destination: Destination, statement: str,
        timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of one read-only statement on an analytics destination."""
    if destination.kind != "analytics":
        raise ConfigError(f"destinations.{name}: `cdc query` reads analytics destinations, this one is a "
                          f"{destination.kind}")
    if not timeout_s > 0:
        raise ConfigError(f"--timeout: a number of seconds above 0, not {timeout_s}")
    dialect = dialect_class(destination.sqlalchemy_url, destination.kind)
    if dialect.read_only_access == "file":
        return _duckdb(destination, statement, timeout_s)
    if dialect.read_only_access == "role":
        return _postgres(name, destination, statement, timeout_s)
    raise ConfigError(f"destinations.{name}: `cdc query` reads DuckDB and PostgreSQL replicas, not "
                      f"{destination.sqlalchemy_url.get_backend_name()!r}")


def _seconds(timeout_s: float) -> str:
    return f"{timeout_s:g} s"


# -- DuckDB -------------------------------------------------------------------------------------------------------

# How long `cdc query` waits for the applier to let go of a DuckDB file.
WRITER_PATIENCE_S = 30.0
# The engine's own walls (see the module's docstring); the extension settings keep a statement from fetching or
# loading code even where external access would not already stop it.
DUCKDB_LOCKED = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "lock_configuration": True,  # last: the settings above can no longer be changed by the statement
}
# The statement types `cdc query` runs on DuckDB: reading ones (DESCRIBE, SHOW, SUMMARIZE and FROM-first are SELECTs).
DUCKDB_ALLOWED = frozenset({"SELECT", "EXPLAIN"})
_LEADING_NOISE = re.compile(r"(\s+|--[^\n]*(\n|$)|/\*.*?\*/)*", re.S)


def _statement_kind(statement: Any) -> str:
    """What a parsed statement is, as its user wrote it (`IMPORT`, not DuckDB's PRAGMA type) and DuckDB names it."""
    text = _LEADING_NOISE.sub("", statement.query, count=1)
    word = re.match(r"[A-Za-z_]+", text)
    kind = statement.type.name
    if word is None or word.group(0).upper() == kind:
        return kind
    return f"{word.group(0).upper()} (a {kind} statement)"


def _duckdb(destination: Destination, statement: str, timeout_s: float) -> tuple[list[str], list[tuple[Any, ...]]]:
    import duckdb

    from consumers.apply.dialects.duckdb import when_free

    url = destination.sqlalchemy_url
    try:
        # The applier holds the file while it writes a batch (about a second at most): wait for it.
        conn = when_free(lambda: duckdb.connect(url.database or ":memory:", read_only=True, config=DUCKDB_LOCKED),
                         WRITER_PATIENCE_S)
    except duckdb.Error as exc:
        raise CdcError(f"cannot open the analytics replica {url.database}: {first_line(exc)}") from None
    try:
        try:
            parsed = conn.extract_statements(statement)
        except duckdb.Error as exc:
            raise CdcError(f"query failed: {first_line(exc)}") from None
        if not parsed:
            raise QueryRefused("`cdc query` was given no statement")
        if len(parsed) > 1:
            raise QueryRefused(f"`cdc query` runs one statement at a time, this text holds {len(parsed)}")
        kind = parsed[0].type.name
        if kind not in DUCKDB_ALLOWED:
            raise QueryRefused(f"refused: {_statement_kind(parsed[0])}; `cdc query` runs only SELECT (and EXPLAIN) "
                               f"statements, on a replica that is read-only")
        # DuckDB has no statement timeout of its own: interrupt the connection from a timer.
        timer = threading.Timer(timeout_s, conn.interrupt)
        timer.daemon = True
        timer.start()
        try:
            result = conn.execute(parsed[0])
            columns = [d[0] for d in result.description or []]
            return columns, result.fetchall() if columns else []
        except duckdb.InterruptException:
            raise QueryRefused(f"query stopped after {_seconds(timeout_s)} (`cdc query --timeout` sets the limit)") \
                from None
        except duckdb.PermissionException as exc:  # enable_external_access = false
            raise QueryRefused(f"refused: `cdc query` reads nothing outside the analytics replica: "
                               f"{first_line(exc)}") from None
        except duckdb.Error as exc:
            message = first_line(exc)
            if "read-only" in message:
                raise QueryRefused(f"{READ_ONLY}: {message}") from None
            raise CdcError(f"query failed: {message}") from None
        finally:
            timer.cancel()
    finally:
        conn.close()


# -- PostgreSQL ---------------------------------------------------------------------------------------------------

def _postgres(name: str, destination: Destination, statement: str,
              timeout_s: float) -> tuple[list[str], list[tuple[Any, ...]]]:
    import psycopg
    from psycopg import errors

    from consumers.apply.dialects.postgres import read_only_role_excess, reader_password, reader_password_file
    from producers.source_admin import psycopg_conninfo

    url = destination.sqlalchemy_url
    role = destination.read_only_role
    assert role is not None  # cdc.config gives every PostgreSQL analytics destination one
    configured = destination.read_only_password
    password = configured.get_secret_value() if configured else reader_password(url, role, create=False)
    if not password:
        raise CdcError(f"destinations.{name}: no password for the read-only role {role}, which `cdc query` logs in "
                       f"as: read_only_password is not set and {reader_password_file(url, role)} does not exist "
                       f"(`cdc run {name}` generates it on this machine)")
    reader = url.set(username=role, password=password)
    try:
        conn = psycopg.connect(psycopg_conninfo(reader), connect_timeout=10,
                               options=f"-c statement_timeout={int(timeout_s * 1000)}")
    except psycopg.OperationalError as exc:
        message = first_line(exc)
        if "authentication failed" in message or "not permitted to log in" in message:
            raise CdcError(f"destinations.{name}: the read-only role {role} cannot log in: {message}",
                           hint=f"`cdc run {name}` creates the role and sets its password when it prepares the "
                                "destination") from None
        raise ServiceUnavailable(f"cannot connect to the analytics replica {masked_url(reader)}: {message}") from None
    try:
        conn.read_only = True  # the transaction psycopg opens on the first statement is BEGIN READ ONLY
        excess = read_only_role_excess(conn, role)
        if excess:  # granted by hand since `cdc run` prepared it: the walls would not hold
            raise QueryRefused(f"destinations.{name}: the read-only role {role} may do more than read "
                               f"({', '.join(excess)}); `cdc query` refuses to run as it until that is taken away")
        cursor = conn.cursor()
        try:
            cursor.execute(statement, prepare=True)  # prepared: the extended protocol, one statement only
            columns = [d.name for d in cursor.description or []]
            return columns, cursor.fetchall() if columns else []
        except errors.ReadOnlySqlTransaction as exc:
            raise QueryRefused(f"{READ_ONLY}: {first_line(exc)}") from None
        except errors.InsufficientPrivilege as exc:
            raise QueryRefused(f"the read-only role {role} may not do that: {first_line(exc)}") from None
        except errors.QueryCanceled as exc:
            raise QueryRefused(f"query stopped after {_seconds(timeout_s)} (`cdc query --timeout` sets the limit): "
                               f"{first_line(exc)}") from None
        except errors.SyntaxError as exc:
            if "multiple commands" in str(exc):
                raise QueryRefused(f"`cdc query` runs one statement at a time: {first_line(exc)}") from None
            raise CdcError(f"query failed: {first_line(exc)}") from None
        except psycopg.Error as exc:
            raise CdcError(f"query failed: {first_line(exc)}") from None
    finally:
        conn.close()  # without a commit: the server rolls the transaction back
