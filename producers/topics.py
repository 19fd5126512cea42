"""Topic administration: the pipeline's topics are created up front by us, as event logs (never compacted); the
topics a pipeline plans, and the record naming the source database whose history they hold."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from cdc import kafka as kafka_clients
from cdc.config import KafkaSettings, Pipeline
from cdc.errors import ServiceUnavailable

# The one record of a pipeline's `_source` topic: which source database its topics hold the history of.
SOURCE_KEY = b"source"


def source_topic(pipeline: Pipeline) -> str:
    """`<pipeline>._source`: a hierarchy name cannot begin with '_' and a table's topic holds its schema's dot."""
    return f"{pipeline.name}._source"


def planned_topics(pipeline: Pipeline) -> set[str]:
    """Every topic that may exist under `<pipeline>.`: what `connectors apply` creates, and the appliers'
    dead-letter topics."""
    planned = {spec.name for spec in pipeline_topics(pipeline)}
    planned |= {f"{pipeline.name}.{name}.dead-letter" for name in pipeline.destinations}
    return planned


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def pipeline_topics(pipeline: Pipeline) -> list[TopicSpec]:
    t = pipeline.topics
    # Keys are root ids, not row identities: compaction would delete history the appliers need.
    log = {"cleanup.policy": "delete", "retention.ms": str(t.retention_ms), "retention.bytes": "-1"}
    specs = [TopicSpec(name, t.partitions, log) for name in pipeline.data_topics]
    # One partition: the transaction topic's order is the source commit order the appliers follow.
    specs.append(TopicSpec(pipeline.transaction_topic, 1, log))
    specs.append(TopicSpec(pipeline.signal_topic, 1, {"cleanup.policy": "delete"}))
    specs.append(TopicSpec(pipeline.notification_topic, 1, {"cleanup.policy": "delete"}))
    # Compacted: only the latest identity matters.
    specs.append(TopicSpec(source_topic(pipeline), 1, {"cleanup.policy": "compact"}))
    return specs


def admin_client(kafka: KafkaSettings | str) -> AdminClient:
    """An admin client of a pipeline's Kafka (its login when it has one), or of a bare bootstrap string."""
    return kafka_clients.admin(kafka, {"log_level": 3})


def existing_topics(admin: AdminClient, timeout: float = 15.0) -> dict[str, int]:
    """Topic name -> partition count."""
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise ServiceUnavailable(f"Kafka did not answer: {exc}") from exc
    return {name: len(t.partitions) for name, t in metadata.topics.items()}


def plan_topics(specs: list[TopicSpec], existing: dict[str, int]) -> tuple[list[TopicSpec], list[str]]:
    """What to create, and warnings about existing topics that differ from the pipeline file."""
    create, warnings = [], []
    for spec in specs:
        have = existing.get(spec.name)
        if have is None:
            create.append(spec)
        elif have != spec.partitions:
            warnings.append(
                f"topic {spec.name} has {have} partitions, the pipeline file asks for {spec.partitions}: left as "
                "it is (adding partitions would move root ids to other partitions and break their order)"
            )
    return create, warnings


def create_topics(admin: AdminClient, specs: list[TopicSpec], replication_factor: int) -> list[str]:
    if not specs:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=replication_factor, config=s.config)
         for s in specs],
        operation_timeout=30,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != exc.args[0].TOPIC_ALREADY_EXISTS:
                raise ServiceUnavailable(f"creating topic {name} failed: {exc}") from exc
    return created


def delete_topics(admin: AdminClient, names: list[str]) -> None:
    if not names:
        return
    for name, future in admin.delete_topics(names, operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != exc.args[0].UNKNOWN_TOPIC_OR_PART:
                raise ServiceUnavailable(f"deleting topic {name} failed: {exc}") from exc



def delete_topics_and_wait(admin: AdminClient, names: list[str], timeout: float = 60.0) -> None:
    """Delete topics and wait until the broker no longer lists them (deletion is asynchronous: a topic created
    again too soon fails as 'marked for deletion')."""
    delete_topics(admin, names)
    deadline = time.monotonic() + timeout
    while set(names) & set(existing_topics(admin)):
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"topics {', '.join(sorted(set(names) & set(existing_topics(admin))))} were "
                                     f"not deleted within {timeout:.0f} s")
        time.sleep(0.5)


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """A partition's log start and end; a topic created a moment ago has no leader yet for a little while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=timeout)
        except KafkaException as exc:
            transient = exc.args[0].code() in (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                                               KafkaError.UNKNOWN_TOPIC_OR_PART)
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def message_counts(kafka: KafkaSettings | str, names: list[str], timeout: float = 15.0, *,
                   ends: bool = False) -> dict[str, int]:
    """Topic -> messages it holds now (log end minus log start, summed over partitions); with `ends`, the sum of
    the log-end offsets instead."""
    if not names:
        return {}
    consumer = kafka_clients.consumer(kafka, {"group.id": "cdc-topic-admin", "enable.auto.commit": False,
                                              "log_level": 3})
    try:
        metadata = consumer.list_topics(timeout=timeout)
        counts = {}
        for name in names:
            info = metadata.topics.get(name)
            if info is None or info.error is not None:
                continue
            total = 0
            for p in info.partitions:
                low, high = _watermarks(consumer, TopicPartition(name, p), timeout)
                total += high if ends else high - low
            counts[name] = total
        return counts
    except KafkaException as exc:
        raise ServiceUnavailable(f"Kafka did not answer: {exc}") from exc
    finally:
        consumer.close()


def read_source_record(kafka: KafkaSettings | str, topic: str, timeout: float = 15.0) -> dict | None:
    """The latest identity record of a pipeline's `_source` topic; None when the topic is absent or empty."""
    consumer = kafka_clients.consumer(kafka, {"group.id": "cdc-topic-admin", "enable.auto.commit": False,
                                              "log_level": 3})
    try:
        info = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if info is None or info.error is not None:
            return None
        low, high = _watermarks(consumer, TopicPartition(topic, 0), timeout)
        if high <= low:
            return None
        consumer.assign([TopicPartition(topic, 0, low)])
        latest = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            value, offset = msg.value(), msg.offset()
            if msg.key() == SOURCE_KEY and value is not None:
                latest = json.loads(value)
            if offset is not None and offset >= high - 1:  # a message read from a partition has an offset
                return latest
        raise ServiceUnavailable(f"could not read topic {topic} to its end within {timeout:.0f} s")
    except KafkaException as exc:
        raise ServiceUnavailable(f"Kafka did not answer: {exc}") from exc
    finally:
        consumer.close()


def write_source_record(kafka: KafkaSettings | str, topic: str, record: dict) -> None:
    producer = kafka_clients.producer(kafka, {"acks": "all", "log_level": 3})
    errors: list[str] = []
    producer.produce(topic, key=SOURCE_KEY, value=json.dumps(record, sort_keys=True).encode(),
                     on_delivery=lambda err, _msg: errors.append(str(err)) if err else None)
    if producer.flush(30) or errors:
        raise ServiceUnavailable(f"could not write the source identity to topic {topic}: {errors or 'timed out'}")
