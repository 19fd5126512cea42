"""`cdc replay` and `cdc backups` on the real stack: rebuilds end equal to the source, backups restore exactly."""

from __future__ import annotations

import subprocess

import psycopg
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from tests.integration.test_replica import CDC, assert_equal, replica, rows, workload  # noqa: F401 - fixture

TABLES = ("school", "person", "enrollment", "attendance")


def snapshot(url: str) -> dict[str, list[tuple]]:
    return {t: rows(url, t) for t in TABLES}


def cdc(path, *args, timeout=600):
    return subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=timeout)


def test_full_and_partial_replays_rebuild_and_backups_restore_exactly(replica):  # noqa: F811
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


def test_replay_refuses_when_retention_deleted_the_start_of_the_history(replica, stack):  # noqa: F811
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
