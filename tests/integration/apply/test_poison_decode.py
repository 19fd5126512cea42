"""Every decode failure follows the destination's `on_error` (issue 15), on the real stack: a Confluent-framed message
whose schema id the registry does not know (HTTP 404) stops the applier naming topic, partition, offset and why, or
goes to the dead-letter topic with its reason while the pipeline goes on to equal the source, in both decoding paths
(the columnar batch decode and the per-message one); a registry that cannot be reached is waited for, not blamed on
the messages (nothing dead-lettered); garbage on the transaction topic follows the same policy."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.codec import AvroDecoder, RegistryClient, Undecodable
from tests.integration.pipelines import CDC, applied_pipeline, execute, purge, table_rows

UNKNOWN_ID = 987654
# Confluent framing (magic byte 0, then the schema id) around bytes no schema was ever asked to read.
POISON = b"\x00" + UNKNOWN_ID.to_bytes(4, "big") + b"\x02\x04whatever"


def _produce(stack, topic: str, value: bytes, key: bytes | None = b"\x00\x00\x00\x00\x01\x02") -> int:
    """Write one message to partition 0 of a topic; its offset."""
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    producer.produce(topic, key=key, value=value, partition=0)
    producer.flush(10)
    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"t-{uuid.uuid4()}"})
    end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    consumer.close()
    return end - 1


def _dead_letters(stack, pipeline, destination: str) -> list:
    dead = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"dlq-{uuid.uuid4()}",
                     "auto.offset.reset": "earliest"})
    dead.subscribe([f"{pipeline.name}.{destination}.dead-letter"])
    messages = [m for _ in range(12) for m in dead.consume(10, 0.5) if m.error() is None]
    dead.close()
    return messages


def _env(per_message: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CDC_NO_BATCH_DECODE", None)
    if per_message:
        env["CDC_NO_BATCH_DECODE"] = "1"  # schemas.batch off: every message through fastavro, one by one
    return env


def _run(path: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CDC, "-c", str(path), "run", "--until-caught-up", "--timeout", str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 120, env=env)


@pytest.fixture
def item_pipeline(stack, source_db, destination_db, tmp_path, request):
    policy = request.param
    source = stack.postgres_url(source_db)
    execute(source, "create table item (id bigint primary key, name text, price numeric(8, 2))",
            "insert into item select g, 'item ' || g, g * 1.25 from generate_series(1, 20) g")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.item"], destinations={
        "copy": {"kind": "replica", "url": stack.postgres_url(destination_db), "on_error": policy}})
    try:
        yield policy, source, stack.postgres_url(destination_db), path, pipeline
    finally:
        purge(pipeline)


@pytest.mark.parametrize("item_pipeline", ["stop", "dead-letter"], indirect=True)
@pytest.mark.parametrize("per_message", [False, True], ids=["batch-decode", "per-message-decode"])
def test_an_unknown_schema_id_follows_on_error(stack, item_pipeline, per_message):
    policy, source, destination, path, pipeline = item_pipeline
    env = _env(per_message)
    first = _run(path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    topic = pipeline.topic_of("public.item")
    offset = _produce(stack, topic, POISON)
    execute(source, "insert into item values (21, 'after the poison', 1)",
            "update item set name = 'changed' where id = 3",
            "delete from item where id = 4")
    result = _run(path, env)
    applied = table_rows(destination, "public.item")
    if policy == "stop":
        assert result.returncode == 1, result.stdout + result.stderr
        # Names topic, partition, offset and the reason.
        assert f"{topic}[0]@{offset}" in result.stderr and f"schema id {UNKNOWN_ID} is unknown" in result.stderr, \
            result.stderr
        assert "HTTP 404" in result.stderr
        assert _dead_letters(stack, pipeline, "copy") == []
        # Not passed over: a second start stops at the same message (the topic's other partitions may have been
        # applied meanwhile; its own partition not past it).
        again = _run(path, env, timeout=60)
        assert again.returncode == 1 and f"{topic}[0]@{offset}" in again.stderr, again.stdout + again.stderr
        return
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"dead-lettered {topic}[0]@{offset}" in result.stdout
    assert applied == table_rows(source, "public.item")  # the good rows after it were applied
    [message] = _dead_letters(stack, pipeline, "copy")
    record = AvroDecoder(RegistryClient(stack.urls()["schema_registry"])).decode(message.value())
    assert (record["topic"], record["partition"], record["offset"]) == (topic, 0, offset)
    assert record["value"] == POISON and f"schema id {UNKNOWN_ID} is unknown" in record["error"]
    headers = {k: v.decode() for k, v in message.headers()}
    assert headers["cdc.topic"] == topic and headers["cdc.offset"] == str(offset)
    assert f"schema id {UNKNOWN_ID} is unknown" in headers["cdc.error"]


@pytest.mark.parametrize("item_pipeline", ["stop", "dead-letter"], indirect=True)
def test_garbage_on_the_transaction_topic_follows_on_error(stack, item_pipeline):
    policy, source, destination, path, pipeline = item_pipeline
    env = _env(False)
    first = _run(path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    topic = pipeline.transaction_topic
    offset = _produce(stack, topic, b"\x00\x00\x00\x00\x01 not a transaction record", key=None)
    execute(source, "insert into item values (21, 'after the garbage', 1)", "delete from item where id = 2")
    result = _run(path, env)
    applied = table_rows(destination, "public.item")
    if policy == "stop":
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"{topic}[0]@{offset}" in result.stderr and "cannot decode" in result.stderr, result.stderr
        assert applied != table_rows(source, "public.item")  # the transactions after it were not applied
        return
    assert result.returncode == 0, result.stdout + result.stderr
    assert applied == table_rows(source, "public.item")
    [message] = _dead_letters(stack, pipeline, "copy")
    record = AvroDecoder(RegistryClient(stack.urls()["schema_registry"])).decode(message.value())
    assert (record["topic"], record["partition"], record["offset"]) == (topic, 0, offset)
    assert "cannot decode" in record["error"]


def test_the_registry_says_404_for_an_unknown_id_but_an_unreachable_registry_is_no_verdict(stack):
    registry = RegistryClient(stack.urls()["schema_registry"])
    with pytest.raises(Undecodable, match=f"schema id {UNKNOWN_ID} is unknown.*HTTP 404"):
        AvroDecoder(registry).decode(POISON)
    registry.close()
    with socket_closed() as url:
        from cdc.errors import ServiceUnavailable

        unreachable = RegistryClient(url, timeout=2)
        with pytest.raises(ServiceUnavailable, match="did not answer"):
            AvroDecoder(unreachable).decode(POISON)
        unreachable.close()


class socket_closed:
    """A registry URL on a local port where nothing listens."""

    def __enter__(self) -> str:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return f"http://127.0.0.1:{port}/apis/ccompat/v7"

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("item_pipeline", ["dead-letter"], indirect=True)
def test_an_unreachable_registry_is_waited_for_not_dead_lettered(stack, item_pipeline, tmp_path):
    import yaml

    _, source, destination, path, pipeline = item_pipeline
    first = _run(path, _env(False))
    assert first.returncode == 0, first.stdout + first.stderr
    execute(source, "insert into item values (21, 'while the registry is away', 1)")
    # The same pipeline, its applier pointed at a registry that does not answer (the connector keeps the real one).
    away = tmp_path / "away.yaml"
    data = yaml.safe_load(path.read_text())
    with socket_closed() as url:
        data["kafka"]["schema_registry_url"] = url
    away.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = subprocess.Popen([CDC, "-c", str(away), "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(False))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any("schema registry unreachable since" in x for x in lines):
            time.sleep(0.5)
        said = "".join(lines)
        assert "schema registry unreachable since" in said and "retrying" in said, said
        time.sleep(3)  # a few retries: none of them may dead-letter the waiting change
        # The destination says the applier is blocked, for `cdc lag` (BLOCKED, not "lag 0.0 s").
        lag = subprocess.run([CDC, "-c", str(away), "lag"], capture_output=True, text=True, env=_env(False),
                             timeout=60)
        said_lag = " ".join((lag.stdout + lag.stderr).split())
        assert "BLOCKED (the schema registry unreachable since" in said_lag, said_lag
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reader.join(10)
        err = proc.stderr.read()
    said = "".join(lines)
    assert "dead-lettered" not in said, said
    assert proc.returncode != 0 and "stopped while the schema registry could not answer" in err, err
    assert _dead_letters(stack, pipeline, "copy") == []
    assert len(table_rows(destination, "public.item")) == 20  # nothing applied without its schema, nothing lost
    back = _run(path, _env(False))
    assert back.returncode == 0, back.stdout + back.stderr
    assert table_rows(destination, "public.item") == table_rows(source, "public.item")


@pytest.mark.parametrize("item_pipeline", ["stop"], indirect=True)
def test_a_key_that_does_not_decode_stops_nothing(stack, item_pipeline):
    """The applier does not decode record keys (rows carry their keys): a good change under a garbage key is
    applied, even under `stop`."""
    _, source, destination, path, pipeline = item_pipeline
    topic = pipeline.topic_of("public.item")
    first = _run(path, _env(False))
    assert first.returncode == 0, first.stdout + first.stderr
    execute(source, "update item set name = 'under a garbage key' where id = 1")
    # Debezium's message of that change, read back, written again under a key no registry can decode.
    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"t-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    value, deadline = None, time.monotonic() + 60
    while value is None and time.monotonic() < deadline:
        for m in consumer.consume(100, 0.5):
            if m.error() is None and m.value() and b"under a garbage key" in m.value():
                value = m.value()
    consumer.close()
    assert value is not None
    offset = _produce(stack, topic, value, key=b"\x07garbage")
    result = _run(path, _env(False))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dead-lettered" not in result.stdout and f"@{offset}" not in result.stderr
    assert table_rows(destination, "public.item") == table_rows(source, "public.item")
