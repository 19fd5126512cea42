"""Errors that do work: which destination errors are transient (consumers.apply.errors, with the drivers' own error
classes), and what `cdc run`'s runner does with them: a transient error starts that destination's applier again
after a backoff, one line per attempt naming the destination and the reason; a terminal one stops that destination
alone while the others go on. The appliers here are stand-ins (the runner's orchestration is what is tested); the
real appliers' part is tests/integration/apply/test_runner.py."""

from __future__ import annotations

import threading

import psycopg
import pymysql
import pytest
from sqlalchemy.exc import OperationalError

from cdc.config import parse
from cdc.errors import CdcError, ConfigError, DestinationBusy, ServiceUnavailable
from consumers.apply import supervisor as runner
from consumers.apply.errors import (
    ApplyError,
    DestinationLost,
    retry_reason,
    session_ended,
    transient_driver_error,
    unreachable,
)
from tests.unit.samples import PIPELINE


def wrapped(driver_error: BaseException) -> OperationalError:
    """The driver's error as SQLAlchemy hands it over."""
    return OperationalError("SELECT 1", {}, driver_error)


def because(error: CdcError, cause: BaseException) -> CdcError:
    error.__cause__ = cause
    return error


def test_driver_errors_that_waiting_mends_are_told_from_those_it_does_not():
    # PostgreSQL: a deadlock, a serialization failure, a lock timeout; the backend terminated; a refused connection.
    for transient in (psycopg.errors.DeadlockDetected("deadlock detected"),
                      psycopg.errors.SerializationFailure("could not serialize access"),
                      psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
                      psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
                      psycopg.OperationalError("connection failed: Connection refused")):
        assert transient_driver_error(wrapped(transient)), transient
    assert session_ended(wrapped(psycopg.errors.AdminShutdown("terminating connection")))
    # A login refused, a database that does not exist, a statement stopped by its timeout, a constraint: not mended.
    for terminal in (psycopg.OperationalError('connection failed: FATAL:  password authentication failed for user "x"'),
                     psycopg.OperationalError('connection failed: FATAL:  database "nope" does not exist'),
                     psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
                     psycopg.errors.UniqueViolation("duplicate key value violates unique constraint")):
        assert not transient_driver_error(wrapped(terminal)), terminal
    assert unreachable(wrapped(psycopg.OperationalError("FATAL:  the database system is starting up")))
    # MariaDB through PyMySQL: lock wait timeout, deadlock, server gone away, can't connect; access denied is not.
    for code in (1205, 1213, 2006, 2013, 2003):
        assert transient_driver_error(wrapped(pymysql.err.OperationalError(code, "...")))
    assert not transient_driver_error(wrapped(pymysql.err.OperationalError(1045, "Access denied for user 'x'")))


def test_what_the_runner_retries():
    # Transient and not caused by a driver error waiting cannot mend: retried, with its reason on one line.
    assert retry_reason(ServiceUnavailable("schema registry at http://r:8081 did not answer")) \
        == "schema registry at http://r:8081 did not answer"
    lost = because(ServiceUnavailable("destination state failed: deadlock detected"),
                   wrapped(psycopg.errors.DeadlockDetected("deadlock detected")))
    assert retry_reason(lost) == "destination state failed: deadlock detected"
    assert retry_reason(DestinationLost("destination state: its session ended")) is not None
    # A "did not answer" that is a login refused: the pipeline file's to fix, never waited out.
    refused = because(ServiceUnavailable("destination state did not answer: password authentication failed"),
                      wrapped(psycopg.OperationalError("FATAL:  password authentication failed for user \"x\"")))
    assert retry_reason(refused) is None
    # Another applier writing the destination is said at once; terminal and unmarked errors stop for good.
    assert retry_reason(DestinationBusy("state", "district")) is None
    assert retry_reason(ApplyError("destination state: applying 3 changes of public.person failed")) is None
    assert retry_reason(ConfigError("destinations.state.url: bad")) is None
    assert retry_reason(RuntimeError("a bug")) is None


class Stats:
    def __init__(self) -> None:
        self.rows = self.transactions = self.columnar_rows = 0


