"""The errors of applying changes to a destination (consumers.apply.applier and its parts), how they are told, and
which of them waiting mends: the destination drivers' errors are classified here, once (`session_ended`,
`unreachable`, `transient_driver_error`), and `retry_reason` says whether `cdc run` starts a failed applier again."""

from __future__ import annotations

from typing import Any

from cdc.errors import CdcError, DestinationBusy, ServiceUnavailable, Terminal, Transient, first_line
from consumers.apply import runs


class DestinationLost(ServiceUnavailable):
    """The destination's session ended (a restart, a terminated backend): the writer lock went with it. `run`
    reconnects, re-takes the lock and resumes from the offsets the destination stored."""


class DestinationUnreachable(ServiceUnavailable):
    """The destination refused the connection or is starting or stopping (not a login or a database that does not
    exist): waited for, like a broker that does not answer, when `cdc run` starts."""


class ApplyError(CdcError, Terminal):
    """A batch could not be applied. Carries, where known, the table and where in Kafka its events came from
    (`table`, `topic`, `partition`, `offsets` as (first, last)); its message names them too (`where`)."""

    def __init__(self, message: str, *, table: str | None = None, topic: str | None = None,
                 partition: int | None = None, offsets: tuple[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.table = table
        self.topic = topic
        self.partition = partition
        self.offsets = offsets


def where(steps: list[Any]) -> str:
    """What a batch of steps holds, for an error message: its changes' count, tables and Kafka positions."""
    events = [e for s in steps for e in s.events]
    if not events:
        return "an empty batch"
    tables = sorted({e.table for e in events})
    spans: dict[tuple[str, int], list[int]] = {}
    for e in events:
        spans.setdefault((e.topic, e.partition), []).extend((e.offset, e.last_offset))
    places = ", ".join(f"{t}[{p}]@{min(o)}-{max(o)}" for (t, p), o in sorted(spans.items())[:4])
    return f"{runs.count(events)} changes of {', '.join(tables)} ({places})"


def located(steps: list[Any]) -> dict[str, Any]:
    """ApplyError's attributes for a batch of steps: the table when the batch holds one, the topic, partition and
    (first, last) offsets when its changes come from one partition."""
    events = [e for s in steps for e in s.events]
    tables = {e.table for e in events}
    partitions = {(e.topic, e.partition) for e in events}
    found: dict[str, Any] = {"table": next(iter(tables)) if len(tables) == 1 else None}
    if len(partitions) == 1:
        (topic, partition), = partitions
        found.update(topic=topic, partition=partition,
                     offsets=(min(e.offset for e in events), max(e.last_offset for e in events)))
    return found


# -- the destination drivers' errors, classified once -------------------------------------------------------------

# MariaDB (PyMySQL) error numbers: cannot connect (socket, TCP), server gone away, connection lost; a connection killed
# (1927) or closed by the server (4031); a lock wait timed out (1205) and a deadlock (1213), where the transaction
# was rolled back and may simply be run again.
_MARIADB_UNREACHABLE = frozenset({2002, 2003, 2006, 2013})
_MARIADB_SESSION_ENDED = frozenset({2006, 2013, 1927, 4031})
_MARIADB_RETRY = frozenset({1205, 1213})
# PostgreSQL SQLSTATEs of a transaction that may succeed when run again: serialization failure, deadlock, lock not
# available (a lock_timeout).
_POSTGRES_RETRY = frozenset({"40001", "40P01", "55P03"})


def _driver(exc: BaseException) -> BaseException:
    """The driver's own error: SQLAlchemy's `.orig` when it wrapped one."""
    return getattr(exc, "orig", None) or exc


def _mariadb_code(orig: BaseException) -> int | None:
    args = getattr(orig, "args", None)
    return args[0] if args and isinstance(args[0], int) else None


def unreachable(exc: BaseException) -> bool:
    """A connection error that waiting can mend: refused, timed out, the server starting or shutting down. Not a
    login refused or a database that does not exist (those are the pipeline file's to fix)."""
    import psycopg

    orig = _driver(exc)
    if isinstance(orig, psycopg.Error):
        if orig.sqlstate is not None:
            return orig.sqlstate.startswith(("08", "57P"))
        # libpq gives no SQLSTATE for a connection refused by the server itself, only its message: "FATAL" when
        # the server answered (a login refused, a database that does not exist), unless it was starting or stopping.
        said = str(orig)
        return "FATAL:" not in said or any(state in said for state in (
            "starting up", "shutting down", "in recovery", "too many clients"))
    return _mariadb_code(orig) in _MARIADB_UNREACHABLE


def session_ended(exc: BaseException) -> bool:
    """A destination error that means the session is gone (SQLSTATE class 08, connection exceptions; 57P01-03, the
    server shutting down or the backend terminated), whatever the driver made of it."""
    orig = _driver(exc)
    state = getattr(orig, "sqlstate", None) or ""
    if state.startswith("08") or state in ("57P01", "57P02", "57P03"):
        return True
    # MariaDB (PyMySQL): the server has gone away, lost connection, connection killed.
    return _mariadb_code(orig) in _MARIADB_SESSION_ENDED


def transient_driver_error(exc: BaseException) -> bool:
    """Whether the same work may succeed when done again later: the session or the server went away, or the
    transaction lost a deadlock, a serialization conflict or a lock wait. Not a login refused, a constraint violated,
    a statement cancelled by its timeout (it would run as long again), nor anything else."""
    orig = _driver(exc)
    if getattr(orig, "sqlstate", None) in _POSTGRES_RETRY or _mariadb_code(orig) in _MARIADB_RETRY:
        return True
    return session_ended(exc) or unreachable(exc)


def _is_driver_error(exc: BaseException | None) -> bool:
    """An error of a database driver (or SQLAlchemy's wrapper of one), as opposed to Kafka's, the registry's..."""
    if exc is None:
        return False
    orig = _driver(exc)
    module = type(orig).__module__.split(".")[0]
    return module in ("psycopg", "pymysql", "duckdb", "sqlalchemy")


def retry_reason(exc: BaseException) -> str | None:
    """Why an applier that stopped with `exc` may be started again (the reason, one line), or None when it must stay
    stopped. Retried: what is marked Transient (a service that did not answer, Kafka, the schema registry, a
    destination that went away or lost a deadlock). Not retried: what is Terminal or unmarked (a poison change, a
    schema change it cannot follow, bad configuration); a destination written by another applier (DestinationBusy:
    the user's to stop, said at once rather than waited out); and a Transient one caused by a driver error that
    waiting does not mend (a login refused surfaces as a destination that "did not answer")."""
    if not isinstance(exc, Transient) or isinstance(exc, (DestinationBusy, Terminal)):
        return None
    cause = exc.__cause__
    if _is_driver_error(cause) and not transient_driver_error(cause):  # type: ignore[arg-type]
        return None
    return first_line(exc)
