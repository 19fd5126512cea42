"""The applier keeps a DuckDB file open between batches only while behind, and never shuts readers out for long."""

import subprocess
import sys
import time

import yaml

from cdc import config
from consumers import applier as applier_module
from consumers.applier import ReplicaApplier


def make_applier(tmp_path):
    data = {"pipeline": "hold", "kafka": {"bootstrap_servers": "127.0.0.1:1", "schema_registry_url": "http://127.0.0.1:1",
                                          "connect_url": "http://127.0.0.1:1"},
            "source": {"url": "postgresql://u:p@127.0.0.1:1/db", "tables": ["public.t"]},
            "destinations": {"lake": {"kind": "analytics", "url": f"duckdb:///{tmp_path / 'lake.duckdb'}"}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return ReplicaApplier(config.load(path, env={}), "lake"), tmp_path / "lake.duckdb"


def reader_gets_in(path) -> bool:
    """Whether another process can open the file to read it now."""
    code = f"import duckdb; duckdb.connect({str(path)!r}, read_only=True).close()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_the_file_stays_open_between_batches_while_behind_and_is_let_go_after(tmp_path):
    a, path = make_applier(tmp_path)
    with a._begin() as conn:
        conn.exec_driver_sql("create table t (x integer)")
    assert reader_gets_in(path), "a batch with nothing behind it closes the file"
    with a._begin(hold=True) as conn:
        conn.exec_driver_sql("insert into t values (1)")
    assert not reader_gets_in(path), "behind: the file should stay open for the next batch"
    with a._begin(hold=True) as conn:  # the next batch uses the held connection and sees the last one's rows
        assert conn.exec_driver_sql("select count(*) from t").scalar() == 1
    a._release()
    assert reader_gets_in(path)
    a.engine.dispose()


def test_after_holding_the_file_long_enough_readers_get_a_window(tmp_path, monkeypatch):
    monkeypatch.setattr(applier_module, "HOLD_S", 0.0)
    monkeypatch.setattr(applier_module, "READER_WINDOW_S", 1.5)
    a, path = make_applier(tmp_path)
    with a._begin(hold=True) as conn:
        conn.exec_driver_sql("create table t (x integer)")
    assert reader_gets_in(path), "held for HOLD_S: the file is closed"
    started = time.monotonic()
    with a._begin(hold=True) as conn:
        conn.exec_driver_sql("insert into t values (1)")
    assert time.monotonic() - started >= 1.0, "the next batch should have left readers their window first"
    a._release()
    a.engine.dispose()
