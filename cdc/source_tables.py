"""One model of a captured source table (columns, primary key, foreign keys, checks, partition parents, row estimate)
and its one reflection from the PostgreSQL catalog, for capture (producers/), hierarchy suggestions and the applier.

Each caller takes what it needs: capture reads primary keys, column names and types, and partition parents; hierarchy
suggestions read foreign keys, nullability and row estimates; the applier reads everything, the catalog's own
description of every column type (`catalog=True`, a few queries per column) included. The cheaper options leave
those fields empty rather than guessing them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import SAWarning
from sqlalchemy.types import TypeEngine

from cdc.errors import ConfigError

if TYPE_CHECKING:
    from consumers.apply.dialects.types import SourceType

# Each replicated row remembers the source position (LSN) of the change that wrote it, in this column of the
# destination (consumers/apply/shapes.py). A source table that is itself a replica (a two-way table of a topology of
# sites) holds its own applier's `_cdc_lsn`: that pipeline's bookkeeping, not data, so it is no column of the model.
LSN_COLUMN = "_cdc_lsn"


@dataclass(frozen=True)
class ColumnShape:
    name: str
    type: TypeEngine  # the source's SQLAlchemy type (a fallback for shapes built without the catalog)
    nullable: bool
    # The source's type as its catalog says (consumers/apply/dialects/types.py): what each dialect maps (docs/types.md).
    # None unless reflected with `catalog=True`.
    source: SourceType | None = None

    @property
    def type_name(self) -> str:
        """The type as the database names it, lower case (`bigint`, `integer`, `text`): what capture compares."""
        return str(self.type).lower()


@dataclass(frozen=True)
class ForeignKeyShape:
    columns: tuple[str, ...]
    referred_table: str  # schema-qualified source name
    referred_columns: tuple[str, ...]
    ondelete: str | None = None  # as the source declares it: "CASCADE", "RESTRICT", ...; None for the default


@dataclass(frozen=True)
class TableShape:
    """A source table; `name` is schema-qualified (`public.person`)."""

    name: str
    columns: tuple[ColumnShape, ...]
    primary_key: tuple[str, ...]
    foreign_keys: tuple[ForeignKeyShape, ...] = field(default=())
    # The source's validated CHECK constraints, (name, definition as pg_get_constraintdef spells it): a PostgreSQL
    # replica creates them with the table (docs/types.md, "Check constraints"). Empty unless `catalog=True`.
    checks: tuple[tuple[str, str], ...] = field(default=())
    # A partition (declarative partitioning): the partitioned tables above it, nearest first, schema-qualified.
    partition_of: tuple[str, ...] = ()
    rows: float | None = None  # the planner's row estimate; None when unknown (never analysed) or not asked for

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

    def has_column(self, name: str) -> bool:
        return any(c.name == name for c in self.columns)

    def nullable(self, column: str) -> bool:
        # A column we were not told about is treated as nullable: the weaker evidence (hierarchy suggestions).
        return next((c.nullable for c in self.columns if c.name == column), True)


class MissingTables(ConfigError):
    """Tables named for reflection that do not exist at the source; the message names the field that listed them."""

    def __init__(self, field_name: str, tables: list[str], database: str | None) -> None:
        super().__init__(f"{field_name}: {', '.join(repr(t) for t in tables)} "
                         f"{'does' if len(tables) == 1 else 'do'} not exist at the source ({database})")
        self.tables = tables


# Every partition of the database -> the partitioned tables above it, nearest first.
_PARTITION_ANCESTORS = text("""
select n.nspname || '.' || c.relname,
       array(select an.nspname || '.' || a.relname
             from pg_partition_ancestors(c.oid) with ordinality as x(relid, depth)
             join pg_class a on a.oid = x.relid join pg_namespace an on an.oid = a.relnamespace
             where x.relid <> c.oid order by x.depth)
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relispartition
""")

# Row estimates: PostgreSQL's planner statistics, free to read. A partitioned table's own reltuples says nothing
# useful, so its leaves are summed. -1 (never vacuumed nor analysed) is "unknown".
_ESTIMATES = text("""
select n.nspname as schema, c.relname as name,
       case when c.relkind = 'p'
            then (select sum(l.reltuples) filter (where l.reltuples >= 0)
                  from pg_partition_tree(c.oid) t join pg_class l on l.oid = t.relid where t.isleaf)
            when c.reltuples >= 0 then c.reltuples end as estimate
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind in ('r', 'p') and n.nspname = any(:schemas)
""")


def source_url(url: URL | str) -> URL:
    """A SQLAlchemy URL of the source on psycopg 3 (the driver this project installs; pipeline files write plain
    postgresql:// URLs). Raises SQLAlchemy's ArgumentError for text that is no URL."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg") if parsed.drivername == "postgresql" else parsed


def reflect_tables(source: URL | str | Connection, tables: Iterable[str] | None = None, *,
                   schemas: Iterable[str] | None = None, catalog: bool = True, estimates: bool = False,
                   field_name: str = "source.tables") -> dict[str, TableShape]:
    """The named tables (schema-qualified), or with `schemas` every table of those schemas but partitions (they are
    captured as their parent), in one pass per kind of object and schema (SQLAlchemy's multi-table reflection).

    catalog: also each column's SourceType and the table's CHECK constraints (the applier's; a few queries per
    column). estimates: also the planner's row estimates. Tables named that do not exist: MissingTables, naming
    `field_name`. Driver errors are raised as they come: each caller says what it was doing.
    """
    if isinstance(source, Connection):
        return _reflect(source, tables, schemas, catalog=catalog, estimates=estimates, field_name=field_name)
    engine = create_engine(source_url(source), pool_pre_ping=False)
    try:
        with engine.connect() as conn:
            return _reflect(conn, tables, schemas, catalog=catalog, estimates=estimates, field_name=field_name)
    finally:
        engine.dispose()


def _reflect(conn: Connection, tables: Iterable[str] | None, schemas: Iterable[str] | None, *, catalog: bool,
             estimates: bool, field_name: str) -> dict[str, TableShape]:
    wanted: dict[str, list[str] | None] = {}  # schema -> its table names, or None for all of its tables
    named = list(dict.fromkeys(tables or ()))
    for qualified in named:
        schema, _, name = qualified.partition(".")
        listed = wanted.setdefault(schema, [])
        assert listed is not None
        listed.append(name)
    for schema in schemas or ():
        wanted[schema] = None
    inspector = inspect(conn)
    default_schema = inspector.default_schema_name
    # Types SQLAlchemy does not know (point, xml, composites...) are described by the catalog instead.
    warnings.filterwarnings("ignore", r"Did not recognize type", SAWarning)
    parents = {t: tuple(a) for t, a in conn.execute(_PARTITION_ANCESTORS)}
    rows = _estimates(conn, sorted(wanted)) if estimates else {}
    found: dict[str, TableShape] = {}
    missing: list[str] = []
    for schema in sorted(wanted):
        pks = inspector.get_multi_pk_constraint(schema=schema, filter_names=wanted[schema])
        names = wanted[schema] or sorted(t for (_, t) in pks if f"{schema}.{t}" not in parents)
        missing += [f"{schema}.{t}" for t in names if (schema, t) not in pks]
        names = [t for t in names if (schema, t) in pks]
        if not names:
            continue
        columns = inspector.get_multi_columns(schema=schema, filter_names=names)
        fks = inspector.get_multi_foreign_keys(schema=schema, filter_names=names)
        for table in names:
            key, qualified = (schema, table), f"{schema}.{table}"
            found[qualified] = TableShape(
                qualified,
                tuple(ColumnShape(c["name"], c["type"], bool(c["nullable"]))
                      for c in columns.get(key, []) if c["name"] != LSN_COLUMN),
                tuple(pks[key].get("constrained_columns") or ()),
                tuple(
                    # PostgreSQL leaves out the schema of a referred table that is on the search path.
                    ForeignKeyShape(tuple(fk["constrained_columns"]),
                                    f"{fk.get('referred_schema') or default_schema}.{fk['referred_table']}",
                                    tuple(fk["referred_columns"]), (fk.get("options") or {}).get("ondelete"))
                    for fk in fks.get(key, [])),
                partition_of=parents.get(qualified, ()),
                rows=rows.get(key))
    if missing:
        # In the order they were named (a schema's tables are reflected together).
        raise MissingTables(field_name, sorted(missing, key=named.index), conn.engine.url.database)
    if catalog:
        found = {name: _with_catalog(conn, shape) for name, shape in found.items()}
    # The order they were named in (callers iterate it: dependency order is decided elsewhere, output is not).
    return {t: found[t] for t in named} if named and not schemas else found


def _with_catalog(conn: Connection, shape: TableShape) -> TableShape:
    from consumers.apply.dialects.types import (  # the dialects import the model; this is read only here
        describe_checks,
        describe_columns,
    )

    cursor: Any = conn.connection.cursor()  # the pooled psycopg connection's own cursor
    described = describe_columns(cursor, shape.name)
    checks = describe_checks(cursor, shape.name)
    columns = tuple(ColumnShape(c.name, c.type, c.nullable, described.get(c.name)) for c in shape.columns)
    return TableShape(shape.name, columns, shape.primary_key, shape.foreign_keys, checks, shape.partition_of,
                      shape.rows)


def _estimates(conn: Connection, schemas: list[str]) -> dict[tuple[str, str], float | None]:
    """(schema, table) -> row estimate, None when unknown."""
    return {(r["schema"], r["name"]): (None if r["estimate"] is None else float(r["estimate"]))
            for r in conn.execute(_ESTIMATES, {"schemas": schemas}).mappings()}
