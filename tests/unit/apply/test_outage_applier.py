"""The applier's Kafka error callback (ChangeReader.kafka_error, a ReplicaApplier's reader), fed librdkafka's own
error objects as a broker outage produces them (~20 a second): one line, the applier BLOCKED; other errors said once
per 30 s; a fatal one kept for `poll` to raise. No service is contacted: the applier is only constructed."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka import KafkaError

from cdc import config
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
