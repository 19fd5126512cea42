"""Tables without a primary key stay exact under Debezium's at-least-once delivery (issue 15), on the real stack.

Exact copies of Debezium's messages (same key, value bytes and headers, the transaction topic's BEGIN and END records
too) are written to the topics again, as Debezium re-sends whole transactions after a crash of Connect or of the
broker: copies of transactions already applied, read by the next `cdc run` (across a restart); copies written right
behind their originals (taken along with them); and everything read in one pass by destinations that start from
nothing. The keyless table holds legitimate duplicate rows (equal rows inserted by one statement and by one
transaction), gets several rows at one LSN (a COPY), and is changed by inserts, updates and deletes of one of
several equal rows. The PostgreSQL replica, the MariaDB replica and the DuckDB analytics replica end equal to the
source by an independent multiset comparison (plain SQL on each engine), `cdc verify` agrees, the applier says what
it skipped, and replays (full, partial, shadow, `--from TIME`) and a backup restored still leave the table equal to
the source."""

from __future__ import annotations

import re
import time
from collections import Counter
from datetime import UTC, datetime

import psycopg

from tests.integration.pipelines import (
    applied_pipeline,
    cdc,
    destination_rows,
    end_offsets,
    execute,
    fresh_database,
    fresh_mariadb_database,
    messages_between,
    purge,
    redeliver,
    topic_messages,
)

SCHEMA = """
create table ledger (who text, amount int, note text);
alter table ledger replica identity full;
create table account (id int primary key, balance int not null);
insert into account select g, 100 from generate_series(1, 5) g;
"""
TABLES = ["public.ledger", "public.account"]
# One COPY: its rows share one LSN (a multi-insert), told apart only by their place in the transaction. (Not equal
# rows: `cdc verify` counts equal history entries at one position as duplicates. Equal rows come from multi-row
# INSERTs below, one LSN each.)
COPY_ROWS = [("c", 3, "z"), ("c", 3, "z2"), ("c", 3, None), ("d", 4, None)]
ONE = "(select ctid from ledger where {} limit 1)"  # one of equal rows, as an application changes one
FIRST = [
    "insert into ledger values ('a', 1, 'x'), ('a', 1, 'x'), ('b', 2, 'y')",
    "COPY",
    "update ledger set note = 'x2' where ctid = " + ONE.format("who = 'a'"),
    "delete from ledger where ctid = " + ONE.format("who = 'c'"),
    "begin; insert into ledger values ('e', 5, 'tmp'); update account set balance = balance - 5 where id = 1; "
    "delete from ledger where who = 'e'; insert into ledger values ('e', 5, 'kept'), ('e', 5, 'kept'); commit",
    "update ledger set amount = amount + 10 where who = 'c'",
]
SECOND = [  # each copied right behind its original
    "insert into ledger values ('f', 6, 'n'), ('f', 6, 'n')",
    "update ledger set note = 'f2' where ctid = " + ONE.format("who = 'f'"),
    "delete from ledger where ctid = " + ONE.format("who = 'a' and note = 'x'"),
    "begin; update account set balance = balance + 5 where id = 2; update ledger set amount = 0 where who = 'b'; "
    "insert into ledger values ('g', 7, null); commit",
    "delete from ledger where who = 'd'",
    "COPY",
]


def _write(source: str, statement: str) -> None:
    if statement != "COPY":
        execute(source, statement)
        return
    with psycopg.connect(source, autocommit=True) as conn, \
            conn.cursor().copy("copy ledger (who, amount, note) from stdin") as copy:
        for row in COPY_ROWS:
            copy.write_row(row)


