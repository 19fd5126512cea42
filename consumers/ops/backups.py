"""Backups taken before `cdc replay` replaces anything, and `cdc backups list / restore / prune` over them.

Two kinds of destination keep them, each its own way:
- a PostgreSQL replica: a schema `_cdc_backup_<time>` holding a copy of each table replaced and of the pipeline's
  stored offsets, recorded in the table `_cdc_backups` (SchemaBackups);
- a DuckDB analytics file: a copy of the whole file in `<file>.backups/<id>-<UTC time>.duckdb`, with a JSON manifest
  beside it (FileBackups). Restoring one puts the whole file back: every table, history and stored offset as they
  were together, also those of other pipelines writing to the same file.
Both are kept for the retention period (30 days unless `prune --days` says otherwise).

DuckDB lets one process write a file, or several read it. The file is only ever copied while a read-only
connection is held on it (so no writer can start meanwhile), and only ever replaced by a rename in its directory
(so a reader that opens it gets the old file or the new one, whole).
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect, text

from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError, DestinationBusy, first_line
from cdc.source_tables import reflect_tables
from consumers.apply.dialects import Dialect, dialect_class, dialect_for
from consumers.apply.dialects.bookkeeping import OFFSETS
from consumers.apply.plan import dependency_order

BACKUPS_TABLE = "_cdc_backups"
DEFAULT_RETENTION = timedelta(days=30)
# How long to wait for readers to let go of a DuckDB file when it must be opened for writing (to fold in a WAL).
READERS_PATIENCE_S = 10.0


@dataclass
class Backup:
    id: int
    created_at: datetime
    location: str  # PostgreSQL: the backup schema; DuckDB: the backup file
    pipeline: str
    tables: list[str]  # the tables the replay replaced


def replayed_dialect(pipeline: Pipeline, destination: str) -> type[Dialect]:
    """The dialect class of a destination that replays and backups know (its `backups` says how they are kept:
    "schema", a PostgreSQL replica; "file", a DuckDB analytics file). Anything else is refused before anything is
    touched."""
    dest = pipeline.destinations.get(destination)
    if dest is None:
        raise ConfigError(f"destinations: no destination named {destination!r} (known: "
                          f"{', '.join(pipeline.destinations) or 'none'})")
    dialect = dialect_class(dest.sqlalchemy_url, dest.kind)
    if dialect.backups is None:
        raise ConfigError(f"destinations.{destination}: replays and backups are not supported for a "
                          f"{dest.sqlalchemy_url.get_backend_name()} {dest.kind} destination (so far: PostgreSQL "
                          "replicas and DuckDB analytics files)")
    if dialect.holds_file:
        duckdb_path(pipeline, destination)
    return dialect


def duckdb_path(pipeline: Pipeline, destination: str) -> Path:
    """The file of a DuckDB destination; an in-memory or remote database has none to copy or swap."""
    database = pipeline.destinations[destination].sqlalchemy_url.database
    if not database or database == ":memory:" or database.startswith("md:"):
        raise ConfigError(f"destinations.{destination}.url: replays and backups need a DuckDB file "
                          f"(duckdb:///path/file.duckdb), not {database or ':memory:'!r}")
    return Path(database)


class BackupStore(ABC):
    """Where a destination keeps its backups; newest first, the current pipeline's only."""

    def __init__(self, pipeline: Pipeline, destination: str) -> None:
        self.pipeline = pipeline
        self.destination = destination

    @abstractmethod
    def take(self, tables: list[str]) -> Backup | None:
        """Back up what a replay of `tables` will replace (None when there is nothing yet)."""

    @abstractmethod
    def list(self) -> list[Backup]: ...

    @abstractmethod
    def restore(self, backup: Backup) -> None:
        """Put back exactly the backed-up content, with the offsets stored at that time."""

    @abstractmethod
    def drop(self, backups: list[Backup]) -> None: ...


def store_for(pipeline: Pipeline, destination: str) -> BackupStore:
    return STORES[replayed_dialect(pipeline, destination).backups or ""](pipeline, destination)


def backup(pipeline: Pipeline, destination: str, tables: list[str]) -> Backup | None:
    return store_for(pipeline, destination).take(tables)


def list_backups(pipeline: Pipeline, destination: str) -> list[Backup]:
    return store_for(pipeline, destination).list()


def restore(pipeline: Pipeline, destination: str, backup_id: int) -> Backup:
    store = store_for(pipeline, destination)
    found = [b for b in store.list() if b.id == backup_id]
    if not found:
        raise CdcError(f"backups: no backup {backup_id} for pipeline {pipeline.name!r} in {destination}")
    store.restore(found[0])
    return found[0]


