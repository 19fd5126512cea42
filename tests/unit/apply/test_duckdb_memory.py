"""The applier's DuckDB memory limit (issue 15 item 8), on a real DuckDB file: set on every connection the applier's
engine opens, raised when a batch runs out of it (the batch then succeeds), left alone for any other error, and never
imposed on connections of engines that did not ask for it (`cdc query`, verify, backups)."""

from __future__ import annotations

import duckdb
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from consumers.apply.dialects import duckdb as duck
from consumers.apply.dialects.duckdb import DuckDBDialect

# More than a 4 MB limit can hold at once: the primary key's index of these rows must stay in memory.
BIG_INSERT = "insert into t select g, 'item ' || g from range(0, 2000000) r(g)"


def _engine(path):
    return create_engine(f"duckdb:///{path}", poolclass=NullPool)


def _limit_mb(conn) -> float:
    spelled = conn.exec_driver_sql("select current_setting('memory_limit')").scalar()  # "30.5 MiB"
    number, unit = spelled.split()
    return float(number) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]


def test_every_connection_of_the_engine_gets_the_limit_and_others_do_not(tmp_path):
    engine = _engine(tmp_path / "lake.duckdb")
    dialect = DuckDBDialect(engine)
    with engine.connect() as conn:
        unbounded = _limit_mb(conn)
    dialect.limit_memory(32)
    for _ in range(2):  # each new connection (the applier opens one per batch or hold)
        with engine.connect() as conn:
            assert 28 <= _limit_mb(conn) <= 32
    assert unbounded > 1024  # DuckDB's default (80 % of the machine's memory) before the applier asked
    # Another engine on the same file (a reader such as `cdc query`, once the writer let go): DuckDB's default.
    with _engine(tmp_path / "lake.duckdb").connect() as conn:
        assert _limit_mb(conn) == unbounded


def test_a_batch_out_of_memory_raises_the_limit_and_then_succeeds(tmp_path):
    engine = _engine(tmp_path / "lake.duckdb")
    dialect = DuckDBDialect(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("create table t (id bigint primary key, v varchar)")
    dialect.limit_memory(4)
    said = []
    while True:  # as ReplicaApplier.apply does: a new connection and transaction each attempt
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(BIG_INSERT)
            break
        except Exception as exc:  # noqa: BLE001 - the test checks what memory_exhausted makes of it
            line = dialect.memory_exhausted(exc)
            if line is None:
                raise
            said.append(line)
    assert said, "a 4 MB limit should not hold the index of 2,000,000 keys"
    assert said[0].startswith("DuckDB needed more than its memory limit of 4 MB") and "raised to 8 MB" in said[0]
    assert dialect.memory_limit_mb == 4 * 2 ** len(said)
    with engine.connect() as conn:
        assert _limit_mb(conn) <= dialect.memory_limit_mb
    # Read without the limit (a count of distinct keys needs more than the writes did): every row, once.
    with _engine(tmp_path / "lake.duckdb").connect() as conn:
        assert conn.exec_driver_sql("select count(*), count(distinct id) from t").fetchone() == (2_000_000, 2_000_000)


def test_other_errors_and_the_cap_leave_the_limit_alone(tmp_path, monkeypatch):
    engine = _engine(tmp_path / "lake.duckdb")
    dialect = DuckDBDialect(engine)
    out_of_memory = duckdb.OutOfMemoryException("Out of Memory Error: failed to pin block of size 256.0 KiB")
    assert dialect.memory_exhausted(out_of_memory) is None  # no limit asked for: not the applier's to raise
    dialect.limit_memory(64)
    with engine.connect() as conn, pytest.raises(duckdb.Error) as caught:
        conn.connection.driver_connection.execute("select * from no_such_table")
    assert dialect.memory_exhausted(caught.value) is None
    assert dialect.memory_exhausted(ValueError("could not allocate block")) is None
    assert dialect.memory_limit_mb == 64
    monkeypatch.setattr(duck, "MEMORY_LIMIT_CAP_MB", 100)
    assert "raised to 100 MB" in dialect.memory_exhausted(out_of_memory)
    assert dialect.memory_exhausted(out_of_memory) is None  # at DuckDB's own default: the error is reported
    assert dialect.memory_limit_mb == 100
