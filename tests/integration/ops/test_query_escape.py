"""`cdc query` as a boundary, on the real stack: every known way out of it (issue 15), on a PostgreSQL and on a DuckDB
analytics replica, is refused with one clear line and exit status 1, and leaves no trace (no file written, no row
changed, no session of the applier's user touched); ordinary SELECTs, over the tables and their histories, still work.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import uuid
from pathlib import Path

import duckdb
import psycopg
import pytest
from sqlalchemy import make_url

from consumers.apply.dialects.postgres import reader_password_file
from producers import capture
from tests.integration.pipelines import CDC, caught_up, fresh_database, pipeline_data, purge, write_pipeline
from tests.integration.sample import rows

SCHEMA = """
create table account (id bigint primary key, owner text not null, balance numeric(12, 2) not null);
insert into account select g, 'owner ' || g, 100 + g from generate_series(1, 30) g;
"""
TABLES = ["public.account"]


@pytest.fixture(scope="module")
def replicas(stack, tmp_path_factory):
    """One source table with a streamed history (updates and a delete after the snapshot), replicated into a DuckDB
    file and a PostgreSQL database whose read-only role has no password in the pipeline file (`cdc run` generates
    one). Also a second DuckDB file, a CSV file with a secret and a directory: what the escapes aim at."""
    work = tmp_path_factory.mktemp("query_escape")
    source_gen = fresh_database(stack, "src")
    source_db = next(source_gen)
    lake_gen = fresh_database(stack, "lake")
    lake_db = next(lake_gen)
    source = stack.postgres_url(source_db)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(SCHEMA)
    name = f"q{uuid.uuid4().hex[:8]}"
    duck = work / "analytics.duckdb"
    path = work / "pipeline.yaml"
    pipeline = write_pipeline(path, pipeline_data(stack, source_db, TABLES, name=name, destinations={
        "duck": {"kind": "analytics", "url": f"duckdb:///{duck}"},
        # A role of its own (roles belong to the server, not to a database), with no password: one is generated.
        "pg": {"kind": "analytics", "url": stack.postgres_url(lake_db), "read_only_role": f"reader_{name}"}}))
    role = pipeline.destinations["pg"].read_only_role
    other = work / "other.duckdb"
    with duckdb.connect(str(other)) as conn:
        conn.execute("create table t as select range as i from range(5)")
    secret = work / "secret.csv"
    secret.write_text("name,password\nadmin,hunter2-" + uuid.uuid4().hex + "\n")
    capture.apply(pipeline)
    try:
        caught_up(path)  # the snapshot first: the changes below are streamed with their own LSNs
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("update account set owner = 'alice' where id = 1")
            conn.execute("update account set balance = 7 where id = 1")
            conn.execute("delete from account where id = 30")
        caught_up(path)
        yield {"path": path, "source": source, "lake": stack.postgres_url(lake_db), "duck": duck, "other": other,
               "secret": secret, "work": work, "role": role, "stack": stack}
    finally:
        def drop_lake() -> None:
            with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
                conn.execute(f'drop database if exists "{lake_db}" with (force)')
                conn.execute(f'drop role if exists "{role}"')

        # Each step whatever became of the others: nothing of this test is left on the shared stack.
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(next, source_gen, None)
            cleanup.callback(next, lake_gen, None)
            cleanup.callback(reader_password_file(make_url(stack.postgres_url()), role).unlink, missing_ok=True)
            cleanup.callback(drop_lake)
            cleanup.callback(purge, pipeline)


def query(replicas, dest: str, statement: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CDC, "-c", str(replicas["path"]), "query", "--dest", dest, statement, *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def refused(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """The one-line error of a refused statement (exit 1), which must hold each phrase; nothing on stdout."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert result.stdout == "", result.stdout
    return lines[0]


def duck_rows(file: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(file), read_only=True) as conn:
        return conn.execute(sql).fetchall()


