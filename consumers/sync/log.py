"""The sync's topic (`<pipeline>.sync.<name>`): every sync written to Kafka as an event before it is applied, Avro
through the schema registry (schemas/codec), and read back from there by `cdc sync apply`; a past sync can be read
again by its id (`--from-log`).

One sync is a run of records sharing its id as key, on the topic's one partition (so they stay in order): the tables
(columns, primary and foreign keys), the rows in chunks (as PostgreSQL's `to_jsonb` wrote them), the schema objects,
and last a manifest with the per-table counts. A sync is complete only when its manifest has arrived and the counts
agree; a run cut short (the writer died) is never applied.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic

from cdc import kafka as kafka_clients
from cdc.config import Pipeline, masked_url
from cdc.errors import CdcError
from consumers.sync.plan import Definition
from schemas.codec import AvroDecoder, AvroEncoder, RegistryClient

SCHEMA: dict[str, Any] = {
    "type": "record", "name": "SyncRecord", "namespace": "cdc.sync",
    "doc": "One record of a configuration sync (cdc sync): a table, a chunk of rows, a schema object or the manifest.",
    "fields": [
        {"name": "sync_id", "type": "string"},
        {"name": "kind", "type": {"type": "enum", "name": "SyncRecordKind",
                                  "symbols": ["TABLE", "ROWS", "OBJECT", "MANIFEST"]}},
        {"name": "table", "type": ["null", "string"], "default": None},
        {"name": "body", "type": "string", "doc": "JSON: the table's shape, a list of rows, an object, the manifest"},
    ],
}
# Rows per record are bounded by size, well under Kafka's default 1 MB message limit.
CHUNK_BYTES = 256 * 1024
TIMEOUT_S = 60.0


def topic_of(pipeline: Pipeline, sync_name: str) -> str:
    return f"{pipeline.name}.sync.{sync_name}"


def _ensure_topic(pipeline: Pipeline, topic: str) -> None:
    admin = kafka_clients.admin(pipeline.kafka, {"log_level": 3})
    # One partition keeps a sync's records in order; kept forever: the topic is the syncs' audit log.
    futures = admin.create_topics([NewTopic(topic, 1, pipeline.topics.replication_factor,
                                            config={"retention.ms": "-1", "cleanup.policy": "delete"})],
                                  operation_timeout=30, request_timeout=30)
    try:
        futures[topic].result(timeout=TIMEOUT_S)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise CdcError(f"sync: creating topic {topic} failed: {exc.args[0].str()}") from None


def publish(pipeline: Pipeline, sync_name: str, scope: Any) -> tuple[str, int]:
    """Write the scope read from the source to the sync's topic; returns the sync id and the offset of its first
    record. Fails (nothing written that counts: no manifest) unless Kafka acknowledged every record."""
    topic = topic_of(pipeline, sync_name)
    _ensure_topic(pipeline, topic)
    registry = RegistryClient(pipeline.kafka.schema_registry_url)
    try:
        encoder = AvroEncoder(registry, f"{topic}-value", SCHEMA)
    finally:
        registry.close()
    sync_id = str(uuid.uuid4())
    key = sync_id.encode()
    producer = kafka_clients.producer(pipeline.kafka, {"acks": "all", "enable.idempotence": True, "linger.ms": 20,
                                                       "log_level": 3})
    errors: list[str] = []
    offsets: list[int] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            offsets.append(msg.offset())

    def send(kind: str, table: str | None, body: Any) -> None:
        value = encoder.encode({"sync_id": sync_id, "kind": kind, "table": table,
                                "body": json.dumps(body, default=str)})
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=delivered)
                return
            except BufferError:
                producer.poll(0.5)

    counts = {}
    for name, table in scope.tables.items():
        send("TABLE", name, table.as_json())
        rows = scope.rows[name]
        counts[name] = len(rows)
        chunk: list[Any] = []
        size = 0
        for row in rows:
            encoded = len(json.dumps(row, default=str))
            if chunk and size + encoded > CHUNK_BYTES:
                send("ROWS", name, chunk)
                chunk, size = [], 0
            chunk.append(row)
            size += encoded
        if chunk:
            send("ROWS", name, chunk)
        producer.poll(0)
    for definition in scope.definitions:
        send("OBJECT", None, asdict(definition))
    send("MANIFEST", None, {"sync": sync_name, "source": masked_url(pipeline.sync(sync_name).source_url),
                            "read_at": scope.read_at.isoformat(), "rows": counts,
                            "objects": len(scope.definitions)})
    left = producer.flush(TIMEOUT_S)
    if left or errors:
        raise CdcError(f"sync: writing sync {sync_id} to topic {topic} failed"
                       + (f": {errors[0]}" if errors else f": {left} records unacknowledged after {TIMEOUT_S:.0f} s")
                       + "; nothing was applied")
    return sync_id, min(offsets)


def read(pipeline: Pipeline, sync_name: str, sync_id: str, start: int | None = None) -> Any:
    """The scope of sync `sync_id` as its topic holds it (from `start`, else from the topic's beginning)."""
    from consumers.sync.apply import SourceScope, TableMeta

    topic = topic_of(pipeline, sync_name)
    registry = RegistryClient(pipeline.kafka.schema_registry_url)
    decoder = AvroDecoder(registry)
    consumer = kafka_clients.consumer(pipeline.kafka, {"group.id": f"{topic}.reader", "enable.auto.commit": False,
                                                       "enable.partition.eof": True, "log_level": 3})
    tables: dict[str, Any] = {}
    rows: dict[str, list[Any]] = {}
    definitions: list[Definition] = []
    manifest: dict[str, Any] | None = None
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=TIMEOUT_S)
        if high <= low:
            raise CdcError(f"sync: topic {topic} holds no syncs")
        consumer.assign([TopicPartition(topic, 0, start if start is not None else low)])
        while manifest is None:
            msg = consumer.poll(TIMEOUT_S)
            if msg is None:
                raise CdcError(f"sync: reading topic {topic}: nothing arrived for {TIMEOUT_S:.0f} s")
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    break
                raise CdcError(f"sync: reading topic {topic}: {error.str()}")
            if msg.key() != sync_id.encode():
                continue
            record = decoder.decode(msg.value())
            body = json.loads(record["body"])
            if record["kind"] == "TABLE":
                tables[record["table"]] = TableMeta.from_json(body)
                rows[record["table"]] = []
            elif record["kind"] == "ROWS":
                rows[record["table"]].extend(body)
            elif record["kind"] == "OBJECT":
                definitions.append(Definition(**body))
            else:
                manifest = body
    finally:
        consumer.close()
        registry.close()
    if manifest is None:
        raise CdcError(f"sync: topic {topic} holds no complete sync {sync_id} (no manifest: it was cut short)")
    got = {name: len(r) for name, r in rows.items()}
    if got != manifest["rows"] or len(definitions) != manifest["objects"]:
        raise CdcError(f"sync: sync {sync_id} in topic {topic} is incomplete: the manifest says {manifest['rows']} "
                       f"rows and {manifest['objects']} objects, the topic holds {got} and {len(definitions)}")
    return SourceScope(tables, rows, definitions, datetime.fromisoformat(manifest["read_at"]), sync_id)
