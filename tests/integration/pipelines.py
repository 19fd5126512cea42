"""Helpers for integration tests: pipeline files pointed at the test stack, and reading what reached Kafka."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from cdc import config
from cdc.config import Pipeline
from infra.stack import StackLayout
from producers import capture


def pipeline_data(stack: StackLayout, database: str, tables: list[str], *, name: str | None = None,
                  hierarchies: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    urls = stack.urls()
    data: dict[str, Any] = {
        "pipeline": name or f"t{uuid.uuid4().hex[:8]}",
        "kafka": {"bootstrap_servers": stack.kafka_bootstrap, "schema_registry_url": urls["schema_registry"],
                  "connect_url": urls["connect"]},
        "source": {"url": stack.postgres_url(database), "tables": tables, "heartbeat_ms": 1000},
    }
    if hierarchies:
        data["hierarchies"] = hierarchies
    data.update(extra)
    return data


CDC = str(Path(sys.executable).parent / "cdc")


def cdc(path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The command line, as a user runs it, on a pipeline file."""
    return subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=timeout)


def caught_up(path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """`cdc run --until-caught-up` on a pipeline file, which must exit 0."""
    run = cdc(path, "run", "--until-caught-up", "--timeout", str(timeout))
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def table_rows(url: str, table: str) -> list[tuple]:
    """Every row of a PostgreSQL table (`schema.table`), with plain SQL, `_cdc_lsn` left out, ordered by its first
    two columns."""
    schema, name = table.split(".")
    with psycopg.connect(url) as conn:
        columns = [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
            "and column_name <> '_cdc_lsn' order by ordinal_position", (schema, name))]
        assert columns, f"{table} does not exist at {url}"
        query = sql.SQL("select {} from {} order by 1{}").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(schema, name),
            sql.SQL(", 2" if len(columns) > 1 else ""))
        return conn.execute(query).fetchall()


def execute(url: str, *statements: str) -> None:
    """Run statements on a database, each committed on its own (a source transaction each)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def write_pipeline(path: Path, data: dict[str, Any]) -> Pipeline:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return config.load(path, env={})


def connect_plugins(stack: StackLayout) -> set[str]:
    """The plugin classes the stack's Kafka Connect loaded (the project's transforms among them)."""
    from producers.connect import ConnectClient

    with ConnectClient(stack.urls()["connect"]) as client:
        return {p.get("class") for p in client.plugins()}


def require_plugins(stack: StackLayout, *classes: str) -> None:
    """Fail (not skip) when Connect lacks a class: `cdc stack up` builds the project's transforms and restarts a
    Connect that predates them."""
    import pytest

    missing = sorted(set(classes) - connect_plugins(stack))
    if missing:
        pytest.fail(f"Kafka Connect lacks {', '.join(missing)}: `cdc stack up` builds them and restarts Connect")


def purge(pipeline: Pipeline) -> None:
    """Delete the test pipeline's connector, slot and publication, and its topics: thousands of topics left by a run
    of the suite slow the broker's metadata requests and fill its heap."""
    capture.delete(pipeline, purge=True)
    from producers import topics

    admin = topics.admin_client(pipeline.kafka.bootstrap_servers)
    prefix = pipeline.pipeline + "."
    mine = [t for t in topics.existing_topics(admin)
            if t.startswith(prefix) or t == f"__debezium-heartbeat.{pipeline.pipeline}"]
    if mine:
        admin.delete_topics(mine, operation_timeout=30)  # not waited for: nothing reads them again
