"""Self-healing on the real stack, without disturbing it: a destination that restarts (a private PostgreSQL cluster
of the test's own), the applier's lock session terminated, a Debezium task failed (this test's connector only), and
a Kafka that does not answer (a closed port)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from infra import stack as stack_mod
from producers.connect import ConnectClient
from producers.debezium import registry_native_url
from tests.integration.pipelines import CDC, caught_up, pipeline_data, write_pipeline
from tests.integration.sample import rows, workload

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 120.0, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def private_pg(tmp_path_factory):
    """A PostgreSQL cluster of this test's own (the stack's own functions start it), on a port of its own: this one
    may be restarted and have its backends terminated without touching the shared stack."""
    home = tmp_path_factory.mktemp("private-pg")
    layout = stack_mod.StackLayout(home, stack_mod.artifacts_dir(), {**stack_mod.DEFAULT_PORTS,
                                                                    "postgres": _free_port()})
    stack_mod._start_postgres(layout, stack_mod.pg_bindir())
    with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
        conn.execute("create database dest")
    yield layout
    stack_mod._stop_postgres(layout)
    shutil.rmtree(stack_mod._pg_root(layout), ignore_errors=True)


def restart_immediately(layout) -> None:
    """pg_ctl restart -m immediate: every session dies at once, as in a crash, and the server comes back."""
    proc = subprocess.run(stack_mod._as_user("postgres", [
        str(stack_mod.pg_bindir() / "pg_ctl"), "-D", str(stack_mod._pg_data(layout)), "-l",
        str(stack_mod._pg_root(layout) / "postgres.log"), "-o", f"-p {layout.ports['postgres']}", "-m", "immediate",
        "-w", "-t", "60", "restart"]), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


class Applier:
    """`cdc run` as a user starts it, its output collected as it comes."""

    def __init__(self, path: Path, *args: str) -> None:
        self.proc = subprocess.Popen([CDC, "-c", str(path), "run", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=ENV)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(60)
        self._reader.join(10)
        return code


@pytest.fixture
def healing(private_pg, sample_pipeline):
    """The replica sample's source on the shared stack, its connector, and a destination on the private cluster."""
    destination = private_pg.postgres_url("dest")
    path, pipeline, source = sample_pipeline({"state": {"kind": "replica", "url": destination}})
    return path, pipeline, source, destination


def equal(source: str, destination: str) -> bool:
    try:
        return all(rows(source, t) == rows(destination, t) for t in ("school", "person", "enrollment", "attendance"))
    except (psycopg.Error, AssertionError):
        return False


def lock_holders(destination: str) -> list[int]:
    with psycopg.connect(destination, autocommit=True) as conn:
        return [r[0] for r in conn.execute("select pid from pg_locks where locktype = 'advisory' and granted")]


RECONNECTED = r"reconnected to the destination .* took its writer lock again"
LOST = r"lost the destination"


