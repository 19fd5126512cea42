"""Failed Debezium tasks restarted, with backoff and a line each time: the watcher behind `cdc run` and
`cdc connectors watch`.

A Debezium task fails for good when its source connection breaks (a PostgreSQL restart, its walsender terminated)
and Kafka Connect never retries it by itself; the fix is the one a person would apply by hand, Connect's
`POST /connectors/<name>/restart?includeTasks=true&onlyFailed=true`. Restarts of a task that fails again are spaced
out (30 s, doubled up to 10 min) so that a source that stays down is not hammered, and each is reported with the
first line of the task's trace. Kafka Connect itself not answering is one line every 30 s (consumers/apply/outage.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cdc.errors import CdcError, first_line
from consumers.apply.outage import Outage
from producers.connect import ConnectClient, ConnectorStatus

CHECK_EVERY_S = 10.0
FIRST_BACKOFF_S = 30.0
MAX_BACKOFF_S = 600.0


class ConnectorWatch:
    """Checks one connector's status when asked (`check`), restarting its failed tasks when due."""

    def __init__(self, connect_url: str, connector: str, echo: Callable[[str], None], *,
                 first_backoff: float = FIRST_BACKOFF_S, max_backoff: float = MAX_BACKOFF_S) -> None:
        self.connector = connector
        self.echo = echo
        self.client = ConnectClient(connect_url, timeout=10.0, retries=1, backoff=0.5)
        self.connect = Outage("Kafka Connect")
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.restarts = 0  # restarts of the current failure
        self.total_restarts = 0
        self._next_restart = 0.0  # monotonic time before which no new restart is asked for
        self._backoff = first_backoff
        self._failing = False
        self._missing_said = False

    def close(self) -> None:
        self.client.close()

    def check(self) -> ConnectorStatus | None:
        """One look at the connector: restart what failed (when the backoff allows), report what changed."""
        try:
            status = self.client.status(self.connector)
        except CdcError as exc:
            line = self.connect.failed(first_line(exc))
            if line:
                self.echo(f"capture: {line}")
            return None
        line = self.connect.recovered()
        if line:
            self.echo(f"capture: {line}")
        if status is None:
            if not self._missing_said:
                self.echo(f"capture: connector {self.connector} does not exist (run `cdc connectors apply`); "
                          "no change reaches the topics")
                self._missing_said = True
            return None
        self._missing_said = False
        failed = [t for t in status.tasks if t.get("state") == "FAILED"]
        if status.state != "FAILED" and not failed:
            if self._failing and status.running:
                self.echo(f"capture: connector {self.connector} running again after {self.restarts} restart(s)")
                self._failing = False
                self.restarts = 0
                self._backoff = self.first_backoff
                self._next_restart = 0.0
            return status
        self._failing = True
        now = time.monotonic()
        if now < self._next_restart:
            return status
        what = (", ".join(f"task {t.get('id')}" for t in failed) or "the connector")
        trace = (status.failed_traces or [""])[0]
        reason = trace.strip().splitlines()[0][:300] if trace.strip() else status.state
        self.restarts += 1
        self.total_restarts += 1
        self.echo(f"capture: connector {self.connector}: {what} FAILED ({reason}); restarting "
                  f"(restart {self.restarts} of this failure; next no sooner than {self._backoff:.0f} s)")
        try:
            self.client.restart(self.connector, include_tasks=True, only_failed=True)
        except CdcError as exc:
            self.echo(f"capture: restarting connector {self.connector} failed: {first_line(exc)}")
        self._next_restart = now + self._backoff
        self._backoff = min(self._backoff * 2, self.max_backoff)
        return status

    def run(self, stop: threading.Event, every: float = CHECK_EVERY_S) -> None:
        """Check every `every` seconds until `stop` is set."""
        while not stop.is_set():
            self.check()
            stop.wait(every)


def watch_in_background(connect_url: str, connector: str, echo: Callable[[str], None],
                        stop: threading.Event, every: float = CHECK_EVERY_S) -> threading.Thread:
    """`cdc run`'s watcher: a daemon thread (it never holds up the appliers' exit)."""

    def work() -> None:
        watch = ConnectorWatch(connect_url, connector, echo)
        try:
            watch.run(stop, every)
        except Exception as exc:  # noqa: BLE001 - the watcher must never take the appliers down
            echo(f"capture: the connector watcher stopped: {exc!r}")
        finally:
            watch.close()

    thread = threading.Thread(target=work, name=f"watch-{connector}", daemon=True)
    thread.start()
    return thread


__all__ = ["ConnectorWatch", "watch_in_background", "CHECK_EVERY_S"]
