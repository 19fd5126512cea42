"""The dead-letter sink of one destination's applier: what it goes past (a message that does not decode, a source
transaction that fails or cannot complete) written to `<pipeline>.<destination>.dead-letter`, Avro through the
registry, the reason in the record and in its headers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from cdc import kafka as kafka_clients
from cdc.config import Pipeline
from cdc.errors import ServiceUnavailable
from consumers.apply.events import ChangeEvent
from schemas.codec import AvroEncoder, RegistryClient, load_schema


def event_json(event: ChangeEvent) -> str:
    """A decoded change as the dead letter's `event_json` holds it (its raw bytes are not kept once decoded)."""
    return json.dumps({"table": event.table, "op": event.op, "key": event.key, "before": event.before,
                       "after": event.after, "lsn": event.lsn, "tx_id": event.tx_id}, default=str)


class DeadLetterSink:
    """One producer and one Avro encoder, made at the first dead letter (most appliers never write one)."""

    def __init__(self, pipeline: Pipeline, destination_name: str, registry: RegistryClient,
                 echo: Callable[[str], None]) -> None:
        self.pipeline = pipeline
        self.name = destination_name
        self.registry = registry
        self.echo = echo
        self.topic = f"{pipeline.name}.{destination_name}.dead-letter"
        self._producer: Producer | None = None
        self._encoder: AvroEncoder | None = None
        self._lock = threading.Lock()  # both of the applier's threads may dead-letter: one producer

    def send(self, error: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
             event_json: str | None) -> None:
        """Write one dead letter and wait for Kafka to acknowledge it: the applier goes past the message next, so
        one whose dead letter was not written would be lost (ServiceUnavailable then)."""
        with self._lock:
            if self._producer is None:
                self._producer = kafka_clients.producer(self.pipeline.kafka,
                                                        {"enable.idempotence": True, "log_level": 3})
                self._encoder = AvroEncoder(self.registry, f"{self.topic}-value", load_schema("dead_letter"))
        assert self._encoder is not None
        record = {"pipeline": self.pipeline.name, "destination": self.name, "error": error, "topic": topic,
                  "partition": partition, "offset": offset, "key": key, "value": value, "event_json": event_json,
                  "failed_at_ms": int(time.time() * 1000)}
        failures: list[Any] = []
        self._producer.produce(self.topic, value=self._encoder.encode(record), key=key,
                               headers={"cdc.error": error[:1000], "cdc.topic": topic,
                                        "cdc.partition": str(partition), "cdc.offset": str(offset)},
                               on_delivery=lambda err, _msg: failures.append(err) if err is not None else None)
        left = self._producer.flush(30)
        if failures or left:
            raise ServiceUnavailable(f"destination {self.name}: could not write the dead letter of "
                                     f"{topic}[{partition}]@{offset} to {self.topic}: "
                                     f"{failures[0] if failures else 'not acknowledged within 30 s'}")
        self.echo(f"{self.name}: dead-lettered {topic}[{partition}]@{offset}: {error.splitlines()[0]}")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
