"""`cdc replay` and `cdc backups` on the real stack: rebuilds end equal to the source, backups restore exactly."""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import UTC, datetime

import psycopg
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from tests.integration.pipelines import CDC, cdc, expire_history
from tests.integration.sample import NAMES, assert_equal, changes_around_a_time, rows, workload


def snapshot(url: str) -> dict[str, list[tuple]]:
    return {t: rows(url, t) for t in NAMES}


def test_full_and_partial_replays_rebuild_and_backups_restore_exactly(replica):
    path, source, destination = replica
    workload(source, 300, seed=6)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    with psycopg.connect(destination, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")  # damage it, past the foreign keys
        conn.execute("delete from attendance where id in (select id from attendance order by id limit 7)")
        conn.execute("update person set name = 'damaged' where id in (select id from person order by id limit 3)")
    before = snapshot(destination)

    full = cdc(path, "replay", "state")
    assert full.returncode == 0, full.stdout + full.stderr
    assert "backup" in full.stdout
    assert_equal(source, destination)
    listed = cdc(path, "backups", "list", "state")
    backup_id = listed.stdout.split()[0]

    restored = cdc(path, "backups", "restore", "state", backup_id)
    assert restored.returncode == 0, restored.stderr
    assert snapshot(destination) == before  # exactly the content from before the replay

    # A partial replay rebuilds only the tables named, and the others stay as they are.
    refused = cdc(path, "replay", "state", "--tables", "public.person")
    assert refused.returncode == 2
    assert "public.attendance, public.enrollment reference the tables to replay" in refused.stderr
    partial = cdc(path, "replay", "state", "--tables", "public.attendance", "--no-backup")
    assert partial.returncode == 0, partial.stdout + partial.stderr
    assert rows(source, "attendance") == rows(destination, "attendance")
    assert rows(destination, "person") == before["person"]  # still damaged: not in the scope
    # Changes keep flowing normally afterwards, and a full replay repairs the rest.
    workload(source, 100, seed=7)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    assert rows(source, "attendance") == rows(destination, "attendance")
    assert cdc(path, "replay", "state", "--no-backup").returncode == 0
    assert_equal(source, destination)


def test_replay_refuses_when_retention_deleted_the_start_of_the_history(replica, stack):
    path, source, destination = replica
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    from cdc import config

    pipeline = config.load(path, env={})
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    topic = pipeline.topic_of("public.attendance")
    from confluent_kafka import Consumer

    probe = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": "replay-test"})
    partition = next(p for p in range(6) if probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] > 1)
    probe.close()
    [future] = admin.delete_records([TopicPartition(topic, partition, 1)]).values()
    future.result()
    before = snapshot(destination)
    refused = cdc(path, "replay", "state")
    assert refused.returncode == 1
    assert f"{topic}[{partition}] starts at offset 1: retention deleted the start of the history" in refused.stderr
    assert snapshot(destination) == before  # nothing was removed


def table_states(url: str) -> dict[str, tuple]:
    """Per table: row count and a checksum of every row's text, read in one statement each."""
    with psycopg.connect(url, autocommit=True) as conn:
        return {t: conn.execute(f"select count(*), coalesce(sum(hashtext(x::text)::bigint), 0) from "
                                f"(select * from {t}) x").fetchone() for t in NAMES}


