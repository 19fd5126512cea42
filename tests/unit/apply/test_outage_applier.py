"""The applier's Kafka error callback (ChangeReader.kafka_error, a ReplicaApplier's reader), fed librdkafka's own
error objects as a broker outage produces them (~20 a second): one line, the applier BLOCKED; other errors said once
per 30 s; a fatal one kept for `poll` to raise. No service is contacted: the applier is only constructed."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from cdc import config
from cdc.kafka import KafkaAccessError
from consumers.apply.applier import ReplicaApplier

PIPELINE = """\
pipeline: outage
kafka:
  bootstrap_servers: 127.0.0.1:1
  schema_registry_url: http://127.0.0.1:1/apis/ccompat/v7
  connect_url: http://127.0.0.1:1
source:
  url: postgresql://cdc@127.0.0.1:1/src
  tables: [public.item]
destinations:
  state:
    kind: replica
    url: postgresql://cdc@127.0.0.1:1/dst
"""


def _applier(tmp_path: Path) -> tuple[ReplicaApplier, list[str]]:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE)
    lines: list[str] = []
    return ReplicaApplier(config.load(path, env={}), "state", echo=lines.append), lines


def test_a_flood_of_transport_errors_is_one_line_and_blocks(tmp_path):
    applier, lines = _applier(tmp_path)
    try:
        assert applier.blocked is None
        refused = "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused"
        for _ in range(400):
            applier.reader.kafka_error(KafkaError(KafkaError._TRANSPORT, refused))
            applier.reader.kafka_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        assert len(lines) == 1, lines
        assert lines[0].startswith("state: Kafka unreachable since ") and ", retrying (" in lines[0]
        assert applier.blocked is not None and applier.blocked.startswith("Kafka unreachable since ")
        applier.reader.kafka_answered()  # a message arrived
        assert applier.blocked is None
        assert lines[-1].startswith("state: Kafka reachable again at ")
    finally:
        applier.close()


def test_other_errors_are_said_once_and_a_fatal_one_is_kept(tmp_path):
    applier, lines = _applier(tmp_path)
    try:
        for _ in range(50):
            applier.reader.kafka_error(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized"))
        assert lines == ["state: Kafka reported: not authorized"]
        assert applier.blocked is None
        applier.reader.kafka_error(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
        assert applier.reader.kafka_fatal is not None
    finally:
        applier.close()


class _ErrorEvent:
    """What librdkafka's consume() hands back for a consumer-level error: a message whose error() is set."""

    def __init__(self, error: KafkaError, topic: str | None = None) -> None:
        self._error, self._topic = error, topic

    def error(self) -> KafkaError:
        return self._error

    def topic(self) -> str | None:
        return self._topic


class _Consumer:
    def __init__(self, events: list[_ErrorEvent]) -> None:
        self.events = events

    def consume(self, num_messages: int, timeout: float) -> list[_ErrorEvent]:
        events, self.events = self.events, []
        return events


def test_a_group_or_topic_its_acls_do_not_grant_stops_the_reader_naming_it(tmp_path):
    """librdkafka says a refused group (its coordinator lookup) once, as an error event of the poll: skipping it
    would leave the applier reading with no word. Other non-fatal events are skipped as before."""
    applier, _ = _applier(tmp_path)
    reader = applier.reader
    try:
        reader.consumer = _Consumer([_ErrorEvent(KafkaError(KafkaError._PARTITION_EOF, "eof"), "outage.public.item")])
        assert reader.poll() == 1
        reader.consumer = _Consumer([_ErrorEvent(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED,
                                                            "FindCoordinator response error: Group authorization "
                                                            "failed"))])
        with pytest.raises(KafkaAccessError) as info:
            reader.poll()
        assert "consumer group cdc-outage-state" in str(info.value), info.value
        assert info.value.exit_code == 2
    finally:
        reader.consumer = None
        applier.close()
