"""`cdc replay` and `cdc backups` on a DuckDB analytics file, on the real stack: rebuilds end equal to the source with
a consistent history, backups restore the file exactly, a shadow replay never shows readers a partial file."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from cdc import config
from cdc.errors import ConfigError
from consumers.ops import replay as replay_mod
from tests.integration.pipelines import cdc, expire_history
from tests.integration.sample import NAMES, TABLES, changes_around_a_time, rows, workload


@pytest.fixture
def lake(sample_pipeline, tmp_path):
    """A source with the sample schema, its connector, and a DuckDB analytics destination `lake` (no file yet)."""
    file = tmp_path / "analytics.duckdb"
    path, _, source = sample_pipeline({"lake": {"kind": "analytics", "url": f"duckdb:///{file}"}})
    return path, source, file


def read(file: Path, statement: str) -> list[tuple]:
    conn = duckdb.connect(str(file), read_only=True)
    try:
        return conn.execute(statement).fetchall()
    finally:
        conn.close()


def write(file: Path, *statements: str) -> None:
    conn = duckdb.connect(str(file))
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def content(file: Path) -> dict[str, list[tuple]]:
    """Every row of every table in the file (current state, histories, stored offsets): what a restore brings back."""
    conn = duckdb.connect(str(file), read_only=True)
    try:
        names = [r[0] for r in conn.execute("select table_name from information_schema.tables order by 1").fetchall()]
        return {n: conn.execute(f'select * from "{n}" order by all').fetchall() for n in names}
    finally:
        conn.close()


def states(file: Path) -> dict[str, tuple]:
    """Per table of the file: row count and a checksum of every row, read through one read-only connection."""
    conn = duckdb.connect(str(file), read_only=True)
    try:
        names = [r[0] for r in conn.execute("select table_name from information_schema.tables order by 1").fetchall()]
        return {n: conn.execute(f'select count(*), coalesce(sum(hash(t)::hugeint), 0) from "{n}" t').fetchone()
                for n in names}
    finally:
        conn.close()


def columns(file: Path, table: str) -> str:
    """The source's columns of a replicated table, by name (as apply/test_replica.rows orders them)."""
    return ", ".join(f'"{c}"' for (c,) in read(file, "select column_name from information_schema.columns where "
                                                     f"table_name = 'public.{table}' and column_name <> '_cdc_lsn' "
                                                     "order by column_name"))


def assert_equal_to_source(source: str, file: Path) -> None:
    for table in NAMES:
        assert rows(source, table) == read(file, f'select {columns(file, table)} from "public.{table}" order by id'), \
            f"{table} differs"


def assert_history_consistent(file: Path) -> None:
    """For every key in the current state, its newest history row is the current row."""
    for table in NAMES:
        cols = columns(file, table)
        newest = read(file, f"select {cols} from (select *, row_number() over (partition by id order by _cdc_lsn "
                            f'desc, _cdc_commit_ts desc) as n from "public.{table}__history") where n = 1 and '
                            f"_cdc_op <> 'd' and id in (select id from \"public.{table}\") order by id")
        assert newest == read(file, f'select {cols} from "public.{table}" order by id'), f"{table}: history differs"


def histories(file: Path) -> dict[str, list[tuple]]:
    return {name: r for name, r in content(file).items() if name.endswith("__history")}


def damage(file: Path) -> None:
    write(file, 'delete from "public.attendance" where id in (select id from "public.attendance" order by id limit 7)',
          """update "public.person" set name = 'damaged' where id in (select id from "public.person" order by id
             limit 3)""",
          'delete from "public.person__history" where id in (select id from "public.person" order by id limit 2)')


def backup_ids(path: Path) -> list[int]:
    listed = cdc(path, "backups", "list", "lake")
    assert listed.returncode == 0, listed.stderr
    return [int(line.split()[0]) for line in listed.stdout.splitlines()]


def test_full_and_partial_replays_of_a_duckdb_file_and_its_backups(lake):
    path, source, file = lake
    workload(source, 300, seed=21)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    built = histories(file)
    damage(file)
    before = content(file)

    full = cdc(path, "replay", "lake")
    assert full.returncode == 0, full.stdout + full.stderr
    assert "backup 1" in full.stdout
    assert_equal_to_source(source, file)
    assert_history_consistent(file)
    assert histories(file) == built  # rebuilt from the topics: the very rows that running the applier wrote
    assert backup_ids(path) == [1]
    [manifest] = (file.parent / "analytics.duckdb.backups").glob("*.json")
    assert json.loads(manifest.read_text())["tables"] == TABLES

    restored = cdc(path, "backups", "restore", "lake", "1")
    assert restored.returncode == 0, restored.stderr
    assert content(file) == before  # exactly the file from before the replay, histories and offsets included
    assert not Path(f"{file}.wal").exists()

    # No foreign keys in an analytics replica: a parent may be replayed alone, and the other tables stay as they are.
    partial = cdc(path, "replay", "lake", "--tables", "public.person")
    assert partial.returncode == 0, partial.stdout + partial.stderr
    assert rows(source, "person") == read(file, f'select {columns(file, "person")} from "public.person" order by id')
    after = content(file)
    assert after['public.attendance'] == before['public.attendance']  # still damaged: not in the scope
    assert after['public.attendance__history'] == before['public.attendance__history']
    assert backup_ids(path) == [2, 1]
    # Changes keep flowing normally afterwards, into every table and history.
    workload(source, 50, seed=22)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    assert rows(source, "person") == read(file, f'select {columns(file, "person")} from "public.person" order by id')

    # Prune: only backups older than the retention period go (backup 1 made 40 days old in its manifest).
    data = json.loads(manifest.read_text())
    data["created_at"] = (datetime.now(UTC) - timedelta(days=40)).isoformat()
    manifest.write_text(json.dumps(data))
    pruned = cdc(path, "backups", "prune", "lake")
    assert pruned.returncode == 0 and "1 backups dropped" in pruned.stdout, pruned.stdout + pruned.stderr
    assert backup_ids(path) == [2]
    assert not (file.parent / "analytics.duckdb.backups" / data["file"]).exists()
    assert cdc(path, "backups", "restore", "lake", "1").returncode == 1  # gone
    assert "1 backups dropped" in cdc(path, "backups", "prune", "lake", "--days", "0").stdout
    assert backup_ids(path) == []
    assert cdc(path, "replay", "lake", "--no-backup").returncode == 0
    assert_equal_to_source(source, file)
    assert_history_consistent(file)
    assert backup_ids(path) == []