def test_shadow_replay_serves_the_old_tables_whole_until_an_atomic_swap(replica):
    path, source, destination = replica
    workload(source, 300, seed=11)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    with psycopg.connect(destination, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")
        conn.execute("delete from attendance where id in (select id from attendance order by id limit 5)")
        conn.execute("update person set name = 'damaged' where id in (select id from person order by id limit 3)")
    old = table_states(destination)
    seen: list[dict[str, tuple]] = []
    halt = threading.Event()

    def reader() -> None:
        while not halt.is_set():
            seen.append(table_states(destination))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        shadow = cdc(path, "replay", "state", "--shadow")
    finally:
        halt.set()
        thread.join(30)
    assert shadow.returncode == 0, shadow.stdout + shadow.stderr
    assert "swapped the rebuilt tables in" in shadow.stdout
    assert_equal(source, destination)
    new = table_states(destination)  # the rebuilt tables (their `_cdc_lsn` included, which the source lacks)
    assert old != new
    assert len(seen) > 5, "the reader hardly ran during the replay"
    for state in seen:
        for table in NAMES:
            # Each table as it was before, or as rebuilt: never empty, never half-built.
            assert state[table] in (old[table], new[table]), f"{table}: a reader saw {state[table]}"
    assert seen[0] == old
    with psycopg.connect(destination) as conn:
        leftovers = conn.execute("select nspname from pg_namespace where nspname like '_cdc_shadow%'").fetchall()
    assert leftovers == []
    # The old tables became the replay's backup, and restoring it brings back exactly what was served before.
    backup_id = cdc(path, "backups", "list", "state").stdout.split()[0]
    assert cdc(path, "backups", "restore", "state", backup_id).returncode == 0
    assert table_states(destination) == old
    # After a shadow replay the destination keeps following the source.
    assert cdc(path, "replay", "state", "--shadow", "--no-backup").returncode == 0
    workload(source, 50, seed=12)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    assert_equal(source, destination)


def test_replay_from_a_time_reapplies_only_the_changes_committed_since(replica):
    path, source, destination = replica
    early, since, late = changes_around_a_time(source, seed=13)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    with psycopg.connect(destination, autocommit=True) as conn:
        conn.execute("delete from attendance where id in (%s, %s)", (early, late))
    replay = cdc(path, "replay", "state", "--from", since.isoformat(), "--no-backup")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    with psycopg.connect(destination) as conn:
        present = {r[0] for r in conn.execute("select id from attendance")}
    assert late in present  # changed after the time: re-applied
    assert early not in present  # changed only before it: left as the destination had it
    # A destination behind the time still gets what it never applied, from before the time too.
    with psycopg.connect(source, autocommit=True) as conn:
        person, enrollment = conn.execute("select person_id, id from enrollment order by id limit 1").fetchone()
        conn.execute("insert into attendance values (9000002, %s, %s, current_date, 'unapplied')", (person, enrollment))
    time.sleep(1.5)
    later = datetime.now(UTC)
    behind = cdc(path, "replay", "state", "--from", later.isoformat(), "--no-backup")
    assert behind.returncode == 0, behind.stdout + behind.stderr
    with psycopg.connect(destination) as conn:
        present = {r[0] for r in conn.execute("select id from attendance")}
    assert 9000002 in present and early not in present
    bad = cdc(path, "replay", "state", "--from", "yesterday")
    assert bad.returncode == 2 and "--from: 'yesterday' is neither `earliest` nor an ISO-8601 time" in bad.stderr


def test_replay_from_a_fresh_snapshot_when_retention_deleted_the_history(replica, stack):
    path, source, destination = replica
    workload(source, 100, seed=14)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    expire_history(stack, path, "public.person")
    with psycopg.connect(destination, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")
        conn.execute("update person set name = 'damaged' where id in (select id from person order by id limit 3)")
    assert cdc(path, "replay", "state").returncode == 1  # refused: the history is incomplete
    rebuilt = cdc(path, "replay", "state", "--from-snapshot", "--timeout", "120")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "snapshot complete" in rebuilt.stdout
    assert_equal(source, destination)
    workload(source, 30, seed=15)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    assert_equal(source, destination)


def test_one_applier_at_a_time_writes_a_destination(replica):
    path, source, destination = replica
    workload(source, 50, seed=8)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    assert cdc(path, "replay", "state").returncode == 0  # leaves a backup to try restoring below
    backup_id = cdc(path, "backups", "list", "state").stdout.split()[0]

    def advisory_locks() -> int:
        with psycopg.connect(destination, autocommit=True) as conn:
            return conn.execute("select count(*) from pg_locks where locktype = 'advisory' and granted and "
                                "database = (select oid from pg_database where datname = current_database())"
                                ).fetchone()[0]

    # A `cdc run` left running, as in another terminal.
    running = subprocess.Popen([CDC, "-c", str(path), "run"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while advisory_locks() == 0:
            assert running.poll() is None and time.monotonic() < deadline, "the running applier never claimed it"
            time.sleep(0.2)
        before = snapshot(destination)
        refused = cdc(path, "replay", "state")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "destination state: another applier is writing it" in refused.stderr
        busy_restore = cdc(path, "backups", "restore", "state", backup_id)
        assert busy_restore.returncode == 1 and "another applier is writing it" in busy_restore.stderr
        assert "backup" not in refused.stdout and "emptied" not in refused.stdout
        assert snapshot(destination) == before  # nothing saved, emptied, restored or written
        second = cdc(path, "run", "state", "--until-caught-up", "--timeout", "60")
        assert second.returncode == 1 and "another applier is writing it" in second.stderr
    finally:
        running.kill()  # however it ends, the database ends its session and the claim with it
        running.wait(30)
    workload(source, 20, seed=9)
    replay = cdc(path, "replay", "state", "--no-backup")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert_equal(source, destination)
