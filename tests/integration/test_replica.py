"""The replica applier on the real stack: equal rows, whole transactions, crashes, hostile names, poison messages."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from producers import capture
from tests.integration.pipelines import caught_up, pipeline_data, purge, write_pipeline

CDC = str(Path(sys.executable).parent / "cdc")

SCHEMA = """
create table school (id integer primary key, name text not null);
create table person (id bigint primary key, name text not null, balance numeric(14, 2) not null,
                     mentor_id bigint references person (id), updated_at timestamptz not null default now());
create table enrollment (id bigint primary key, person_id bigint not null references person (id),
                         school_id integer not null references school (id) on update cascade,
                         grade integer not null, started date not null);
create table attendance (id bigint primary key, person_id bigint not null references person (id),
                         enrollment_id bigint not null references enrollment (id), day date not null,
                         status text not null);
insert into school select g, 'school ' || g from generate_series(1, 5) g;
insert into person (id, name, balance) select g, 'person ' || g, 1000 from generate_series(1, 50) g;
update person set mentor_id = id - 1 where id > 1 and id % 3 = 0;
insert into enrollment select g, g, 1 + g % 5, 1 + g % 12, date '2025-09-01' from generate_series(1, 50) g;
insert into attendance select g, 1 + g % 50, 1 + g % 50, date '2025-09-01' + g % 30, 'present'
from generate_series(1, 200) g;
"""
TABLES = ["public.school", "public.person", "public.enrollment", "public.attendance"]
HIERARCHIES = {"person": {"root": "public.person",
                          "members": {"public.enrollment": "person_id", "public.attendance": "person_id"}}}
TOTAL = Decimal("50000.00")


def rows(url: str, table: str, order: str = "id") -> list[tuple]:
    """Every row of a table read with plain SQL, without our code; `_cdc_lsn` left out."""
    with psycopg.connect(url) as conn:
        columns = [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = 'public' and table_name = %s "
            "and column_name <> '_cdc_lsn' order by column_name", (table,))]
        query = sql.SQL("select {} from {} order by {}").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table), sql.SQL(order))
        return conn.execute(query).fetchall()


def workload(url: str, transactions: int, seed: int, stop: threading.Event | None = None) -> int:
    """Multi-table source transactions that keep the sum of balances constant at every commit."""
    rng = random.Random(seed)
    done = 0
    with psycopg.connect(url, autocommit=True) as conn:  # each `transaction()` block is a source transaction
        next_person = conn.execute("select max(id) + 1 from person").fetchone()[0]
        next_child = 100_000 + seed * 1_000_000
        for _ in range(transactions):
            if stop is not None and stop.is_set():
                break
            with conn.transaction():
                people = [r[0] for r in conn.execute("select id from person order by random() limit 2")]
                kind = rng.choice(["transfer", "transfer", "create", "delete", "grade", "move", "school"])
                if kind == "transfer" and len(people) == 2:
                    amount = rng.randint(1, 100)
                    conn.execute("update person set balance = balance - %s, updated_at = now() where id = %s",
                                 (amount, people[0]))
                    conn.execute("update person set balance = balance + %s, updated_at = now() where id = %s",
                                 (amount, people[1]))
                elif kind == "create":
                    pid, next_person = next_person, next_person + 1
                    conn.execute("insert into person (id, name, balance, mentor_id) values (%s, %s, 0, %s)",
                                 (pid, f"new {pid}", people[0] if people else None))
                    next_child += 1
                    conn.execute("insert into enrollment values (%s, %s, (select id from school order by random() "
                                 "limit 1), 1, current_date)", (next_child, pid))
                    conn.execute("insert into attendance values (%s, %s, %s, current_date, 'present')",
                                 (next_child, pid, next_child))
                elif kind == "delete" and len(people) == 2 and people[0] != 1:
                    victim, heir = people[0], people[1] if people[1] != people[0] else 1
                    conn.execute("update person set mentor_id = null where mentor_id = %s", (victim,))
                    conn.execute("update person set balance = balance + (select balance from person where id = %s) "
                                 "where id = %s", (victim, heir))
                    conn.execute("delete from attendance where person_id = %s or enrollment_id in "
                                 "(select id from enrollment where person_id = %s)", (victim, victim))
                    conn.execute("delete from enrollment where person_id = %s", (victim,))
                    conn.execute("delete from person where id = %s", (victim,))
                elif kind == "grade":
                    conn.execute("update enrollment set grade = grade %% 12 + 1 where person_id = %s", (people[0],))
                elif kind == "move":
                    # a primary-key update of a member row
                    next_child += 1
                    conn.execute("update attendance set id = %s where id = (select min(id) from attendance "
                                 "where person_id = %s)", (next_child, people[0]))
                else:
                    # a primary-key update of a referenced row: the source cascades it to enrollments
                    sid = conn.execute("select id from school order by random() limit 1").fetchone()[0]
                    conn.execute("update school set id = %s where id = %s", (sid + 100 if sid < 1000 else sid - 100, sid))
            done += 1
    return done


@pytest.fixture
def replica(stack, source_db, tmp_path):
    """A source with the sample schema, its connector, and an empty destination database."""
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
    destination = f"dst_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f'create database "{destination}"')
    data = pipeline_data(stack, source_db, TABLES, hierarchies=HIERARCHIES,
                         destinations={"state": {"kind": "replica", "url": stack.postgres_url(destination)}})
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)
    capture.apply(pipeline)
    yield path, stack.postgres_url(source_db), stack.postgres_url(destination)
    purge(pipeline)
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f'drop database if exists "{destination}" with (force)')


def cdc(path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=timeout)


def assert_equal(source: str, destination: str) -> None:
    for table in ("school", "person", "enrollment", "attendance"):
        assert rows(source, table) == rows(destination, table), f"{table} differs"


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


def test_a_mariadb_destination_follows_the_same_workload(stack, source_db, mariadb_database, tmp_path):
    """The second dialect, end to end: the design is not PostgreSQL-only."""
    from sqlalchemy import create_engine

    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
    data = pipeline_data(stack, source_db, TABLES, hierarchies=HIERARCHIES,
                         destinations={"mirror": {"kind": "replica", "url": mariadb_database}})
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)
    capture.apply(pipeline)
    source = stack.postgres_url(source_db)
    try:
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
    finally:
        purge(pipeline)
