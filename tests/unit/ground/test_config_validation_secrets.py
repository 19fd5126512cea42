"""Secrets never in clear (issue 15, item 6), the parts that need no running service: connector configurations hold
references to owner-only files, the stack's URLs are printed masked, its state files are its owner's only, and the
registry gets its password from the environment."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cdc.config import parse
from cdc.errors import ConfigError
from infra import stack
from producers import debezium
from producers.connect import changed_secrets, remove_secrets, write_secrets
from tests.unit.samples import PIPELINE
from tests.unit.samples import SOURCE_TABLES as TABLES

PASSWORD = "s3cret:with=odd}chars\\and\r\nnewlines\r"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pipeline():
    data = json.loads(json.dumps(PIPELINE))
    data["source"]["url"] = "postgresql://cdc:s3cret@localhost:5432/district"
    return parse(data, env={})


def test_the_connector_configuration_holds_a_reference_not_the_password():
    config = debezium.connector_config(pipeline(), TABLES, secrets="/state/secrets/district-source")
    assert config["database.password"] == "${dir:/state/secrets/district-source:database.password}"
    assert not [k for k, v in config.items() if "s3cret" in v]
    assert debezium.secret_values(pipeline()) == {"database.password": "s3cret"}
    # Printing shows the reference (no secret in it); a password in clear is masked.
    assert debezium.masked(config)["database.password"] == config["database.password"]
    assert debezium.masked({"database.password": "s3cret"})["database.password"] == "********"


def test_a_source_without_a_password_has_no_secret():
    data = json.loads(json.dumps(PIPELINE))
    data["source"]["url"] = "postgresql://cdc@localhost:5432/district"
    p = parse(data, env={})
    assert debezium.secret_values(p) == {}
    assert debezium.connector_config(p, TABLES, secrets="/state/secrets/x")["database.password"] == ""


def test_a_secrets_directory_a_reference_cannot_name_is_refused():
    with pytest.raises(ConfigError, match="cannot name"):
        debezium.connector_config(pipeline(), TABLES, secrets="/state:odd/secrets/district-source")


def test_secrets_are_written_owner_only_and_changes_are_reported(tmp_path):
    root = tmp_path / "secrets"
    directory = root / "district-source"
    assert changed_secrets(directory, {"database.password": PASSWORD}) == ["database.password"]
    assert not root.exists()  # looking changes nothing
    assert write_secrets(directory, {"database.password": PASSWORD}) == ["database.password"]
    secret = directory / "database.password"
    assert secret.read_bytes() == PASSWORD.encode()  # as it is: DirectoryConfigProvider reads the whole file
    assert (mode(secret), mode(directory), mode(root)) == (0o600, 0o700, 0o700)
    assert write_secrets(directory, {"database.password": PASSWORD}) == []
    assert write_secrets(directory, {"database.password": "new"}) == ["database.password"]
    assert secret.read_text() == "new" and mode(secret) == 0o600
    secret.chmod(0o644)  # loosened by hand: put back even when the value is the same
    assert write_secrets(directory, {"database.password": "new"}) == [] and mode(secret) == 0o600
    assert [p.name for p in directory.iterdir()] == ["database.password"]  # no temporary file left behind
    assert remove_secrets(directory) and not directory.exists() and not remove_secrets(directory)


def test_stack_urls_are_printed_masked(tmp_path, monkeypatch):
    monkeypatch.setenv("CDC_HOME", str(tmp_path / "home"))
    layout = stack.StackLayout.resolve()
    assert layout.urls()["postgres"].startswith("postgresql://cdc:cdc@")  # for the launcher's own use
    masked = layout.masked_urls()
    assert masked["postgres"] == f"postgresql://cdc:***@127.0.0.1:{layout.ports['postgres']}/postgres"
    assert masked["mariadb"] == f"mysql+pymysql://cdc:***@127.0.0.1:{layout.ports['mariadb']}/"
    assert masked["kafka"] == layout.urls()["kafka"] and masked["connect"] == layout.urls()["connect"]
    info = stack.status()
    text = json.dumps(info)
    assert ":cdc@" not in text and info["postgres"] == masked["postgres"]
    assert {c["url"] for c in info["components"].values()} == set(masked.values())


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:p@h:1/d", "postgresql://u:***@h:1/d"),
    ("postgresql://u:p@ss@h/d", "postgresql://u:***@h/d"),
    ("postgresql://u@h/d", "postgresql://u@h/d"),
    ("http://h:8081/apis/ccompat/v7", "http://h:8081/apis/ccompat/v7"),
])
def test_mask_url(url, shown):
    assert stack.mask_url(url) == shown


def test_state_files_and_directories_become_owner_only(tmp_path):
    home = tmp_path / "home"
    for name in ("connect", "kafka", "logs", "run", "registry", "secrets"):
        (home / name).mkdir(parents=True)
    (home / "stack.json").write_text("{}")
    (home / "connect" / "worker.properties").write_text("x")
    home.chmod(0o755)
    stack.protect_state(stack.StackLayout(home, tmp_path / "artifacts"))
    assert mode(home) == 0o700  # no database server directories inside
    for name in ("connect", "kafka", "logs", "run", "registry", "secrets"):
        assert mode(home / name) == 0o700, name
    assert mode(home / "stack.json") == 0o600 and mode(home / "connect" / "worker.properties") == 0o600


def test_the_worker_reads_secrets_through_the_directory_provider_and_a_stale_worker_is_seen(tmp_path):
    layout = stack.StackLayout(tmp_path / "home", tmp_path / "artifacts")
    text = stack._rendered("connect-worker.properties", stack._connect_values(layout))
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert lines["config.providers"] == debezium.SECRETS_PROVIDER
    assert lines[f"config.providers.{debezium.SECRETS_PROVIDER}.class"] == \
        "org.apache.kafka.common.config.provider.DirectoryConfigProvider"
    assert lines[f"config.providers.{debezium.SECRETS_PROVIDER}.param.allowed.paths"] == str(
        stack.secrets_dir(layout.home))
    assert not stack.connect_config_current(layout)  # never started
    stack._render("connect-worker.properties", layout.home / "connect" / "worker.properties",
                  stack._connect_values(layout))
    assert stack.connect_config_current(layout)
    assert mode(layout.home / "connect" / "worker.properties") == 0o600
    (layout.home / "connect" / "worker.properties").write_text(text.split("config.providers")[0])  # an older one
    assert not stack.connect_config_current(layout)


def test_the_registry_gets_its_password_from_the_environment(tmp_path, monkeypatch):
    spawned = {}
    monkeypatch.setattr(stack, "_spawn", lambda layout, component, argv, cwd, env=None: spawned.update(
        argv=argv, env=env) or 0)
    jars = tmp_path / "artifacts" / "registry"
    jars.mkdir(parents=True)
    (jars / "apicurio-registry-app-runner.jar").write_text("")
    stack._start_registry(stack.StackLayout(tmp_path / "home", tmp_path / "artifacts"), "java")
    assert not [a for a in spawned["argv"] if "password" in a]
    assert spawned["env"] == {stack.REGISTRY_PASSWORD_ENV: stack.PG_PASSWORD}
    assert any(a.startswith("-Dapicurio.datasource.username=") for a in spawned["argv"])


def test_a_registry_started_with_its_password_on_the_command_line_is_stale(tmp_path):
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                            "-Dapicurio.datasource.password=cdc"])
    new = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-Dapicurio.datasource.username=cdc"])
    try:
        layout = stack.StackLayout(tmp_path, tmp_path)
        assert stack.registry_stale(layout, old.pid) and not stack.registry_stale(layout, new.pid)
    finally:
        for proc in (old, new):
            proc.kill()
            proc.wait()


def test_the_worker_starts_with_its_secrets_directory_made(tmp_path, monkeypatch):
    """Kafka's DirectoryConfigProvider refuses to start the worker when an allowed path does not exist (seen: "Path
    .../secrets does not exist"), so a new state directory gets it before Connect starts."""
    monkeypatch.setattr(stack, "_spawn", lambda *args, **kwargs: 0)
    layout = stack.StackLayout(tmp_path / "home", tmp_path / "artifacts")
    stack._start_connect(layout, "java")
    assert stack.secrets_dir(layout.home).is_dir() and mode(stack.secrets_dir(layout.home)) == 0o700
