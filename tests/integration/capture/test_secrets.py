"""Secrets on the real stack (issue 15, item 6): after `cdc connectors apply`, the source password is neither in Kafka
Connect's REST answers nor in its config topic, the registry's password is not on its command line, `cdc stack status`
shows no password, the secrets file is its owner's only, and the connector still streams rows."""

from __future__ import annotations

import json
import stat
import subprocess
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from infra import stack as stack_mod
from tests.integration.pipelines import CDC, caught_up, cdc, execute, pipeline_data, table_rows, write_pipeline

# The worker's config topic (infra/templates/connect-worker.properties).
CONFIG_TOPIC = "_cdc-connect-configs"


@pytest.fixture
def source_role(stack):
    """A login role of its own with a password found nowhere else, dropped after the databases it owns."""
    role = f"h2_{uuid.uuid4().hex[:10]}"
    password = f"pw-{uuid.uuid4().hex}"
    execute(stack.postgres_url(), f"create role {role} login replication password '{password}'")
    yield role, password
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f"drop role if exists {role}")


def config_topic_values(bootstrap: str) -> list[bytes]:
    """Every message of Connect's config topic, from its beginning to its current end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"h2-secrets-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "log_level": 0})
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(CONFIG_TOPIC, 0), timeout=10)
        consumer.assign([TopicPartition(CONFIG_TOPIC, 0, 0)])
        values: list[bytes] = []
        position = 0
        while position < high:
            for msg in consumer.consume(500, 5):
                assert msg.error() is None, msg.error()
                values.append((msg.key() or b"") + b"\0" + (msg.value() or b""))
                position = msg.offset() + 1
        return values
    finally:
        consumer.close()


def test_the_source_password_is_never_stored_or_shown_in_clear(stack, source_role, source_db, destination_db,
                                                                tmp_path):
    role, password = source_role
    execute(stack.postgres_url(), f'alter database "{source_db}" owner to {role}')
    source_url = stack.postgres_url(source_db).replace("cdc:cdc@", f"{role}:{password}@")
    execute(source_url, "create table public.item (id int primary key, name text)",
            "insert into public.item values (1, 'one'), (2, 'two')")
    path = tmp_path / "pipeline.yaml"
    data = pipeline_data(stack, source_db, ["public.item"],
                         destinations={"copy": {"kind": "replica", "url": stack.postgres_url(destination_db)}})
    data["source"]["url"] = source_url
    pipeline = write_pipeline(path, data)
    name = pipeline.connector_name
    try:
        applied = cdc(path, "connectors", "apply")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert password not in applied.stdout + applied.stderr

        # The connector runs with the password it reads from the file: rows arrive.
        execute(source_url, "insert into public.item values (3, 'three')")
        caught_up(path)
        assert table_rows(stack.postgres_url(destination_db), "public.item") == [(1, "one"), (2, "two"),
                                                                                 (3, "three")]

        # Connect's REST API: the configuration and the task configurations hold the reference.
        connect_url = stack.urls()["connect"]
        stored = httpx.get(f"{connect_url}/connectors/{name}/config").json()
        assert stored["database.password"].startswith("${dir:") and stored["database.password"].endswith(
            ":database.password}")
        tasks = httpx.get(f"{connect_url}/connectors/{name}/tasks").text
        for answer in (json.dumps(stored), tasks):
            assert password not in answer

        # Connect's config topic (the file every user of the machine can read, in Kafka's log directory).
        values = config_topic_values(stack.kafka_bootstrap)
        mine = [v for v in values if name.encode() in v]
        assert mine, f"no message about {name} in {CONFIG_TOPIC}"
        assert not [v for v in values if password.encode() in v]

        # The file Connect reads it from: its owner's only.
        secret = stack_mod.secrets_dir() / name / "database.password"
        assert secret.read_text() == password
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(stack_mod.secrets_dir().stat().st_mode) == 0o700

        # A second apply compares references: nothing to change.
        again = cdc(path, "connectors", "apply")
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"connector {name}: unchanged" in again.stdout
        diff = cdc(path, "connectors", "diff")
        assert diff.returncode == 0 and f"connector {name}: no changes" in diff.stdout, diff.stdout + diff.stderr

        # A new password: same reference, but `diff` and `apply` see it, and the connector restarts with it.
        new_password = f"pw-{uuid.uuid4().hex}"
        execute(stack.postgres_url(), f"alter role {role} password '{new_password}'")
        data["source"]["url"] = source_url.replace(password, new_password)
        write_pipeline(path, data)
        diff = cdc(path, "connectors", "diff")
        assert diff.returncode == 1 and "~ database.password: ******** -> ******** (a new value)" in diff.stdout
        updated = cdc(path, "connectors", "apply")
        assert updated.returncode == 0, updated.stdout + updated.stderr
        assert f"connector {name}: updated" in updated.stdout
        assert new_password not in updated.stdout + updated.stderr
        assert secret.read_text() == new_password
        execute(data["source"]["url"], "insert into public.item values (4, 'four')")
        caught_up(path)
        assert table_rows(stack.postgres_url(destination_db), "public.item")[-1] == (4, "four")
        assert not [v for v in config_topic_values(stack.kafka_bootstrap) if new_password.encode() in v]
    finally:
        deleted = cdc(path, "connectors", "delete", "--purge")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert not (stack_mod.secrets_dir() / name).exists()


def test_the_registry_password_is_not_on_its_command_line(stack):
    pid = stack_mod.component_pid(stack, "schema_registry")
    assert pid is not None
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "apicurio.datasource.url" in command_line  # the right process
    assert "datasource.password" not in command_line
    everything = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "datasource.password" not in everything


def test_stack_status_shows_no_password(stack):
    for args in (["stack", "status", "--json"], ["stack", "status"]):
        proc = subprocess.run([CDC, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f":{stack_mod.PG_PASSWORD}@" not in proc.stdout and f":{stack_mod.MARIADB_PASSWORD}@" not in proc.stdout
    info = json.loads(subprocess.run([CDC, "stack", "status", "--json"], capture_output=True, text=True,
                                     timeout=120).stdout)
    assert info["postgres"].startswith(f"postgresql://{stack_mod.PG_USER}:***@127.0.0.1:")
    assert info["components"]["mariadb"]["url"].startswith(f"mysql+pymysql://{stack_mod.MARIADB_USER}:***@")


def test_state_files_are_their_owners_only(stack):
    home = stack.home
    assert stat.S_IMODE((home / "stack.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "connect" / "worker.properties").stat().st_mode) == 0o600
    for name in ("connect", "kafka", "logs", "run"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o700, name
    assert stat.S_IMODE(home.stat().st_mode) & 0o077 in (0, 0o011)  # reachable, never listable by others
