"""Source-side administration over SQL: replication slots and publications that a pipeline owns."""

from __future__ import annotations

import time

import psycopg


def drop_slot(conn: psycopg.Connection, slot: str, *, wait: float = 30.0) -> bool:
    """Drop a replication slot once its reader has let go of it; False when there was no such slot.

    A deleted connector's task releases the slot a moment after Connect acknowledges the delete, so we wait
    for it to turn inactive rather than fail.
    """
    deadline = time.monotonic() + wait
    while True:
        row = conn.execute("select active from pg_replication_slots where slot_name = %s", (slot,)).fetchone()
        if row is None:
            return False
        if not row[0] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    conn.execute("select pg_drop_replication_slot(%s)", (slot,))
    return True


def slots_of_database(conn: psycopg.Connection, database: str) -> list[str]:
    return [r[0] for r in conn.execute("select slot_name from pg_replication_slots where database = %s", (database,))]
