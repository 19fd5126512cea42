"""Reading change events from Kafka in batches: confluent-kafka consumer plus the cached Avro decoder."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from cdc import kafka as kafka_clients
from cdc.config import KafkaSettings
from cdc.errors import DecodeError, ServiceUnavailable
from consumers.apply.events import ChangeEvent, from_envelope
from schemas.codec import AvroDecoder


class ChangeStream:
    """A batch reader over change topics from their start; tombstones are skipped (the delete before them counts)."""

    def __init__(self, kafka: KafkaSettings | str, decoder: AvroDecoder, topics: list[str], *, group: str,
                 batch_size: int = 500) -> None:
        self._decoder = decoder
        self._batch = batch_size
        self._consumer = kafka_clients.consumer(kafka, {
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # Topics can appear after we subscribe (a table added to the pipeline): notice them within seconds.
            "topic.metadata.refresh.interval.ms": 5000,
            "log_level": 3,
        })
        # Positions we have read to: a rebalance (a new topic appearing, say) must not send us back to the start.
        self._positions: dict[tuple[str, int], int] = {}
        self._consumer.subscribe(topics, on_assign=self._on_assign)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            position = self._positions.get((tp.topic, tp.partition))
            if position is not None:
                tp.offset = position
        consumer.assign(partitions)

    def close(self) -> None:
        self._consumer.close()

    def batches(self, timeout: float = 1.0) -> Iterator[list[ChangeEvent]]:
        while True:
            messages = self._consumer.consume(self._batch, timeout)
            events = []
            for msg in messages:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        continue  # the connector has not created it yet
                    raise ServiceUnavailable(f"Kafka consumer error: {err}")
                topic, partition, offset = kafka_clients.position(msg)
                self._positions[topic, partition] = offset + 1
                raw, raw_key = msg.value(), msg.key()
                if raw is None:
                    continue
                try:
                    value = self._decoder.decode(raw)
                    key = self._decoder.decode(raw_key) if raw_key is not None else None
                    events.append(from_envelope(value, key, topic=topic, partition=partition, offset=offset))
                except (ValueError, KafkaException) as exc:
                    raise DecodeError(str(exc), topic=topic, partition=partition, offset=offset) from exc
            yield events

    def collect(self, done: Callable[[list[ChangeEvent]], bool], timeout: float) -> list[ChangeEvent]:
        """Read until `done(all events so far)` is true or `timeout` seconds pass; returns what was read."""
        seen: list[ChangeEvent] = []
        deadline = time.monotonic() + timeout
        for batch in self.batches():
            seen.extend(batch)
            if done(seen) or time.monotonic() > deadline:
                return seen
        return seen
