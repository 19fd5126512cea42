"""Kafka clients made one way: the settings of a pipeline's Kafka (bootstrap, and a SCRAM login when the pipeline file
gives `kafka.sasl`), and clear errors when the broker refuses the login or an operation.

Every Consumer, Producer and AdminClient of the project is built from `client_settings`, so a pipeline whose file
names a Kafka user (a site's link, see docs/sites.md) uses it everywhere, and one without keeps the stack's
PLAINTEXT listener. librdkafka retries a refused login for ever (a line a second on stderr, calls that time out with
"transport failure"); the error callback installed here turns it into a KafkaAccessError naming the user instead.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

from cdc.config import KafkaSettings
from cdc.errors import CdcError, ServiceUnavailable, Terminal

SECURITY_PROTOCOL = "SASL_PLAINTEXT"
SASL_MECHANISM = "SCRAM-SHA-256"
# The settings whose values are secrets: never printed (see `shown_settings`).
SECRET_SETTINGS = ("sasl.password",)
# Errors of the broker that mean "this user may not": not retried, reported with the user's name.
AUTHORIZATION_CODES = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "consumer group",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "cluster",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "transactional id",
}


class KafkaAccessError(CdcError, Terminal):
    """Kafka refused a login (wrong user or password) or an operation (no ACL allows it): a configuration problem,
    exit status 2; retrying would not help."""

    exit_code = 2


def _user(kafka: KafkaSettings | str) -> str | None:
    if isinstance(kafka, KafkaSettings) and kafka.sasl is not None:
        return kafka.sasl.username
    return None


def _bootstrap(kafka: KafkaSettings | str) -> str:
    return kafka if isinstance(kafka, str) else kafka.bootstrap_servers


def refused_login(error: KafkaError) -> bool:
    """Whether `error` is the broker refusing the login. librdkafka also reports a SASL handshake its own side cut
    short (the connection dropped or timed out mid-handshake: "mechanism handshake failed: Local: Broker transport
    failure") as an authentication error; that one is a network hiccup it retries, not a wrong password."""
    return error.code() == KafkaError._AUTHENTICATION and "handshake failed: Local:" not in error.str()


def login_error(kafka: KafkaSettings | str, error: KafkaError) -> KafkaAccessError:
    user = _user(kafka)
    who = f"Kafka user {user!r}" if user else "the Kafka client (no user: kafka.sasl is not set)"
    return KafkaAccessError(f"{_bootstrap(kafka)} refused the login of {who}: {error.str()} (check kafka.sasl's "
                            "username and password, and that `cdc topology apply` created the user)")


def access_error(kafka: KafkaSettings | str, error: KafkaError, what: str = "") -> KafkaAccessError | None:
    """The KafkaAccessError an authorisation error means (naming the user and the topic or group), else None."""
    if refused_login(error):
        return login_error(kafka, error)
    kind = AUTHORIZATION_CODES.get(error.code())
    if kind is None:
        return None
    user = _user(kafka)
    who = f"Kafka user {user!r}" if user else "the Kafka client"
    target = f" {what}" if what else ""
    return KafkaAccessError(f"{_bootstrap(kafka)}: {who} is not allowed this on {kind}{target} "
                            f"({error.name()}: {error.str()}); its ACLs do not grant it")


def raise_for_access(kafka: KafkaSettings | str, error: KafkaError | None, what: str = "") -> None:
    """Raise the KafkaAccessError an error of a message, a delivery or a future means; other errors are left to the
    caller (they may be transient)."""
    if error is not None and (exc := access_error(kafka, error, what)) is not None:
        raise exc


def client_settings(kafka: KafkaSettings | str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """librdkafka settings for a client of `kafka` (a pipeline's Kafka settings, or a bare bootstrap string for the
    stack's PLAINTEXT listener): bootstrap, the SCRAM login when `kafka.sasl` is set, and an error callback that
    raises KafkaAccessError when the login is refused (from the client's poll/flush). `extra` (librdkafka's names:
    `{"group.id": ..., "log_level": 3}`) is added as it is; an `error_cb` in it is still called for every other
    error."""
    settings: dict[str, Any] = {"bootstrap.servers": _bootstrap(kafka)}
    if isinstance(kafka, KafkaSettings) and kafka.sasl is not None:
        settings.update({
            "security.protocol": SECURITY_PROTOCOL,
            "sasl.mechanism": SASL_MECHANISM,
            "sasl.username": kafka.sasl.username,
            "sasl.password": kafka.sasl.password.get_secret_value(),
        })
    settings.update(extra or {})
    theirs = settings.pop("error_cb", None)

    def on_error(error: KafkaError) -> None:
        if refused_login(error):
            raise login_error(kafka, error)
        if theirs is not None:
            theirs(error)

    settings["error_cb"] = on_error
    return settings


def shown_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as a message or a log may show them: secrets replaced by `***`, callbacks left out."""
    return {k: ("***" if k in SECRET_SETTINGS else v) for k, v in settings.items() if not callable(v)}


def position(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a message a consumer returned without an error, which always has all three
    (the client types them optional because an error event may lack them)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise KafkaException(f"a consumed message without a position: topic {topic}, partition {partition}, "
                             f"offset {offset}")
    return topic, partition, offset


def consumer(kafka: KafkaSettings | str, extra: dict[str, Any] | None = None) -> Consumer:
    return Consumer(client_settings(kafka, extra))


def producer(kafka: KafkaSettings | str, extra: dict[str, Any] | None = None) -> Producer:
    return Producer(client_settings(kafka, extra))


def admin(kafka: KafkaSettings | str, extra: dict[str, Any] | None = None) -> AdminClient:
    return AdminClient(client_settings(kafka, extra))


def check_login(kafka: KafkaSettings | str, timeout: float = 15.0) -> None:
    """Log in once and read the cluster's metadata: a refused login raises KafkaAccessError naming the user at once
    (librdkafka alone would only time out with "transport failure")."""
    client = admin(kafka, {"log_level": 0})
    deadline = time.monotonic() + timeout
    while True:
        # Short metadata requests, the client's error queue served between them: a refused login is an error event,
        # which the metadata request itself only reports as a "transport failure" once it times out.
        try:
            client.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            client.poll(0)  # serves a queued login error, which the callback raises
            if time.monotonic() >= deadline:
                error = exc.args[0] if exc.args else exc
                raise ServiceUnavailable(f"{_bootstrap(kafka)}: Kafka did not answer in {timeout:g} s: "
                                         f"{error.str() if isinstance(error, KafkaError) else error}") from None


def check_topic_access(client: Consumer | Producer | AdminClient, kafka: KafkaSettings | str, topics: list[str],
                       timeout: float = 15.0) -> None:
    """Raise KafkaAccessError when the user may not see one of `topics`. A consumer that `assign()`s partitions of a
    topic it is not authorised for gets nothing at all from librdkafka (the topic is marked in error in its metadata,
    no message or callback says so): readers ask here first."""
    for topic in topics:
        metadata = client.list_topics(topic, timeout=timeout)
        described = metadata.topics.get(topic)
        if described is not None and described.error is not None:
            raise_for_access(kafka, described.error, topic)
