"""Destination dialects, one module each with the same shape; `dialect_for` picks one from the engine's URL."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from cdc.errors import ConfigError
from consumers.dialects.base import Dialect, SchemaChangeError


def dialect_for(engine: Engine) -> Dialect:
    backend = engine.url.get_backend_name()
    if backend == "postgresql":
        from consumers.dialects.postgres import PostgresDialect

        return PostgresDialect(engine)
    if backend in ("mysql", "mariadb"):
        from consumers.dialects.mariadb import MariaDBDialect

        return MariaDBDialect(engine)
    if backend == "duckdb":
        from consumers.dialects.duckdb import DuckDBDialect

        return DuckDBDialect(engine)
    raise ConfigError(f"no dialect for {backend!r} destinations (supported: postgresql, mariadb, duckdb)")


__all__ = ["Dialect", "SchemaChangeError", "dialect_for"]