def test_destination_restarts_and_a_terminated_lock_session(healing, private_pg):
    path, pipeline, source, destination = healing
    applier = Applier(path, "state", "--no-watch-connector")
    try:
        wait_for("the snapshot at the destination", lambda: equal(source, destination), timeout=180)
        [holder] = wait_for("the writer lock", lambda: lock_holders(destination))

        # 1. A restart while the applier is idle: it notices within about a second, reconnects, takes the lock again.
        restart_immediately(private_pg)
        wait_for("the reconnection after an idle restart", lambda: applier.count(RECONNECTED) >= 1, timeout=90)
        assert applier.count(LOST) >= 1, applier.output
        assert applier.proc.poll() is None, applier.output
        [new_holder] = wait_for("the writer lock, again", lambda: lock_holders(destination))
        assert new_holder != holder

        # ... so a second `cdc run` of the same destination started after the restart is refused.
        second = subprocess.run([CDC, "-c", str(path), "run", "state", "--no-watch-connector"], capture_output=True,
                                text=True, timeout=120, env=ENV)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "another applier is writing it" in second.stderr, second.stdout + second.stderr

        # 2. A restart while the applier is applying a workload: nothing lost, nothing applied twice.
        done = threading.Event()
        writer = threading.Thread(target=lambda: (workload(source, 400, seed=11), done.set()))
        writer.start()
        time.sleep(2)
        restarts = applier.count(RECONNECTED)
        restart_immediately(private_pg)
        writer.join()
        wait_for("the reconnection after a restart under load", lambda: applier.count(RECONNECTED) > restarts,
                 timeout=90)
        wait_for("the destination equal to the source after the restart under load",
                 lambda: equal(source, destination), timeout=180)

        # 3. The lock's session terminated (pg_terminate_backend): the applier takes it again and keeps applying.
        [holder] = lock_holders(destination)
        reconnections = applier.count(RECONNECTED)
        with psycopg.connect(destination, autocommit=True) as conn:
            assert conn.execute("select pg_terminate_backend(%s)", (holder,)).fetchone()[0]
        wait_for("the reconnection after the lock session was terminated",
                 lambda: applier.count(RECONNECTED) > reconnections, timeout=60)
        workload(source, 100, seed=12)
        wait_for("the destination equal to the source after the lock session was terminated",
                 lambda: equal(source, destination), timeout=120)

        # 4. The lock's session terminated and the lock taken by someone else before the applier gets it back: it
        # stops, saying why, and writes nothing more.
        [holder] = lock_holders(destination)
        key = f"cdc {pipeline.name} state"
        with psycopg.connect(destination, autocommit=True) as thief:
            # waits (up to 5 s) for the backend to be gone, then takes the lock before the applier notices (1 s)
            assert thief.execute("select pg_terminate_backend(%s, 5000)", (holder,)).fetchone()[0]
            assert thief.execute("select pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()[0]
            with psycopg.connect(destination, autocommit=True) as conn:
                before = conn.execute("select sum(next_offset) from _cdc_offsets").fetchone()[0]
            workload(source, 50, seed=13)
            code = applier.proc.wait(60)
            assert code == 1, applier.output
            applier._reader.join(10)
            assert "this applier lost its writer lock" in applier.output, applier.output
            assert "another applier holds it now" in applier.output, applier.output
            time.sleep(3)
            with psycopg.connect(destination, autocommit=True) as conn:
                after = conn.execute("select sum(next_offset) from _cdc_offsets").fetchone()[0]
            assert after == before, "the applier wrote without its lock"
    finally:
        applier.stop()
        print(applier.output)
    # A new applier, once the lock is free, converges (what was read before the stop is applied now).
    caught_up(path)
    assert equal(source, destination)


def _value_artifact(pipeline, table: str) -> tuple[str, str]:
    """(group, id) of a table's value schema in Apicurio (the converter registers one per record type)."""
    registry = registry_native_url(pipeline.kafka.schema_registry_url)
    found = httpx.get(f"{registry}/search/artifacts", params={"group": f"{pipeline.name}.{table}",
                                                               "limit": 100}).json()
    [artifact] = [(a["groupId"], a["id"]) for a in found["artifacts"] if a["id"] == "Envelope"]
    return artifact


def test_a_failed_debezium_task_is_restarted_by_cdc_run(healing):
    """This pipeline's connector only: its value schema for public.school gets a BACKWARD compatibility rule in the
    registry, and the source makes an incompatible change (a NOT NULL column without default): the converter is
    refused and the task FAILS, as Connect leaves it (it never retries a failed task). Once the rule is gone, the
    watcher of `cdc run` restarts the task (with backoff, reported) and rows keep arriving."""
    path, pipeline, source, destination = healing
    applier = Applier(path, "state", "--watch-every", "2")
    registry = registry_native_url(pipeline.kafka.schema_registry_url)
    try:
        wait_for("the snapshot at the destination", lambda: equal(source, destination), timeout=180)
        group, artifact = _value_artifact(pipeline, "public.school")
        rules = f"{registry}/groups/{group}/artifacts/{artifact}/rules"
        assert httpx.post(rules, json={"type": "COMPATIBILITY", "config": "BACKWARD"}).status_code == 204
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("alter table school add column rank integer not null default 0")
            conn.execute("alter table school alter column rank drop default")
            conn.execute("insert into school values (6, 'school 6', 3)")
        with ConnectClient(pipeline.kafka.connect_url) as connect:
            wait_for("the task to fail", lambda: connect.status(pipeline.connector_name).failed_traces, timeout=120)
            wait_for("the restart line", lambda: applier.count(r"capture: connector .*task 0 FAILED.*restarting"),
                     timeout=60)
            assert httpx.delete(f"{rules}/COMPATIBILITY").status_code == 204
            wait_for("the connector running again", lambda: applier.count(r"running again after"), timeout=180)
            assert connect.status(pipeline.connector_name).running
        workload(source, 50, seed=22)
        wait_for("the destination equal to the source after the task was restarted",
                 lambda: equal(source, destination), timeout=180)
        # the change the task failed on arrived too (columns by name: id, name, rank; the workload moves ids)
        assert [rank for _, name, rank in rows(destination, "school") if name == "school 6"] == [3]
        assert applier.proc.poll() is None, applier.output
    finally:
        applier.stop()
        print(applier.output)


def test_a_kafka_outage_is_one_line_per_interval(stack, source_db, tmp_path, private_pg):
    """A pipeline whose Kafka does not answer (a closed port): one clear line, not librdkafka's stream of them, and
    the progress line says the applier is blocked (not `lag 0.0 s`)."""
    source = stack.postgres_url(source_db)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("create table item (id integer primary key, name text)")
    data = pipeline_data(stack, source_db, ["public.item"],
                         destinations={"state": {"kind": "replica", "url": private_pg.postgres_url("dest")}})
    data["kafka"]["bootstrap_servers"] = f"127.0.0.1:{_free_port()}"  # nothing listens there
    path = tmp_path / "pipeline.yaml"
    write_pipeline(path, data)
    applier = Applier(path, "state", "--no-watch-connector")
    time.sleep(25)
    assert applier.proc.poll() is None, applier.output  # waiting for Kafka, not exited
    applier.stop()
    lines = applier.lines
    unreachable = [line for line in lines if re.search(r"Kafka unreachable since \d\d:\d\d:\d\d, retrying", line)
                   and "BLOCKED" not in line]
    assert unreachable, applier.output
    assert len(unreachable) <= 2, applier.output  # in 25 s: the first line, at most one reminder (30 s apart)
    assert any("BLOCKED: Kafka unreachable since" in line for line in lines), applier.output
    assert not any("lag 0.0 s" in line for line in lines), applier.output
    # librdkafka's own lines (`%3|...|FAIL|...`) do not reach the output: a handful of lines in all
    assert not [line for line in lines if line.startswith("%")], applier.output
    assert len(lines) < 12, applier.output
    # ... and the destination says so, for `cdc lag` (BLOCKED)
    with psycopg.connect(private_pg.postgres_url("dest")) as conn:
        [(status,)] = conn.execute("select error from _cdc_status").fetchall()
    assert re.match(r"blocked: Kafka unreachable since \d\d:\d\d:\d\d UTC, retrying", status), status
    print(applier.output)


@pytest.fixture
def private_kafka(tmp_path_factory):
    """A Kafka broker of this test's own (started by the stack's own functions, on ports of its own): this one may be
    killed and started again without touching the shared stack."""
    home = tmp_path_factory.mktemp("private-kafka")
    layout = stack_mod.StackLayout(home, stack_mod.artifacts_dir(), {
        **stack_mod.DEFAULT_PORTS, "kafka": _free_port(), "kafka_controller": _free_port(),
        "kafka_sasl": _free_port()})  # the shared broker holds the default SASL port
    java = stack_mod.find_java()
    state = {"pid": None}

    def start() -> None:
        state["pid"] = stack_mod._start_kafka(layout, java)
        stack_mod._wait("kafka", layout, lambda: stack_mod._kafka_healthy(layout), state["pid"], 120)

    def kill() -> None:
        os.killpg(state["pid"], signal.SIGKILL)
        wait_for("the private broker to die", lambda: not stack_mod._alive(state["pid"]), timeout=30)

    start()
    yield layout, start, kill
    if state["pid"] and stack_mod._alive(state["pid"]):
        stack_mod._stop_pid(state["pid"])
    shutil.rmtree(home, ignore_errors=True)


def test_a_broker_outage_under_a_running_applier_is_one_line_and_blocked(stack, source_db, destination_db, tmp_path,
                                                                          private_kafka):
    """`cdc run` applying from a broker that is then killed: one line and a reminder at most every 30 s (not
    librdkafka's ~20 a second), the progress line and the destination's status (for `cdc lag`) say BLOCKED; when the
    broker is back, one line says so and the status is cleared (the pipeline has no connector: no rows to flow)."""
    layout, start, kill = private_kafka
    source = stack.postgres_url(source_db)
    destination = stack.postgres_url(destination_db)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("create table item (id integer primary key, name text)")
    data = pipeline_data(stack, source_db, ["public.item"],
                         destinations={"state": {"kind": "replica", "url": destination}})
    data["kafka"]["bootstrap_servers"] = layout.kafka_bootstrap
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)
    # No connector: only the topics the applier reads, on the private broker.
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": layout.kafka_bootstrap, "log_level": 0})
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in pipeline.data_topics + [pipeline.transaction_topic]]
                                      ).values():
        future.result(30)
    del admin  # it would keep reconnecting to the broker killed below
    applier = Applier(path, "state", "--no-watch-connector")
    try:
        wait_for("the applier's first progress line", lambda: applier.count(r"state: 0 rows.*lag "), timeout=120)
        kill()
        killed_at = len(applier.lines)
        time.sleep(45)
        during = applier.lines[killed_at:]
        first = [line for line in during if re.match(r"state: Kafka unreachable since \d\d:\d\d:\d\d, retrying", line)]
        assert 1 <= len(first) <= 2, applier.output  # 45 s: the first line and one reminder 30 s later
        assert any("BLOCKED: Kafka unreachable since" in line for line in during), applier.output
        assert not any(re.search(r"lag \d", line) for line in during), applier.output
        assert not any(line.startswith("%") for line in during), applier.output  # librdkafka's own lines
        assert len(during) <= 10, applier.output
        with psycopg.connect(destination) as conn:
            [(status,)] = conn.execute("select error from _cdc_status").fetchall()
        assert status.startswith("blocked: Kafka unreachable since"), status
        assert applier.proc.poll() is None, applier.output

        start()
        wait_for("the line saying Kafka is back", lambda: applier.count(r"state: Kafka reachable again at"),
                 timeout=120)
        # The status is cleared right after that line is printed (the next poll): waited for, not raced.
        def cleared() -> bool:
            with psycopg.connect(destination) as conn:
                return conn.execute("select count(*) from _cdc_status").fetchone()[0] == 0

        wait_for("the blocked status cleared", cleared, timeout=30)
    finally:
        applier.stop()
        print(applier.output)


