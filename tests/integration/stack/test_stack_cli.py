"""The `cdc stack` commands as a user runs them: status endpoints, idempotent up, and clear start-up failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CDC = str(Path(sys.executable).parent / "cdc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cdc(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CDC, *args], capture_output=True, text=True, env=env or os.environ.copy(),
                          timeout=timeout)


def isolated_env(tmp_path: Path, **ports: int) -> dict[str, str]:
    """A state directory of its own and free ports, so the check cannot collide with the shared stack."""
    env = os.environ.copy()
    env["CDC_HOME"] = str(tmp_path / "home")
    for name in ("POSTGRES", "MARIADB", "KAFKA", "KAFKA_CONTROLLER", "SCHEMA_REGISTRY", "SCHEMA_REGISTRY_MANAGEMENT",
                 "CONNECT"):
        env[f"CDC_{name}_PORT"] = str(ports.get(name.lower(), free_port()))
    return env


def test_status_json_prints_every_endpoint_as_a_url(stack):
    proc = run_cdc("stack", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["postgres"].startswith("postgresql://") and info["kafka"].startswith("kafka://")
    assert info["mariadb"].startswith("mysql+pymysql://cdc:***@127.0.0.1:")  # passwords masked (issue 15)
    assert info["schema_registry"].endswith("/apis/ccompat/v7") and info["connect"].startswith("http://")
    assert all(c["state"] == "healthy" for c in info["components"].values())


def test_second_up_reports_what_already_runs(stack):
    proc = run_cdc("stack", "up")
    assert proc.returncode == 0, proc.stderr
    for name in ("postgres", "mariadb", "kafka", "schema_registry", "connect"):
        assert f"{name}: already running" in proc.stdout


@pytest.mark.parametrize("component", ["kafka", "mariadb"])
def test_up_with_a_port_taken_fails_naming_the_component_and_starts_nothing(tmp_path, component):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        env = isolated_env(tmp_path, **{component: taken})
        proc = run_cdc("stack", "up", env=env)
    assert proc.returncode == 1
    assert f"{component}: port {taken} on 127.0.0.1 is already in use" in proc.stderr
    assert f"CDC_{component.upper()}_PORT" in proc.stderr
    # Nothing was started: the isolated stack reports every component stopped.
    status = json.loads(run_cdc("stack", "status", "--json", env=env).stdout)
    assert {c["state"] for c in status["components"].values()} == {"stopped"}


def test_up_without_java_fails_with_a_clear_message(tmp_path):
    env = isolated_env(tmp_path)
    env["PATH"] = str(tmp_path / "empty-bin")
    env.pop("JAVA_HOME", None)
    proc = run_cdc("stack", "up", env=env)
    assert proc.returncode == 1
    assert "kafka: Java was not found" in proc.stderr
    assert "Traceback" not in proc.stderr
