"""Authenticated and authorised site links against a real broker: a PRIVATE Kafka started by the stack's own functions
from the stack's template (SASL_PLAINTEXT + SCRAM-SHA-256 listener, StandardAuthorizer), users and ACLs made by
`producers.sites.apply_access` (what `cdc topology apply` runs) from a topology file's sites. What a satellite's
operator would check: a wrong password is refused at once with the user's name; a satellite cannot read another's
topics (nor write them); it can write its own up topics and read its own down topics; the PLAINTEXT listener the
local tools use works as before."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import time
import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from cdc import kafka as kafka_clients
from cdc import topology
from cdc.config import KafkaSasl
from infra import stack as stack_mod
from producers import sites
from producers import topics as topics_mod

TOPOLOGY = {
    "topology": "shop",
    "kafka": {"bootstrap_servers": "set below", "schema_registry_url": "http://127.0.0.1:8081",
              "connect_url": "http://127.0.0.1:8083"},
    "site_bootstrap_servers": "set below",
    "sites": {
        "hq": {"sync_id": 1, "url": "postgresql://cdc@127.0.0.1:5432/hq"},
        "north": {"sync_id": 2, "url": "postgresql://cdc@127.0.0.1:5432/north",
                  "kafka_user": {"username": "shop-north", "password": "${NORTH_KAFKA_PASSWORD}"}},
        "south": {"sync_id": 3, "url": "postgresql://cdc@127.0.0.1:5432/south",
                  "kafka_user": {"username": "shop-south", "password": "${SOUTH_KAFKA_PASSWORD}"}},
    },
    "master_tables": ["public.item"],
    "site_tables": {"public.sale": "site_id"},
}
ENV = {"NORTH_KAFKA_PASSWORD": "n0rth-" + uuid.uuid4().hex, "SOUTH_KAFKA_PASSWORD": "s0uth-" + uuid.uuid4().hex}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A broker of this module's own, rendered from infra/templates/kafka-server.properties as `cdc stack up` renders
    it, on free ports: the shared stack is never reconfigured."""
    home = tmp_path_factory.mktemp("auth-kafka")
    layout = stack_mod.StackLayout(home, stack_mod.artifacts_dir(), {
        **stack_mod.DEFAULT_PORTS, "kafka": _free_port(), "kafka_controller": _free_port(),
        "kafka_sasl": _free_port()})
    pid = stack_mod._start_kafka(layout, stack_mod.find_java())
    try:
        stack_mod._wait("kafka", layout, lambda: stack_mod._kafka_healthy(layout), pid, 120)
        yield layout
    finally:
        if stack_mod._alive(pid):
            stack_mod._stop_pid(pid)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def topo(broker):
    """The topology, its users and ACLs applied, and the links' topics created (as `cdc topology apply` would)."""
    data = copy.deepcopy(TOPOLOGY)
    data["kafka"]["bootstrap_servers"] = broker.kafka_bootstrap
    data["site_bootstrap_servers"] = broker.kafka_sasl_bootstrap
    t = topology.parse(data, "topology.yaml", ENV)
    lines = sites.apply_access(t)
    assert "kafka user shop-north (north): SCRAM-SHA-256 credential set" in lines
    assert "  + User:shop-north: read topics shop-north-down.*" in lines
    assert not any(ENV["NORTH_KAFKA_PASSWORD"] in line or ENV["SOUTH_KAFKA_PASSWORD"] in line for line in lines)
    admin = kafka_clients.admin(broker.kafka_bootstrap)
    names = [topic for link in t.links() for topic in [*link.pipeline.data_topics, link.pipeline.transaction_topic]]
    for future in admin.create_topics([NewTopic(name, 1, 1) for name in names]).values():
        future.result(30)
    return t


def site_kafka(t: topology.Topology, satellite: str, password: str | None = None):
    kafka = t.site_kafka(satellite)
    if password is not None:
        kafka = kafka.model_copy(update={"sasl": KafkaSasl(username=kafka.sasl.username, password=password)})
    return kafka


