"""Topic administration: the pipeline's topics are created up front by us, as event logs (never compacted)."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from cdc.config import Pipeline
from cdc.errors import ServiceUnavailable


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
    return specs


def admin_client(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})


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

