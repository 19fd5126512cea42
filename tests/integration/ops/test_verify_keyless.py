"""`cdc verify --fix` and `cdc resync` on a table without a primary key, on the real stack: missing, extra and changed
rows (duplicates among them: 3 copies at the source, 2 at the destination) planted on a PostgreSQL replica, a MariaDB
replica and a DuckDB analytics replica are named by `cdc verify`, and `--fix` brings each back to 100 % while the
source keeps writing the table; an independent comparison (plain SQL, its own normal forms) agrees."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import duckdb
import psycopg
from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError

from consumers.ops import resync, verify
from tests.integration.pipelines import (
    CDC,
    applied_pipeline,
    caught_up,
    cdc,
    destination_rows,
    execute,
    purge,
)

ROW = "'2026-01-01 10:00+00', {level}, {msg}, {score}, 10.50, '{{\"b\": [1, 2.50], \"a\": \"x y\"}}', " \
      "'{{a,\"b c\"}}', true, '1 day 02:03:04.5', '2026-01-01'"
SOURCE = f"""
create table log (logged timestamptz, level int, msg text, score real, amount numeric(8, 2), meta jsonb, tags text[],
    ok boolean, spent interval, day date);
insert into log values ({ROW.format(level=1, msg="'start'", score=1.5)}),
    ({ROW.format(level=1, msg="'start'", score=1.5)}),
    ({ROW.format(level=1, msg="'start'", score=1.5)}),
    ({ROW.format(level=2, msg="'warn'", score=6.314)}), ({ROW.format(level=2, msg="'warn'", score=6.314)}),
    ('2026-01-01 10:02+00', 3, null, null, null, null, null, null, null, null),
    ({ROW.format(level=4, msg="'dup'", score=0.1)}), ({ROW.format(level=4, msg="'dup'", score=0.1)});
insert into log select timestamptz '2026-01-02 00:00+00' + g * interval '1 minute', 10 + g, 'row ' || g, g / 3.0,
    g * 1.25, jsonb_build_object('g', g), array['t', g::text], g % 2 = 0, g * interval '1.5 second',
    date '2026-02-01' + g from generate_series(1, 40) g;
