"""Destination dialects, one module each with the same shape; `dialect_for` picks one by database and kind."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from cdc.errors import ConfigError
from consumers.apply.dialects.base import Dialect, SchemaChangeError


def dialect_for(engine: Engine, kind: str = "replica") -> Dialect:
    """The dialect of a destination: by its database, and for PostgreSQL by its kind (replica or analytics)."""
    backend = engine.url.get_backend_name()
    if backend == "postgresql":
        from consumers.apply.dialects.postgres import PostgresAnalyticsDialect, PostgresDialect

        return PostgresAnalyticsDialect(engine) if kind == "analytics" else PostgresDialect(engine)
    if backend in ("mysql", "mariadb"):
        from consumers.apply.dialects.mariadb import MariaDBDialect

        return MariaDBDialect(engine)
    if backend == "duckdb":
        from consumers.apply.dialects.duckdb import DuckDBDialect

        return DuckDBDialect(engine)
    raise ConfigError(f"no dialect for {backend!r} destinations (supported: postgresql, mariadb, duckdb)")


__all__ = ["Dialect", "SchemaChangeError", "dialect_for"]
