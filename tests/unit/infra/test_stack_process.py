"""Unit tests of the stack launcher's process handling (real child processes, no services)."""

import socket
from pathlib import Path

import pytest

from cdc.errors import StackError
from infra import stack


def layout(tmp_path: Path) -> stack.StackLayout:
    return stack.StackLayout(home=tmp_path, artifacts=tmp_path / "artifacts")


def test_a_component_that_dies_at_start_is_reported_with_its_log_tail(tmp_path):
    lay = layout(tmp_path)
    pid = stack._spawn(lay, "kafka", ["sh", "-c", "echo 'FATAL: cannot bind'; exit 3"], tmp_path)
    with pytest.raises(StackError) as info:
        stack._wait("kafka", lay, lambda: False, pid, timeout=10)
    text = str(info.value)
    assert text.startswith("kafka: the process exited during start-up")
    assert "FATAL: cannot bind" in text


def test_port_check_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not stack._port_free(s.getsockname()[1])


def test_java_missing_names_the_component(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(StackError, match="^kafka: Java was not found"):
        stack.find_java()


def test_a_pid_that_is_not_ours_is_not_ours(tmp_path):
    lay = layout(tmp_path)
    lay.pidfile("kafka").parent.mkdir(parents=True)
    lay.pidfile("kafka").write_text("1\n")  # pid 1 is alive but its command line does not name our state dir
    assert stack.component_pid(lay, "kafka") is None


def test_a_mariadb_pid_that_is_not_ours_is_not_ours(tmp_path):
    lay = layout(tmp_path)
    (tmp_path / "mariadb").mkdir()
    (tmp_path / "mariadb" / "mariadbd.pid").write_text("1\n")  # alive, but not a server of this data directory
    assert stack.component_pid(lay, "mariadb") is None


def test_the_mariadb_socket_leaves_a_state_directory_too_deep_for_a_unix_socket(tmp_path):
    assert stack._mariadb_socket(tmp_path) == tmp_path / "mariadbd.sock"
    deep = tmp_path / ("d" * 120)
    socket_path = stack._mariadb_socket(deep)
    assert socket_path.parent == Path("/tmp") and len(str(socket_path)) < 100


def test_the_mariadb_url_names_the_pymysql_driver_and_the_database(tmp_path):
    lay = stack.StackLayout(home=tmp_path, artifacts=tmp_path, ports={**stack.DEFAULT_PORTS, "mariadb": 3399})
    assert lay.urls()["mariadb"] == "mysql+pymysql://cdc:cdc@127.0.0.1:3399/"
    assert lay.mariadb_url("state") == "mysql+pymysql://cdc:cdc@127.0.0.1:3399/state"
