"""Destination dialects, one module each with the same shape; `dialect_for` picks one by database and kind.

Every difference between destination backends lives in these classes: what the applier writes, and what the
operations built on it (replay and backups, `cdc query`, verify and resync, `cdc lag`) need to know of a backend.
Those ask `dialect_class` (no connection needed) or `dialect_for`, never the URL's backend name."""

from __future__ import annotations

from sqlalchemy.engine import URL, Engine

from cdc.errors import ConfigError
from consumers.apply.dialects.base import Dialect, SchemaChangeError


def dialect_class(url: URL, kind: str = "replica") -> type[Dialect]:
    """The dialect class of a destination URL and kind (replica or analytics), for what a backend is and can do
    (its class attributes and class methods) without an engine or a connection."""
    backend = url.get_backend_name()
    if backend == "postgresql":
        from consumers.apply.dialects.postgres import PostgresAnalyticsDialect, PostgresDialect

        return PostgresAnalyticsDialect if kind == "analytics" else PostgresDialect
    if backend in ("mysql", "mariadb"):
        from consumers.apply.dialects.mariadb import MariaDBDialect

        return MariaDBDialect
    if backend == "duckdb":
        from consumers.apply.dialects.duckdb import DuckDBDialect

        return DuckDBDialect
    raise ConfigError(f"no dialect for {backend!r} destinations (supported: postgresql, mariadb, duckdb)")


def dialect_for(engine: Engine, kind: str = "replica") -> Dialect:
    """The dialect of a destination: by its database, and for PostgreSQL by its kind (replica or analytics)."""
    return dialect_class(engine.url, kind)(engine)


__all__ = ["Dialect", "SchemaChangeError", "dialect_class", "dialect_for"]
