"""`cdc verify` checks the change histories of analytics destinations (DuckDB and PostgreSQL) on the real stack: no
change stored twice, and each key's last history entry gives its current state. Histories replicated from a source
with inserts, updates, deletes and primary-key updates (single and composite keys) verify consistent; a planted
duplicate and a planted inconsistency are named by table and key, and exit 1."""

from __future__ import annotations

import json
import subprocess

import duckdb
import psycopg

from tests.integration.pipelines import CDC, applied_pipeline, execute, purge

SCHEMA = """
create table item (id int primary key, name text not null, price numeric(8, 2), meta jsonb, tags text[]);
insert into item select g, 'item ' || g, g * 1.5, jsonb_build_object('g', g), array['t' || g]
  from generate_series(1, 30) g;
create table stock (shop int, sku text, qty int, primary key (shop, sku));
alter table stock replica identity full;
insert into stock select s, k, s * 10 from generate_series(1, 3) s, unnest(array['a', 'b', 'c d']) k;
create table note (body text, n int);
alter table note replica identity full;
insert into note values ('x', 1), ('x', 1), ('y', 2);
"""
TABLES = ["public.item", "public.stock", "public.note"]
# Streamed after the snapshot: every op, several changes of one key (some in one transaction), a primary-key update
# (a delete and an insert at one source position), a deleted key inserted again, NULLs set and cleared.
WORKLOAD = [
    "insert into item values (31, 'new', null, null, null), (32, 'gone soon', 1, '{}', '{}')",
    "update item set name = 'second', price = null where id = 2",
    "begin; update item set name = 'third' where id = 2; update item set meta = '{\"a\": [1, 2]}' where id = 2; "
    "delete from item where id = 32; commit",
    "delete from item where id in (5, 6)",
    "insert into item values (5, 'again', 2.5, '[1]', array['x', null])",
    "update item set price = price + 1 where id between 10 and 20",
    "update stock set qty = qty + 1 where shop = 1",
    "update stock set sku = 'z' where shop = 2 and sku = 'b'",
    "delete from stock where shop = 3 and sku = 'c d'",
    "insert into stock values (4, 'a', null)",
    "update note set n = 3 where body = 'y'",
    "insert into note values ('x', 1)",
]


def _verify(cdc, destination: str) -> tuple[int, dict]:
    result = cdc("verify", destination, "--json", "--settle", "0")
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {"stderr": result.stderr}


def _histories(report: dict) -> dict[str, dict]:
    return {t["table"]: t["history"] for t in report["tables"]}


