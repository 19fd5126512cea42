"""Kafka client settings (cdc/kafka.py), `kafka.sasl` in the pipeline file, and the per-site Kafka users of a
topology (cdc/topology.py, producers/sites.py): what each client logs in as, what each satellite is granted, and that
no password is ever shown. Pure: no broker (tests/integration/sites/test_sites_auth.py runs them against one)."""

from __future__ import annotations

import copy
import json

import pytest
from confluent_kafka import KafkaError

from cdc import config, topology
from cdc import kafka as kafka_clients
from cdc.errors import ConfigError
from producers import sites
from tests.unit.samples import TOPOLOGY as BASE

PIPELINE = {
    "pipeline": "district",
    "kafka": {"bootstrap_servers": "localhost:9094", "schema_registry_url": "http://localhost:8081",
              "connect_url": "http://localhost:8083",
              "sasl": {"username": "north", "password": "${KAFKA_PASSWORD}"}},
    "source": {"url": "postgresql://cdc@localhost:5432/district", "tables": ["public.school"]},
    "destinations": {},
}
SECRET = "pa$$ \"word\" \\ 1"


def pipeline(mutate=None, env=None):
    data = copy.deepcopy(PIPELINE)
    if mutate:
        mutate(data)
    return config.parse(data, "pipe.yaml", {"KAFKA_PASSWORD": SECRET} if env is None else env)


def test_settings_without_a_login_are_the_plaintext_listener():
    settings = kafka_clients.client_settings("127.0.0.1:9092", {"group.id": "g", "log_level": 3})
    assert settings["bootstrap.servers"] == "127.0.0.1:9092" and settings["group.id"] == "g"
    assert settings["log_level"] == 3 and callable(settings["error_cb"])
    assert not any(k.startswith("sasl.") or k == "security.protocol" for k in settings)
    plain = pipeline(lambda d: d["kafka"].pop("sasl"))
    assert plain.kafka.sasl is None
    assert "sasl.username" not in kafka_clients.client_settings(plain.kafka)


def test_settings_with_a_login_are_scram_over_sasl_plaintext():
    kafka = pipeline().kafka
    settings = kafka_clients.client_settings(kafka, {"acks": "all"})
    assert settings["security.protocol"] == "SASL_PLAINTEXT" and settings["sasl.mechanism"] == "SCRAM-SHA-256"
    assert settings["sasl.username"] == "north" and settings["sasl.password"] == SECRET
    assert settings["bootstrap.servers"] == "localhost:9094" and settings["acks"] == "all"
    shown = kafka_clients.shown_settings(settings)
    assert shown["sasl.password"] == "***" and SECRET not in json.dumps(shown) and "error_cb" not in shown


def test_a_refused_login_raises_naming_the_user_and_other_errors_reach_the_callers_callback():
    seen = []
    settings = kafka_clients.client_settings(pipeline().kafka, {"error_cb": seen.append})
    refused = KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: invalid credentials")
    with pytest.raises(kafka_clients.KafkaAccessError) as info:
        settings["error_cb"](refused)
    message = str(info.value)
    assert "'north'" in message and "localhost:9094" in message and "invalid credentials" in message
    assert SECRET not in message and info.value.exit_code == 2
    transport = KafkaError(KafkaError._TRANSPORT, "broker down")
    settings["error_cb"](transport)
    # A handshake cut short on the client's side is reported as an authentication error too: it is the network.
    cut = KafkaError(KafkaError._AUTHENTICATION, "GroupCoordinator: SASL SCRAM-SHA-256 mechanism handshake failed: "
                     "Local: Broker transport failure: broker's supported mechanisms: (n/a)")
    settings["error_cb"](cut)
    assert seen == [transport, cut]
    assert kafka_clients.access_error(pipeline().kafka, cut) is None


