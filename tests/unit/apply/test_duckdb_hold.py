"""The applier keeps a DuckDB file open between batches only while behind, and never shuts readers out for long.

Time is a fake clock here (`time` of consumers/apply/writer.py): the tests say what happens in which order
as the clock moves, never how long the machine took."""

import subprocess
import sys

import pytest
import yaml

from cdc import config
from consumers.apply import writer as writer_module
from consumers.apply.applier import ReplicaApplier


class Clock:
    """Stands in for the `time` module inside the applier: `sleep` moves the clock and is written to `events`,
    beside the connections the applier opens, so a test can read the order of the two."""

    def __init__(self, events: list) -> None:
        self.now = 1000.0
        self.events = events
        self.on_sleep = lambda: None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.events.append(("sleep", seconds))
        self.on_sleep()
        self.now += seconds


@pytest.fixture
def lake(tmp_path, monkeypatch):
    """An analytics applier on a DuckDB file, on a fake clock; yields (applier, file, clock, events)."""
    data = {"pipeline": "hold", "kafka": {"bootstrap_servers": "127.0.0.1:1", "schema_registry_url": "http://127.0.0.1:1",
                                          "connect_url": "http://127.0.0.1:1"},
            "source": {"url": "postgresql://u:p@127.0.0.1:1/db", "tables": ["public.t"]},
            "destinations": {"lake": {"kind": "analytics", "url": f"duckdb:///{tmp_path / 'lake.duckdb'}"}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    events: list = []
    clock = Clock(events)
    monkeypatch.setattr(writer_module, "time", clock)
    applier = ReplicaApplier(config.load(path, env={}), "lake")
    writer = applier.writer  # where the destination's connections are made and held (consumers/apply/writer.py)
    connect = writer._connect

    def counted_connect():
        events.append(("connect",))
        return connect()

    monkeypatch.setattr(writer, "_connect", counted_connect)
    yield writer, tmp_path / "lake.duckdb", clock, events
    writer.release()
    applier.close()


def reader_gets_in(path) -> bool:
    """Whether another process can open the file to read it now."""
    code = f"import duckdb; duckdb.connect({str(path)!r}, read_only=True).close()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_the_file_stays_open_between_batches_while_behind_and_is_let_go_after(lake):
    a, path, clock, events = lake
    with a.begin() as conn:
        conn.exec_driver_sql("create table t (x integer)")
    assert reader_gets_in(path), "a batch with nothing behind it closes the file"
    with a.begin(hold=True) as conn:
        conn.exec_driver_sql("insert into t values (1)")
    assert not reader_gets_in(path), "behind: the file should stay open for the next batch"
    with a.begin(hold=True) as conn:  # the next batch uses the held connection and sees the last one's rows
        assert conn.exec_driver_sql("select count(*) from t").scalar() == 1
    assert events == [("connect",), ("connect",)], "the second batch reused the held connection, nobody waited"
    a.release()
    assert reader_gets_in(path)


def test_after_holding_the_file_long_enough_readers_get_a_window(lake):
    a, path, clock, events = lake
    with a.begin(hold=True) as conn:
        conn.exec_driver_sql("create table t (x integer)")
        clock.now += writer_module.HOLD_S  # a batch that ends HOLD_S after the file was opened
    assert reader_gets_in(path), "held for HOLD_S: the file is closed"
    window: list[bool] = []
    clock.on_sleep = lambda: window.append(reader_gets_in(path))
    with a.begin(hold=True) as conn:
        conn.exec_driver_sql("insert into t values (1)")
    # The next batch left readers their window first (the file closed the while), then opened the file again.
    assert events == [("connect",), ("sleep", pytest.approx(writer_module.READER_WINDOW_S)), ("connect",)]
    assert window == [True], "a reader could open the file during the window"
    with a.begin(hold=True) as conn:  # opened just now: held again, no window owed
        assert conn.exec_driver_sql("select count(*) from t").scalar() == 1
    assert events[3:] == [], "within HOLD_S the held connection serves the next batch"


def test_a_window_that_has_passed_already_is_not_waited_for(lake):
    a, path, clock, events = lake
    with a.begin(hold=True) as conn:
        conn.exec_driver_sql("create table t (x integer)")
        clock.now += writer_module.HOLD_S
    clock.now += writer_module.READER_WINDOW_S  # readers had their window while the applier did other work
    with a.begin(hold=True) as conn:
        conn.exec_driver_sql("insert into t values (1)")
    assert events == [("connect",), ("connect",)]