def test_mariadb_lock_session_killed(mariadb_database, sample_pipeline):
    """MariaDB: the applier's lock session KILLed (only that session, on the shared server): the applier takes the
    lock again and keeps applying, and `cdc verify` finds the destination equal to the source."""
    import json

    from sqlalchemy import create_engine, text

    path, pipeline, source = sample_pipeline({"state": {"kind": "replica", "url": mariadb_database}})
    engine = create_engine(mariadb_database)
    key = f"cdc {pipeline.name} state"

    def holder():
        with engine.connect() as conn:
            return conn.execute(text("select is_used_lock(:k)"), {"k": key}).scalar()

    applier = Applier(path, "state", "--no-watch-connector")
    try:
        wait_for("the applier at work", lambda: applier.count(r"state: \d+ rows"), timeout=120)
        first = wait_for("the writer lock", holder, timeout=30)
        with engine.connect() as conn:
            conn.execute(text(f"kill {int(first)}"))
        wait_for("the reconnection after the KILL", lambda: applier.count(RECONNECTED) >= 1, timeout=60)
        second = wait_for("the writer lock, again", holder, timeout=30)
        assert second != first
        workload(source, 200, seed=31)
        caught = caught_up_busy(path)
        assert "another applier is writing it" in caught, caught  # the running applier holds the lock
        time.sleep(1)
        deadline = time.monotonic() + 180
        while True:
            verify = subprocess.run([CDC, "-c", str(path), "verify", "state", "--json"], capture_output=True,
                                    text=True, timeout=300, env=ENV)
            report = json.loads(verify.stdout) if verify.stdout.strip().startswith("{") else {}
            if report.get("equal") or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert report.get("equal"), verify.stdout + verify.stderr
        assert applier.proc.poll() is None, applier.output
    finally:
        applier.stop()
        engine.dispose()
        print(applier.output)


