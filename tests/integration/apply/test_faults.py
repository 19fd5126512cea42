"""Faults of the shared stack during a workload (issue 15): the broker, PostgreSQL (source and destination at once)
and the Kafka Connect worker, each SIGKILLed while `cdc run` applies and the source writes. Each ends with the
replica equal to the source by plain SQL, the analytics history free of duplicates (`cdc verify`), and the
workload's invariant (the sum of balances) intact at the destination.

These kill processes every other test shares: the stack is brought back (`cdc stack up`) before each test ends."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from infra import stack as stack_mod
from producers import capture
from producers.connect import ConnectClient
from tests.integration.pipelines import CDC, cdc, pipeline_data, purge, write_pipeline
from tests.integration.sample import HIERARCHIES, SCHEMA, TABLES, TOTAL, rows, workload


@pytest.fixture
def faulted(stack, source_db, tmp_path):
    """A source with the sample schema; a PostgreSQL replica and a DuckDB analytics replica."""
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
    destination = f"dst_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f'create database "{destination}"')
    data = pipeline_data(stack, source_db, TABLES, hierarchies=HIERARCHIES, destinations={
        "state": {"kind": "replica", "url": stack.postgres_url(destination)},
        "lake": {"kind": "analytics", "url": f"duckdb:///{tmp_path / 'lake.duckdb'}"}})
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)
    capture.apply(pipeline)
    yield path, pipeline, stack.postgres_url(source_db), stack.postgres_url(destination)
    stack_mod.up(echo=lambda line: None)  # whatever the test did, the next one finds the stack up
    purge(pipeline)
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f'drop database if exists "{destination}" with (force)')


def _resilient_workload(url: str, stop: threading.Event, done: list[int]) -> None:
    """The sample workload, again and again until `stop`, through a source that may go away: a transaction cut by
    the fault is rolled back by PostgreSQL (the invariant holds at every commit), and writing resumes."""
    seed = 0
    while not stop.is_set():
        seed += 1
        try:
            done.append(workload(url, 20, seed, stop))
        except psycopg.Error:
            time.sleep(0.5)


def _run_through(path, pipeline, source: str, fault) -> str:
    """`cdc run` and the workload together; `fault()` midway; then the workload stops and a last
    `cdc run --until-caught-up` must bring every destination level. Returns what the long run printed."""
    log = path.parent / "run.log"
    with open(log, "w") as out:
        runner = subprocess.Popen([CDC, "-c", str(path), "run"], stdout=out, stderr=subprocess.STDOUT)
    stop, done = threading.Event(), []
    writer = threading.Thread(target=_resilient_workload, args=(source, stop, done))
    try:
        writer.start()
        time.sleep(6)
        fault()
        time.sleep(10)
        stop.set()
        writer.join(timeout=120)
        assert sum(done) > 0, "the workload committed nothing"
        _connector_back(pipeline)
        time.sleep(3)
    finally:
        stop.set()
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            runner.kill()
    final = cdc(path, "run", "--until-caught-up", "--timeout", "240")
    assert final.returncode == 0, final.stdout + final.stderr
    return log.read_text()


def _connector_back(pipeline, timeout: float = 180) -> None:
    """The connector running again. A task that failed while the fault lasted (its converter lost the registry's
    storage with PostgreSQL, say) is restarted by the `cdc run` under test, with backoff: waited for, not restarted
    here (`capture.apply` gave up at the first FAILED it saw, racing that restart)."""
    deadline = time.monotonic() + timeout
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        while True:
            status = connect.status(pipeline.connector_name)
            if status is not None and status.running:
                return
            assert time.monotonic() < deadline, f"the connector did not run again within {timeout:.0f} s: {status}"
            time.sleep(1)


def _assert_level(path, source: str, destination: str) -> None:
    for table in ("school", "person", "enrollment", "attendance"):
        assert rows(source, table) == rows(destination, table), f"{table} differs"
    with psycopg.connect(destination) as conn:
        assert conn.execute("select sum(balance) from person").fetchone()[0] == TOTAL
    for name in ("state", "lake"):
        verified = cdc(path, "verify", name)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        if name == "lake":
            assert "0 duplicate row(s)" in verified.stdout, verified.stdout


def _sigkill(stack, component: str, down_s: float):
    """A fault: SIGKILL the stack's `component`, leave it down `down_s` seconds, then `cdc stack up` again."""
    def fault() -> None:
        os.kill(stack_mod.component_pid(stack, component), signal.SIGKILL)
        time.sleep(down_s)
        stack_mod.up(echo=lambda line: None)
    return fault


def test_a_broker_sigkilled_during_a_workload_loses_and_repeats_nothing(stack, faulted):
    path, pipeline, source, destination = faulted
    printed = _run_through(path, pipeline, source, _sigkill(stack, "kafka", 5))
    assert "Kafka unreachable" in printed or "unreachable" in printed.lower(), printed[-2000:]
    _assert_level(path, source, destination)


def test_postgresql_sigkilled_during_a_workload_loses_and_repeats_nothing(stack, faulted):
    """The source and both PostgreSQL-held parts (the replica, the registry's storage) go down at once."""
    path, pipeline, source, destination = faulted
    _run_through(path, pipeline, source, _sigkill(stack, "postgres", 3))
    _assert_level(path, source, destination)


def test_connect_sigkilled_during_a_workload_loses_and_repeats_nothing(stack, faulted):
    """Debezium re-sends what it had not committed to its offsets when the worker comes back (at least once): the
    replica and the analytics history must still hold each change once."""
    path, pipeline, source, destination = faulted
    _run_through(path, pipeline, source, _sigkill(stack, "connect", 3))
    _assert_level(path, source, destination)