def test_an_authorisation_error_names_the_user_and_the_topic():
    kafka = pipeline().kafka
    error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed")
    with pytest.raises(kafka_clients.KafkaAccessError) as info:
        kafka_clients.raise_for_access(kafka, error, "shop-south-down.public.item")
    assert "'north'" in str(info.value) and "shop-south-down.public.item" in str(info.value)
    assert "TOPIC_AUTHORIZATION_FAILED" in str(info.value)
    group = KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "Group authorization failed")
    assert "consumer group" in str(kafka_clients.access_error(kafka, group, "g"))
    kafka_clients.raise_for_access(kafka, KafkaError(KafkaError._TRANSPORT, "down"))  # not an access error
    kafka_clients.raise_for_access(kafka, None)


def test_kafka_sasl_is_validated_and_never_shown():
    p = pipeline()
    assert SECRET not in repr(p.kafka) and SECRET not in json.dumps(p.masked())
    assert p.masked()["kafka"]["sasl"]["username"] == "north"

    def bad(mutate, env=None) -> str:
        with pytest.raises(ConfigError) as info:
            pipeline(mutate, env)
        return str(info.value)

    assert "pipe.yaml: kafka.sasl.password: is empty" in bad(lambda d: d["kafka"]["sasl"].update(password=""))
    assert "pipe.yaml: kafka.sasl.password: environment variable KAFKA_PASSWORD is not set" in bad(None, env={})
    message = bad(lambda d: d["kafka"]["sasl"].update(username="north:admin"))
    assert "pipe.yaml: kafka.sasl.username: 'north:admin' is not a Kafka user name" in message
    assert "kafka.sasl.password: is required" in bad(lambda d: d["kafka"]["sasl"].pop("password"))
    assert "kafka.sasl.mechanism: is not a known setting" in bad(lambda d: d["kafka"]["sasl"].update(mechanism="x"))


# -- a topology's site users ------------------------------------------------------------------------------------

ENV = {"HQ_PASSWORD": "s3cret", "NORTH_KAFKA": "n0rth-secret", "SOUTH_KAFKA": "s0uth-secret"}


def with_users(data=None):
    data = copy.deepcopy(data or BASE)
    data["site_bootstrap_servers"] = "127.0.0.1:9094"
    data["sites"]["north"]["kafka_user"] = {"username": "shop-north", "password": "${NORTH_KAFKA}"}
    data["sites"]["south"]["kafka_user"] = {"username": "shop-south", "password": "${SOUTH_KAFKA}"}
    return data


def broken(data) -> str:
    with pytest.raises(ConfigError) as info:
        topology.parse(data, "topo.yaml", ENV)
    return str(info.value)


def test_site_users_are_validated():
    data = with_users()
    data.pop("site_bootstrap_servers")
    assert "topo.yaml: site_bootstrap_servers: is required when a site has a kafka_user" in broken(data)
    data = with_users()
    data["sites"]["south"]["kafka_user"]["username"] = "shop-north"
    assert "topo.yaml: sites.south.kafka_user.username: 'shop-north' is already site 'north''s user" in broken(data)
    data = with_users()
    data["sites"]["hq"]["kafka_user"] = {"username": "hq", "password": "x"}
    assert "topo.yaml: sites.hq.kafka_user: the master's clients use `kafka:`" in broken(data)
    data = with_users()
    data["site_bootstrap_servers"] = "not a server"
    assert "topo.yaml: site_bootstrap_servers: each server must be host:port" in broken(data)


def test_a_satellites_down_applier_logs_in_as_its_user_and_the_master_keeps_its_listener():
    topo = topology.parse(with_users(), "topo.yaml", ENV)
    links = {(link.satellite, link.direction): link for link in topo.links()}
    down = links["north", "down"]
    # The master plans and applies the link (its topics, its connector) through `kafka:` ...
    assert down.pipeline.kafka.sasl is None and down.pipeline.kafka.bootstrap_servers == "localhost:9092"
    # ... and the satellite's applier reads as the satellite's user at the authenticated listener.
    assert down.site_pipeline.kafka.bootstrap_servers == "127.0.0.1:9094"
    assert down.site_pipeline.kafka.sasl.username == "shop-north"
    assert down.site_pipeline.kafka.sasl.password.get_secret_value() == "n0rth-secret"
    assert down.site_pipeline.name == down.pipeline.name
    up = links["north", "up"]
    assert up.site_pipeline is up.pipeline and up.pipeline.kafka.sasl is None  # the master applies up links
    # Without a kafka_user (the first slice's topologies), nothing changes.
    plain = {(link.satellite, link.direction): link for link in topology.parse(BASE, "t", ENV).links()}
    assert plain["north", "down"].site_pipeline is plain["north", "down"].pipeline


