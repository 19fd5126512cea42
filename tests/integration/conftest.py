"""Fixtures shared by the integration tests, registered once: the real local stack, started once per test session
(and stopped afterwards only if this session started it), fresh databases, and the sample source with its replica."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from cdc.config import Pipeline
from infra import stack as stack_mod
from producers import capture
from producers.connect import ConnectClient
from schemas.codec import AvroDecoder, RegistryClient
from tests.integration.pipelines import fresh_database, fresh_mariadb_database, pipeline_data, purge, write_pipeline
from tests.integration.sample import HIERARCHIES, SCHEMA, TABLES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def stack():
    os.environ.setdefault("CDC_HOME", str(REPO / ".cdc"))
    was_up = stack_mod.status()["healthy"]
    layout = stack_mod.up(echo=lambda line: print(line))
    yield layout
    if not was_up and not os.environ.get("CDC_KEEP_STACK"):
        stack_mod.down(echo=lambda line: print(line))


@pytest.fixture
def connect(stack):
    with ConnectClient(stack.urls()["connect"]) as client:
        yield client


@pytest.fixture
def decoder(stack):
    registry = RegistryClient(stack.urls()["schema_registry"])
    yield AvroDecoder(registry)
    registry.close()


@pytest.fixture
def source_db(stack):
    """A fresh source database."""
    yield from fresh_database(stack, "src")


@pytest.fixture
def destination_db(stack):
    """A fresh PostgreSQL destination database."""
    yield from fresh_database(stack, "dst")


@pytest.fixture
def mariadb_database(stack):
    """A fresh, uniquely named database on the stack's MariaDB; yields its URL and drops it afterwards."""
    yield from fresh_mariadb_database(stack)


@pytest.fixture
def sample_pipeline(stack, source_db, tmp_path):
    """A factory: `make(destinations)` loads the sample schema into a fresh source database, writes a pipeline file
    of the sample's tables and hierarchy with those destinations, and applies its connector; it returns (pipeline
    file, pipeline, source URL). Whatever it made is purged afterwards."""
    made = []

    def make(destinations: dict) -> tuple[Path, Pipeline, str]:
        source = stack.postgres_url(source_db)
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(SCHEMA)
        path = tmp_path / "pipeline.yaml"
        pipeline = write_pipeline(path, pipeline_data(stack, source_db, TABLES, hierarchies=HIERARCHIES,
                                                      destinations=destinations))
        made.append(pipeline)
        capture.apply(pipeline)
        return path, pipeline, source

    yield make
    for pipeline in made:
        purge(pipeline)


@pytest.fixture
def replica(stack, destination_db, sample_pipeline):
    """The sample source, its connector, and an empty PostgreSQL destination `state`; yields (pipeline file, source
    URL, destination URL)."""
    destination = stack.postgres_url(destination_db)
    path, _, source = sample_pipeline({"state": {"kind": "replica", "url": destination}})
    return path, source, destination