"""
COLUMNS = ["logged", "level", "msg", "score", "amount", "meta", "tags", "ok", "spent", "day"]


def plant(kind: str, url: str) -> None:
    """On one destination, in its own SQL: one of three copies of 'start' lost (3 at the source, 2 here), one copy
    of 'warn' changed, the only 'no message' row lost, a third copy of 'dup' (2 at the source), a stray row."""
    cols = ", ".join(COLUMNS + ["_cdc_lsn"])
    stray = cols.replace("level", "9").replace("msg", "'stray'")
    if kind == "duckdb":
        t = '"public.log"'
        statements = [f"delete from {t} where rowid = (select min(rowid) from {t} where level = 1)",
                      f"update {t} set msg = 'changed' where rowid = (select min(rowid) from {t} where level = 2)",
                      f"delete from {t} where level = 3",
                      f"insert into {t} ({cols}) select {cols} from {t} where level = 4 limit 1",
                      f"insert into {t} ({cols}) select {stray} from {t} where level = 4 limit 1"]
        with duckdb.connect(url) as conn:
            for s in statements:
                conn.execute(s)
        return
    if kind == "mariadb":
        statements = ["delete from log where level = 1 limit 1",
                      "update log set msg = 'changed' where level = 2 limit 1"]
    else:
        statements = ["delete from log where ctid = (select min(ctid) from log where level = 1)",
                      "update log set msg = 'changed' where ctid = (select min(ctid) from log where level = 2)"]
    statements += ["delete from log where level = 3",
                   f"insert into log ({cols}) select {cols} from log where level = 4 limit 1",
                   f"insert into log ({cols}) select {stray} from log where level = 4 limit 1"]
    engine = create_engine(url)
    try:
        for attempt in range(5):
            try:
                with engine.begin() as conn:
                    for s in statements:
                        conn.exec_driver_sql(s)
                return
            except DBAPIError as exc:
                # The applier may be writing the table: a deadlock (MariaDB 1213, PostgreSQL 40P01) rolls the
                # damage back whole, so it is planted again, as any script would.
                if attempt == 4 or not re.search(r"\b1213\b|[Dd]eadlock", str(exc.orig)):
                    raise
                time.sleep(0.5)
    finally:
        engine.dispose()


# -- the independent comparison: each engine's rows read with plain SQL, in one normal form of its own ----------------

def normal(row: tuple) -> tuple:
    logged, level, msg, score, amount, meta, tags, ok, spent, day = row
    if isinstance(logged, datetime):
        logged = logged.astimezone(UTC).replace(tzinfo=None) if logged.tzinfo else logged
    if isinstance(meta, str):
        meta = json.loads(meta)
    if isinstance(tags, str):
        tags = json.loads(tags)  # MariaDB holds arrays as JSON
    if isinstance(spent, int):
        spent = timedelta(microseconds=spent)  # MariaDB holds intervals as microseconds
    return (logged, level, msg, None if score is None else f"{float(score):.6g}",
            None if amount is None else Decimal(str(amount)).normalize(),
            None if meta is None else json.dumps(meta, sort_keys=True), None if tags is None else tuple(tags),
            None if ok is None else bool(ok), spent, day if day is None or isinstance(day, date) else None)


def rows(kind: str, url: str) -> Counter:
    """The table's rows at a destination (a DuckDB file's path, or a database URL) as a multiset, normalised."""
    url = f"duckdb:///{url}" if kind == "duckdb" else url
    return Counter(normal(r) for r in destination_rows(url, "log", COLUMNS))


class Writer(threading.Thread):
    """Keeps changing the source table (inserts, updates and deletes of single copies) while the fixes run."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.done, self.error = url, threading.Event(), 0, None

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    row = ROW.format(level=100 + i % 3, msg=repr(f'c{i}'), score=i)
                    conn.execute(f"insert into log values ({row})")
                    conn.execute(f"insert into log values ({row})")
                    if i % 2 == 0:  # one of two equal rows changed, one of two others deleted
                        conn.execute(f"update log set msg = 'c{i} changed' where ctid = "
                                     f"(select ctid from log where msg = 'c{i}' limit 1)")
                        conn.execute(f"delete from log where ctid = (select ctid from log where msg = 'c{i - 1}' "
                                     "limit 1)")
                    if i == 5:  # a copy of a row the destinations lack copies of: the update finds one there
                        conn.execute("update log set score = 2.5 where ctid = (select ctid from log where level = 1 "
                                     "limit 1)")
                    self.done = i
                    time.sleep(0.1)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_verify_fix_brings_a_table_without_a_key_back_on_every_engine_while_the_source_writes(
        stack, source_db, destination_db, mariadb_database, tmp_path, monkeypatch):
    source = stack.postgres_url(source_db)
    execute(source, SOURCE)
    duck = str(tmp_path / "analytics.duckdb")
    urls = {"postgresql": stack.postgres_url(destination_db), "mariadb": mariadb_database, "duckdb": duck}
    names = {"postgresql": "pg", "mariadb": "maria", "duckdb": "duck"}
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.log"], destinations={
        "pg": {"kind": "replica", "url": urls["postgresql"]},
        "maria": {"kind": "replica", "url": mariadb_database},
        "duck": {"kind": "analytics", "url": f"duckdb:///{duck}"}})
    applier = writer = None
    try:
        caught_up(path)
        want = rows("postgresql", source)
        assert sum(want.values()) == 48 and want.most_common(1)[0][1] == 3
        for kind, dest in names.items():
            assert rows(kind, urls[kind]) == want, kind
            clean = cdc(path, "verify", dest, "--json")
            assert clean.returncode == 0, (kind, clean.stdout, clean.stderr)

        for kind, dest in names.items():
            plant(kind, urls[kind])
            result = cdc(path, "verify", dest, "--json", "--settle", "0")
            assert result.returncode == 1, (kind, result.stderr)
            [report] = json.loads(result.stdout)["tables"]
            assert report["keyless"] is True and (report["source_rows"], report["destination_rows"]) == (48, 48)
            assert sorted((r[1], r[2]) for r in report["missing"]) == [(1, "start"), (2, "warn"), (3, None)], \
                (kind, report["missing"])
            assert sorted((r[1], r[2]) for r in report["extra"]) == [(2, "changed"), (4, "dup"), (9, "stray")], \
                (kind, report["extra"])
            assert report["different"] == [] and report["accuracy"] < 1

        # A key makes no sense here, and says so.
        refused = cdc(path, "resync", "public.log", "--ids", "1")
        assert refused.returncode == 2 and "no primary key" in refused.stderr, refused.stderr

        applier = subprocess.Popen([CDC, "-c", str(path), "run"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        writer = Writer(source)
        writer.start()
        for kind, dest in names.items():
            fixed = cdc(path, "verify", dest, "--fix", "--json", "--settle", "3")
            assert fixed.returncode == 0, (kind, fixed.stdout, fixed.stderr)
            [report] = json.loads(fixed.stdout)["tables"]
            assert report["accuracy"] == 1.0 and not report["missing"] and not report["extra"], (kind, report)
            assert "locked against writers" in fixed.stderr and "inserted 1 missing copy" in fixed.stderr, \
                fixed.stderr
            # Writers of the table waited while it was locked: seconds, not the whole run.
            held = float(re.search(r"unlocked after ([\d.]+) s", fixed.stderr).group(1))
            assert held < 20, fixed.stderr
            print(f"{kind}: the source table was locked {held} s")

        # `cdc resync TABLE` without --ids does the same for one destination.
        plant("postgresql", urls["postgresql"])
        resynced = cdc(path, "resync", "public.log", "--dest", "pg", "--json")
        assert resynced.returncode == 0, resynced.stdout + resynced.stderr
        request = json.loads(resynced.stdout)
        assert request["state"] == "complete" and len(request["keys"]) == 6, request

        # A larger table is compared by buckets first (verify's step 1), and only the differing buckets' rows are
        # read: the same fix, with the threshold lowered below the table's size.
        monkeypatch.setattr(verify, "FETCH_ALL_BELOW", 8)
        plant("mariadb", urls["mariadb"])
        request = resync.sync_keyless(pipeline, "public.log", destination="maria", wait=60)
        assert request.state == "complete" and len(request.keys) == 6, request
        time.sleep(1)
        writer.stop.set()
        writer.join(30)
        assert writer.error is None and writer.done >= 10, (writer.error, writer.done)
        applier.terminate()
        applier.wait(60)
        applier = None
        caught_up(path)

        want = rows("postgresql", source)
        assert sum(want.values()) > 48
        for kind, dest in names.items():
            got = rows(kind, urls[kind])
            assert got == want, (kind, "missing", want - got, "extra", got - want)
            final = cdc(path, "verify", dest, "--json")
            assert final.returncode == 0, (kind, final.stdout, final.stderr)
        # The analytics history tells what the fix did: a delete for each surplus copy (one position each), a
        # snapshot read for each copy inserted.
        with duckdb.connect(duck, read_only=True) as conn:
            done = conn.execute("""select _cdc_op, level, msg, _cdc_lsn from "public.log__history"
                                   where _cdc_tx_id = 'cdc resync' order by 2, 3""").fetchall()
        assert sorted((op, level, msg) for op, level, msg, _ in done) == [
            ("d", 2, "changed"), ("d", 4, "dup"), ("d", 9, "stray"), ("r", 1, "start"), ("r", 2, "warn"),
            ("r", 3, None)], done
        assert len({lsn for op, *_, lsn in done if op == "d"}) == 3 and all(lsn > 0 for op, *_, lsn in done
                                                                            if op == "d"), done
        history = [h for h in json.loads(cdc(path, "history", "--json").stdout) if h["table"] == "public.log"]
        assert len(history) == 5 and all(h["state"] == "complete" for h in history), history
        assert sorted(h["destination"] for h in history) == ["duck", "maria", "maria", "pg", "pg"]
    finally:
        if writer is not None:
            writer.stop.set()
        if applier is not None:
            applier.terminate()
            _, err = applier.communicate(timeout=60)
            print("cdc run said:", err.decode(errors="replace")[-5000:])
        purge(pipeline)
