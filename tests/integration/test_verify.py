"""`cdc verify` on the real stack: a corrupted destination is reported key by key, with counts and accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine

from producers import capture
from tests.integration.pipelines import execute, pipeline_data, purge, write_pipeline

CDC = str(Path(sys.executable).parent / "cdc")
ROWS = 20_000


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_verify_reports_exactly_the_corrupted_keys(stack, source_db, tmp_path, kind):
    source = stack.postgres_url(source_db)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("create table item (id bigint primary key, name text not null, qty integer, "
                     "price numeric(10, 2), seen timestamptz, flag boolean)")
        conn.execute("insert into item select g, 'item ' || g, g %% 97, g / 7.0, "
                     "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 minute', g %% 2 = 0 "
                     "from generate_series(1, %s) g", (ROWS,))
    name = f"dst_{uuid.uuid4().hex[:10]}"
    if kind == "postgresql":
        with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        url = stack.postgres_url(name)
    else:
        admin = create_engine(stack.mariadb_url())
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
        url = stack.mariadb_url(name)
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, pipeline_data(stack, source_db, ["public.item"],
                                                  destinations={"copy": {"kind": "replica", "url": url}}))
    capture.apply(pipeline)
    cdc = lambda *args: subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=300)
    try:
        assert cdc("run", "--until-caught-up", "--timeout", "240").returncode == 0
        clean = cdc("verify", "copy", "--json")
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert json.loads(clean.stdout)["equal"] is True

        destination = create_engine(url if kind == "mariadb" else url.replace("postgresql://", "postgresql+psycopg://"))
        with destination.begin() as conn:
            conn.exec_driver_sql("delete from item where id in (3, 500, 9999, 15000, 20000)")
            conn.exec_driver_sql("update item set name = 'changed' where id in (7, 8000)")
            conn.exec_driver_sql("update item set price = price + 0.01 where id = 12345")
            conn.exec_driver_sql("update item set flag = not flag where id = 19999")
            conn.exec_driver_sql("insert into item (id, name, _cdc_lsn) values (20001, 'extra', 0), "
                                 "(50000, 'extra', 0), (-1, 'extra', 0)")
        destination.dispose()
        result = cdc("verify", "copy", "--json", "--settle", "0")
    finally:
        purge(pipeline)
        if kind == "postgresql":
            with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
                conn.execute(f'drop database if exists "{name}" with (force)')
        else:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    [table] = report["tables"]
    assert report["equal"] is False
    assert (table["source_rows"], table["destination_rows"]) == (ROWS, ROWS - 5 + 3)
    assert table["missing"] == [[3], [500], [9999], [15000], [20000]]
    assert sorted(table["extra"]) == [[-1], [20001], [50000]]
    assert table["different"] == [[7], [8000], [12345], [19999]]
    assert table["accuracy"] == pytest.approx((ROWS - 5 - 4) / (ROWS + 3))


SCHEMA = """
create table person (id bigint primary key, name text not null);
create table enrollment (id bigint primary key, person_id bigint not null references person (id), grade int);
insert into person select g, 'p' || g from generate_series(1, 50) g;
insert into enrollment select g, g, g % 12 from generate_series(1, 50) g;
"""


def test_fix_resync_and_history(stack, source_db, destination_db, tmp_path):
    source = stack.postgres_url(source_db)
    execute(source, SCHEMA)
    url = stack.postgres_url(destination_db)
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, pipeline_data(
        stack, source_db, ["public.person", "public.enrollment"],
        hierarchies={"person": {"root": "public.person", "members": {"public.enrollment": "person_id"}}},
        # dead-letter: a re-synced child whose parent is missing must not stop the replica.
        destinations={"copy": {"kind": "replica", "url": url, "on_error": "dead-letter"}}))
    capture.apply(pipeline)
    cdc = lambda *args: subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=300)
    assert cdc("run", "--until-caught-up", "--timeout", "240").returncode == 0
    applier = subprocess.Popen([CDC, "-c", str(path), "run"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("insert into person values (51, 'late')")
        assert cdc("verify", "--settle", "3").returncode == 0
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("set session_replication_role = replica")  # corrupt past the foreign keys
            conn.execute("delete from person where id in (5, 6)")
            conn.execute("delete from enrollment where id in (5, 7)")
            conn.execute("update enrollment set grade = 99 where id = 8")
            conn.execute("insert into enrollment (id, person_id, grade, _cdc_lsn) values (900, 1, 1, 0)")

        # A child whose parent is missing at the destination cannot arrive: the history says why and what to do.
        child = cdc("resync", "public.enrollment", "--ids", "5", "--wait", "15", "--json")
        assert child.returncode == 1
        [result] = json.loads(child.stdout)["results"]
        assert result["ok"] is False and "--with-parents" in result["reason"] and "public.person" in result["reason"]

        parents = cdc("resync", "public.enrollment", "--ids", "5,424242", "--with-parents", "--json", "--as", "alice")
        request = json.loads(parents.stdout)
        assert [(r["key"], r["ok"], r["reason"]) for r in request["results"]] == [
            ([5], True, ""), ([424242], False, "not at the source")]
        with psycopg.connect(url) as conn:
            assert conn.execute("select name from person where id = 5").fetchone() == ("p5",)

        fixed = cdc("verify", "--fix", "--json", "--settle", "3")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert json.loads(fixed.stdout)["equal"] is True

        history = json.loads(cdc("history", "--json").stdout)
        assert [h["state"] for h in history][-2:] == ["failed", "failed"]
        latest_alice = next(h for h in history if h["requested_by"] == "alice")
        assert latest_alice["table"] == "public.enrollment" and latest_alice["keys"] == [[5], [424242]]
        shown = cdc("history", "show", str(latest_alice["id"]), "--csv", str(tmp_path / "r.csv"),
                    "--html", str(tmp_path / "r.html"))
        assert shown.returncode == 0
        assert "424242" in (tmp_path / "r.csv").read_text() and "not at the source" in (tmp_path / "r.html").read_text()
        assert cdc("history", "clear").returncode == 0
        assert json.loads(cdc("history", "--json").stdout) == []
    finally:
        applier.terminate()
        applier.wait(30)
        purge(pipeline)
