"""Capture keyed by object hierarchy on the real stack: topics, keys, partitions, order, restarts, added tables."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import psycopg

from consumers.apply.stream import ChangeStream
from infra import stack as stack_mod
from producers import capture
from tests.integration.pipelines import pipeline_data, purge, write_pipeline

CDC = str(Path(sys.executable).parent / "cdc")

SCHEMA = """
create table school (id integer primary key, name text not null);
create table person (id bigint primary key, name text not null);
create table enrollment (id bigint primary key, person_id bigint not null references person (id),
                         school_id integer not null references school (id), grade integer not null);
create table account (id bigint primary key, owner text not null, balance numeric(12, 2) not null);
create table ledger (id bigserial primary key, account_id bigint not null references account (id),
                     amount numeric(12, 2) not null);
insert into school select g, 'school ' || g from generate_series(1, 3) g;
insert into account select g, 'owner ' || g, 1000 from generate_series(1, 8) g;
"""
TABLES = ["public.school", "public.person", "public.enrollment", "public.account", "public.ledger"]
HIERARCHIES = {
    "person": {"root": "public.person", "members": {"public.enrollment": "person_id"}},
    "account": {"root": "public.account", "members": {"public.ledger": "account_id"}},
}
ROOT_OF = {"public.person": "id", "public.enrollment": "person_id", "public.account": "id",
           "public.ledger": "account_id", "public.school": "id"}


def run_workload(conn: psycopg.Connection, transactions: int, seed: int = 7) -> tuple[dict[int, int], Counter]:
    """Multi-table source transactions; returns source xid -> commit sequence, and the changes per (table, op)."""
    rng = random.Random(seed)
    persons: dict[int, list[int]] = {}
    next_person, next_enrollment = 1, 1
    order: dict[int, int] = {}
    changes: Counter = Counter()
    for seq in range(transactions):
        with conn.transaction():
            xid = conn.execute("select txid_current()").fetchone()[0]
            kind = rng.choice(["create", "create", "update", "transfer", "transfer", "delete", "school"])
            if kind == "create" or not persons:
                pid, next_person = next_person, next_person + 1
                conn.execute("insert into person values (%s, %s)", (pid, f"p{pid}"))
                persons[pid] = []
                changes["public.person", "c"] += 1
                for _ in range(rng.randint(1, 2)):
                    conn.execute("insert into enrollment values (%s, %s, %s, %s)",
                                 (next_enrollment, pid, rng.randint(1, 3), rng.randint(1, 12)))
                    persons[pid].append(next_enrollment)
                    next_enrollment += 1
                    changes["public.enrollment", "c"] += 1
            elif kind == "update":
                pid = rng.choice(sorted(persons))
                conn.execute("update person set name = name || '+' where id = %s", (pid,))
                changes["public.person", "u"] += 1
                for eid in persons[pid]:
                    conn.execute("update enrollment set grade = grade + 1 where id = %s", (eid,))
                    changes["public.enrollment", "u"] += 1
            elif kind == "transfer":
                a, b = rng.sample(range(1, 9), 2)
                amount = rng.randint(1, 50)
                conn.execute("update account set balance = balance - %s where id = %s", (amount, a))
                conn.execute("update account set balance = balance + %s where id = %s", (amount, b))
                conn.execute("insert into ledger (account_id, amount) values (%s, %s), (%s, %s)",
                             (a, -amount, b, amount))
                changes["public.account", "u"] += 2
                changes["public.ledger", "c"] += 2
            elif kind == "delete":
                pid = rng.choice(sorted(persons))
                for eid in persons.pop(pid):
                    conn.execute("delete from enrollment where id = %s", (eid,))
                    changes["public.enrollment", "d"] += 1
                conn.execute("delete from person where id = %s", (pid,))
                changes["public.person", "d"] += 1
            else:
                conn.execute("update school set name = name || '!' where id = %s", (rng.randint(1, 3),))
                changes["public.school", "u"] += 1
        order[xid] = seq
    return order, changes


def test_changes_are_routed_by_hierarchy_keyed_by_root_and_ordered(stack, decoder, source_db, tmp_path):
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml",
                              pipeline_data(stack, source_db, TABLES, hierarchies=HIERARCHIES,
                                            topics={"partitions": 4}))
    capture.apply(pipeline)
    stream = ChangeStream(stack.kafka_bootstrap, decoder, pipeline.data_topics, group=f"test-{pipeline.name}")
    try:
        snapshot = stream.collect(lambda seen: len(seen) >= 11, timeout=120)
        assert all(e.snapshot for e in snapshot)
        with psycopg.connect(stack.postgres_url(source_db)) as conn:
            order, expected = run_workload(conn, 150)
        total = sum(expected.values())
        events = stream.collect(lambda seen: len(seen) >= total, timeout=180)
    finally:
        stream.close()
        purge(pipeline)

    assert Counter((e.table, e.op) for e in events) == expected
    p = pipeline.name
    topic_of = {"public.person": f"{p}.person", "public.enrollment": f"{p}.person", "public.account": f"{p}.account",
                "public.ledger": f"{p}.account", "public.school": f"{p}.public.school"}
    partitions_of_root: dict[tuple[str, object], set[int]] = defaultdict(set)
    by_partition: dict[tuple[str, int], list] = defaultdict(list)
    for e in events:
        assert e.topic == topic_of[e.table], (e.table, e.topic)
        assert e.key == {"id": e.row[ROOT_OF[e.table]]}, (e.table, e.key, e.row)
        assert e.tx_id is not None and e.tx_order is not None and e.tx_order >= 1
        partitions_of_root[e.topic, e.key["id"]].add(e.partition)
        by_partition[e.topic, e.partition].append(e)
    assert all(len(parts) == 1 for parts in partitions_of_root.values())
    assert len({part for (topic, part) in by_partition if topic == f"{p}.person"}) > 1  # spread, yet never split
    for events_in_partition in by_partition.values():
        events_in_partition.sort(key=lambda e: e.offset)
        positions = [(order[int(e.tx_id.split(":")[0])], e.tx_order) for e in events_in_partition]
        assert positions == sorted(positions), "a partition's events are not in source commit order"


def test_apply_is_idempotent_and_diff_shows_exactly_the_edit(stack, source_db, tmp_path):
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
    data = pipeline_data(stack, source_db, TABLES, hierarchies=HIERARCHIES)
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)

    def cdc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=300)

    try:
        first = cdc("connectors", "apply")
        assert first.returncode == 0, first.stderr
        assert f"connector {pipeline.connector_name}: created" in first.stdout
        assert f"topic {pipeline.name}.person: created" in first.stdout
        second = cdc("connectors", "apply")
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == f"connector {pipeline.connector_name}: unchanged"
        same = cdc("connectors", "diff")
        assert (same.returncode, same.stdout.strip()) == (0, f"connector {pipeline.connector_name}: no changes")

        data["source"]["heartbeat_ms"] = 2500
        data["source"]["snapshot_mode"] = "when_needed"
        write_pipeline(path, data)
        edited = cdc("connectors", "diff")
        assert edited.returncode == 1, edited.stderr
        assert edited.stdout.splitlines() == ["~ heartbeat.interval.ms: 1000 -> 2500",
                                              "~ snapshot.mode: initial -> when_needed"]
        assert cdc("connectors", "apply").stdout.splitlines()[:3] == [
            f"connector {pipeline.connector_name}: updated", "  ~ heartbeat.interval.ms: 1000 -> 2500",
            "  ~ snapshot.mode: initial -> when_needed"]
        status = cdc("connectors", "status")
        assert status.returncode == 0 and "RUNNING" in status.stdout
    finally:
        purge(pipeline)


def test_killing_the_connect_worker_mid_workload_loses_no_change(stack, decoder, source_db, tmp_path):
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml",
                              pipeline_data(stack, source_db, TABLES, hierarchies=HIERARCHIES))
    capture.apply(pipeline)
    stream = ChangeStream(stack.kafka_bootstrap, decoder, pipeline.data_topics, group=f"test-{pipeline.name}")
    result: dict = {}

    def workload() -> None:
        with psycopg.connect(stack.postgres_url(source_db)) as conn:
            for i in range(400):
                with conn.transaction():
                    conn.execute("insert into person values (%s, %s)", (i, f"p{i}"))
                    conn.execute("insert into enrollment values (%s, %s, 1, 1)", (i, i))
                time.sleep(0.02)
        result["done"] = True

    try:
        stream.collect(lambda seen: len(seen) >= 11, timeout=120)
        writer = threading.Thread(target=workload)
        writer.start()
        # Kill the worker once the stream is well under way.
        before_kill = stream.collect(lambda seen: len(seen) >= 100, timeout=120)
        pid = stack_mod.component_pid(stack, "connect")
        os.kill(pid, signal.SIGKILL)
        writer.join(timeout=120)
        assert result.get("done"), "the source workload did not finish"
        stack_mod.up(echo=lambda line: None)  # starts Connect again; the connector resumes from its offsets
        capture.apply(pipeline)  # waits until the connector runs again; its configuration is unchanged
        wanted = {(table, i) for table in ("public.person", "public.enrollment") for i in range(400)}
        after_kill = stream.collect(
            lambda seen: {(e.table, e.row["id"]) for e in before_kill + seen if e.op == "c"} >= wanted, timeout=240)
    finally:
        stream.close()
        purge(pipeline)
    created = Counter((e.table, e.row["id"]) for e in before_kill + after_kill if e.op == "c")
    for i in range(400):
        assert created["public.person", i] >= 1 and created["public.enrollment", i] >= 1, f"change {i} was lost"


def test_a_table_added_to_the_pipeline_is_snapshotted_then_streamed_alone(stack, decoder, source_db, tmp_path):
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("create table course (id integer primary key, title text not null)")
        conn.execute("insert into course select g, 'course ' || g from generate_series(1, 5) g")
    data = pipeline_data(stack, source_db, ["public.school", "public.account"])
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)
    capture.apply(pipeline)
    topics = [*pipeline.data_topics, f"{pipeline.name}.public.course"]
    stream = ChangeStream(stack.kafka_bootstrap, decoder, topics, group=f"test-{pipeline.name}")
    try:
        first = stream.collect(lambda seen: len(seen) >= 11, timeout=120)
        assert Counter(e.table for e in first) == {"public.school": 3, "public.account": 8}
        data["source"]["tables"].append("public.course")
        pipeline = write_pipeline(path, data)
        report = capture.apply(pipeline)
        assert report.action == "updated" and report.snapshot_requested == ["public.course"]
        added = stream.collect(lambda seen: sum(e.table == "public.course" for e in seen) >= 5, timeout=180)
        with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
            conn.execute("insert into course values (6, 'streamed')")
            conn.execute("update school set name = 'renamed' where id = 1")
        later = stream.collect(lambda seen: any(e.table == "public.course" and e.op == "c" for e in seen)
                               and any(e.table == "public.school" for e in seen), timeout=120)
    finally:
        stream.close()
        purge(pipeline)
    snapshot_of_course = [e for e in added if e.table == "public.course"]
    assert sorted(e.row["id"] for e in snapshot_of_course) == [1, 2, 3, 4, 5]
    assert all(e.op == "r" for e in snapshot_of_course)
    # The tables already captured were not snapshotted again.
    assert [e for e in added + later if e.table != "public.course" and e.op == "r"] == []
    assert [(e.table, e.op, e.row["id"]) for e in later] == [("public.course", "c", 6), ("public.school", "u", 1)]


def test_a_hierarchy_added_later_is_snapshotted_without_losing_rows_that_share_a_root(stack, decoder, source_db,
                                                                                      tmp_path):
    """An incremental snapshot de-duplicates a chunk's rows by record key, and a member's key is its root's id:
    rows sharing a root would be lost. Such tables take a blocking snapshot."""
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("insert into person select g, 'p' || g from generate_series(1, 3) g")
        conn.execute("insert into enrollment select g, (g - 1) / 3 + 1, 1, g from generate_series(1, 9) g")
    data = pipeline_data(stack, source_db, ["public.school", "public.account", "public.ledger"],
                         hierarchies={"account": HIERARCHIES["account"]})
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)
    capture.apply(pipeline)
    data["source"]["tables"] += ["public.person", "public.enrollment"]
    data["hierarchies"]["person"] = HIERARCHIES["person"]
    pipeline = write_pipeline(path, data)
    stream = ChangeStream(stack.kafka_bootstrap, decoder, pipeline.data_topics, group=f"test-{pipeline.name}")
    try:
        report = capture.apply(pipeline)
        assert sorted(report.snapshot_requested) == ["public.enrollment", "public.person"]
        seen = stream.collect(lambda events: sum(e.table == "public.enrollment" for e in events) >= 9, timeout=180)
    finally:
        stream.close()
        purge(pipeline)
    enrollments = [e for e in seen if e.table == "public.enrollment"]
    assert sorted(e.row["id"] for e in enrollments) == list(range(1, 10))
    assert {e.topic for e in enrollments} == {pipeline.topic_of("public.person")}
