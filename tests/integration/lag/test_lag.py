"""`cdc lag` on the real stack: idle and caught up, a stopped consumer, Kafka's own view, a failed task, the page."""

from __future__ import annotations

import html
import json
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from producers.connect import ConnectClient
from tests.integration.pipelines import CDC, caught_up, cdc
from tests.integration.sample import workload

REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def lagging(stack, destination_db, sample_pipeline):
    """A source with the sample schema and its connector, a replica destination, caught up once (the snapshot)."""
    path, pipeline, source = sample_pipeline({"state": {"kind": "replica",
                                                        "url": stack.postgres_url(destination_db)}})
    caught_up(path, 300)
    return path, pipeline, source


def lag_json(path: Path, *args: str) -> tuple[int, dict]:
    run = cdc(path, "lag", "--json", *args, timeout=120)
    assert run.returncode in (0, 1), run.stdout + run.stderr
    return run.returncode, json.loads(run.stdout)


def test_an_idle_caught_up_pipeline_reports_zero_seconds_and_ok(lagging):
    path, pipeline, _ = lagging
    time.sleep(3)  # idle: nothing is written at the source from here on
    code, doc = lag_json(path, "--window", "2", "--check")
    assert code == 0, doc
    (dest,) = doc["destinations"]
    assert dest["name"] == "state" and dest["status"] == "OK", dest
    assert dest["lag_messages"] == 0 and dest["lag_seconds"] == 0
    assert all(p["lag_messages"] == 0 and p["lag_seconds"] == 0 for p in dest["partitions"])
    topics = {p["topic"] for p in dest["partitions"]}
    assert topics == {*pipeline.data_topics, pipeline.transaction_topic}
    assert doc["source"]["connector_state"] == "RUNNING"
    assert isinstance(doc["source"]["slot_retained_bytes"], int) and doc["source"]["slot_retained_bytes"] >= 0
    table = cdc(path, "lag", "--window", "0")
    assert table.returncode == 0 and "state" in table.stdout and "OK" in table.stdout, table.stdout + table.stderr
    watch = subprocess.Popen([CDC, "-c", str(path), "lag", "--watch", "--interval", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    watch.send_signal(signal.SIGINT)  # Ctrl-C is how a watch ends: exit 0
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert "state" in out and "OK" in out and "RUNNING" in out, out + err


def test_a_stopped_consumer_shows_growing_lag_then_ok_after_a_run(lagging):
    path, pipeline, source = lagging
    stop = threading.Event()
    writer = threading.Thread(target=workload, args=(source, 100_000, 7, stop))
    started = time.time()
    writer.start()
    try:
        time.sleep(4)
        code1, first = lag_json(path, "--window", "3", "--check")
        time.sleep(3)
        code2, second = lag_json(path, "--window", "3", "--check")
    finally:
        stop.set()
        writer.join()
    a, b = first["destinations"][0], second["destinations"][0]
    assert code1 == 1 and code2 == 1
    assert a["status"] in ("STALL", "STOP") and b["status"] in ("STALL", "STOP"), (a["reason"], b["reason"])
    assert 0 < a["lag_messages"] < b["lag_messages"]
    assert 0 < a["lag_seconds"] < b["lag_seconds"]
    # Measured, not interpolated: the oldest waiting change was committed after the writer started.
    assert a["oldest_unapplied_commit_ts_ms"] == b["oldest_unapplied_commit_ts_ms"]
    assert started - 1 <= a["oldest_unapplied_commit_ts_ms"] / 1000 <= started + 4
    assert b["lag_seconds"] <= time.time() - started + 1
    # The consumer comes back: caught up, zero, OK.
    caught_up(path, 300)
    code, doc = lag_json(path, "--window", "2", "--check")
    dest = doc["destinations"][0]
    assert code == 0 and dest["status"] == "OK" and dest["lag_messages"] == 0 and dest["lag_seconds"] == 0, dest


def kafka_view(bootstrap: str, group: str, partitions: list[tuple[str, int]]) -> tuple[dict, dict]:
    """(group committed offsets, log-end offsets) from the admin client: Kafka's own view."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in partitions])
    committed = admin.list_consumer_group_offsets([request])[group].result(timeout=30)
    groups = {(tp.topic, tp.partition): tp.offset for tp in committed.topic_partitions if tp.offset >= 0}
    ends_future = admin.list_offsets({TopicPartition(t, p): OffsetSpec.latest() for t, p in partitions})
    ends = {(tp.topic, tp.partition): f.result(timeout=30).offset for tp, f in ends_future.items()}
    return groups, ends


def test_the_figures_agree_with_kafkas_own_view(lagging):
    path, pipeline, source = lagging
    workload(source, 300, seed=8)
    caught_up(path, 300)
    workload(source, 150, seed=9)  # committed, not applied: the consumer is not running
    time.sleep(3)  # let Debezium write them to Kafka
    _, doc = lag_json(path, "--window", "0")
    dest = doc["destinations"][0]
    parts = {(p["topic"], p["partition"]): p for p in dest["partitions"]}
    groups, ends = kafka_view(pipeline.kafka.bootstrap_servers, f"cdc-{pipeline.name}-state", list(parts))
    # end offsets are read again after ours, and nothing was written in between
    assert {tp: p["end_offset"] for tp, p in parts.items()} == ends
    assert {tp: p["applied_offset"] for tp, p in parts.items() if tp in groups} == groups
    assert all(p["applied_offset"] == 0 for tp, p in parts.items() if tp not in groups)
    kafka_lag = {tp: ends[tp] - groups.get(tp, 0) for tp in parts}
    assert {tp: p["lag_messages"] for tp, p in parts.items()} == kafka_lag
    assert dest["lag_messages"] == sum(kafka_lag.values()) > 0


def test_a_failed_connector_task_is_error(lagging):
    path, pipeline, source = lagging
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        config = connect.config(pipeline.connector_name)
        assert config is not None
        # The value converter cannot reach its registry: the first change the task converts fails it.
        broken = {**config, "value.converter.apicurio.registry.url": "http://127.0.0.1:1/apis/registry/v2"}
        connect.put_config(pipeline.connector_name, broken)
        deadline = time.monotonic() + 120
        failed = None
        while time.monotonic() < deadline and failed is None:
            with psycopg.connect(source, autocommit=True) as conn:
                conn.execute("insert into school values ((select max(id) + 1 from school), 'broken')")
            time.sleep(2)
            status = connect.status(pipeline.connector_name)
            if status is not None and any(t["state"] == "FAILED" for t in status.tasks):
                failed = status
        assert failed is not None, f"the task did not fail: {connect.status(pipeline.connector_name)}"
    code, doc = lag_json(path, "--window", "1", "--check")
    assert code == 1
    assert doc["destinations"][0]["status"] == "ERROR", doc["destinations"][0]
    assert "FAILED" in doc["destinations"][0]["reason"]
    assert any(t["state"] == "FAILED" for t in doc["source"]["tasks"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", f"--user-data-dir={user_data}",
                           "--virtual-time-budget=8000", *args], capture_output=True, text=True, timeout=120)


def _cells(dom: str) -> dict[str, dict[str, str]]:
    """destination -> field -> (data-value or text) from the rendered table."""
    rows = {}
    for name, body in re.findall(r'<tr data-destination="([^"]+)">(.*?)</tr>', dom, re.S):
        cells = {}
        for attrs, text in re.findall(r"<td ([^>]*)>(.*?)</td>", body, re.S):
            field = re.search(r'data-field="([^"]+)"', attrs).group(1)
            value = re.search(r'data-value="([^"]*)"', attrs)
            cells[field] = html.unescape(value.group(1) if value else text)
        rows[html.unescape(name)] = cells
    return rows


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (infra/setup-system.sh)")
def test_the_page_renders_in_chromium_with_the_numbers_of_lag_json(lagging, tmp_path):
    path, pipeline, source = lagging
    workload(source, 100, seed=10)  # committed and left unapplied: a lag that stands still
    time.sleep(3)
    port = _free_port()
    server = subprocess.Popen([CDC, "-c", str(path), "lag", "--stop-after", "1",
                               "serve", "--port", str(port), "--interval", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "page http://" in line, line + server.stderr.read() if server.poll() is not None else line
        base = f"http://127.0.0.1:{port}"
        for _ in range(60):  # a window of samples, so the status rules have history
            feed = httpx.get(f"{base}/api/lag", timeout=10).json()
            if feed["report"] and len(feed["series"]) >= 3:
                break
            time.sleep(0.5)
        _, doc = lag_json(path, "--window", "2", "--stop-after", "1")
        checked_at = time.time()
        dom = _chromium("--dump-dom", f"{base}/", user_data=tmp_path / "chromium").stdout
        assert 'data-rendered="1"' in dom, dom[-2000:]
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "lag-page.png"
        shot.unlink(missing_ok=True)
        _chromium(f"--screenshot={shot}", "--window-size=1280,900", f"{base}/", user_data=tmp_path / "chromium2")
        assert shot.exists() and shot.stat().st_size > 10_000
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        server.terminate()
        server.wait(timeout=30)
    page = _cells(dom)
    (dest,) = doc["destinations"]
    assert set(page) == {"state"}
    row = page["state"]
    assert dest["lag_messages"] > 0
    assert int(row["lag_messages"]) == dest["lag_messages"]
    assert int(row["oldest_unapplied_commit_ts_ms"]) == dest["oldest_unapplied_commit_ts_ms"]
    assert row["status"] == dest["status"] == "STOP"
    # seconds keep growing while the consumer is stopped; both come from the same commit time
    assert abs(float(row["lag_seconds"]) - dest["lag_seconds"]) <= time.time() - checked_at + 10
    assert re.search(r'id="connector-state"[^>]*>RUNNING<', dom) and doc["source"]["connector_state"] == "RUNNING"
    expected = f'cdc_destination_lag_messages{{destination="state",pipeline="{pipeline.name}"}} ' \
               f'{float(dest["lag_messages"])}'
    assert expected in metrics, metrics[:3000]
    assert f'cdc_destination_status{{destination="state",pipeline="{pipeline.name}",status="STOP"}} 1.0' \
        in metrics
    assert "cdc_slot_retained_bytes" in metrics and "cdc_lag_seconds" in metrics


def test_a_mariadb_destination_reports_its_lag_too(mariadb_database, sample_pipeline):
    """The offsets are read through SQLAlchemy from any dialect; MariaDB's naive DATETIME is UTC."""
    path, _, source = sample_pipeline({"mirror": {"kind": "replica", "url": mariadb_database}})
    caught_up(path, 300)
    finished = time.time()
    code, doc = lag_json(path, "--window", "1", "--check")
    dest = doc["destinations"][0]
    assert code == 0 and dest["status"] == "OK" and dest["lag_messages"] == 0, dest
    assert abs(dest["last_applied_at"] - finished) < 60
    workload(source, 20, seed=11)
    time.sleep(3)
    # One sample (--window 0) cannot tell stuck from moving, but it never says OK with messages waiting.
    code, doc = lag_json(path, "--window", "0", "--check")
    dest = doc["destinations"][0]
    assert code == 1 and dest["status"] == "BEHIND" and dest["lag_messages"] > 0, dest
    code, doc = lag_json(path, "--window", "1", "--stop-after", "0")
    dest = doc["destinations"][0]
    assert dest["status"] == "STOP" and dest["lag_messages"] > 0 and dest["lag_seconds"] > 0, dest
