"""`cdc connectors delete --purge` forgets a connector's stored offsets even when the connector itself is gone
(deleted without --purge, or lost with Connect's configuration): a connector created later under the name must
not resume from a position its source no longer has."""

from __future__ import annotations

import psycopg

from producers import capture
from producers.source_admin import drop_slot
from tests.integration.pipelines import (
    applied_pipeline,
    caught_up,
    cdc,
    execute,
    purge,
    table_rows,
)


def test_purge_resets_the_offsets_a_deleted_connector_left(stack, source_db, destination_db, tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, "create table item (id integer primary key, name text)",
            "insert into item select g, 'i' || g from generate_series(1, 5) g")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.item"], destinations={
        "pg": {"kind": "replica", "url": stack.postgres_url(destination_db)}})
    try:
        caught_up(path)
        # Deleted without --purge: Connect keeps its offsets. Then its slot goes (the source was re-created, say).
        capture.delete(pipeline, purge=False)
        with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
            drop_slot(conn, pipeline.slot_name, wait=10)
        execute(source, "insert into item values (6, 'written while no connector ran')")
        purged = cdc(path, "connectors", "delete", "--purge")
        assert purged.returncode == 0, purged.stdout + purged.stderr
        assert f"connector {pipeline.connector_name}: source offsets reset" in purged.stdout, purged.stdout
        applied = cdc(path, "connectors", "apply")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        caught_up(path)
        status = cdc(path, "connectors", "status")
        assert status.returncode == 0 and "RUNNING" in status.stdout, status.stdout + status.stderr
        assert table_rows(source, "public.item") == table_rows(stack.postgres_url(destination_db), "public.item")
    finally:
        purge(pipeline)
