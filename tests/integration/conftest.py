"""The real local stack, started once per test session (and stopped afterwards only if this session started it)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg
import pytest

from infra import stack as stack_mod
from producers.connect import ConnectClient
from producers.source_admin import drop_slot, slots_of_database
from schemas.codec import AvroDecoder, RegistryClient

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


def fresh_database(stack, prefix: str):
    """A new, uniquely named PostgreSQL database; dropped afterwards with whatever slot still points at it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    yield name
    with psycopg.connect(stack.postgres_url(), autocommit=True) as conn:
        for slot in slots_of_database(conn, name):
            drop_slot(conn, slot)
        conn.execute(f'drop database if exists "{name}" with (force)')


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
    from sqlalchemy import create_engine

    name = f"dst_{uuid.uuid4().hex[:10]}"
    admin = create_engine(stack.mariadb_url())
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
    yield stack.mariadb_url(name)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    admin.dispose()