def _write_with_copy_right_behind(stack, decoder, pipeline, source: str, statement: str) -> int:
    """Run one source transaction, wait until Debezium wrote it whole (its END record and the events it counts),
    then write a copy of everything Debezium wrote meanwhile right behind it. Returns the messages copied."""
    topics = [*pipeline.data_topics, pipeline.transaction_topic]
    before = end_offsets(stack, topics)
    _write(source, statement)
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, f"Debezium did not write {statement!r} within 60 s"
        messages = messages_between(stack, before, end_offsets(stack, topics))
        counted = 0
        for m in messages:
            if m.topic() == pipeline.transaction_topic and m.value() is not None:
                record = decoder.decode(m.value())
                if record["status"] == "END":
                    counted += sum(c["event_count"] for c in record.get("data_collections") or ()
                                   if c["data_collection"] in TABLES)
        data = sum(1 for m in messages if m.topic() in pipeline.data_topics and m.value() is not None)
        if counted and data >= counted:
            return redeliver(stack, messages)
        time.sleep(0.3)


def _ledger(url: str) -> Counter:
    """The destination's ledger rows as a multiset, read with the engine's own plain SQL."""
    return Counter(destination_rows(url, "ledger", ["who", "amount", "note"]))


def _accounts(url: str) -> list[tuple]:
    return destination_rows(url, "account", ["id", "balance"])


def _run(path, *destinations: str) -> str:
    result = cdc(path, "run", *destinations, "--until-caught-up", "--timeout", "240")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _skipped(output: str) -> dict[str, int]:
    """Per destination, the keyless changes `cdc run` said it skipped as re-sent."""
    counts: dict[str, int] = {}
    for name, n in re.findall(r"^(\w+): (\d+) re-sent keyless change\(s\) of source transaction\(s\) .* already "
                              r"applied: skipped$", output, re.M):
        counts[name] = counts.get(name, 0) + int(n)
    return counts


def _copies(output: str) -> dict[str, int]:
    """Per destination, the whole re-sent transactions `cdc run` said it skipped (consumers/apply/copies.py)."""
    counts: dict[str, int] = {}
    for name, n in re.findall(r"^(\w+): skipped (\d+) re-sent cop(?:y|ies) of source transactions already applied",
                              output, re.M):
        counts[name] = counts.get(name, 0) + int(n)
    return counts


def _equal_everywhere(source: str, urls: dict[str, str], path) -> None:
    want, accounts = _ledger(source), _accounts(source)
    assert max(want.values()) >= 2  # legitimate duplicates are part of the point
    for name, url in urls.items():
        got = _ledger(url)
        assert got == want, (name, "missing", want - got, "extra", got - want)
        assert _accounts(url) == accounts, name
        verified = cdc(path, "verify", name, "--json", "--settle", "0")
        if verified.returncode != 0:
            print(name, verified.stdout, verified.stderr)
        assert verified.returncode == 0, name