# -- PostgreSQL ---------------------------------------------------------------------------------------------------

def test_postgres_query_logs_in_as_the_read_only_role_and_ordinary_selects_work(replicas):
    role, lake, source = replicas["role"], replicas["lake"], replicas["source"]
    who = query(replicas, "pg", "select current_user, session_user, current_setting('transaction_read_only')")
    assert who.returncode == 0, who.stderr
    # The session itself is the role's: there is no other user to go back to.
    assert who.stdout.splitlines()[1:] == [f"{role}\t{role}\ton"]
    counted = query(replicas, "pg", "select count(*) as n, sum(balance) as total from public.account")
    assert counted.returncode == 0, counted.stderr
    with psycopg.connect(source) as conn:
        n, total = conn.execute("select count(*), sum(balance) from account").fetchone()
    assert counted.stdout.splitlines()[1:] == [f"{n}\t{total}"]
    history = query(replicas, "pg", "select _cdc_op, owner, balance from public.account__history where id = 1 "
                    "order by _cdc_lsn")
    assert history.returncode == 0, history.stderr
    assert history.stdout.splitlines()[1:] == ["r\towner 1\t101.00", "u\talice\t101.00", "u\talice\t7.00"]
    deleted = query(replicas, "pg", "select _cdc_op from public.account__history where id = 30 order by _cdc_lsn")
    assert deleted.stdout.splitlines()[1:] == ["r", "d"], deleted.stdout + deleted.stderr
    assert rows(lake, "account") == rows(source, "account")

    # No password in the pipeline file: `cdc run` generated one, in a file of the state directory that only its
    # owner may read, and made the role a LOGIN role with no attribute beyond logging in.
    secret_file = reader_password_file(make_url(lake), role)
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    with psycopg.connect(replicas["stack"].postgres_url()) as conn:
        assert conn.execute("select rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
                            "from pg_roles where rolname = %s", (role,)).fetchone() == (True, *[False] * 5)
        assert conn.execute("select count(*) from pg_auth_members m join pg_roles r on r.oid = m.member "
                            "where r.rolname = %s", (role,)).fetchone() == (0,)
    # Without that file (another state directory) and without a password in the pipeline file: a clear refusal.
    elsewhere = query(replicas, "pg", "select 1", env={"CDC_HOME": str(replicas["work"] / "elsewhere")})
    refused(elsewhere, f"no password for the read-only role {role}", "read_only_password is not set",
            "`cdc run pg` generates it")


@pytest.mark.parametrize("statement, phrases", [
    # The tester's escape: back to the login's own role, then read a server file.
    ("select set_config('role', 'none', true), pg_read_file('/etc/passwd')",
     ["may not do that", "permission denied for function pg_read_file"]),
    ("do $$ begin perform set_config('role', 'none', true); perform pg_read_file('/etc/passwd'); end $$",
     ["may not do that", "permission denied for function pg_read_file"]),
    ("select set_config('role', 'cdc', true)", ["may not do that", "permission denied to set role"]),
    ("set session authorization cdc", ["may not do that", "permission denied to set session authorization"]),
    ("select pg_read_binary_file('/etc/passwd')", ["may not do that", "permission denied for function"]),
    ("select pg_ls_dir('.')", ["may not do that", "permission denied for function pg_ls_dir"]),
    ("select rolpassword from pg_authid", ["may not do that", "permission denied for table pg_authid"]),
    ("select * from _cdc_offsets", ["may not do that", "permission denied for table _cdc_offsets"]),
    ("select lo_import('/etc/passwd')", ["may not do that", "permission denied for function lo_import"]),
    # Writes, with and without tricks around the transaction.
    ("delete from public.account", ["the analytics replica is read-only: "]),
    ("with gone as (delete from public.account returning 1) select count(*) from gone",
     ["the analytics replica is read-only: "]),
    ("do $$ begin perform set_config('role', 'none', true); delete from public.account; end $$",
     ["the analytics replica is read-only: "]),
    ("create table public.intruder (i int)", ["the analytics replica is read-only: "]),
    ("select set_config('transaction_read_only', 'off', false)", ["read-write mode"]),
    ("reset role; delete from public.account", ["one statement at a time"]),
    ("commit; delete from public.account", ["one statement at a time"]),
])
def test_postgres_escape_is_refused(replicas, statement, phrases):
    before = rows(replicas["lake"], "account")
    refused(query(replicas, "pg", statement), *phrases)
    assert rows(replicas["lake"], "account") == before == rows(replicas["source"], "account")
    with psycopg.connect(replicas["lake"]) as conn:
        assert conn.execute("select to_regclass('public.intruder')").fetchone() == (None,)


