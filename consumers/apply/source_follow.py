"""Following the source's tables at a destination while applying: columns added (and filled), types changed, enum
labels added, found by new writer schemas or by a value the old type cannot hold; and rows of changes from before a
column existed given what the source holds there."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from cdc.config import Pipeline
from cdc.source_tables import ColumnShape, TableShape, reflect_tables
from consumers.apply import values
from consumers.apply.dialects import Dialect
from consumers.apply.dialects.base import SchemaChangeError
from consumers.apply.errors import ApplyError
from consumers.apply.events import ChangeEvent
from consumers.apply.transactions import SourceUnit
from producers.debezium import avro_name
from producers.source_admin import one_row, psycopg_conninfo


class SourceFollower:
    """One destination's view of how the source's tables changed since its shapes were reflected."""

    def __init__(self, pipeline: Pipeline, name: str, dialect: Dialect, shapes: dict[str, TableShape],
                 converter: Callable[[int, str], values.RowConverter], echo: Callable[[str], None]) -> None:
        self.pipeline = pipeline
        self.name = name
        self.dialect = dialect
        self.shapes = shapes  # the writer's, shared: followed tables are replaced in it
        self.converter = converter
        self.echo = echo
        # Columns the source gained: what rows from before them hold there (_column_origin), and which columns
        # each writer schema lacks (_absent_columns).
        self._origins: dict[tuple[str, str], tuple[str, Any]] = {}
        self._absent: dict[int, list[str]] = {}
        self._schemas_checked: set[int] = set()  # writer schemas whose table's columns were compared (check_columns)
        self._tables_seen: set[str] = set()  # tables with a writer schema checked since the start (check_columns)

    def convert(self, event: ChangeEvent, image: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """A change's image as the destination's row (types converted, columns it does not carry filled)."""
        if image is None:
            return None
        if event.schema_id is None:
            return dict(image)
        row = self.converter(event.schema_id, event.table).convert(image)
        absent = self._absent_columns(event.schema_id, event.table)
        return self._fill_absent(event.table, row, absent) if absent and row is not None else row

    def check_columns(self, conn: Any, events: list[ChangeEvent]) -> None:
        """A writer schema met for the first time may say the source changed the table: Debezium registers a new one
        whenever a change shows in its Avro (a column added or dropped, int -> bigint, a numeric's scale). The table
        is then reflected afresh from the source (unless it is the table's first writer schema since the start and
        matches the shape reflected then) and compared with the shape the destination was made from: columns
        the source gained are added (and filled, `fill_new_column`), columns whose catalog type changed get the
        new mapped type (Dialect.alter_column_type, in the batch's transaction, before any row is written) unless
        `_refuse_type_changes` stops; a dropped column stops the applier (the dialect's ensure_table). The
        destination's catalog is compared too (Dialect.differing_types): a type changed while no applier ran is
        found by the first change after a start. A change with no Avro of its own while an applier runs
        (varchar(10) -> text: a string either way; an enum's new label) is found when a value the old type cannot
        hold fails its batch: the source is reflected again, the destination follows, and the batch is applied
        again (`changed_under`). A value is never truncated to fit."""
        for schema_id in {e.schema_id for e in events if e.schema_id is not None} - self._schemas_checked:
            table = next(e.table for e in events if e.schema_id == schema_id)
            converter = self.converter(schema_id, table)
            shape = self.shapes.get(table)
            if shape is None:
                self._schemas_checked.add(schema_id)
                continue
            gained = set(converter.columns) - set(shape.column_names)
            # The destination's catalog: the source may have changed a type while no applier ran (the shape,
            # reflected at start, already has it), or a batch that changed it here was rolled back.
            differing = self.dialect.differing_types(conn, shape)
            first = table not in self._tables_seen
            self._tables_seen.add(table)
            if first and not gained and not differing and set(converter.columns) == set(shape.column_names):
                # A table's first writer schema since the start, matching the shape reflected at the start: the
                # source is not reflected again (once per table at every start would slow a start of many tables).
                self._schemas_checked.add(schema_id)
                continue
            fresh = reflect_tables(self.pipeline.source.sqlalchemy_url, [table])[table]
            changed = _type_changes(shape, fresh, differing)
            dropped = set(shape.column_names) - set(fresh.column_names)
            if not gained and not changed and not dropped:
                self._schemas_checked.add(schema_id)
                continue
            converter.rename({avro_name(c): c for c in fresh.column_names})
            self.follow(conn, fresh, changed)
            self._schemas_checked.add(schema_id)

    def follow(self, conn: Any, fresh: TableShape, changed: list[tuple[str, str, str]]) -> None:
        """Make the destination's table the source's `fresh` shape: `changed` columns get their new type (or the
        applier stops, `_refuse_type_changes`), columns the source gained are added and filled, an enum's new labels
        are added; a dropped column stops the applier (the dialect's ensure_table raises, naming it)."""
        table = fresh.name
        self._refuse_type_changes(fresh, changed)
        self._absent.clear()
        self.dialect.forget_table(table)  # rebuilt from the fresh shape, under the same name
        for column, old, new in changed:
            try:
                action = self.dialect.alter_column_type(conn, fresh, column)
            except SchemaChangeError as exc:
                raise ApplyError(f"destination {self.name}: {table}.{column} changed type at the source from "
                                 f"{old} to {new}, which this destination cannot follow ({exc}); rebuild the "
                                 f"table from the topics with `cdc replay {self.name} --tables {table}`",
                                 table=table) from exc
            self.echo(f"{self.name}: {action} ({table}.{column} changed at the source from {old} to {new})")
        self.shapes[table] = fresh
        self.dialect.added_columns.clear()
        for action in self.dialect.ensure_table(conn, fresh, self.shapes):
            self.echo(f"{self.name}: {action}")
        for _, column in self.dialect.added_columns:
            self.fill_new_column(conn, fresh, column)

    def changed_under(self, steps: list[SourceUnit], exc: BaseException,
                      begin: Callable[[], contextlib.AbstractContextManager[Any]]) -> bool:
        """After a batch failed on a value its destination column cannot hold: did the source change a column of the
        batch's tables in a way no writer schema told (varchar(10) -> varchar(50) is a string in Avro either way; an
        enum's new label is not in the shape)? If so, the destination follows it in a transaction of its own
        (`begin`: PostgreSQL can use an enum label only once the transaction that added it has committed) and the
        caller applies the batch again; if not, the value is really too big for the source's type as reflected:
        False."""
        if not is_data_error(exc):
            return False
        tables = sorted({item.table for step in steps for item in step.events} & set(self.shapes))
        if not tables:
            return False
        fresh_shapes = reflect_tables(self.pipeline.source.sqlalchemy_url, tables)
        followed = False
        for table in tables:
            shape, fresh = self.shapes[table], fresh_shapes[table]
            changed = _type_changes(shape, fresh, {})
            if not changed and not _relabelled(shape, fresh):
                continue
            with begin() as conn:
                self.follow(conn, fresh, changed)
            followed = True
        return followed

    def _refuse_type_changes(self, fresh: TableShape, changed: list[tuple[str, str, str]]) -> None:
        """Raise ApplyError, before anything changes, for a type change the destination is not made to follow: a
        key column's (primary or foreign, or referred to by another table's foreign key: both ends of a constraint
        would have to change together, MariaDB's key columns have types of their own) or a generated column's
        (the source's expression decides its type)."""
        referred = {c for s in self.shapes.values() for fk in s.foreign_keys if fk.referred_table == fresh.name
                    for c in fk.referred_columns}
        keys = set(fresh.primary_key) | {c for fk in fresh.foreign_keys for c in fk.columns} | referred
        for column, old, new in changed:
            source = fresh.column(column).source
            why = ("it is a key column (a primary or foreign key, or referred to by one): its constraints would "
                   "have to change with it" if column in keys else
                   "it is a generated column" if source is not None and source.generated else None)
            if why:
                raise ApplyError(f"destination {self.name}: {fresh.name}.{column} changed type at the source from "
                                 f"{old} to {new}, which is not followed automatically: {why}. Rebuild the table from "
                                 f"the topics with `cdc replay {self.name} --tables {fresh.name}`", table=fresh.name)

    def fill_new_column(self, conn: Any, shape: TableShape, column: str) -> None:
        """Give a column the source gained the values its existing rows have there: PostgreSQL wrote no change for
        them. Every row the destination holds now was written by changes from before the column existed (the first
        change that has it is what made the applier add it), so each holds, at the source, what the ADD COLUMN gave
        it (`_column_origin`), or a value a later change (applied after this) sets. In the batch's destination
        transaction: with the ADD COLUMN, or not at all."""
        from sqlalchemy import bindparam

        kind, value = self._column_origin(shape, column)
        table = self.dialect.table(shape)
        if kind == "value":
            if value is not None:
                conn.execute(table.update().values({column: self.dialect.prepared(shape, [{column: value}],
                                                                                  [column])[0][column]}))
                self.echo(f"{self.name}: filled {table.fullname}.{column} of existing rows with the source's default")
            return
        if value:
            key = [f"_k{i}" for i in range(len(shape.primary_key))]
            statement = table.update().where(*(table.c[c] == bindparam(k) for c, k in zip(shape.primary_key, key)))\
                .values({column: bindparam("_v")})
            rows = self.dialect.prepared(shape, [{**dict(zip(shape.primary_key, pk)), column: v}
                                                 for pk, v in value.items()], [*shape.primary_key, column])
            conn.execute(statement, [{**{k: row[c] for c, k in zip(shape.primary_key, key)}, "_v": row[column]}
                                     for row in rows])
        self.echo(f"{self.name}: copied {table.fullname}.{column} of {len(value)} existing rows from the source "
                  "(a volatile default)")

    def _column_origin(self, shape: TableShape, column: str) -> tuple[str, Any]:
        """What a source column holds in the rows stored before it was added (PostgreSQL wrote no change for them):

        - ("value", v), the same for all: a constant default (a "fast default") is kept as the column's missing
          value (pg_attribute.attmissingval) and read for every row stored before the ADD; without a default, NULL.
        - ("copy", {primary key: value}): a volatile default (random(), clock_timestamp()...) rewrote the table, a
          value per row, again without a change: the rows' current values, read once from the source. A later
          change of a row overwrites what was copied, so the copy converges like any snapshot read. A table without
          a primary key cannot be matched row by row: refused, naming the table and column.
        Asked once per column and kept."""
        known = self._origins.get((shape.name, column))
        if known is not None:
            return known
        from psycopg import sql as pg_sql

        relation = pg_sql.Identifier(shape.schema, shape.table)
        with psycopg.connect(psycopg_conninfo(self.pipeline.source.sqlalchemy_url), autocommit=True) as source:
            found = source.execute(
                "select atthasmissing, attmissingval::text, format_type(atttypid, atttypmod), atthasdef "
                "from pg_attribute where attrelid = %s::regclass and attname = %s and not attisdropped",
                (relation.as_string(source), column)).fetchone()
            if found is None:
                origin: tuple[str, Any] = ("value", None)  # dropped again since: the next change says so
            elif found[0]:
                missing_text, type_name = found[1], found[2]
                origin = ("value", one_row(source.execute(pg_sql.SQL("select ({}::text::{})[1]").format(
                    pg_sql.Literal(missing_text), pg_sql.SQL(type_name + "[]"))), "a missing value")[0])
            elif not found[3] or not one_row(source.execute(
                    pg_sql.SQL("select exists (select from {} where {} is not null)").format(
                        relation, pg_sql.Identifier(column))), "select exists")[0]:
                origin = ("value", None)
            elif not shape.primary_key:
                raise ApplyError(
                    f"destination {self.name}: {shape.name}.{column} was added at the source with values PostgreSQL "
                    "wrote without a change event (a volatile default rewrote the table), and the table has no "
                    "primary key to copy them by: its rows cannot be made equal to the source's", table=shape.name)
            else:
                rows = source.execute(pg_sql.SQL("select {}, {} from {}").format(
                    pg_sql.SQL(", ").join(map(pg_sql.Identifier, shape.primary_key)), pg_sql.Identifier(column),
                    relation)).fetchall()
                origin = ("copy", {tuple(row[:-1]): row[-1] for row in rows})
        self._origins[shape.name, column] = origin
        return origin

    def _absent_columns(self, schema_id: int, table: str) -> list[str]:
        """The table's columns that changes of this writer schema do not carry: they were written before the
        columns existed (a replay of the topics into a table made with them)."""
        absent = self._absent.get(schema_id)
        if absent is None:
            shape = self.shapes.get(table)
            carried = self.converter(schema_id, table).avro_names()
            absent = [c for c in shape.column_names if c not in carried] if shape is not None else []
            self._absent[schema_id] = absent
        return absent

    def _fill_absent(self, table: str, row: dict[str, Any], absent: list[str]) -> dict[str, Any]:
        """A row of a change from before `absent` columns existed, with what the source holds there for it."""
        shape = self.shapes[table]
        for column in absent:
            kind, value = self._column_origin(shape, column)
            row[column] = value if kind == "value" else value.get(tuple(row.get(c) for c in shape.primary_key))
        return row


def _spelled(column: ColumnShape) -> str:
    """A source column's type as its catalog spells it (`numeric(12,4)`): what a change of type is told by."""
    return column.source.sql if column.source is not None else str(column.type)


def _type_changes(shape: TableShape, fresh: TableShape, differing: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(column, old type, new type) of the columns whose type differs between the shape a destination was made from
    and the source's `fresh` one, or whose destination type (`differing`, from its catalog) differs."""
    changed = [(c.name, _spelled(shape.column(c.name)), _spelled(c)) for c in fresh.columns
               if c.name in shape.column_names and _spelled(shape.column(c.name)) != _spelled(c)]
    known = {column for column, _, _ in changed}
    changed += [(column, stored, _spelled(fresh.column(column))) for column, stored in differing.items()
                if column not in known and column in fresh.column_names]
    return changed


def _labels(column: ColumnShape) -> tuple[str, ...]:
    source = column.source.leaf() if column.source is not None else None
    return source.labels if source is not None else ()


def _relabelled(shape: TableShape, fresh: TableShape) -> bool:
    """Whether an enum column of the table gained labels at the source since the shape was reflected."""
    return any(_labels(c) != _labels(shape.column(c.name)) for c in fresh.columns if c.name in shape.column_names)


def is_data_error(exc: BaseException) -> bool:
    """A destination's refusal of a value for its column's type (too long, not a label of the enum, out of range):
    the errors a source's silent column change causes. PostgreSQL's class 22, MariaDB's data errors, DuckDB's
    conversion errors."""
    import duckdb
    from sqlalchemy.exc import DataError

    orig = getattr(exc, "orig", None) or exc
    return isinstance(exc, DataError) or isinstance(orig, (psycopg.errors.DataError, duckdb.ConversionException,
                                                             duckdb.InvalidInputException))


__all__ = ["SourceFollower", "is_data_error"]
