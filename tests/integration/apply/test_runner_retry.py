"""`cdc run` starts a destination's applier again after a transient error: here a real lock wait lost at a real
PostgreSQL destination (another session holds the table its batch writes, and the destination's `lock_timeout` gives
up first). The run says so on one line naming the destination and the reason, starts a fresh applier from the offsets
the destination stored, and ends caught up with the destination equal to the source."""

from __future__ import annotations

import os
import subprocess
import threading

import psycopg

from tests.integration.pipelines import CDC, caught_up
from tests.integration.sample import NAMES, rows, workload


def test_a_lost_lock_wait_starts_the_destination_again_and_it_catches_up(stack, destination_db, sample_pipeline):
    url = stack.postgres_url(destination_db)
    path, _, source = sample_pipeline({"state": {"kind": "replica", "url": url}})
    workload(source, 10, seed=3)
    caught_up(path)  # the tables exist, the snapshot is applied
    with psycopg.connect(url, autocommit=True) as conn:
        # Every new session of the destination gives up waiting for a lock after 300 ms (the applier's too).
        conn.execute(f'alter database "{destination_db}" set lock_timeout = \'300ms\'')
    workload(source, 20, seed=4)
    holder = psycopg.connect(url)
    holder.execute("lock table public.person in access exclusive mode")  # held until rolled back below
    run = subprocess.Popen([CDC, "-c", str(path), "run", "--until-caught-up", "--timeout", "240"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    retried = threading.Event()

    def read() -> None:
        assert run.stdout is not None
        for line in run.stdout:
            lines.append(line)
            if "stopped on a transient error" in line:
                retried.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert retried.wait(180), "".join(lines)
    finally:
        holder.rollback()  # the lock goes: the next attempt writes
        holder.close()
    assert run.wait(240) == 0, "".join(lines)
    reader.join(10)
    said = "".join(lines)
    retry = next(line for line in lines if "stopped on a transient error" in line)
    # One line naming the destination, the reason the driver gave, and when it starts again.
    assert retry.startswith("state: ") and "lock timeout" in retry and "starting it again in" in retry, said
    assert "(attempt 1)" in retry, said
    for name in NAMES:
        assert rows(url, name) == rows(source, name), name