def test_shadow_replay_serves_the_old_file_whole_until_an_atomic_swap(lake):
    path, source, file = lake
    workload(source, 300, seed=23)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    damage(file)
    old = states(file)
    seen: list[dict[str, tuple]] = []
    errors: list[BaseException] = []
    halt = threading.Event()

    def reader() -> None:
        while not halt.is_set():
            try:
                seen.append(states(file))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        shadow = cdc(path, "replay", "lake", "--shadow")
        time.sleep(0.5)  # the reader also sees the new file
    finally:
        halt.set()
        thread.join(30)
    assert shadow.returncode == 0, shadow.stdout + shadow.stderr
    assert "swapped the rebuilt file in; the old one is backup 1" in shadow.stdout
    assert errors == []
    assert_equal_to_source(source, file)
    assert_history_consistent(file)
    new = states(file)
    assert old != new
    assert len(seen) > 5, "the reader hardly ran during the replay"
    for state in seen:
        # The whole file as it was before, or as rebuilt: never an empty or half-built table.
        assert state in (old, new), f"a reader saw {state}"
    assert seen[0] == old and seen[-1] == new
    assert [p.name for p in file.parent.iterdir() if ".shadow-" in p.name] == []
    # The old file became the replay's backup, and restoring it brings back exactly what was served before.
    assert cdc(path, "backups", "restore", "lake", "1").returncode == 0
    assert states(file) == old
    # After a shadow replay the file keeps following the source.
    assert cdc(path, "replay", "lake", "--shadow", "--no-backup").returncode == 0
    assert backup_ids(path) == [1]
    workload(source, 50, seed=24)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    assert_equal_to_source(source, file)
    assert_history_consistent(file)


def test_replay_of_a_duckdb_file_from_a_time_and_from_a_fresh_snapshot(lake, stack):
    path, source, file = lake
    early, since, late = changes_around_a_time(source, seed=25)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    before = histories(file)
    write(file, f'delete from "public.attendance" where id in ({early}, {late})')
    replay = cdc(path, "replay", "lake", "--from", since.isoformat(), "--no-backup")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    present = {r[0] for r in read(file, 'select id from "public.attendance"')}
    assert late in present  # changed after the time: re-applied
    assert early not in present  # changed only before it: left as the file had it
    # The changes re-applied are recorded in the history once, as before.
    assert histories(file) == before

    # Retention deletes the whole history of the hierarchy's topic: only a fresh snapshot can rebuild the file.
    expire_history(stack, path, "public.person")
    damage(file)
    refused = cdc(path, "replay", "lake")
    assert refused.returncode == 1 and "retention deleted the start of the history" in refused.stderr
    rebuilt = cdc(path, "replay", "lake", "--from-snapshot", "--timeout", "120")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "snapshot complete" in rebuilt.stdout
    assert_equal_to_source(source, file)
    assert_history_consistent(file)  # emptied, then rebuilt from the snapshot
    assert {op for (op,) in read(file, 'select distinct _cdc_op from "public.person__history"')} == {"r"}
    workload(source, 30, seed=26)
    assert cdc(path, "run", "--until-caught-up", "--timeout", "300").returncode == 0
    assert_equal_to_source(source, file)
    assert_history_consistent(file)


def test_replays_and_backups_refuse_destinations_they_cannot_rebuild(tmp_path):
    data = {"pipeline": "p", "kafka": {"bootstrap_servers": "127.0.0.1:1", "schema_registry_url": "http://127.0.0.1:1",
                                       "connect_url": "http://127.0.0.1:1"},
            "source": {"url": "postgresql://u@127.0.0.1:1/s", "tables": ["public.t"]},
            "destinations": {"pg_lake": {"kind": "analytics", "url": "postgresql://u@127.0.0.1:1/lake"},
                             "lake": {"kind": "analytics", "url": f"duckdb:///{tmp_path / 'lake.duckdb'}"}}}
    pipeline = config.parse(data, env={})
    for name, problem in (("pg_lake", "not supported for a postgresql analytics destination"),
                          ("nope", "no destination named 'nope'")):
        with pytest.raises(ConfigError, match=problem):
            replay_mod.replay(pipeline, name)
    with pytest.raises(ConfigError, match="choose one"):
        replay_mod.replay(pipeline, "lake", shadow=True, from_snapshot=True)
    # An in-memory DuckDB (nothing to replay into, or back up) is refused when the file loads.
    data["destinations"]["memory"] = {"kind": "analytics", "url": "duckdb:///:memory:"}
    with pytest.raises(ConfigError, match="destinations.memory.url"):
        config.parse(data, env={})