class StandIn:
    """An applier whose run does what its destination's script says: raise the next error, or apply `rows`."""

    def __init__(self, name: str, script: list[BaseException | int]) -> None:
        self.name = name
        self.script = script
        self.stats = Stats()
        self.closed = self.stopped = False
        self.timeouts: list[float | None] = []

    def run(self, *, until_caught_up: bool, timeout: float | None, progress) -> None:  # noqa: ANN001
        self.timeouts.append(timeout)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        self.stats.rows += step
        self.stats.transactions += 1

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def pipeline():
    return parse({**PIPELINE, "destinations": {
        "state": {"kind": "replica", "url": "postgresql://u@db/state"},
        "lake": {"kind": "analytics", "url": "duckdb:///lake.duckdb"}}}, env={})


def run(pipeline, scripts, monkeypatch, timeout=None):  # noqa: ANN001
    monkeypatch.setattr(runner, "RESTART_FIRST_S", 0.01)
    made: list[StandIn] = []

    def make(_pipeline, name):  # noqa: ANN001
        made.append(StandIn(name, scripts[name]))
        return made[-1]

    lines: list[str] = []
    done: dict[str, object] = {}

    def target() -> None:  # the runner installs signal handlers from the main thread only: called here directly
        try:
            done["result"] = runner.run(pipeline, [], until_caught_up=True, timeout=timeout, echo=lines.append,
                                        watch_connector=False, make_applier=make)
        except BaseException as exc:  # noqa: BLE001 - asserted by the test
            done["error"] = exc

    assert threading.current_thread() is threading.main_thread()
    target()
    return done, lines, made


def test_a_transient_error_starts_that_destination_again_and_the_other_goes_on(pipeline, monkeypatch):
    gone = because(ServiceUnavailable("destination state failed: deadlock detected"),
                   wrapped(psycopg.errors.DeadlockDetected("deadlock detected")))
    scripts = {"state": [gone, ServiceUnavailable("Kafka consumer failed: broker down"), 5], "lake": [7]}
    done, lines, made = run(pipeline, scripts, monkeypatch)
    assert done == {"result": 0}, lines
    retries = [line for line in lines if "transient error" in line]
    # One line per attempt, naming the destination and the reason, and the attempt's number.
    assert len(retries) == 2, lines
    assert retries[0].startswith("state: ") and "deadlock detected" in retries[0] and "attempt 1" in retries[0]
    assert "Kafka consumer failed: broker down" in retries[1] and "attempt 2" in retries[1]
    # Three appliers of `state` (each failed one closed before the next started), one of `lake`.
    assert [a.name for a in made] == ["state", "lake", "state", "state"]
    assert all(a.closed for a in made)
    # The summary counts what every run of a destination applied.
    assert "state: applied 5 rows in 1 source transactions" in lines
    assert "lake: applied 7 rows in 1 source transactions" in lines


def test_a_terminal_error_stops_its_destination_alone(pipeline, monkeypatch):
    poison = ApplyError("destination state: applying 3 changes of public.person failed: value too long",
                        table="public.person")
    scripts = {"state": [poison], "lake": [7]}
    done, lines, made = run(pipeline, scripts, monkeypatch)
    assert done.get("error") is poison, lines  # the run ends with it (exit 1)...
    assert [a.name for a in made] == ["state", "lake"]  # ...never started again...
    assert not any("transient error" in line for line in lines)
    assert "lake: applied 7 rows in 1 source transactions" in lines  # ...and the other destination went on
    assert not made[1].stopped


def test_a_transient_error_is_not_retried_past_the_runs_timeout(pipeline, monkeypatch):
    monkeypatch.setattr(runner, "RESTART_FIRST_S", 60.0)  # the next attempt would come after the timeout
    scripts = {"state": [ServiceUnavailable("Kafka consumer failed: broker down")], "lake": [1]}
    made: list[StandIn] = []
    lines: list[str] = []

    def make(_pipeline, name):  # noqa: ANN001
        made.append(StandIn(name, scripts[name]))
        return made[-1]

    with pytest.raises(ServiceUnavailable, match="broker down"):
        runner.run(pipeline, [], until_caught_up=True, timeout=5.0, echo=lines.append, watch_connector=False,
                   make_applier=make)
    assert [a.name for a in made] == ["state", "lake"]
    assert made[0].timeouts == [5.0]  # the first run gets the whole timeout
