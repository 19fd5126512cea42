"""Outages as a diagnosis, not noise: one line when a service stops answering, a reminder at most every 30 s, one
line when it answers again (the state behind `cdc run`'s "Kafka unreachable since HH:MM:SS, retrying").

Pure logic, no I/O: the caller reports failures and successes with the time they happened and prints the lines
this returns. Kafka's client library retries by itself and reports every failed connection attempt (about 20 a
second with a few partitions); those reports all land here, and only the first and then one every `every` seconds
become a line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

REMIND_EVERY_S = 30.0


def clock(epoch: float) -> str:
    """HH:MM:SS of an epoch time, in UTC (the stack's logs and `cdc lag` speak UTC)."""
    return time.strftime("%H:%M:%S", time.gmtime(epoch))


@dataclass
class Outage:
    """One service's reachability, seen by one applier (or watcher)."""

    service: str  # "Kafka", "the schema registry", "destination state", "Kafka Connect"
    every: float = REMIND_EVERY_S
    since: float | None = None  # epoch time of the first failure of the current outage
    detail: str = ""  # the latest failure's reason, first line
    _said_at: float | None = None  # monotonic time of the last line printed about it
    failures: int = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def describe(self) -> str | None:
        """'Kafka unreachable since 17:40:02' while down, else None (the progress line and `cdc lag` use it)."""
        return None if self.since is None else f"{self.service} unreachable since {clock(self.since)}"

    def failed(self, detail: str, *, now: float | None = None, mono: float | None = None) -> str | None:
        """A failure happened: the line to print, or None when one was printed less than `every` seconds ago."""
        now = time.time() if now is None else now
        mono = time.monotonic() if mono is None else mono
        self.failures += 1
        self.detail = " ".join(detail.split())[:300]
        if self.since is None:
            self.since = now
        return self._due(mono)

    def tick(self, *, mono: float | None = None) -> str | None:
        """Called now and then while nothing new happens: the reminder when one is due during an outage."""
        if self.since is None:
            return None
        return self._due(time.monotonic() if mono is None else mono)

    def recovered(self, *, now: float | None = None) -> str | None:
        """The service answered: the line saying so when it was down, else None."""
        if self.since is None:
            return None
        now = time.time() if now is None else now
        line = (f"{self.service} reachable again at {clock(now)} after {now - self.since:.0f} s "
                f"({self.failures} failed attempts)")
        self.since, self._said_at, self.failures, self.detail = None, None, 0, ""
        return line

    def _due(self, mono: float) -> str | None:
        if self._said_at is not None and mono - self._said_at < self.every:
            return None
        self._said_at = mono
        line = f"{self.describe()}, retrying"
        return f"{line} ({self.detail})" if self.detail else line


__all__ = ["Outage", "REMIND_EVERY_S", "clock"]
