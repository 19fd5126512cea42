"""Outage lines (consumers/apply/outage.py): one line when a service stops answering, a reminder at most every 30 s,
one line when it is back; and the progress line of `cdc run` saying BLOCKED instead of a lag of 0."""

from __future__ import annotations

import calendar
import time

from consumers.apply.outage import Outage, clock
from consumers.apply.supervisor import _progress_printer

T0 = calendar.timegm((2026, 11, 30, 17, 40, 2, 0, 0, 0))


def test_a_flood_of_failures_is_one_line_then_one_every_30_s():
    kafka = Outage("Kafka")
    lines = []
    # librdkafka reports ~20 failed connection attempts a second: 95 s of them
    for n in range(95 * 20):
        line = kafka.failed("Connect to ipv4#127.0.0.1:9092 failed: Connection refused", now=T0 + n / 20,
                            mono=1000 + n / 20)
        if line:
            lines.append(line)
    assert lines[0] == ("Kafka unreachable since 17:40:02, retrying "
                        "(Connect to ipv4#127.0.0.1:9092 failed: Connection refused)")
    assert len(lines) == 4  # at 0, 30, 60 and 90 s
    assert all(line.startswith("Kafka unreachable since 17:40:02, retrying") for line in lines)
    assert kafka.describe() == "Kafka unreachable since 17:40:02"


def test_reminders_come_without_new_failures_and_the_recovery_is_one_line():
    registry = Outage("the schema registry")
    assert registry.tick(mono=0) is None  # not down: nothing to say
    assert registry.failed("HTTP 503", now=T0, mono=0)
    assert registry.tick(mono=29.9) is None
    assert registry.tick(mono=30.0) == "the schema registry unreachable since 17:40:02, retrying (HTTP 503)"
    assert registry.tick(mono=45) is None
    back = registry.recovered(now=T0 + 61)
    assert back == "the schema registry reachable again at 17:41:03 after 61 s (1 failed attempts)"
    assert registry.recovered(now=T0 + 62) is None  # said once
    assert not registry.down and registry.describe() is None
    # a new outage starts a new story: its own time, its own first line at once
    assert registry.failed("timeout", now=T0 + 100, mono=100) == \
        "the schema registry unreachable since 17:41:42, retrying (timeout)"


def test_details_are_one_short_line():
    outage = Outage("Kafka")
    line = outage.failed("a\nlong\n" + "x" * 5000, now=T0, mono=0)
    assert "\n" not in line and len(line) < 400


def test_clock_is_utc():
    assert clock(T0) == "17:40:02"


class _Stats:
    rows, transactions, rows_per_second = 10, 2, 5.0


class _Applier:
    name = "state"
    stats = _Stats()

    def __init__(self, blocked, reading_paused=None):
        self.blocked, self.reading_paused = blocked, reading_paused

    def lag_seconds(self):
        return 0.0


def test_the_progress_line_says_blocked_not_lag_0(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    show = _progress_printer(lines.append)
    show(_Applier("Kafka unreachable since 17:40:02"))
    assert lines == ["state: 10 rows, 2 source transactions, 5 rows/s, BLOCKED: Kafka unreachable since 17:40:02"]
    time.sleep(0)  # the printer prints every 10 s when not on a terminal: a new printer for the healthy case
    lines.clear()
    _progress_printer(lines.append)(_Applier(None))
    assert lines == ["state: 10 rows, 2 source transactions, 5 rows/s, lag 0.0 s"]
    lines.clear()
    _progress_printer(lines.append)(_Applier(None, "2 partition(s) paused (40,000 changes read ahead)"))
    assert lines == ["state: 10 rows, 2 source transactions, 5 rows/s, lag 0.0 s, 2 partition(s) paused (40,000 "
                     "changes read ahead)"]


def test_cdc_lag_says_blocked_when_the_applier_recorded_an_outage():
    from consumers.lag.status import BLOCKED, BLOCKED_PREFIX, DestinationSample, PartitionLag, judge, worst

    parts = (PartitionLag("p.person", 0, 5, 9),)
    blocked = DestinationSample("state", 100.0, parts, 90.0,
                                BLOCKED_PREFIX + "Kafka unreachable since 17:40:02 UTC, retrying")
    verdict = judge([blocked], None)
    assert (verdict.status, verdict.reason) == (BLOCKED, "Kafka unreachable since 17:40:02 UTC, retrying")
    assert worst(["STOP", BLOCKED]) == BLOCKED and worst([BLOCKED, "ERROR"]) == "ERROR"


def test_a_broker_settling_after_a_restart_is_asked_again_and_a_refusal_is_not():
    from confluent_kafka import KafkaError, KafkaException

    from consumers.apply.reader import kafka_settling

    # seen after a broker SIGKILL, from the log-end offsets: it stopped an applier for good
    assert kafka_settling(KafkaException(KafkaError(KafkaError.FENCED_LEADER_EPOCH)))
    assert kafka_settling(KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION)))
    assert not kafka_settling(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    assert not kafka_settling(KafkaException("no error object"))
