"""The replica applier on the real stack: equal rows, whole transactions, crashes, hostile names, poison messages."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from tests.integration.pipelines import CDC, caught_up, cdc
from tests.integration.sample import TOTAL, assert_equal, workload


def test_the_destination_equals_the_source_after_a_multi_table_workload(replica):
    path, source, destination = replica
    workload(source, 2000, seed=1)
    run = cdc(path, "run", "--until-caught-up", "--timeout", os.environ.get("CDC_TEST_TIMEOUT", "300"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert_equal(source, destination)
    # Restarting applies nothing twice: the stored offsets are where it resumes.
    again = cdc(path, "run", "--until-caught-up", "--timeout", "120")
    assert again.returncode == 0 and "applied 0 rows" in again.stdout, again.stdout
    with psycopg.connect(destination) as conn:
        stored = conn.execute("select topic, sum(next_offset) from _cdc_offsets group by topic").fetchall()
    assert {t for t, _ in stored} >= {t for t in ("person", "transaction")} or len(stored) >= 2


def test_sigkill_at_random_points_and_a_concurrent_reader_never_see_a_broken_state(replica):
    path, source, destination = replica
    first = cdc(path, "run", "--until-caught-up", "--timeout", "300")  # the snapshot, so the invariant holds
    assert first.returncode == 0, first.stderr
    violations: list[str] = []
    stop_reader = threading.Event()

    def reader() -> None:
        # Every destination commit ends between source transactions, so the total is always the same.
        with psycopg.connect(destination, autocommit=True) as conn:
            while not stop_reader.is_set():
                with conn.transaction():
                    total = conn.execute("select coalesce(sum(balance), 0) from person").fetchone()[0]
                    orphans = conn.execute("select count(*) from enrollment e left join person p "
                                           "on p.id = e.person_id where p.id is null").fetchone()[0]
                if total != TOTAL or orphans:
                    violations.append(f"total {total}, orphans {orphans}")
                time.sleep(0.005)

    writer_done = threading.Event()
    writer = threading.Thread(target=lambda: (workload(source, 10_000, seed=2), writer_done.set()))
    watcher = threading.Thread(target=reader)
    writer.start()
    watcher.start()
    kills = 0
    rng = random.Random(3)
    try:
        while not writer_done.is_set() or kills < 10:
            proc = subprocess.Popen([CDC, "-c", str(path), "run"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(1.0, 4.0))
            if proc.poll() is not None:
                pytest.fail(f"the applier stopped by itself: {proc.stderr.read().decode()[-2000:]}")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        writer.join()
        final = cdc(path, "run", "--until-caught-up", "--timeout", "600")
        assert final.returncode == 0, final.stderr
    finally:
        stop_reader.set()
        watcher.join()
    assert kills >= 10
    assert violations == []
    assert_equal(source, destination)


def test_sigterm_finishes_the_batch_in_flight_and_exits_cleanly(replica):
    path, source, destination = replica
    proc = subprocess.Popen([CDC, "-c", str(path), "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workload(source, 300, seed=4)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "applied" in out
    final = cdc(path, "run", "--until-caught-up", "--timeout", "300")
    assert final.returncode == 0, final.stderr
    assert_equal(source, destination)


def test_a_mariadb_destination_follows_the_same_workload(mariadb_database, sample_pipeline):
    """The second dialect, end to end: the design is not PostgreSQL-only."""
    from sqlalchemy import create_engine

    path, _, source = sample_pipeline({"mirror": {"kind": "replica", "url": mariadb_database}})
    workload(source, 1000, seed=5)
    caught_up(path, 300)
    destination = create_engine(mariadb_database)
    with destination.connect() as conn:
        for table, columns in [("school", "id, name"), ("person", "id, name, balance, mentor_id"),
                               ("enrollment", "id, person_id, school_id, grade, started"),
                               ("attendance", "id, person_id, enrollment_id, day, status")]:
            with psycopg.connect(source) as src:
                expected = [tuple(r) for r in src.execute(f"select {columns} from {table} order by id")]
            got = [tuple(r) for r in conn.exec_driver_sql(f"select {columns} from `{table}` order by id")]
            assert got == expected, table
        total = conn.exec_driver_sql("select sum(balance) from person").scalar()
    destination.dispose()
    assert total == TOTAL
