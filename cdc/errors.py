"""The one exception root of the project, with terminal and transient markers, and the exit codes they map to."""

from __future__ import annotations


class CdcError(Exception):
    """Root of every error this project raises on purpose.

    `exit_code` follows the command-line contract: 1 when an operation failed, 2 for bad usage or configuration.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class Terminal:
    """Marker: retrying will not help (bad input, a constraint violated, a missing artifact)."""


class Transient:
    """Marker: the same call may succeed later (a service restarting, a rebalance)."""


class ConfigError(CdcError, Terminal):
    """The pipeline file or the command line is wrong; the message names the file, the field and the problem."""

    exit_code = 2


class StackError(CdcError, Terminal):
    """A component of the local stack could not be prepared, started, checked or stopped."""

    def __init__(self, component: str, message: str, *, log_tail: str | None = None, hint: str | None = None):
        super().__init__(f"{component}: {message}", hint=hint)
        self.component = component
        self.log_tail = log_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.log_tail:
            text += f"\n--- last lines of the {self.component} log ---\n{self.log_tail.rstrip()}"
        return text


class ServiceUnavailable(CdcError, Transient):
    """A service (Kafka, the registry, Kafka Connect, a database) did not answer."""


class NotApplied(CdcError, Terminal):
    """The pipeline's connector or topics do not exist yet: waiting will not make them; `cdc connectors apply`
    will."""


class DestinationBusy(CdcError, Transient):
    """Another applier (a `cdc run`, a `cdc replay`, a backup being restored) is writing the destination."""

    def __init__(self, destination: str, pipeline: str) -> None:
        super().__init__(f"destination {destination}: another applier is writing it (a `cdc run` or `cdc replay` of "
                         f"pipeline {pipeline}, or a backup being restored); stop it first",
                         hint="one applier at a time: two would write the same rows")


class ConnectError(CdcError):
    """Kafka Connect refused or failed a REST call; carries the connector, the endpoint and Connect's message."""

    def __init__(self, message: str, *, connector: str | None, endpoint: str, status: int | None):
        super().__init__(message)
        self.connector = connector
        self.endpoint = endpoint
        self.status = status


class RegistryError(CdcError):
    """The schema registry refused or failed a call; carries the HTTP status and the registry's error code."""

    def __init__(self, message: str, *, status: int | None = None, error_code: int | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class DecodeError(CdcError, Terminal):
    """A Kafka message could not be decoded; carries where it came from."""

    def __init__(self, message: str, *, topic: str, partition: int, offset: int):
        super().__init__(f"{topic}[{partition}]@{offset}: {message}")
        self.topic = topic
        self.partition = partition
        self.offset = offset


def first_line(error: BaseException | str, limit: int = 500) -> str:
    """The reason an error gives, as one line for a log or a message: a driver's own error when SQLAlchemy wraps it
    (`.orig`), its first line that says something, whitespace collapsed, at most `limit` characters; the error's type
    when it says nothing (an empty message must not become an empty reason, or an IndexError)."""
    text = error if isinstance(error, str) else str(getattr(error, "orig", None) or error)
    line = next((" ".join(x.split()) for x in text.splitlines() if x.strip()), "")
    if not line:
        return "" if isinstance(error, str) else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def driver_reason(error: BaseException, limit: int = 500) -> str:
    """A database driver's error whole, on one line: its DETAIL and HINT lines say which row and why (`Key (id)=(5)
    already exists`), which `first_line` would drop. The driver's own error when SQLAlchemy wraps it (`.orig`, not
    the wrapper that repeats the statement and its parameters); at most `limit` characters."""
    line = " ".join(str(getattr(error, "orig", None) or error).split()) or type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