def produce(kafka, topic: str, value: bytes) -> KafkaError | None:
    """One message, delivered or refused: the delivery report's error (None when written)."""
    reports = []
    producer = kafka_clients.producer(kafka, {"log_level": 0, "message.timeout.ms": 15000})
    producer.produce(topic, value, on_delivery=lambda err, msg: reports.append(err))
    producer.flush(30)
    assert len(reports) == 1, f"no delivery report for {topic} in 30 s"
    return reports[0]


def _commit(kafka, consumer, msg, topic: str, timeout: float = 30.0) -> None:
    """Commit `msg` in the consumer's group: the group's ACL is checked here. The first commit may find the group's
    coordinator still being looked up (_WAIT_COORD): asked again, as a reader does, until it answers. A group the
    user may not use never gets a coordinator: the refusal comes once, as an error event of the consumer's poll
    (what the applier's reader serves), so the consumer is polled between the tries."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            consumer.commit(msg, asynchronous=False)
            return
        except KafkaException as exc:
            error = exc.args[0]
            kafka_clients.raise_for_access(kafka, error, topic)
            if error.code() not in (KafkaError._WAIT_COORD, KafkaError.COORDINATOR_NOT_AVAILABLE,
                                    KafkaError.NOT_COORDINATOR) or time.monotonic() > deadline:
                raise
            event = consumer.poll(0.5)
            if event is not None:
                kafka_clients.raise_for_access(kafka, event.error(), topic)


def read_one(kafka, topic: str, group: str, timeout: float = 30.0):
    """The first message of partition 0 of `topic`, read in `group`, with access errors raised as
    KafkaAccessError (what a reader built on cdc.kafka does)."""
    consumer = kafka_clients.consumer(kafka, {"group.id": group, "enable.auto.commit": False, "log_level": 0,
                                              "auto.offset.reset": "earliest"})
    try:
        kafka_clients.check_topic_access(consumer, kafka, [topic])
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            kafka_clients.raise_for_access(kafka, msg.error(), topic)
            if msg.error() is None:
                _commit(kafka, consumer, msg, topic)
                return msg.value()
        raise AssertionError(f"nothing read from {topic} in {timeout} s")
    finally:
        consumer.close()


def test_a_wrong_password_is_refused_at_once_naming_the_user(topo):
    started = time.monotonic()
    with pytest.raises(kafka_clients.KafkaAccessError) as info:
        kafka_clients.check_login(site_kafka(topo, "north", password="wrong"), timeout=20)
    message = str(info.value)
    assert "'shop-north'" in message and "invalid credentials" in message, message
    assert topo.site_bootstrap_servers in message and "wrong" not in message.replace("wrong password", "")
    assert time.monotonic() - started < 20, "refused by the timeout, not by the broker's answer"
    # A client of the project (a consumer polling) gets the same error, not a silent retry loop.
    with pytest.raises(kafka_clients.KafkaAccessError, match="'shop-north'"):
        read_one(site_kafka(topo, "north", password="wrong"), "shop-north-down.public.item",
                 "cdc-shop-north-down-north", timeout=20)
    # The right password logs in.
    kafka_clients.check_login(site_kafka(topo, "north"))


def test_a_satellite_writes_its_own_up_topics_and_reads_its_own_down_topics(topo, broker):
    north = site_kafka(topo, "north")
    assert produce(north, "shop-north-up.public.sale", b"north's sale") is None
    # The master (the PLAINTEXT listener: the broker's local tools) reads what north wrote.
    assert read_one(broker.kafka_bootstrap, "shop-north-up.public.sale", "hq-check") == b"north's sale"
    # The master writes north's down topic; north's applier group reads it.
    assert produce(broker.kafka_bootstrap, "shop-north-down.public.item", b"an item for north") is None
    assert read_one(north, "shop-north-down.public.item", "cdc-shop-north-down-north") == b"an item for north"


def test_a_satellite_cannot_read_or_write_another_sites_topics(topo, broker):
    north = site_kafka(topo, "north")
    assert produce(broker.kafka_bootstrap, "shop-south-down.public.item", b"south only") is None
    with pytest.raises(kafka_clients.KafkaAccessError) as info:
        read_one(north, "shop-south-down.public.item", "cdc-shop-north-down-north")
    message = str(info.value)
    assert "'shop-north'" in message and "shop-south-down.public.item" in message, message
    assert "TOPIC_AUTHORIZATION_FAILED" in message, message
    # Nor write south's up topic (posing as south), nor read its own up topic (what the master receives).
    error = produce(north, "shop-south-up.public.sale", b"forged")
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error
    with pytest.raises(kafka_clients.KafkaAccessError, match="TOPIC_AUTHORIZATION_FAILED"):
        read_one(north, "shop-north-up.public.sale", "cdc-shop-north-down-north")
    # Nor read its own down topic in a group that is not its applier's.
    with pytest.raises(kafka_clients.KafkaAccessError, match="GROUP_AUTHORIZATION_FAILED"):
        read_one(north, "shop-north-down.public.item", "someone-elses-group")


def test_apply_removes_an_acl_the_topology_does_not_give(topo, broker):
    """An ACL added by hand (north may read south's down topics) is taken away by the next apply: a satellite may do
    what the topology says and nothing else. The passwords are set again (a changed one takes effect)."""
    admin = kafka_clients.admin(broker.kafka_bootstrap)
    extra = AclBinding(ResourceType.TOPIC, "shop-south-down.", ResourcePatternType.PREFIXED, "User:shop-north", "*",
                       AclOperation.READ, AclPermissionType.ALLOW)
    for future in admin.create_acls([extra]).values():
        future.result(30)
    lines = sites.apply_access(topo)
    assert "  - User:shop-north: read topics shop-south-down.* (not the topology's)" in lines, lines
    assert not any(line.startswith("  +") for line in lines), lines  # the topology's own ACLs were all there
    with pytest.raises(kafka_clients.KafkaAccessError, match="TOPIC_AUTHORIZATION_FAILED"):
        read_one(site_kafka(topo, "north"), "shop-south-down.public.item", "cdc-shop-north-down-north")


def test_the_plaintext_listener_still_serves_the_local_tools(topo, broker):
    """Kafka's own command-line tool and the project's PLAINTEXT clients need no login and are refused nothing."""
    libs = f"{broker.artifacts / 'kafka' / 'libs'}/*"
    proc = subprocess.run([stack_mod.find_java(), "-cp", libs, "org.apache.kafka.tools.TopicCommand",
                           "--bootstrap-server", broker.kafka_bootstrap, "--list"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "shop-south-down.public.item" in proc.stdout.split() and "shop-north-up.public.sale" in proc.stdout.split()
    assert produce(broker.kafka_bootstrap, "shop-south-up.public.sale", b"local") is None
    assert read_one(broker.kafka_bootstrap, "shop-south-up.public.sale", "any-local-group") == b"local"


def test_an_up_links_connector_writes_as_its_satellites_user(stack, tmp_path, broker):
    """`apply` of a satellite with a kafka_user on the real Connect worker: its up connector's producer logs in as
    the satellite through `producer.override.*` (the login a reference to a connector secret) and writes the
    satellite's rows to its up topic at the authenticated listener (the private broker's, so the shared broker is not
    reconfigured); the configuration Connect holds names no password."""
    import psycopg

    from producers import capture
    from producers.connect import ConnectClient
    from tests.integration.pipelines import fresh_database

    name = "auth" + uuid.uuid4().hex[:6]
    gens = {site: fresh_database(stack, f"{name}_{site}") for site in ("hq", "north")}
    urls = {site: stack.postgres_url(next(gen)) for site, gen in gens.items()}
    for url in urls.values():
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("create table public.sale (site_id int not null, id int not null, qty int not null, "
                         "primary key (site_id, id))")
    data = copy.deepcopy(TOPOLOGY)
    data["topology"] = name
    data["kafka"] = {"bootstrap_servers": broker.kafka_bootstrap,
                     "schema_registry_url": stack.urls()["schema_registry"], "connect_url": stack.urls()["connect"]}
    data["site_bootstrap_servers"] = broker.kafka_sasl_bootstrap
    data["sites"] = {"hq": {"sync_id": 1, "url": urls["hq"]},
                     "north": {"sync_id": 2, "url": urls["north"],
                               "kafka_user": {"username": f"{name}-north", "password": "${NORTH_KAFKA_PASSWORD}"}}}
    data.pop("master_tables")
    t = topology.parse(data, "topology.yaml", ENV)
    [link] = t.links()
    up = link.pipeline
    # Connect's own topic creation uses the worker's cluster (the shared broker); the private one gets the
    # heartbeat topic up front, as the worker would have made it there in a one-cluster deployment.
    admin = kafka_clients.admin(broker.kafka_bootstrap)
    for future in admin.create_topics([NewTopic(f"__debezium-heartbeat.{up.name}", 1, 1)]).values():
        future.result(30)
    try:
        with psycopg.connect(urls["north"], autocommit=True) as conn:
            conn.execute("insert into public.sale values (2, 1, 5), (2, 2, 7)")
        lines = []
        sites.apply(t, echo=lines.append)
        assert f"  + User:{name}-north: write topics {up.name}.*" in lines, lines
        with ConnectClient(stack.urls()["connect"]) as connect:
            config = connect.config(up.connector_name)
            assert config["producer.override.sasl.jaas.config"].startswith("${dir:"), config
            assert ENV["NORTH_KAFKA_PASSWORD"] not in json.dumps(config)
            connect.wait_running(up.connector_name, timeout=120)
        with psycopg.connect(urls["north"], autocommit=True) as conn:
            conn.execute("insert into public.sale values (2, 3, 9)")
        # The snapshot's two rows and the streamed one, in north's up topic at the private broker.
        topic = up.topic_of("public.sale")
        deadline = time.monotonic() + 120
        counts = {}
        while time.monotonic() < deadline:
            counts = topics_mod.message_counts(broker.kafka_bootstrap, [topic])
            if counts.get(topic, 0) >= 3:
                break
            time.sleep(1)
        assert counts.get(topic, 0) >= 3, counts
        # Written by north's user: the broker authorised the connector's producer as it (north may write its up
        # topics, and nothing reached the shared broker's copy of them).
        assert topics_mod.message_counts(stack.kafka_bootstrap, [topic]).get(topic, 0) == 0
    finally:
        capture.delete(up, purge=True)
        shared = topics_mod.admin_client(stack.kafka_bootstrap)
        mine = [n for n in topics_mod.existing_topics(shared)
                if n.startswith(up.name + ".") or n == f"__debezium-heartbeat.{up.name}"]
        if mine:
            shared.delete_topics(mine, operation_timeout=30)
        for gen in gens.values():
            with pytest.raises(StopIteration):
                next(gen)


def test_a_removed_satellite_can_no_longer_log_in(topo, broker):
    """`cdc topology remove` takes a satellite's Kafka access away first: its ACLs and its user (run last: south's
    user is gone afterwards)."""
    south = site_kafka(topo, "south")
    kafka_clients.check_login(south)
    lines = sites.remove_access(topo, "south")
    assert lines[0].startswith("kafka user shop-south (south): ") and "ACLs deleted" in lines[0], lines
    assert int(lines[0].split(": ")[1].split()[0]) == len(sites.site_grants(topo, "south")), lines
    assert lines[1] == "kafka user shop-south (south): credential deleted", lines
    with pytest.raises(kafka_clients.KafkaAccessError, match="'shop-south'"):
        kafka_clients.check_login(south, timeout=20)
    # Again: nothing left to delete, said so.
    assert sites.remove_access(topo, "south")[1] == "kafka user shop-south (south): had no credential"
    # North is untouched.
    kafka_clients.check_login(site_kafka(topo, "north"))