def test_keyless_changes_are_applied_once_whatever_debezium_resends(stack, decoder, source_db, destination_db,
                                                                     mariadb_database, tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    fresh_pg_db = fresh_database(stack, "dst")
    fresh_pg = stack.postgres_url(next(fresh_pg_db))
    fresh_maria_db = fresh_mariadb_database(stack)
    fresh_maria = next(fresh_maria_db)
    urls = {"pg": stack.postgres_url(destination_db), "maria": mariadb_database,
            "duck": f"duckdb:///{tmp_path / 'lake.duckdb'}", "pg2": fresh_pg,
            "maria2": fresh_maria, "duck2": f"duckdb:///{tmp_path / 'fresh.duckdb'}"}
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, TABLES, destinations={
        name: {"kind": "analytics" if url.startswith("duckdb") else "replica", "url": url}
        for name, url in urls.items()})
    try:
        for statement in FIRST:
            _write(source, statement)
        _run(path, "pg", "maria", "duck")
        _equal_everywhere(source, {n: urls[n] for n in ("pg", "maria", "duck")}, path)

        between = datetime.now(UTC)  # for the replay --from TIME below
        time.sleep(0.5)
        # Copies of every transaction applied so far, read by the next run: after a restart of `cdc run`.
        copies = redeliver(stack, topic_messages(stack, [*pipeline.data_topics, pipeline.transaction_topic]))
        assert copies > 20
        # Then transactions each re-sent right behind its original.
        for statement in SECOND:
            assert _write_with_copy_right_behind(stack, decoder, pipeline, source, statement) > 0
        said = _run(path, "pg", "maria", "duck")
        print(said)
        # Every copy was recognised and said: FIRST's transactions, applied by the first run, skipped whole (their
        # commits are at or before the destination's last one), and SECOND's 11 keyless changes, taken along with
        # their originals or in the same batch, by the keyless records.
        skipped_whole = _copies(said)  # every transaction of the topics so far (FIRST's and the set-up's)
        assert set(skipped_whole) == {"pg", "maria", "duck"} and len(set(skipped_whole.values())) == 1, said
        assert skipped_whole["pg"] >= len(FIRST), said
        assert _skipped(said) == {"pg": 11, "maria": 11, "duck": 11}, said
        # Destinations that start from nothing read every original and every copy in one pass: the same.
        said = _run(path, "pg2", "maria2", "duck2")
        print(said)
        assert _copies(said) == {f"{name}2": n for name, n in skipped_whole.items()}, said
        assert _skipped(said) == {"pg2": 11, "maria2": 11, "duck2": 11}, said
        _equal_everywhere(source, urls, path)

        # A replay re-applies on purpose: the records of applied transactions do not keep it from rebuilding the
        # table (its offsets go back before them), and the copies in the topics are still applied once; a partial
        # replay leaves the other tables as they were, records and all.
        for name, *how in (("pg",), ("duck",), ("pg", "--tables", "public.ledger"),
                           ("pg2", "--tables", "public.account"), ("pg2", "--shadow"), ("duck2", "--shadow")):
            replayed = cdc(path, "replay", name, *how, "--no-backup", "--timeout", "240")
            assert replayed.returncode == 0, replayed.stdout + replayed.stderr
            _equal_everywhere(source, {name: urls[name]}, path)
        # And the stream goes on after it.
        execute(source, "insert into ledger values ('h', 8, 'after'), ('h', 8, 'after')",
                "delete from ledger where ctid = " + ONE.format("who = 'h'"))
        _run(path, *urls)
        _equal_everywhere(source, urls, path)
        # A backup put back (its tables and stored offsets as they were) voids the records of what was applied after
        # it: those transactions are applied to the restored table again, once.
        taken = cdc(path, "replay", "pg", "--tables", "public.ledger", "--timeout", "240")
        assert taken.returncode == 0, taken.stdout + taken.stderr
        backup_id = re.search(r"backup (\d+)", taken.stdout + taken.stderr).group(1)
        execute(source, "insert into ledger values ('i', 9, 'x'), ('i', 9, 'x')",
                "delete from ledger where ctid = " + ONE.format("who = 'i'"),
                "update ledger set note = 'y' where who = 'i'")
        _run(path, "pg")
        _equal_everywhere(source, {"pg": urls["pg"]}, path)
        restored = cdc(path, "backups", "restore", "pg", backup_id)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert ("i", 9, "y") not in _ledger(urls["pg"])  # as it was before those changes
        _run(path, "pg")
        _equal_everywhere(source, {"pg": urls["pg"]}, path)
        # A replay --from TIME empties nothing: what the table held stays, and the changes it had applied since
        # TIME are applied again on top, their keyless ones skipped by the records (not inserted twice).
        replayed = cdc(path, "replay", "duck", "--from", between.isoformat(), "--no-backup", "--timeout", "240")
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert _skipped(replayed.stdout + replayed.stderr).get("duck", 0) >= 11, replayed.stdout + replayed.stderr
        _equal_everywhere(source, {"duck": urls["duck"]}, path)
        # And `cdc run` goes on after it: the copies from before TIME it read past at the end of a partition were
        # stored as read (else the run reads them again and waits for END records it is already past).
        execute(source, "insert into ledger values ('j', 10, 'after the replay')")
        after = cdc(path, "run", "duck", "--until-caught-up", "--timeout", "90")
        assert after.returncode == 0, after.stdout + after.stderr
        _equal_everywhere(source, {"duck": urls["duck"]}, path)
    finally:
        purge(pipeline)
        next(fresh_maria_db, None)
        next(fresh_pg_db, None)
