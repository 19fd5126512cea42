"""What a replicated table looks like at the destination: columns, primary key, foreign keys and checks, from the
source."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import MetaData, Table, create_engine, inspect
from sqlalchemy.engine import URL
from sqlalchemy.exc import SAWarning
from sqlalchemy.types import TypeEngine

if TYPE_CHECKING:
    from consumers.apply.dialects.types import SourceType

# Each replicated row remembers the source position (LSN) of the change that wrote it, in this column:
# a conditional upsert in one statement can then refuse to let an older change overwrite a newer one.
LSN_COLUMN = "_cdc_lsn"
# Incremental snapshot reads (ad-hoc snapshots, re-syncs) carry no LSN. They hold the row as it is now, and
# what changes it later comes later in the same partition, so they always win, and keep the stored LSN.
SNAPSHOT_LSN = -1
OFFSETS_TABLE = "_cdc_offsets"
# Why the applier of a pipeline stopped, when it stopped on an error (cdc lag reports it).
STATUS_TABLE = "_cdc_status"
# The source transactions whose changes of a table without a primary key a destination has applied, per pipeline and
# table: such rows carry no LSN guard, so a transaction Debezium re-sends (at-least-once) is recognised here instead
# and its keyless changes are not applied twice (DestinationWriter._keyless_once, consumers/apply/writer.py;
# docs/applier.md).
APPLIED_TABLE = "_cdc_applied_transactions"
LAST_COMMIT_TABLE = "_cdc_last_commit"  # the last source commit applied (consumers/apply/copies.py)


@dataclass(frozen=True)
class ColumnShape:
    name: str
    type: TypeEngine  # the source's SQLAlchemy type (a fallback for shapes built without the catalog)
    nullable: bool
    # The source's type as its catalog says (consumers/apply/dialects/types.py): what each dialect maps (docs/types.md).
    source: SourceType | None = None


@dataclass(frozen=True)
class ForeignKeyShape:
    columns: tuple[str, ...]
    referred_table: str  # schema-qualified source name
    referred_columns: tuple[str, ...]


@dataclass(frozen=True)
class TableShape:
    """A source table as the applier sees it; `name` is schema-qualified (`public.person`)."""

    name: str
    columns: tuple[ColumnShape, ...]
    primary_key: tuple[str, ...]
    foreign_keys: tuple[ForeignKeyShape, ...] = field(default=())
    # The source's validated CHECK constraints, (name, definition as pg_get_constraintdef spells it): a PostgreSQL
    # replica creates them with the table (docs/types.md, "Check constraints").
    checks: tuple[tuple[str, str], ...] = field(default=())

    @property
    def schema(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def table(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> ColumnShape:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


def reflect_shapes(url: URL, tables: list[str] | tuple[str, ...]) -> dict[str, TableShape]:
    """The shapes of the captured tables, read from the source with SQLAlchemy reflection."""
    from consumers.apply.dialects.types import (  # the dialects package imports this module
        describe_checks,
        describe_columns,
    )

    engine = create_engine(url.set(drivername="postgresql+psycopg"))
    shapes: dict[str, TableShape] = {}
    try:
        insp = inspect(engine)
        metadata = MetaData()
        # Types SQLAlchemy does not know (point, xml, composites...) are described by the catalog instead.
        warnings.filterwarnings("ignore", r"Did not recognize type", SAWarning)
        with engine.connect() as conn:
            cursor = conn.connection.cursor()  # the pooled psycopg connection's own cursor
            catalog = {t: describe_columns(cursor, t) for t in tables}
            checks = {t: describe_checks(cursor, t) for t in tables}
        for qualified in tables:
            schema, name = qualified.split(".", 1)
            table = Table(name, metadata, schema=schema, autoload_with=engine)
            fks = tuple(
                ForeignKeyShape(
                    tuple(fk["constrained_columns"]),
                    f"{fk.get('referred_schema') or insp.default_schema_name}.{fk['referred_table']}",
                    tuple(fk["referred_columns"]),
                )
                for fk in insp.get_foreign_keys(name, schema=schema)
            )
            shapes[qualified] = TableShape(
                qualified,
                # A source table that is itself a replica (a two-way table of a topology of sites) holds its
                # applier's `_cdc_lsn`: that pipeline's bookkeeping, not data, and this destination has its own.
                tuple(ColumnShape(c.name, c.type, bool(c.nullable), catalog[qualified].get(c.name))
                      for c in table.columns if c.name != LSN_COLUMN),
                tuple(c.name for c in table.primary_key.columns),
                fks,
                checks[qualified],
            )
    finally:
        engine.dispose()
    return shapes