def test_histories_replay_to_the_current_state_and_plants_are_named(stack, source_db, destination_db, tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    file = tmp_path / "lake.duckdb"
    pg = stack.postgres_url(destination_db)
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, TABLES, destinations={
        "lake": {"kind": "analytics", "url": f"duckdb:///{file}"},
        "pglake": {"kind": "analytics", "url": pg}})

    def cdc(*args):
        return subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=300)

    try:
        execute(source, *WORKLOAD)
        caught = cdc("run", "--until-caught-up", "--timeout", "240")
        assert caught.returncode == 0, caught.stdout + caught.stderr

        for destination in ("lake", "pglake"):
            code, report = _verify(cdc, destination)
            assert code == 0 and report["equal"] is True, json.dumps(report, indent=1)
            histories = _histories(report)
            for table in ("public.item", "public.stock"):
                h = histories[table]
                assert h["checked"] is True and h["equal"] is True, (destination, table, h)
                assert h["duplicates"] == 0 and h["inconsistent"] == 0 and h["inconsistent_keys"] == []
            # 30 snapshot reads and 20 changes of item; 9 reads and 7 changes (a key update is two) of stock.
            assert histories["public.item"]["rows"] == 50, histories["public.item"]
            assert histories["public.stock"]["rows"] == 16, histories["public.stock"]
            note = histories["public.note"]
            assert note["checked"] is False and "no primary key" in note["note"] and note["duplicates"] == 0
            assert note["rows"] == 5 and note["equal"] is True, note
            human = cdc("verify", destination, "--settle", "0")
            assert human.returncode == 0 and "history" in human.stdout and "0 duplicate row(s)" in human.stdout

        # Re-syncs append snapshot reads without a source position: no false alarm. Item 3 is re-synced twice (two
        # reads of one key, told apart by their read time); item 12 lost its last change in both the history and
        # the current state (planted), which the re-sync repairs: the read, not the older history entry, is the
        # current row.
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute("delete from public.item__history where id = 12 and _cdc_lsn = "
                         "(select max(_cdc_lsn) from public.item__history where id = 12)")
            conn.execute("update public.item set price = price - 1 where id = 12")
        code, report = _verify(cdc, "pglake")
        assert code == 1 and report["tables"][0]["different"] == [[12]], report
        assert report["tables"][0]["history"]["equal"] is True, report  # the plant left it consistent
        applier = subprocess.Popen([CDC, "-c", str(path), "run", "pglake"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        try:
            for ids in ("3", "3", "12"):
                synced = cdc("resync", "public.item", "--ids", ids, "--dest", "pglake", "--wait", "60")
                assert synced.returncode == 0, synced.stdout + synced.stderr
        finally:
            applier.terminate()
            applier.wait(30)
        with psycopg.connect(pg) as conn:
            reads = conn.execute("select id, count(*) from public.item__history where _cdc_lsn = -1 "
                                 "group by id order by id").fetchall()
        assert reads == [(3, 2), (12, 1)], reads
        code, report = _verify(cdc, "pglake")
        assert code == 0 and report["equal"] is True, json.dumps(report, indent=1)
        assert _histories(report)["public.item"]["rows"] == 50 - 1 + 3

        # DuckDB: one change of item 2 stored twice (as a re-sent transaction would be); stock's row (1, 'a')
        # deleted from the current state with no delete in its history.
        lake = duckdb.connect(str(file))
        try:
            lake.execute("insert into \"public.item__history\" select * from \"public.item__history\" where id = 2 "
                         "and _cdc_lsn = (select max(_cdc_lsn) from \"public.item__history\" where id = 2)")
            lake.execute("delete from \"public.stock\" where shop = 1 and sku = 'a'")
        finally:
            lake.close()
        code, report = _verify(cdc, "lake")
        assert code == 1 and report["equal"] is False, report
        histories = _histories(report)
        assert histories["public.item"]["duplicates"] == 1 and histories["public.item"]["duplicate_keys"] == [[2]]
        assert histories["public.item"]["inconsistent"] == 0 and histories["public.item"]["equal"] is False
        stock = histories["public.stock"]
        assert stock["duplicates"] == 0 and stock["inconsistent"] == 1 and stock["inconsistent_keys"] == [[1, "a"]]
        assert "absent from the current state" in stock["inconsistent_examples"][0]["why"], stock
        assert histories["public.note"]["equal"] is True
        human = cdc("verify", "lake", "--settle", "0")
        assert human.returncode == 1
        assert "public.item__history" in human.stdout and "1 duplicate row(s) (e.g. keys [2])" in human.stdout
        assert "[1, 'a']: absent from the current state" in human.stdout, human.stdout
        assert "2 history table(s) with problems" in human.stdout, human.stdout

        # PostgreSQL: a change of stock (2, 'z') stored twice, and item 7's last change lost from its history only
        # (the current state still equals the source: only the history check can see it).
        execute(source, "update item set name = 'seven' where id = 7")
        assert cdc("run", "pglake", "--until-caught-up", "--timeout", "240").returncode == 0
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute("insert into public.stock__history select * from public.stock__history "
                         "where shop = 2 and sku = 'z'")
            conn.execute("delete from public.item__history where id = 7 and name = 'seven'")
            conn.execute("insert into public.note__history select * from public.note__history where n = 3")
        code, report = _verify(cdc, "pglake")
        assert code == 1 and report["equal"] is False, report
        by_table = {t["table"]: t for t in report["tables"]}
        assert all(t["missing"] == t["extra"] == t["different"] == [] for t in report["tables"]), report
        histories = _histories(report)
        assert histories["public.stock"]["duplicates"] == 1 and histories["public.stock"]["duplicate_keys"] == [
            [2, "z"]] and histories["public.stock"]["inconsistent"] == 0
        item = histories["public.item"]
        assert item["duplicates"] == 0 and item["inconsistent_keys"] == [[7]], item
        assert "differs from its last history entry" in item["inconsistent_examples"][0]["why"]
        # A table without a key: a change stored twice is found by whole row.
        note = by_table["public.note"]["history"]
        assert note["duplicates"] == 1 and note["duplicate_keys"] == [["y", 3]], note
    finally:
        purge(pipeline)
