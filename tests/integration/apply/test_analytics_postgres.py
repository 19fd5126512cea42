"""The analytics replica on PostgreSQL, on the real stack: equal to the source, a change history that answers "the
value of row X as of time T", and read-only for its users (`cdc query` and the read-only role's own logins)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from datetime import date, datetime
from decimal import Decimal

import psycopg
import pytest
import yaml
from psycopg import errors
from sqlalchemy import make_url

from cdc import config
from consumers.apply.dialects.postgres import reader_password_file
from producers import capture
from tests.integration.pipelines import CDC, pipeline_data, purge
from tests.integration.sample import NAMES, SCHEMA, TABLES, rows, workload

READER_PASSWORD = "reader-" + uuid.uuid4().hex[:12]


@pytest.fixture
def lake(stack, source_db, tmp_path):
    """A source with the sample schema and its connector; two PostgreSQL analytics destinations: `lake` with a named
    read-only role that logs in with a password from the environment, and one with the default role, which logs in
    with the password `cdc run` generates for it."""
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("alter table enrollment replica identity full")  # Debezium's delete events carry the whole row
    suffix = uuid.uuid4().hex[:8]
    databases = [f"ana_{suffix}", f"mart_{suffix}"]
    mart = f"mart_{suffix}"
    reader = f"analyst_{suffix}"
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        for database in databases:
            conn.execute(f'create database "{database}"')
    data = pipeline_data(stack, source_db, TABLES, destinations={
        "lake": {"kind": "analytics", "url": stack.postgres_url(databases[0]), "read_only_role": reader,
                 "read_only_password": "${READER_PASSWORD}"},
        mart: {"kind": "analytics", "url": stack.postgres_url(databases[1])}})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    pipeline = config.load(path, env={"READER_PASSWORD": READER_PASSWORD})
    capture.apply(pipeline)
    try:
        yield pipeline, path, {"lake": databases[0], mart: databases[1]}
    finally:
        purge(pipeline)
        with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
            for database in databases:
                conn.execute(f'drop database if exists "{database}" with (force)')
            for role in (reader, f"cdc_reader_{mart}"):
                conn.execute(f'drop role if exists "{role}"')
        reader_password_file(make_url(stack.postgres_url()), f"cdc_reader_{mart}").unlink(missing_ok=True)


def cdc(path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "READER_PASSWORD": READER_PASSWORD})


def moment(conn: psycopg.Connection) -> datetime:
    """A time after everything committed so far and before anything committed next (the caller sleeps)."""
    at = conn.execute("select clock_timestamp()").fetchone()[0]
    time.sleep(0.15)
    return at


def as_of(url: str, table: str, key: int, at: datetime) -> tuple | None:
    """The row `key` of `table` as of `at`, from its history with plain SQL: None when it did not exist."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            f"select name, balance, _cdc_op from public.{table}__history where id = %s and _cdc_commit_ts <= %s "
            "order by _cdc_commit_ts desc, _cdc_lsn desc limit 1", (key, at)).fetchone()
    return None if found is None or found[2] == "d" else found[:2]