def test_postgres_copy_to_a_program_or_a_file_is_refused_and_runs_nothing(replicas):
    target = Path("/tmp") / f"cdc-escape-{uuid.uuid4().hex}"  # a place the server's OS user could write
    refused(query(replicas, "pg", f"copy (select 1) to program 'id > {target}'"),
            "may not do that", "pg_execute_server_program")
    refused(query(replicas, "pg", f"copy (select * from public.account) to '{target}'"),
            "may not do that", "pg_write_server_files")
    assert not target.exists()


def test_postgres_the_applier_sessions_are_out_of_reach(replicas):
    with psycopg.connect(replicas["lake"]) as applier:  # a session of the applier's user (a superuser here)
        pid = applier.info.backend_pid
        refused(query(replicas, "pg", f"select pg_terminate_backend({pid})"), "may not do that", "terminate")
        refused(query(replicas, "pg", f"select pg_cancel_backend({pid})"), "may not do that", "cancel")
        assert applier.execute("select 1").fetchone() == (1,)


def test_postgres_statement_timeout(replicas):
    refused(query(replicas, "pg", "select pg_sleep(30)", "--timeout", "1"),
            "query stopped after 1 s", "--timeout", "statement timeout")


def test_postgres_a_role_given_more_than_reading_is_refused(replicas):
    role = replicas["role"]
    admin = replicas["stack"].postgres_url()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'grant pg_read_server_files to "{role}"')
    try:
        refused(query(replicas, "pg", "select pg_read_file('/etc/passwd')"),
                f"the read-only role {role} may do more than read", "member of pg_read_server_files")
        # The applier says so when it prepares the destination, and goes on replicating.
        run = caught_up(replicas["path"])
        assert f"pg: WARNING: read-only role {role} may do more than read (member of pg_read_server_files)" \
            in run.stdout, run.stdout
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'revoke pg_read_server_files from "{role}"')


# -- DuckDB -------------------------------------------------------------------------------------------------------

def test_duckdb_ordinary_selects_work(replicas):
    with psycopg.connect(replicas["source"]) as conn:
        n, total = conn.execute("select count(*), sum(balance) from account").fetchone()
    counted = query(replicas, "duck", 'select count(*) as n, sum(balance) as total from "public.account"')
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.splitlines()[1:] == [f"{n}\t{total}"]
    history = query(replicas, "duck", 'select _cdc_op, owner, balance from "public.account__history" where id = 1 '
                    "order by _cdc_lsn")
    assert history.returncode == 0, history.stderr
    assert history.stdout.splitlines()[1:] == ["r\towner 1\t101.00", "u\talice\t101.00", "u\talice\t7.00"]
    as_of = query(replicas, "duck", 'from "public.account__history" select _cdc_op where id = 30 '
                  "order by _cdc_lsn desc limit 1")
    assert as_of.stdout.splitlines()[1:] == ["d"], as_of.stdout + as_of.stderr
    for statement in ('describe "public.account"', "show tables", 'explain select * from "public.account"'):
        result = query(replicas, "duck", statement)
        assert result.returncode == 0, (statement, result.stderr)
    settings = query(replicas, "duck", "select current_setting('enable_external_access') as ext, "
                     "current_setting('lock_configuration') as locked")
    assert settings.stdout.splitlines()[1:] == ["False\tTrue"], settings.stdout + settings.stderr