def test_each_satellite_is_granted_its_own_topics_and_nothing_else():
    topo = topology.parse(with_users(), "topo.yaml", ENV)
    grants = {(g.resource, g.name, g.pattern, g.operation) for g in sites.site_grants(topo, "north")}
    assert grants == {
        ("topic", "shop-north-up.", "prefixed", "write"), ("topic", "shop-north-up.", "prefixed", "describe"),
        ("topic", "__debezium-heartbeat.shop-north-up", "literal", "write"),
        ("topic", "__debezium-heartbeat.shop-north-up", "literal", "describe"),
        ("topic", "shop-north-down.", "prefixed", "read"), ("topic", "shop-north-down.", "prefixed", "describe"),
        ("group", "cdc-shop-north-down-north", "literal", "read"),
        ("group", "cdc-shop-north-down-north", "literal", "describe"),
        ("topic", "shop-north-down.north.dead-letter", "literal", "write"),
    }
    assert not any("south" in name for _, name, _, _ in grants)


def test_an_up_links_connector_writes_as_its_satellite_by_a_secret_reference():
    topo = topology.parse(with_users(), "topo.yaml", ENV)
    links = {(link.satellite, link.direction): link for link in topo.links()}
    overrides = sites.connector_overrides(topo, links["north", "up"])
    assert overrides["producer.override.bootstrap.servers"] == "127.0.0.1:9094"
    assert overrides["producer.override.security.protocol"] == "SASL_PLAINTEXT"
    assert overrides["producer.override.sasl.mechanism"] == "SCRAM-SHA-256"
    reference = overrides["producer.override.sasl.jaas.config"]
    assert reference.startswith("${dir:") and reference.endswith(
        "shop-north-up-source:producer.override.sasl.jaas.config}")
    assert "n0rth-secret" not in json.dumps(overrides)
    assert sites.connector_overrides(topo, links["north", "down"]) == {}  # the master's connector
    assert sites.connector_overrides(topology.parse(BASE, "t", ENV), links["north", "up"]) == {}
    jaas = sites.jaas_config(config.KafkaSasl(username="u", password='a"b\\c'))
    assert jaas == ('org.apache.kafka.common.security.scram.ScramLoginModule required username="u" '
                    'password="a\\"b\\\\c";')


def test_the_stack_has_an_authenticated_listener_and_status_shows_it(tmp_path, monkeypatch):
    from infra import stack

    monkeypatch.setenv("CDC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CDC_KAFKA_SASL_PORT", "19094")
    layout = stack.StackLayout.resolve()
    assert layout.kafka_sasl_bootstrap == "127.0.0.1:19094"
    assert "kafka_sasl" in stack.COMPONENT_PORTS["kafka"]  # checked free before Kafka starts
    info = stack.status()
    assert info["kafka_sasl"] == "kafka://127.0.0.1:19094" and info["kafka_sasl_mechanism"] == "SCRAM-SHA-256"
    assert info["components"]["kafka"]["sasl_url"].startswith("kafka://127.0.0.1:19094")
    rendered = stack._rendered("kafka-server.properties", {"port": 1, "controller_port": 2, "sasl_port": 19094,
                                                           "data": "/d"})
    props = dict(line.split("=", 1) for line in rendered.splitlines() if line and not line.startswith("#"))
    assert "SASL_PLAINTEXT://127.0.0.1:19094" in props["listeners"].split(",")
    assert "SASL_PLAINTEXT://127.0.0.1:19094" in props["advertised.listeners"].split(",")
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-256"
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["super.users"] == "User:ANONYMOUS" and props["inter.broker.listener.name"] == "PLAINTEXT"
    assert "{{" not in rendered