def prune(pipeline: Pipeline, destination: str, older_than: timedelta = DEFAULT_RETENTION) -> list[Backup]:
    store = store_for(pipeline, destination)
    cutoff = datetime.now(UTC) - older_than
    old = [b for b in store.list() if b.created_at < cutoff]
    store.drop(old)
    return old


# -- PostgreSQL: a schema per backup --------------------------------------------------------------------------------

class SchemaBackups(BackupStore):
    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        engine = create_engine(self.pipeline.destinations[self.destination].driver_url)
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            engine.dispose()

    @staticmethod
    def ensure_table(conn: Any) -> None:
        conn.execute(text(f'create table if not exists "{BACKUPS_TABLE}" (id bigserial primary key, created_at '
                          "timestamptz not null default now(), schema_name text not null, pipeline text not null, "
                          "tables jsonb not null)"))

    def record(self, conn: Any, schema: str, tables: list[str]) -> Backup:
        """Record a backup schema filled in this transaction (by `take`, or by a shadow replay's swap)."""
        row = conn.execute(text(f'insert into "{BACKUPS_TABLE}" (schema_name, pipeline, tables) '
                                "values (:s, :p, cast(:t as jsonb)) returning id, created_at"),
                           {"s": schema, "p": self.pipeline.name, "t": json.dumps(tables)}).one()
        return Backup(row[0], row[1], schema, self.pipeline.name, tables)

    def take(self, tables: list[str]) -> Backup:
        """Copy the tables (and the pipeline's stored offsets) into a new timestamped schema."""
        shapes = reflect_tables(self.pipeline.source.sqlalchemy_url, tables)
        schema = f"_cdc_backup_{datetime.now(UTC):%Y%m%d_%H%M%S_%f}"
        with self._transaction() as conn:
            dialect = dialect_for(conn.engine)
            prep = conn.dialect.identifier_preparer
            self.ensure_table(conn)
            conn.execute(text(f"create schema {prep.quote(schema)}"))
            insp = inspect(conn)
            for name in tables:
                table = dialect.table(shapes[name])
                if insp.has_table(table.name, schema=table.schema):
                    conn.execute(text(f"create table {prep.quote(schema)}.{prep.quote(name)} as table "
                                      f"{prep.format_table(table)}"))
            conn.execute(text(f"create table {prep.quote(schema)}.{prep.quote(OFFSETS.name)} as select * from "
                              f"{prep.quote(OFFSETS.name)} where pipeline = :p"), {"p": self.pipeline.name})
            return self.record(conn, schema, tables)

    def list(self) -> list[Backup]:
        with self._transaction() as conn:
            self.ensure_table(conn)
            rows = conn.execute(text(f'select id, created_at, schema_name, pipeline, tables from "{BACKUPS_TABLE}" '
                                     "where pipeline = :p order by id desc"), {"p": self.pipeline.name}).all()
        return [Backup(r[0], r[1], r[2], r[3], list(r[4])) for r in rows]

    def restore(self, backup: Backup) -> None:
        shapes = reflect_tables(self.pipeline.source.sqlalchemy_url, backup.tables)
        with self._transaction() as conn:
            dialect = dialect_for(conn.engine)
            # Not under an applier at work: it would write into the tables being put back. The lock is this
            # session's, and the session ends with the restore (`_transaction` disposes of its engine).
            if not dialect.try_writer_lock(conn, self.pipeline.name, self.destination):
                raise DestinationBusy(self.destination, self.pipeline.name)
            prep = conn.dialect.identifier_preparer
            dialect.begin_batch(conn, snapshot=True)
            order = dependency_order(shapes)
            for name in reversed(order):
                conn.execute(text(f"delete from {prep.format_table(dialect.table(shapes[name]))}"))
            for name in order:
                conn.execute(text(f"insert into {prep.format_table(dialect.table(shapes[name]))} "
                                  f"select * from {prep.quote(backup.location)}.{prep.quote(name)}"))
            conn.execute(text(f"delete from {prep.quote(OFFSETS.name)} where pipeline = :p"),
                         {"p": self.pipeline.name})
            conn.execute(text(f"insert into {prep.quote(OFFSETS.name)} select * from "
                              f"{prep.quote(backup.location)}.{prep.quote(OFFSETS.name)}"))

    def drop(self, backups: list[Backup]) -> None:
        if not backups:
            return
        with self._transaction() as conn:
            for b in backups:
                conn.execute(text(f'drop schema if exists "{b.location}" cascade'))
                conn.execute(text(f'delete from "{BACKUPS_TABLE}" where id = :i'), {"i": b.id})


# -- DuckDB: a copy of the file per backup --------------------------------------------------------------------------