def duck_escapes(replicas) -> list[tuple[str, list[str]]]:
    work, other, secret = replicas["work"], replicas["other"], replicas["secret"]
    return [
        (f"copy (select * from \"public.account\") to '{work}/out.csv'", ["refused: COPY"]),
        (f"copy \"public.account\" to '{work}/out.parquet' (format parquet)", ["refused: COPY"]),
        (f"export database '{work}/exported'", ["refused: EXPORT"]),
        (f"import database '{work}/exported'", ["refused: IMPORT"]),
        ("select * from read_text('/etc/shadow')", ["reads nothing outside the analytics replica", "/etc/shadow"]),
        ("select * from read_text('/etc/passwd')", ["reads nothing outside the analytics replica", "/etc/passwd"]),
        (f"select * from read_csv('{secret}')", ["reads nothing outside the analytics replica"]),
        (f"select * from '{secret}'", ["reads nothing outside the analytics replica"]),
        ("select * from glob('/etc/*')", ["reads nothing outside the analytics replica"]),
        (f"select * from read_parquet('{work}/*.parquet')", ["reads nothing outside the analytics replica"]),
        (f"attach '{other}' as v (read_write)", ["refused: ATTACH"]),
        (f"attach '{other}' as v (read_write); delete from v.t", ["one statement at a time"]),
        (f"select * from query('attach ''{other}'' as v')", ["query failed", "single SELECT"]),
        ("detach analytics", ["refused: DETACH"]),
        ("set enable_external_access = true", ["refused: SET"]),
        ("reset lock_configuration", ["refused: RESET"]),
        ("use memory", ["refused: USE"]),
        ("pragma enable_profiling", ["refused: PRAGMA"]),
        ("pragma version", ["refused: PRAGMA"]),
        ("install httpfs", ["refused: INSTALL"]),
        ("load httpfs", ["refused: LOAD"]),
        ("call pragma_version()", ["refused: CALL"]),
        ("checkpoint", ["refused: CHECKPOINT"]),
        ("create temp table x as select 1", ["refused: CREATE"]),
        ('delete from "public.account"', ["refused: DELETE", "read-only"]),
        ('update "public.account" set balance = 0', ["refused: UPDATE", "read-only"]),
        ("begin", ["refused: BEGIN"]),
        ('select 1; delete from "public.account"', ["one statement at a time", "holds 2"]),
    ]


def test_duckdb_escapes_are_refused_and_change_nothing(replicas):
    duck, other, work, secret = replicas["duck"], replicas["other"], replicas["work"], replicas["secret"]
    account = 'select * from "public.account" order by id'
    before = duck_rows(duck, account)
    assert len(before) == 29
    files = sorted(p.name for p in work.iterdir())
    leaked = secret.read_text().split("\n")[1].split(",")[1]
    problems = []
    for statement, phrases in duck_escapes(replicas):
        result = query(replicas, "duck", statement)
        try:
            line = refused(result, *phrases)
        except AssertionError as exc:
            problems.append(f"{statement!r}: {exc}")
            continue
        for forbidden in ("root:", leaked):
            if forbidden in result.stdout + line:
                problems.append(f"{statement!r} let {forbidden!r} out")
        # Nothing written or changed: the replica, the other database, the directory they are in.
        assert duck_rows(duck, account) == before, statement
        assert duck_rows(other, "select count(*) from t") == [(5,)], statement
        assert sorted(p.name for p in work.iterdir()) == files, statement
    assert not problems, "\n".join(problems)


def test_duckdb_statement_timeout(replicas):
    refused(query(replicas, "duck", "select sum(hash(a.range * b.range)) from range(1000000) a, range(1000000) b",
                  "--timeout", "1"), "query stopped after 1 s", "--timeout")