def test_postgres_analytics_replica_history_and_read_only_role(stack, source_db, lake):
    pipeline, path, databases = lake
    source = stack.postgres_url(source_db)
    lake_url = stack.postgres_url(databases["lake"])
    mart = next(name for name in databases if name != "lake")
    reader = pipeline.destinations["lake"].read_only_role

    # The snapshot first, so that every scripted change below is streamed with its own commit time.
    first = cdc(path, "run", "--until-caught-up", "--timeout", "240")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"lake: created read-only role {reader}" in first.stdout
    assert f"{mart}: created read-only role cdc_reader_{mart}" in first.stdout

    # A scripted life of person 1 and of a new person 500, each step committed before a known moment.
    with psycopg.connect(source, autocommit=True) as conn:
        before = moment(conn)
        conn.execute("update person set name = 'alice', balance = 10 where id = 1")
        t_alice = moment(conn)
        with conn.transaction():  # one source transaction over both tables, person 1 changed twice in it
            conn.execute("update person set name = 'bob' where id = 1")
            conn.execute("update person set balance = 20 where id = 1")  # same commit time, a later LSN
            conn.execute("insert into person (id, name, balance) values (500, 'carol', 5)")
            conn.execute("insert into enrollment values (900, 500, 1, 5, date '2025-09-01')")
        t_bob = moment(conn)
        conn.execute("update person set balance = 30 where id = 1")
        conn.execute("update person set name = 'dave' where id = 500")
        t_thirty = moment(conn)
        with conn.transaction():
            conn.execute("delete from enrollment where person_id = 500")
            conn.execute("delete from person where id = 500")
        t_gone = moment(conn)
        conn.execute("update person set name = 'erin' where id = 1")
    workload(source, 120, seed=3)  # never renames or deletes person 1

    # A second run prepares again (the role and its grants are idempotent) and applies the rest.
    result = cdc(path, "run", "--until-caught-up", "--timeout", "240")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "created read-only role" not in result.stdout

    # The current state equals the source, row by row, both sides read with plain SQL.
    for table in NAMES:
        source_rows = rows(source, table)
        assert len(source_rows) > 20 or table == "school", table
        assert rows(lake_url, table) == source_rows, table
        assert rows(stack.postgres_url(databases[mart]), table) == source_rows, table

    # "The value of row X as of time T", for the scripted sequence.
    assert as_of(lake_url, "person", 1, before) == ("person 1", Decimal("1000.00"))
    assert as_of(lake_url, "person", 1, t_alice) == ("alice", Decimal("10.00"))
    assert as_of(lake_url, "person", 1, t_bob) == ("bob", Decimal("20.00"))
    assert as_of(lake_url, "person", 1, t_thirty) == ("bob", Decimal("30.00"))
    assert as_of(lake_url, "person", 1, t_gone) == ("bob", Decimal("30.00"))
    assert as_of(lake_url, "person", 500, t_alice) is None
    assert as_of(lake_url, "person", 500, t_bob) == ("carol", Decimal("5.00"))
    assert as_of(lake_url, "person", 500, t_thirty) == ("dave", Decimal("5.00"))
    assert as_of(lake_url, "person", 500, t_gone) is None
    # The history's newest version of every key is the current state: the whole history, in the right order.
    newest = ("select id, name, balance, mentor_id, updated_at from (select distinct on (id) * "
              "from public.person__history order by id, _cdc_commit_ts desc, _cdc_lsn desc) h where _cdc_op <> 'd' "
              "order by id")
    with psycopg.connect(source) as conn:
        current = conn.execute("select id, name, balance, mentor_id, updated_at from person order by id").fetchall()
    with psycopg.connect(lake_url) as conn:
        assert conn.execute(newest).fetchall() == current
        assert conn.execute("select count(*) from public.person__history h where _cdc_lsn is null "
                            "or _cdc_commit_ts is null or _cdc_op not in ('r', 'c', 'u', 'd')").fetchone() == (0,)

    with psycopg.connect(lake_url) as conn:
        # Every change in order; a delete with the row as it was (the whole row with REPLICA IDENTITY FULL, only
        # the key otherwise); a snapshot read as `r`; the changes of one source transaction under one id.
        assert conn.execute("select _cdc_op from public.person__history where id = 500 "
                            "order by _cdc_lsn").fetchall() == [("c",), ("u",), ("d",)]
        first = (500, 1, 5, date(2025, 9, 1))
        assert conn.execute("select person_id, school_id, grade, started, _cdc_op from public.enrollment__history "
                            "where id = 900 order by _cdc_lsn").fetchall() == [(*first, "c"), (*first, "d")]
        assert conn.execute("select count(*) from public.enrollment__history where _cdc_op = 'r'").fetchone() == (50,)
        tx = conn.execute("select distinct _cdc_tx_id from public.person__history where id = 500 and _cdc_op = 'c' "
                          "union select distinct _cdc_tx_id from public.enrollment__history where id = 900 "
                          "and _cdc_op = 'c'").fetchall()
        assert len(tx) == 1 and tx[0][0]
        # No foreign keys on analytics tables.
        assert conn.execute("select count(*) from pg_constraint where contype = 'f'").fetchone() == (0,)

    # The read-only roles: LOGIN roles (with the configured password, or a generated one), read-only by default,
    # SELECT only.
    with psycopg.connect(stack.postgres_url()) as conn:
        assert conn.execute("select rolcanlogin, rolconfig from pg_roles where rolname = %s",
                            (reader,)).fetchone() == (True, ["default_transaction_read_only=on"])
        assert conn.execute("select rolcanlogin, rolconfig from pg_roles where rolname = %s",
                            (f"cdc_reader_{mart}",)).fetchone() == (True, ["default_transaction_read_only=on"])
    reader_url = f"postgresql://{reader}:{READER_PASSWORD}@127.0.0.1:{stack.ports['postgres']}/{databases['lake']}"
    expected = rows(source, "person")
    with psycopg.connect(reader_url) as conn:
        assert conn.execute("select count(*) from public.person").fetchone() == (len(expected),)
        assert conn.execute("select count(*) > 0 from public.enrollment__history").fetchone() == (True,)
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("update public.person set balance = 0")
        conn.rollback()
        conn.read_only = False  # even a transaction it makes read-write cannot write: it holds SELECT only
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("update public.person set balance = 0")
        conn.rollback()
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("select * from _cdc_offsets")

    # `cdc query`: reads as the read-only role, in the DuckDB path's output format.
    read = cdc(path, "query", "select count(*) as n, sum(balance) as total from public.person", "--json")
    assert read.returncode == 0, read.stderr
    with psycopg.connect(source) as conn:
        n, total = conn.execute("select count(*), sum(balance) from person").fetchone()
    assert json.loads(read.stdout) == [{"n": n, "total": str(total)}]
    text = cdc(path, "query", "select current_user as who, name from public.person where id = 1")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == ["who\tname", f"{reader}\terin"]
    mart_read = cdc(path, "query", "--dest", mart, "select current_user as who, count(*) as n from public.enrollment "
                    "group by 1")
    assert mart_read.returncode == 0, mart_read.stderr
    assert mart_read.stdout.splitlines()[1] == f"cdc_reader_{mart}\t{len(rows(source, 'enrollment'))}"

    # Writes are refused with one clear line and exit 1, and so are the tricks around the role; nothing changes.
    for statement in ("insert into public.person values (9999, 'x', 0, null, now())",
                      "update public.person set balance = 0",
                      "delete from public.enrollment",
                      "create table public.intruder (i int)",
                      "drop table public.person",
                      "truncate public.enrollment",
                      "do $$ begin execute 'reset role'; delete from public.person; end $$",
                      "with gone as (delete from public.person returning 1) select count(*) from gone"):
        refused = cdc(path, "query", statement)
        assert refused.returncode == 1, (statement, refused.stdout, refused.stderr)
        assert refused.stderr.startswith("error: the analytics replica is read-only: "), (statement, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    for statement in ("reset role; delete from public.person", "commit; delete from public.person",
                      "set transaction read write; update public.person set balance = 0"):
        refused = cdc(path, "query", statement)
        assert refused.returncode == 1, (statement, refused.stdout, refused.stderr)
        assert "one statement at a time" in refused.stderr, (statement, refused.stderr)
    lifted = cdc(path, "query", "select set_config('transaction_read_only', 'off', false)")
    assert lifted.returncode == 1 and "read-write mode" in lifted.stderr, lifted.stderr
    private = cdc(path, "query", "select * from _cdc_offsets")
    assert private.returncode == 1 and "permission denied" in private.stderr, private.stderr
    assert rows(lake_url, "person") == expected
    assert rows(lake_url, "enrollment") == rows(source, "enrollment")
    with psycopg.connect(lake_url) as conn:
        assert conn.execute("select to_regclass('public.intruder')").fetchone() == (None,)


def test_a_role_the_applier_did_not_create_is_left_alone_and_refused(stack):
    from sqlalchemy import BigInteger, create_engine

    from cdc.errors import ConfigError
    from cdc.source_tables import ColumnShape, TableShape
    from consumers.apply.dialects import dialect_for
    from consumers.apply.dialects.postgres import PostgresAnalyticsDialect, PostgresDialect

    outsider = f"outsider_{uuid.uuid4().hex[:8]}"
    engine = create_engine(stack.postgres_url(driver="psycopg"))
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f"create role {outsider} login password 'secret'")
    try:
        assert type(dialect_for(engine)) is PostgresDialect  # replicas keep their dialect
        dialect = dialect_for(engine, "analytics")
        assert isinstance(dialect, PostgresAnalyticsDialect)
        with (pytest.raises(ConfigError, match=f"the role {outsider} already exists and was not created by cdc"),
              engine.begin() as conn):
            dialect.grant_read_only(conn, outsider, None)
        with psycopg.connect(stack.postgres_url()) as conn:
            assert conn.execute("select rolcanlogin, rolconfig from pg_roles where rolname = %s",
                                (outsider,)).fetchone() == (True, None)
        # A table whose history table's name PostgreSQL would truncate is refused before anything is created.
        long = TableShape(f"public.{'t' * 56}", (ColumnShape("id", BigInteger(), False),), ("id",))
        with pytest.raises(ConfigError, match="longer than PostgreSQL's 63-byte identifiers"), engine.begin() as conn:
            dialect.ensure_table(conn, long, {long.name: long})
    finally:
        engine.dispose()
        with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
            conn.execute(f"drop role if exists {outsider}")