class FileBackups(BackupStore):
    def __init__(self, pipeline: Pipeline, destination: str) -> None:
        super().__init__(pipeline, destination)
        self.live = duckdb_path(pipeline, destination)
        self.directory = self.live.with_name(self.live.name + ".backups")

    def _manifests(self) -> list[tuple[Backup, Path]]:
        found = []
        for manifest in self.directory.glob("*.json") if self.directory.is_dir() else ():
            try:
                data = json.loads(manifest.read_text())
                found.append((Backup(int(data["id"]), datetime.fromisoformat(data["created_at"]),
                                     str(self.directory / data["file"]), data["pipeline"], list(data["tables"])),
                              manifest))
            except (ValueError, KeyError, TypeError) as exc:
                raise CdcError(f"backups: the manifest {manifest} is unreadable ({exc!r}); fix or remove it") from None
        return sorted(found, key=lambda item: item[0].id, reverse=True)

    def list(self) -> list[Backup]:
        return [b for b, _ in self._manifests() if b.pipeline == self.pipeline.name]

    def _reserve(self) -> tuple[int, datetime, Path]:
        """The next id (ids only grow, whichever pipeline took the backups) and a file name for it."""
        self.directory.mkdir(exist_ok=True)
        taken = [int(p.name.split("-", 1)[0]) for p in self.directory.iterdir() if p.name.split("-", 1)[0].isdigit()]
        backup_id = max(taken, default=0) + 1
        now = datetime.now(UTC)
        return backup_id, now, self.directory / f"{backup_id:04d}-{now:%Y%m%dT%H%M%SZ}.duckdb"

    def _record(self, backup_id: int, created_at: datetime, path: Path, tables: list[str]) -> Backup:
        """Write the manifest last, whole (a rename): a backup without one was never finished and is not listed."""
        manifest = path.with_suffix(".json")
        partial = manifest.with_name(f".{manifest.name}.partial")
        partial.write_text(json.dumps({"id": backup_id, "created_at": created_at.isoformat(), "file": path.name,
                                       "pipeline": self.pipeline.name, "destination": self.destination,
                                       "tables": tables}, indent=2))
        os.replace(partial, manifest)
        return Backup(backup_id, created_at, str(path), self.pipeline.name, tables)

    def take(self, tables: list[str]) -> Backup | None:
        if not self.live.exists():
            return None  # never written: nothing to lose
        backup_id, now, path = self._reserve()
        copy_database(self.live, path)
        return self._record(backup_id, now, path, tables)

    def restore(self, backup: Backup) -> None:
        restored = self.live.with_name(f".{self.live.name}.restore")
        try:
            copy_database(Path(backup.location), restored)
            replace_database(restored, self.live)
        finally:
            remove_database(restored)

    def swap_in(self, new: Path, tables: list[str], *, keep_old: bool) -> Backup | None:
        """Put the file `new` (beside the live one, closed) in place of the live file in one rename. With
        `keep_old`, the old file becomes a backup: a second name for it in the backups directory, made first."""
        if not (keep_old and self.live.exists()):
            replace_database(new, self.live)
            return None
        backup_id, now, path = self._reserve()
        replace_database(new, self.live, keep_old_at=path)
        return self._record(backup_id, now, path, tables)

    def drop(self, backups: list[Backup]) -> None:
        manifests = {b.id: manifest for b, manifest in self._manifests()}
        for b in backups:
            manifests[b.id].unlink(missing_ok=True)  # first: a file without a manifest is not a backup any more
            remove_database(Path(b.location))


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def remove_database(path: Path) -> None:
    """Remove a DuckDB file and its write-ahead log, if any."""
    path.unlink(missing_ok=True)
    _wal(path).unlink(missing_ok=True)


def check_not_written(path: Path) -> None:
    """Refuse when another process is writing the DuckDB file (a `cdc run` in the middle of a batch). An idle
    `cdc run` holds no lock between batches and cannot be seen: stopping it first is the operator's part."""
    if path.exists():
        with _read_only(path):
            pass


@contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """Hold a read-only connection on a DuckDB file: while it is open no process can write the file."""
    import duckdb

    try:
        conn = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        message = first_line(exc)
        if "lock" in message.lower():
            raise CdcError(f"{path} is being written by another process; stop `cdc run` for this destination first "
                           f"({message})") from None
        raise CdcError(f"cannot open {path}: {message}") from None
    try:
        yield
    finally:
        conn.close()