def caught_up_busy(path: Path) -> str:
    """A second applier of the destination: refused while the first holds the lock (its message)."""
    run = subprocess.run([CDC, "-c", str(path), "run", "state", "--until-caught-up", "--timeout", "60",
                          "--no-watch-connector"], capture_output=True, text=True, timeout=120, env=ENV)
    assert run.returncode == 1, run.stdout + run.stderr
    return run.stderr


def test_a_destination_down_when_cdc_run_starts_is_waited_for(healing, private_pg):
    """`cdc run` started before its destination: it says so, waits, and applies once the destination is up. A wrong
    password is not waited for: it is the pipeline file's to fix, and said at once."""
    path, pipeline, source, destination = healing
    stack_mod._stop_postgres(private_pg)
    applier = Applier(path, "state", "--no-watch-connector")
    try:
        wait_for("the line saying the destination does not answer",
                 lambda: applier.count(r"the destination does not answer .*waiting for it") >= 1, timeout=90)
        time.sleep(3)
        assert applier.proc.poll() is None, applier.output  # waiting, not exited
        stack_mod._start_postgres(private_pg, stack_mod.pg_bindir())
        wait_for("the connection once the destination is up", lambda: applier.count(RECONNECTED) >= 1, timeout=120)
        wait_for("the destination equal to the source", lambda: equal(source, destination), timeout=180)
    finally:
        applier.stop()
        print(applier.output)
    wrong = path.with_name("wrong-password.yaml")
    wrong.write_text(path.read_text().replace(destination, destination.replace("://cdc:cdc@", "://nobody:x@")))
    assert "nobody" in wrong.read_text()
    refused = subprocess.run([CDC, "-c", str(wrong), "run", "state", "--no-watch-connector"], capture_output=True,
                             text=True, timeout=120, env=ENV)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "nobody" in refused.stderr and "does not answer" not in refused.stdout, refused.stdout + refused.stderr
