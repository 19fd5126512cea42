"""The connector watcher's decisions (producers/watch.py), on a stand-in for Kafka Connect's answers: a failed task is
restarted at once, again only after a backoff that doubles, reported each time with its trace's first line; an
unreachable Connect is one line per 30 s; recovery is said once."""

from __future__ import annotations

import time

from cdc.errors import ServiceUnavailable
from producers.connect import ConnectorStatus
from producers.watch import ConnectorWatch


class _Connect:
    def __init__(self) -> None:
        self.answers: list = []
        self.restarts: list[tuple] = []

    def status(self, name):
        answer = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def restart(self, name, *, include_tasks, only_failed):
        self.restarts.append((name, include_tasks, only_failed))

    def close(self):
        pass


FAILED = ConnectorStatus("c", "RUNNING", [{"id": 0, "state": "FAILED",
                                           "trace": "org.apache.kafka.connect.errors.ConnectException: An exception "
                                                    "occurred in the change event producer\n\tat ..."}])
RUNNING = ConnectorStatus("c", "RUNNING", [{"id": 0, "state": "RUNNING"}])


def _watch(first_backoff: float = 0.3):
    lines: list[str] = []
    watch = ConnectorWatch("http://127.0.0.1:1", "c", lines.append, first_backoff=first_backoff, max_backoff=0.6)
    watch.client.close()
    fake = _Connect()
    watch.client = fake  # type: ignore[assignment]
    return watch, fake, lines


def test_a_failed_task_is_restarted_with_backoff_and_reported():
    watch, connect, lines = _watch()
    connect.answers = [FAILED]
    watch.check()
    assert connect.restarts == [("c", True, True)]  # includeTasks=true&onlyFailed=true
    assert "task 0 FAILED (org.apache.kafka.connect.errors.ConnectException: An exception occurred" in lines[0]
    watch.check()
    watch.check()
    assert len(connect.restarts) == 1  # still failing, but within the backoff: not hammered
    time.sleep(0.35)
    watch.check()
    assert len(connect.restarts) == 2
    time.sleep(0.35)
    watch.check()
    assert len(connect.restarts) == 2  # the backoff doubled (0.6 s)
    time.sleep(0.3)
    watch.check()
    assert len(connect.restarts) == 3
    connect.answers = [RUNNING]
    watch.check()
    watch.check()
    assert [line for line in lines if "running again" in line] == ["capture: connector c running again after 3 "
                                                                    "restart(s)"]
    connect.answers = [FAILED]  # a new failure is restarted at once again
    watch.check()
    assert len(connect.restarts) == 4


def test_a_healthy_connector_is_left_alone_and_an_unreachable_connect_is_one_line():
    watch, connect, lines = _watch()
    connect.answers = [RUNNING]
    for _ in range(5):
        watch.check()
    assert connect.restarts == [] and lines == []
    connect.answers = [ServiceUnavailable("Kafka Connect at http://127.0.0.1:8083 did not answer GET /connectors/c")]
    for _ in range(50):
        watch.check()
    assert len(lines) == 1 and lines[0].startswith("capture: Kafka Connect unreachable since "), lines
    connect.answers = [RUNNING]
    watch.check()
    assert lines[-1].startswith("capture: Kafka Connect reachable again")
