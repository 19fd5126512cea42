"""Helpers for integration tests: pipeline files pointed at the test stack, and reading what reached Kafka."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import yaml

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


def execute(url: str, *statements: str) -> None:
    """Run statements on a database, each committed on its own (a source transaction each)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def write_pipeline(path: Path, data: dict[str, Any]) -> Pipeline:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return config.load(path, env={})


def purge(pipeline: Pipeline) -> None:
    capture.delete(pipeline, purge=True)