def fold_wal(path: Path) -> None:
    """Fold the write-ahead log a DuckDB writer left beside `path` (one that stopped without closing the file) into
    the file, so that the file alone holds everything. It needs the file for writing: readers, who come and go, are
    waited for a while; a writer is not."""
    if not _wal(path).exists():
        return
    import duckdb

    from consumers.apply.dialects.duckdb import when_free

    try:
        conn = when_free(lambda: duckdb.connect(str(path)), READERS_PATIENCE_S)
    except duckdb.Error as exc:
        raise CdcError(f"cannot open {path} to fold its write-ahead log in: {first_line(exc)}",
                       hint="stop `cdc run` for this destination, and the readers of the file") from None
    try:
        conn.execute("CHECKPOINT")
    finally:
        conn.close()


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of the DuckDB file `source` at `target`, written under another name and renamed when whole.
    The bytes are copied while a read-only connection holds the file, so no writer can change them meanwhile; a
    write-ahead log found beside it is copied too, then folded into the copy (which nobody else has open)."""
    partial = target.with_name(f".{target.name}.partial")
    remove_database(partial)
    try:
        with _read_only(source):
            shutil.copyfile(source, partial)
            if _wal(source).exists():
                shutil.copyfile(_wal(source), _wal(partial))
        fold_wal(partial)
        os.replace(partial, target)
    finally:
        remove_database(partial)


def replace_database(new: Path, live: Path, *, keep_old_at: Path | None = None) -> None:
    """Put the DuckDB file `new` (closed, without a WAL, in the live file's directory) in place of `live` with one
    rename; with `keep_old_at`, the old file keeps that second name (a hard link, else a copy).

    A WAL left beside `live` would belong to the wrong file after the rename (DuckDB refuses to open the pair), so
    it is folded into the old file first. A read-only connection is held on the old file throughout: no writer can
    start on it before the rename, and one that starts after it opens the new file."""
    fold_wal(live)
    if not live.exists():
        os.replace(new, live)
        return
    with _read_only(live):
        if _wal(live).exists():
            raise CdcError(f"{live} was written while it was being replaced; stop `cdc run` for this destination "
                           "and try again")
        if keep_old_at is not None:
            try:
                os.link(live, keep_old_at)  # no copy: the old file simply keeps this name when the live one moves on
            except OSError:
                shutil.copyfile(live, keep_old_at)
        try:
            os.replace(new, live)
        except BaseException:
            if keep_old_at is not None:
                keep_old_at.unlink(missing_ok=True)  # perhaps still a name of the live file: it must not stay
            raise



# -- PostgreSQL: a scope of rows per backup (cdc sync) --------------------------------------------------------------

class ScopeBackups:
    """Backups of a scope of rows (the rows a configuration sync replaces), in the same `_cdc_backups` table and
    `_cdc_backup_<time>` schemas as SchemaBackups, under an owner of their own (`<pipeline>.sync.<name>`), so that
    they are listed, restored and pruned the same way. `take` works in the caller's transaction: the backup exists
    exactly when what it guards was committed."""

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def take(self, conn: Any, scopes: dict[str, tuple[str, dict[str, Any]]]) -> Backup:
        """Copy, per table, the rows matching its predicate (SQL and parameters) into a new backup schema."""
        prep = conn.dialect.identifier_preparer
        schema = f"_cdc_backup_{datetime.now(UTC):%Y%m%d_%H%M%S_%f}"
        SchemaBackups.ensure_table(conn)
        conn.execute(text(f"create schema {prep.quote(schema)}"))
        for name, (predicate, params) in scopes.items():
            table_schema, table = name.split(".", 1)
            conn.execute(text(f"create table {prep.quote(schema)}.{prep.quote(name)} as select * from "
                              f"{prep.quote(table_schema)}.{prep.quote(table)} where {predicate}"), params)
        row = conn.execute(text(f'insert into "{BACKUPS_TABLE}" (schema_name, pipeline, tables) '
                                "values (:s, :p, cast(:t as jsonb)) returning id, created_at"),
                           {"s": schema, "p": self.owner, "t": json.dumps(list(scopes))}).one()
        return Backup(row[0], row[1], schema, self.owner, list(scopes))

    def list(self, conn: Any) -> list[Backup]:
        SchemaBackups.ensure_table(conn)
        rows = conn.execute(text(f'select id, created_at, schema_name, pipeline, tables from "{BACKUPS_TABLE}" '
                                 "where pipeline = :p order by id desc"), {"p": self.owner}).all()
        return [Backup(r[0], r[1], r[2], r[3], list(r[4])) for r in rows]

    def prune(self, conn: Any, older_than: timedelta) -> list[Backup]:
        """Drop this owner's backups older than the retention period."""
        cutoff = datetime.now(UTC) - older_than
        old = [b for b in self.list(conn) if b.created_at < cutoff]
        for b in old:
            conn.execute(text(f'drop schema if exists "{b.location}" cascade'))
            conn.execute(text(f'delete from "{BACKUPS_TABLE}" where id = :i'), {"i": b.id})
        return old


# How each way of keeping backups that a dialect names (Dialect.backups) is done.
STORES: dict[str, type[BackupStore]] = {"schema": SchemaBackups, "file": FileBackups}
