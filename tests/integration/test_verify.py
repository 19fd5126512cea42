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
from tests.integration.pipelines import pipeline_data, purge, write_pipeline

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
