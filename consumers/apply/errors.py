"""The errors of applying changes to a destination (consumers.apply.applier and its parts), and how they are told."""

from __future__ import annotations

from typing import Any

from cdc.errors import CdcError, ServiceUnavailable, Terminal
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
