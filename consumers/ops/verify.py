"""`cdc verify`: how well a destination agrees with its source, table by table, computed inside both databases.

Every row gets a canonical text (consumers/ops/compare.py: one rule per source column type, spelled in each engine's
SQL so that PostgreSQL, MariaDB and DuckDB give the same text for equal values), and an md5 of it. Rows are put in
buckets the same way on both sides, whatever the engines' types and collations:
- a one-column integer key: by ranges of its values (~16 rows a range), which the key's index fetches back;
- any other key (composite, uuid, text, char...): by the first hex digits of the md5 of the key's text;
- no primary key: the table is a multiset of rows, bucketed by the first digits of the row's own md5.

1. Each side returns (bucket, count, aggregate of 60 bits of the row md5s) for the whole table in one query: XOR for
   keyed tables (rows are unique), a sum for keyless ones (a duplicated row must not cancel itself out).
2. Buckets whose (count, aggregate) agree are equal and never leave the database. Rows of the differing buckets
   only are fetched from both sides, with their key text and row hash, in one query each.
3. Rows whose key text is on one side only are missing or extra; rows whose hashes differ are compared value by
   value with the Python rule (compare.equal), which settles what SQL could not spell identically (JSON spacing,
   arrays kept as JSON text, float exponents): such a pair is equal, never a false alarm. Keyless rows are matched
   as multisets of their normal forms.

Both sides run at the same time (one thread each), each in one snapshot. Small tables skip step 1. A table that
cannot be compared (no destination table yet, a query fails) is reported with the reason, never skipped.

Analytics destinations also keep a change history per table (`<table>__history`); each is checked inside the
destination, in the same snapshot as its current-state table (check_history): no change stored twice, and each
key's last history entry gives its current row. A history problem makes the table, and the report, unequal; histories
are only reported here, never repaired (`--fix` re-syncs current-state rows only).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError, first_line
from cdc.source_tables import LSN_COLUMN, MissingTables, TableShape, reflect_tables
from consumers.apply.dialects import Dialect, dialect_class, dialect_for
from consumers.apply.dialects.base import HISTORY_COLUMNS, HISTORY_SUFFIX
from consumers.apply.dialects.postgres import PostgresDialect
from consumers.apply.shapes import SNAPSHOT_LSN
from consumers.ops.compare import Kind, equal, jsonable, kind_of, normal, normal_row

ROWS_PER_BUCKET = 16  # the aim of step 1: a differing bucket costs ~16 rows fetched per side
FETCH_ALL_BELOW = 20_000  # tables with at most this many rows a side skip step 1: one query fetches them
DUCKDB_PATIENCE_S = 60.0  # how long to wait for a DuckDB file another process (the applier) writes
# The source's backend: its canonical texts, quoting and snapshot are PostgreSQL's.
SOURCE: type[Dialect] = PostgresDialect


@dataclass
class TableReport:
    table: str
    source_rows: int = 0
    destination_rows: int = 0
    missing: list[list[Any]] = field(default_factory=list)  # at the source, not at the destination
    extra: list[list[Any]] = field(default_factory=list)  # at the destination, not at the source
    different: list[list[Any]] = field(default_factory=list)
    keyless: bool = False  # no primary key: missing/extra are whole rows (one entry per surplus copy)
    error: str | None = None  # why the table could not be compared
    queries: int = 0
    seconds: float = 0.0
    # The canonical key text of each reported key (row hash for keyless rows): how fix and recheck find them.
    handles: dict[str, dict[tuple, str]] = field(default_factory=dict, repr=False)
    history: HistoryReport | None = None  # analytics destinations: what the check of the table's history found

    @property
    def distinct_keys(self) -> int:
        return self.source_rows + len(self.extra)

    @property
    def accuracy(self) -> float:
        """Matching keys / distinct keys of both sides (1.0 for two empty tables)."""
        if self.error:
            return 0.0
        distinct = self.distinct_keys
        matching = self.source_rows - len(self.missing) - len(self.different)
        return 1.0 if distinct == 0 else max(0.0, matching / distinct)

    @property
    def rows_equal(self) -> bool:
        """The current-state table agrees with the source (its history aside)."""
        return not (self.missing or self.extra or self.different or self.error)

    @property
    def equal(self) -> bool:
        return self.rows_equal and (self.history is None or self.history.equal)

    def as_json(self) -> dict[str, Any]:
        return {"table": self.table, "source_rows": self.source_rows, "destination_rows": self.destination_rows,
                "missing": self.missing, "extra": self.extra, "different": self.different,
                "accuracy": round(self.accuracy, 6), "keyless": self.keyless, "error": self.error,
                "queries": self.queries, "seconds": round(self.seconds, 3)} | (
                    {"history": self.history.as_json()} if self.history is not None else {})


@dataclass
class Report:
    destination: str
    tables: list[TableReport]

    @property
    def equal(self) -> bool:
        return all(t.equal for t in self.tables)

    def as_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "equal": self.equal, "tables": [t.as_json() for t in self.tables]}


# ---------------------------------------------------------------------------------------------------------------
# table names


def _split_quoted(name: str) -> list[str] | None:
    """`"Ops"."My table"` -> ['Ops', 'My table'] (doubled quotes inside); None when not written that way."""
    parts, i = [], 0
    while i < len(name):
        if name[i] != '"':
            return None
        j, part = i + 1, []
        while True:
            end = name.find('"', j)
            if end < 0:
                return None
            part.append(name[j:end])
            if name[end + 1:end + 2] == '"':
                part.append('"')
                j = end + 2
                continue
            break
        parts.append("".join(part))
        i = end + 1
        if i < len(name):
            if name[i] != ".":
                return None
            i += 1
    return parts


def _parts(name: str) -> list[str]:
    """schema and table of a name as a user types it: quoted parts exact, unquoted parts as typed."""
    name = name.strip()
    quoted = _split_quoted(name)
    if quoted is not None:
        return quoted
    m = re.fullmatch(r'"((?:[^"]|"")*)"\.(.+)', name) or re.fullmatch(r'([^".]+)\."((?:[^"]|"")*)"', name)
    if m:
        return [m.group(1).replace('""', '"'), m.group(2).strip('"').replace('""', '"')]
    return name.split(".", 1)


def resolve_table(name: str, tables: tuple[str, ...] | list[str]) -> str:
    """The captured table a user means: `schema.table` as configured, `"Schema"."Table"` (quoted, exact),
    `Schema.Table` in any case when only one captured table matches, or a bare table name when unique."""
    if name in tables:
        return name
    parts = _parts(name)
    exact = [t for t in tables if t.split(".", 1) == parts] if len(parts) == 2 else []
    if exact:
        return exact[0]
    if '"' in name and len(parts) == 2 and all(name.count('"') >= 2 for _ in parts):
        # Quoted names are exact, as in SQL: no case folding.
        loose = [i for i, p in enumerate(parts) if f'"{p.replace(chr(34), chr(34) * 2)}"' not in name]
        candidates = [t for t in tables if all(
            (a.lower() == b.lower()) if i in loose else a == b for i, (a, b) in enumerate(zip(t.split(".", 1), parts)))]
        if len(candidates) == 1:
            return candidates[0]
        raise ConfigError(f"--tables: {name!r} is not a captured table (source.tables: {', '.join(tables)})")
    if len(parts) == 2:
        folded = [t for t in tables if [p.lower() for p in t.split(".", 1)] == [p.lower() for p in parts]]
    else:
        folded = [t for t in tables if t.split(".", 1)[1] == parts[0]] or \
                 [t for t in tables if t.split(".", 1)[1].lower() == parts[0].lower()]
    if len(folded) == 1:
        return folded[0]
    if len(folded) > 1:
        raise ConfigError(f"--tables: {name!r} matches {', '.join(folded)}; quote it exactly, e.g. "
                          f'"{folded[0].split(".", 1)[0]}"."{folded[0].split(".", 1)[1]}"')
    raise ConfigError(f"--tables: {name!r} is not a captured table (source.tables: {', '.join(tables)})")


# ---------------------------------------------------------------------------------------------------------------
# one side


class _Side:
    """One database's view of one table: bucket aggregates, and rows of chosen buckets with key text and hash."""

    def __init__(self, conn: Connection, backend: type[Dialect], table_sql: str, shape: TableShape,
                 stored: dict[str, str], peer: dict[str, str] | None = None) -> None:
        self.conn = conn
        self.backend = backend
        self.canon = backend.canon()
        self.table = table_sql
        self.columns = [c for c in shape.column_names if c != LSN_COLUMN]
        self.kinds = [kind_of(shape.column(c).type) for c in self.columns]
        self.key_index = [self.columns.index(k) for k in shape.primary_key]
        # Every column name quoted, always: SQLAlchemy's DuckDB preparer leaves DuckDB keywords such as `by` bare.
        quoted = [backend.quote(c) for c in self.columns]
        # The source's own column types are its reflected ones; where a canonical form depends on what the other
        # side can hold (an interval against MariaDB's microseconds), the source reads `peer`, the destination's.
        if peer is not None:
            stored = {c: "interval" if peer.get(c) == "interval" else "" for c in self.columns
                      if self.kinds[self.columns.index(c)].name == "interval"}
        texts = [self.canon.column(k, q, stored.get(c)) for c, k, q in zip(self.columns, self.kinds, quoted)]
        self.row_text = self.canon.row_text(texts)
        self.key_text = self.canon.row_text([texts[i] for i in self.key_index]) if self.key_index else None
        # A one-column integer key is bucketed by ranges of its values (found through its index).
        self.int_key = quoted[self.key_index[0]] if len(self.key_index) == 1 and \
            self.kinds[self.key_index[0]].name == "int" else None
        self.fetch_exprs = [self.canon.fetch(k, q, stored.get(c)) for c, k, q in zip(self.columns, self.kinds, quoted)]
        self.exact = all(self.canon.exact(k, stored.get(c)) for c, k in zip(self.columns, self.kinds))
        # Light: fetch the key columns only (when both sides are exact, a differing hash is a difference).
        self.light = False
        self.queries = 0

    def _run(self, sql: str) -> list[Any]:
        self.queries += 1
        return raw_query(self.conn, sql)

    def count(self) -> tuple[int, Any, Any]:
        """Rows, and the smallest and largest key of a one-column integer key (None otherwise)."""
        if self.int_key is None:
            return int(self._run(f"SELECT count(*) FROM {self.table}")[0][0]), None, None
        n, lo, hi = self._run(f"SELECT count(*), min({self.int_key}), max({self.int_key}) FROM {self.table}")[0]
        return int(n), lo, hi

    def _inner(self) -> str:
        """Per row: its key text (the row hash's md5 for keyless tables), row hash, and the fetched columns."""
        c = self.canon
        row_md5 = c.md5(self.row_text)
        key = self.key_text if self.key_text is not None else row_md5
        fetched = [self.fetch_exprs[i] for i in self.key_index] if self.light else self.fetch_exprs
        return f"SELECT {key} AS k, {c.hash60(row_md5)} AS h, {', '.join(fetched)} FROM {self.table}"

    def bucket_expr(self, b: Bucketing) -> str:
        if b.width is not None:
            return f"(({self.int_key} - ({b.lo})) {self.canon.int_div} {b.width})"
        key = self.key_text if self.key_text is not None else self.row_text
        return f"substr({self.canon.md5(key)}, 1, {b.digits})"

    def buckets(self, b: Bucketing) -> dict[Any, tuple[int, int]]:
        """(count, hash aggregate) per bucket. Keyed rows are unique, so their hashes are XORed (cheap, and no
        two rows cancel); a keyless table may hold a row twice, which XOR would cancel, so its hashes are summed."""
        c = self.canon
        h = c.hash60(c.md5(self.row_text))
        agg = f"bit_xor({h})" if self.key_index else f"sum({h})"
        sql = f"SELECT {self.bucket_expr(b)} AS b, count(*), {agg} FROM {self.table} GROUP BY 1"
        return {_bucket_value(r[0]): (int(r[1]), int(r[2] or 0)) for r in self._run(sql)}

    def rows(self, b: Bucketing, buckets: list[Any] | None) -> list[tuple]:
        """(key text, row hash, values...) of the rows in these buckets (all rows for None)."""
        sql = self._inner()
        if buckets is not None:
            if not buckets:
                return []
            if b.width is not None and len(buckets) <= RANGES_AT_MOST:
                # Key ranges: the primary key's index finds them without reading the table.
                ranges = [(b.lo + x * b.width, b.lo + (x + 1) * b.width - 1) for x in buckets]
                sql += " WHERE " + " OR ".join(f"{self.int_key} BETWEEN {lo} AND {hi}" for lo, hi in ranges)
            else:
                listed = ", ".join(str(x) if isinstance(x, int) else f"'{x}'" for x in buckets)  # ints or hex
                sql += f" WHERE {self.bucket_expr(b)} IN ({listed})"
        return [tuple(r) for r in self._run(sql)]


RANGES_AT_MOST = 500  # differing key ranges fetched by index; more are found by one scan


def _bucket_value(v: Any) -> Any:
    return v if isinstance(v, str) else int(v)


@dataclass(frozen=True)
class Bucketing:
    """How rows are put in buckets: by ranges of a one-column integer key (`lo`, `width`), which the key's index
    can fetch, or by the first `digits` hex digits of the key text's md5 (any key, any engine's collation)."""

    digits: int = 1
    lo: int | None = None
    width: int | None = None

    def of(self, handle: str) -> Any:
        """The bucket of a reported row, from its handle (key text 'v123', or a keyless row's md5)."""
        if self.width is not None:
            return (int(handle[1:]) - self.lo) // self.width
        return _bucket_of(handle, self.digits)


def table_sql(backend: type[Dialect], table: Any) -> str:
    """A destination Table's name, quoted for its backend."""
    return ".".join(backend.quote(part) for part in ([table.schema] if table.schema else []) + [table.name])


def raw_query(conn: Connection, sql: str, *, fetch: bool = True) -> list[Any]:
    """Run SQL without parameters on the driver's own cursor (in the connection's transaction): SQLAlchemy would
    hand the drivers an empty parameter list, and PyMySQL then reads every '%' in a key's text as a placeholder."""
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(sql)
        return [tuple(r) for r in cursor.fetchall()] if fetch else []
    finally:
        cursor.close()


def _bucket_of(key_text: str, digits: int) -> str:
    return hashlib.md5(key_text.encode("utf-8")).hexdigest()[:digits]


def _digits(rows: int) -> int:
    """Hex digits of the bucket: about ROWS_PER_BUCKET rows a bucket, at least 16 buckets."""
    return max(1, min(6, math.ceil(math.log(max(rows, 1) / ROWS_PER_BUCKET, 16)) if rows > ROWS_PER_BUCKET else 1))


def _key_sort(key: list[Any]) -> list[tuple]:
    return [(0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v)) for v in key]


def _compare_rows(src: _Side, src_rows: list[tuple], dst_rows: list[tuple], report: TableReport) -> None:
    """File the fetched rows of both sides as missing, extra or different (keyed), or as surplus copies (keyless)."""
    kinds = src.kinds
    key_kinds = [kinds[i] for i in src.key_index]
    if src.key_index:
        # Where each key value sits in a fetched row: after (key text, hash), among all columns or the key's only.
        at = [2 + j for j in range(len(src.key_index))] if src.light else [2 + i for i in src.key_index]
        s = {r[0]: r for r in src_rows}
        d = {r[0]: r for r in dst_rows}
        only_src = [k for k in s if k not in d]
        only_dst = [k for k in d if k not in s]
        # A key whose text differs between engines (an exotic key type) still pairs up by its normal form.
        by_normal = {tuple(normal(t, s[k][p]) for t, p in zip(key_kinds, at)): k for k in only_src}
        paired = []
        for k in only_dst:
            other = by_normal.pop(tuple(normal(t, d[k][p]) for t, p in zip(key_kinds, at)), None)
            if other is not None:
                paired.append((other, k))
        paired_src = {a for a, _ in paired}
        paired_dst = {b for _, b in paired}
        candidates = [(k, k) for k in s if k in d and s[k][1] != d[k][1]] + paired
        for ks, kd in candidates:
            if (src.light and ks == kd) or not _equal_row(kinds, s[ks][2:], d[kd][2:]):
                _file(report, "different", [s[ks][p] for p in at], ks, key_kinds)
        for k in only_src:
            if k not in paired_src:
                _file(report, "missing", [s[k][p] for p in at], k, key_kinds)
        for k in only_dst:
            if k not in paired_dst:
                _file(report, "extra", [d[k][p] for p in at], k, key_kinds)
        return
    # Keyless: rows with the same hash are the same row; the others are matched by their normal forms.
    sc, dc = Counter(r[1] for r in src_rows), Counter(r[1] for r in dst_rows)
    unsettled_s = [r for r in src_rows if sc[r[1]] != dc.get(r[1], 0)]
    unsettled_d = [r for r in dst_rows if dc[r[1]] != sc.get(r[1], 0)]
    s_norm = Counter(normal_row(kinds, r[2:]) for r in unsettled_s)
    d_norm = Counter(normal_row(kinds, r[2:]) for r in unsettled_d)
    sample_s = {normal_row(kinds, r[2:]): r for r in unsettled_s}
    sample_d = {normal_row(kinds, r[2:]): r for r in unsettled_d}
    for row, n in (s_norm - d_norm).items():
        for _ in range(n):
            _file(report, "missing", list(sample_s[row][2:]), sample_s[row][0])
    for row, n in (d_norm - s_norm).items():
        for _ in range(n):
            _file(report, "extra", list(sample_d[row][2:]), sample_d[row][0])


def _equal_row(kinds: list[Kind], a: tuple, b: tuple) -> bool:
    return all(equal(k, x, y) for k, x, y in zip(kinds, a, b))


def _file(report: TableReport, bucket: str, key: list[Any], handle: str, kinds: list[Kind] | None = None) -> None:
    # char(n) keys are shown without their padding, as a user types them (whichever side's value this is).
    shown = [jsonable(v.rstrip(" ") if isinstance(v, str) and k is not None and k.name == "char" else v)
             for v, k in zip(key, kinds or [None] * len(key))]
    getattr(report, bucket).append(shown)
    report.handles.setdefault(bucket, {})[tuple(map(repr, shown))] = handle


def _compare(src: _Side, dst: _Side, report: TableReport,
             pool: ThreadPoolExecutor) -> tuple[Bucketing, list[Any] | None]:
    """Compare the two sides into `report`; returns the bucketing and the buckets fetched (None: the whole table)."""
    (n_src, lo_s, hi_s), (n_dst, lo_d, hi_d) = [f.result() for f in [pool.submit(src.count), pool.submit(dst.count)]]
    report.source_rows, report.destination_rows = n_src, n_dst
    largest = max(n_src, n_dst)
    bounds = [v for v in (lo_s, hi_s, lo_d, hi_d) if v is not None]
    if src.int_key is not None and bounds:
        lo, hi = min(bounds), max(bounds)
        width = max(1, -(-(hi - lo + 1) // max(1, largest // ROWS_PER_BUCKET)))
        bucketing = Bucketing(lo=lo, width=width)
    else:
        bucketing = Bucketing(digits=_digits(largest))
    src.light = dst.light = bool(src.key_index) and src.exact and dst.exact
    if largest <= FETCH_ALL_BELOW:
        chosen = None
    else:
        a_f, b_f = pool.submit(src.buckets, bucketing), pool.submit(dst.buckets, bucketing)
        a, b = a_f.result(), b_f.result()
        chosen = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    s_f, d_f = pool.submit(src.rows, bucketing, chosen), pool.submit(dst.rows, bucketing, chosen)
    _compare_rows(src, s_f.result(), d_f.result(), report)
    return bucketing, chosen


def _sort(report: TableReport) -> None:
    for name in ("missing", "extra", "different"):
        getattr(report, name).sort(key=_key_sort)


# ---------------------------------------------------------------------------------------------------------------
# connections


def source_engine(pipeline: Pipeline) -> Engine:
    return create_engine(pipeline.source.sqlalchemy_url.set(drivername="postgresql+psycopg"), poolclass=NullPool)


def destination_engine(pipeline: Pipeline, destination: str, *, write: bool = False) -> Engine:
    dest = pipeline.destinations[destination]
    return dialect_class(dest.driver_url, dest.kind).reader_engine(dest.driver_url, write=write)


def backend_of(pipeline: Pipeline, destination: str) -> type[Dialect]:
    """The dialect class of a destination: how its SQL quotes, types and canonical texts are spelled."""
    dest = pipeline.destinations[destination]
    return dialect_class(dest.driver_url, dest.kind)


def connect(engine: Engine) -> Connection:
    """A reading connection of `destination_engine`, waiting while the applier holds a DuckDB file."""
    backend = dialect_class(engine.url)  # how it is read does not depend on the destination's kind
    if backend.holds_file:
        from pathlib import Path

        path = engine.url.database
        if path and path != ":memory:" and not Path(path).exists():
            raise CdcError(f"verify: the DuckDB file {path} does not exist yet (`cdc run` creates it when it applies "
                           "the first changes)")
    return backend.connect_reading(engine, DUCKDB_PATIENCE_S)


@dataclass
class _Target:
    shape: TableShape
    src_sql: str
    dst_sql: str
    stored: dict[str, str]
    history: tuple[str, str | None, str] | None = None  # analytics destinations: the history table (_history_sql)


def _targets(pipeline: Pipeline, destination: str, chosen: list[str], dst: Connection, backend: type[Dialect],
             reports: dict[str, TableReport]) -> dict[str, _Target]:
    from sqlalchemy.exc import ProgrammingError

    shapes = {}
    for name in chosen:  # one by one: a table missing at the source is that table's error, not everyone's
        try:
            shapes.update(reflect_tables(pipeline.source.sqlalchemy_url, [name]))
        except (MissingTables, ProgrammingError, psycopg.errors.UndefinedTable) as exc:
            reports[name].error = ("the source has no such table (source.tables names it)"
                                   if isinstance(exc, MissingTables) or "does not exist" in str(exc)
                                   else f"cannot be read at the source: {first_line(exc)}")
    dialect = dialect_for(dst.engine, pipeline.destinations[destination].kind)
    targets = {}
    for name in chosen:
        if name not in shapes:
            continue
        shape = shapes[name]
        table = dialect.table(shape)
        stored = backend.catalog_types(dst, table.schema, table.name)
        if not stored:
            reports[name].error = (f"the destination {destination} has no table {table.fullname} yet (`cdc run` "
                                   "creates it when it applies the table's first changes)")
            continue
        missing = [c for c in shape.column_names if c not in stored]
        if missing:
            reports[name].error = (f"the destination table {table.fullname} has no column(s) {', '.join(missing)} "
                                   "(`cdc run` adds them when it applies the next change)")
            continue
        reports[name].keyless = not shape.primary_key
        src_sql = f'"{shape.schema.replace(chr(34), chr(34) * 2)}"."{shape.table.replace(chr(34), chr(34) * 2)}"'
        targets[name] = _Target(shape, src_sql, table_sql(backend, table), stored,
                                _history_sql(backend, table) if dialect.keeps_history else None)
    return targets


def verify(pipeline: Pipeline, destination: str, tables: list[str] | None = None, *, settle: float = 2.0,
           echo: Callable[[str], None] = lambda line: None) -> Report:
    """Compare every chosen table (all captured tables by default) of one destination with the source."""
    if destination not in pipeline.destinations:
        raise ConfigError(f"destinations: no destination named {destination!r} "
                          f"(known: {', '.join(pipeline.destinations) or 'none'})")
    chosen = list(dict.fromkeys(resolve_table(t, pipeline.source.tables) for t in tables)) if tables \
        else list(pipeline.source.tables)
    reports = {name: TableReport(name) for name in chosen}
    src_engine, dst_engine = source_engine(pipeline), destination_engine(pipeline, destination)
    backend = backend_of(pipeline, destination)
    targets: dict[str, _Target] = {}
    fetched: dict[str, tuple[Bucketing, list[Any] | None]] = {}
    try:
        with src_engine.connect() as src, connect(dst_engine) as dst, ThreadPoolExecutor(2) as pool:
            # One snapshot per side, so that every table is compared as of one moment on each side.
            SOURCE.begin_consistent_read(src)
            backend.begin_consistent_read(dst)
            targets = _targets(pipeline, destination, chosen, dst, backend, reports)
            for name, target in targets.items():
                report = reports[name]
                started = time.monotonic()
                s_side = _Side(src, SOURCE, target.src_sql, target.shape, {}, target.stored)
                d_side = _Side(dst, backend, target.dst_sql, target.shape, target.stored)
                try:
                    fetched[name] = _compare(s_side, d_side, report, pool)
                except Exception as exc:  # noqa: BLE001 - reported per table, never skipped in silence
                    report.error = f"could not be compared: {type(exc).__name__}: {first_line(exc)}"
                    _reset(src)
                    _reset(dst)
                report.queries = s_side.queries + d_side.queries
                report.seconds = time.monotonic() - started
                echo(f"{name}: {len(report.missing)} missing, {len(report.extra)} extra, "
                     f"{len(report.different)} different ({report.seconds:.1f} s)")
            # Analytics histories, in the same snapshot of the destination as its current-state tables.
            for name, target in targets.items():
                if target.history is None:
                    continue
                try:
                    reports[name].history = check_history(dst, backend, target, target.history)
                except Exception as exc:  # noqa: BLE001 - reported per table, never skipped in silence
                    reports[name].history = HistoryReport(
                        table=target.history[2], error=f"could not be checked: {type(exc).__name__}: "
                                                       f"{first_line(exc)}")
                    _reset(dst)
                h = reports[name].history
                echo(f"{name}: history {h.rows} rows, {h.duplicates} duplicate(s), {h.inconsistent} inconsistent "
                     "key(s)" + (f", {h.error}" if h.error else ""))
        unequal = [n for n in targets if not reports[n].rows_equal and not reports[n].error]
        if unequal and settle > 0:
            # A change still in flight (within the destination's lag) when the tables were read has been applied
            # by now: only what differs in both looks is reported.
            time.sleep(settle)
            with src_engine.connect() as src, connect(dst_engine) as dst, ThreadPoolExecutor(2) as pool:
                SOURCE.begin_consistent_read(src)
                backend.begin_consistent_read(dst)
                for name in unequal:
                    _recheck(src, dst, backend, targets[name], reports[name], fetched[name], pool)
    finally:
        src_engine.dispose()
        dst_engine.dispose()
    for report in reports.values():
        _sort(report)
    return Report(destination, [reports[n] for n in chosen])


def _reset(conn: Connection) -> None:
    with contextlib.suppress(Exception):  # the connection is only read; a failed rollback leaves nothing behind
        conn.rollback()


def _recheck(src: Connection, dst: Connection, backend: type[Dialect], target: _Target, report: TableReport,
             fetched: tuple[Bucketing, list[Any] | None], pool: ThreadPoolExecutor) -> None:
    """Compare the reported rows once more; only what differs in both looks stays reported."""
    bucketing, chosen = fetched
    handles = {h for name in ("missing", "extra", "different") for h in report.handles.get(name, {}).values()}
    # A keyless row's handle is its row md5, whose first digits are its bucket.
    buckets = None if chosen is None else sorted({h[:bucketing.digits] if report.keyless else bucketing.of(h)
                                                  for h in handles})
    again = TableReport(report.table, keyless=report.keyless)
    s_side = _Side(src, SOURCE, target.src_sql, target.shape, {}, target.stored)
    d_side = _Side(dst, backend, target.dst_sql, target.shape, target.stored)
    s_side.light = d_side.light = bool(s_side.key_index) and s_side.exact and d_side.exact
    s_f, d_f = pool.submit(s_side.rows, bucketing, buckets), pool.submit(d_side.rows, bucketing, buckets)
    _compare_rows(s_side, s_f.result(), d_f.result(), again)
    report.queries += s_side.queries + d_side.queries
    for name in ("missing", "extra", "different"):
        if report.keyless:  # multisets: as many copies as both looks agree on
            budget = Counter(map(repr, getattr(again, name))) & Counter(map(repr, getattr(report, name)))
            kept = []
            for row in getattr(again, name):
                if budget[repr(row)] > 0:
                    budget[repr(row)] -= 1
                    kept.append(row)
            setattr(report, name, kept)
            report.handles[name] = again.handles.get(name, {})
        else:
            still = again.handles.get(name, {})
            setattr(report, name, [k for k in getattr(report, name) if tuple(map(repr, k)) in still])
            report.handles[name] = {k: v for k, v in report.handles.get(name, {}).items() if k in still}


# ---------------------------------------------------------------------------------------------------------------
# --fix


def fix(pipeline: Pipeline, report: Report, *, wait: float = 120.0, echo=lambda line: None) -> None:  # noqa: ANN001
    """Make the destination agree: re-sync every missing or different key from the source (through Debezium and
    the running applier), and delete the rows that exist only at the destination. A table without a primary key
    (nothing names a row) is brought back whole by resync.sync_keyless: its source table is locked against writers
    for a few seconds while the destination catches up and its surplus and missing copies are fixed."""
    from consumers.ops import resync

    refused = []
    engine = destination_engine(pipeline, report.destination, write=True)
    backend = backend_of(pipeline, report.destination)
    shapes = reflect_tables(pipeline.source.sqlalchemy_url, [t.table for t in report.tables if not t.error])
    dialect = dialect_for(engine, pipeline.destinations[report.destination].kind)
    try:
        for table in report.tables:
            if table.error or table.rows_equal:  # histories are not repaired here, only reported
                continue
            if table.keyless:
                # No key names a row: the table is brought back whole, aligned with the stream (resync.sync_keyless);
                # the copies this report counted may have moved since, so it compares again under its lock.
                try:
                    request = resync.sync_keyless(pipeline, table.table, destination=report.destination,
                                                  requested_by="cdc verify --fix", wait=wait, echo=echo)
                except CdcError as exc:  # the others are still fixed
                    refused.append(f"{table.table}: {exc}")
                    continue
                echo(f"{table.table}: re-sync request {request.id} {request.state}, {len(request.keys)} differing "
                     "row(s) brought back")
                if request.state != "complete":
                    refused.append(f"{table.table}: " + "; ".join(r.reason for r in request.results if not r.ok))
                continue
            shape = shapes[table.table]
            if table.extra:
                handles = list(table.handles.get("extra", {}).values())
                with connect(engine) as conn:
                    stored = backend.catalog_types(conn, dialect.table(shape).schema, dialect.table(shape).name)
                    side = _Side(conn, backend, table_sql(backend, dialect.table(shape)), shape, stored)
                    history = _history_sql(backend, dialect.table(shape))[0] if dialect.keeps_history else None
                    position = _source_position(pipeline) if history else None
                    columns = ", ".join(backend.quote(c) for c in side.columns)
                    for start in range(0, len(handles), 1000):
                        listed = ", ".join(side.canon.literal(h) for h in handles[start:start + 1000])
                        if history:
                            # An analytics history ends each deleted row with a delete, at the source's current
                            # position, so that it still replays to the current state.
                            raw_query(conn, f"INSERT INTO {history} ({columns}, {', '.join(HISTORY_COLUMNS)}) "
                                            f"SELECT {columns}, 'd', {position}, 'cdc verify --fix', CURRENT_TIMESTAMP "
                                            f"FROM {side.table} WHERE {side.key_text} IN ({listed})", fetch=False)
                        raw_query(conn, f"DELETE FROM {side.table} WHERE {side.key_text} IN ({listed})", fetch=False)
                    conn.commit()
                echo(f"{table.table}: deleted {len(table.extra)} rows that exist only at the destination")
            keys = table.missing + table.different
            if keys:
                try:
                    request = resync.resync(pipeline, table.table, keys=keys, destination=report.destination,
                                            requested_by="cdc verify --fix", wait=wait, echo=echo)
                except ConfigError as exc:  # a table Debezium cannot re-send: the others are still fixed
                    refused.append(str(exc))
                    continue
                echo(f"{table.table}: re-sync request {request.id} {request.state}, "
                     f"{sum(r.ok for r in request.results)}/{len(request.results)} keys synced")
                for r in request.results:
                    if not r.ok:
                        echo(f"{table.table} {r.key}: {r.reason}")
    finally:
        engine.dispose()
    for table in report.tables:
        if table.history is not None and not table.history.equal:
            echo(f"{table.table}: its history {table.history.table} is not repaired by --fix (only reported)")
    if refused:
        raise CdcError("verify --fix: " + "; ".join(refused))


# ---------------------------------------------------------------------------------------------------------------
# analytics histories


HISTORY_EXAMPLES = 20  # keys shown per history problem; the counts are exact
# Kinds whose large values PostgreSQL may store out of line (TOAST): an update that left such a value unchanged may
# reach the applier without it (Debezium's placeholder), and the history then records NULL for the value it did
# not know, while the current-state row keeps it. Such a NULL in an update's history row is no alarm.
_TOASTABLE = frozenset({"text", "char", "bytes", "json", "array", "other", "numeric", "bits"})


@dataclass
class HistoryReport:
    """What `cdc verify` found in an analytics destination's change history of one table."""

    table: str = ""  # the history table, as the destination names it
    rows: int = 0
    duplicates: int = 0  # surplus rows: copies of a change (same source position, key and op) beyond the first
    duplicate_keys: list[list[Any]] = field(default_factory=list)  # a few of their keys (whole rows, keyless)
    inconsistent: int = 0  # keys whose last history entry does not give their current state
    inconsistent_keys: list[list[Any]] = field(default_factory=list)  # a few, with `why` for each
    why: list[str] = field(default_factory=list)
    checked: bool = False  # whether the replay check ran (not for tables without a key)
    note: str | None = None
    error: str | None = None  # why the history could not be checked

    @property
    def equal(self) -> bool:
        return not (self.duplicates or self.inconsistent or self.error)

    def as_json(self) -> dict[str, Any]:
        return {"table": self.table, "rows": self.rows, "duplicates": self.duplicates,
                "duplicate_keys": self.duplicate_keys, "inconsistent": self.inconsistent,
                "inconsistent_keys": self.inconsistent_keys,
                "inconsistent_examples": [{"key": k, "why": w} for k, w in zip(self.inconsistent_keys, self.why)],
                "checked": self.checked, "note": self.note, "error": self.error, "equal": self.equal}


def _source_position(pipeline: Pipeline) -> int:
    """The source's current WAL position, as Debezium numbers LSNs (`_cdc_lsn`)."""
    from producers.source_admin import psycopg_conninfo

    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url)) as conn:
        return int(conn.execute("select pg_current_wal_lsn() - '0/0'").fetchone()[0])


def _history_sql(backend: type[Dialect], table: Any) -> tuple[str, str | None, str]:
    """The quoted name of a destination table's history, and its schema and bare name."""
    name = table.name + HISTORY_SUFFIX
    return ".".join(backend.quote(p) for p in ([table.schema] if table.schema else []) + [name]), table.schema, name


def check_history(conn: Connection, backend: type[Dialect], target: _Target,
                  history: tuple[str, str | None, str]) -> HistoryReport:
    """Check one table's history inside the destination, set-based:

    1. No duplicates: no two history rows for the same change, i.e. the same source position (`_cdc_lsn`), key and
       op (Debezium delivers at least once; a re-sent transaction must not be stored twice). Snapshot reads without
       a position (`_cdc_lsn` = SNAPSHOT_LSN: re-syncs, ad-hoc snapshots) are legitimately read again later, so
       theirs are told apart by their read time (`_cdc_commit_ts`) too. Without a key, the whole row is the key,
       and snapshot reads are left out (a snapshot reads equal rows at one position: copies look the same).
    2. It replays to the current state: for each key, the last entry in source order (`_cdc_lsn`; on a tie, as in a
       primary-key update's delete and insert, the delete first) is a delete exactly when the key is absent from
       the current-state table, and otherwise holds its values (canonical texts compared NULL-safe, in SQL). Snapshot
       reads have no place in source order, and the applier lets them win whenever they arrive: a current row equal
       to one of its key's snapshot reads is consistent, and one with only snapshot reads must equal one of them.
       Tables without a key are not replayed (no key says which entry is a row's last): `checked` is false.
    """
    h_sql, h_schema, h_name = history
    report = HistoryReport(table=".".join(filter(None, (h_schema, h_name))))
    stored = backend.catalog_types(conn, h_schema, h_name)
    if not stored:
        # The applier creates a history beside every table it creates; a table made otherwise (by hand, adopted)
        # has none, and there is nothing to check: said, not an alarm.
        report.note = f"no history table {report.table} (the table was not created by `cdc run`): not checked"
        return report
    shape = target.shape
    columns = [c for c in shape.column_names if c != LSN_COLUMN]
    lacking = [c for c in [*columns, *HISTORY_COLUMNS] if c not in stored]
    if lacking:
        report.error = f"the history table {report.table} has no column(s) {', '.join(lacking)}"
        return report
    canon = backend.canon()
    kinds = {c: kind_of(shape.column(c).type) for c in columns}
    q = {c: backend.quote(c) for c in columns}
    key = list(shape.primary_key)
    run = lambda sql: raw_query(conn, sql)  # noqa: E731
    report.rows = int(run(f"SELECT count(*) FROM {h_sql}")[0][0])
    read_time = f"CASE WHEN _cdc_lsn = {SNAPSHOT_LSN} THEN _cdc_commit_ts END"

    # 1. duplicates
    if key:
        identity = [q[c] for c in key]
        shown = [canon.fetch(kinds[c], q[c], stored.get(c)) for c in key]
    else:
        identity = [canon.md5(canon.row_text([canon.column(kinds[c], q[c], stored.get(c)) for c in columns]))]
        shown = [canon.fetch(kinds[c], q[c], stored.get(c)) for c in columns]
    grouping = f"_cdc_lsn, _cdc_op, {read_time}, {', '.join(identity)}"
    # Without a key, equal rows are read by one snapshot at one position: reads cannot be told from copies.
    where = "" if key else " WHERE _cdc_op <> 'r'"
    surplus, = run(f"SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {h_sql}{where} "
                   f"GROUP BY {grouping} HAVING count(*) > 1) g")[0]
    report.duplicates = int(surplus)
    if report.duplicates:
        # One row of each duplicated change (no DISTINCT or ORDER BY on the values: PostgreSQL's json has no
        # equality), the first few by their identity.
        ids = ", ".join(f"{e} AS _cdc_i{i}" for i, e in enumerate(identity))
        picked = ", ".join(f"{s} AS _cdc_c{i}" for i, s in enumerate(shown))
        rows = run(f"SELECT {', '.join(f'_cdc_c{i}' for i in range(len(shown)))} FROM ("
                   f"SELECT {ids}, {picked}, count(*) OVER (PARTITION BY {grouping}) AS _cdc_n, "
                   f"row_number() OVER (PARTITION BY {grouping}) AS _cdc_r FROM {h_sql}{where}) x "
                   f"WHERE _cdc_n > 1 AND _cdc_r = 1 ORDER BY {', '.join(f'_cdc_i{i}' for i in range(len(identity)))} "
                   f"LIMIT {HISTORY_EXAMPLES * 4}")
        seen = []
        for r in rows:
            k = _shown(list(r), [kinds[c] for c in (key or columns)])
            if k not in seen:
                seen.append(k)
        report.duplicate_keys = seen[:HISTORY_EXAMPLES]

    # 2. replay
    if not key:
        report.note = ("no primary key: the history is not replayed (no key tells which entry is a row's last); "
                       "duplicates are checked by whole row, snapshot reads aside (equal rows share one position)")
        return report
    report.checked = True

    def same(a: str, b: str) -> str:
        """SQL: the row of alias `a` (a history entry) holds the values of the row of alias `b`, NULL-safe."""
        parts = []
        for c in columns:
            x = canon.column(kinds[c], f"{a}.{q[c]}", stored.get(c))
            y = canon.column(kinds[c], f"{b}.{q[c]}", stored.get(c))
            cond = f"({x} IS NOT DISTINCT FROM {y})"
            if kinds[c].name in _TOASTABLE:
                cond = f"({cond} OR ({a}._cdc_op = 'u' AND {a}.{q[c]} IS NULL))"
            parts.append(cond)
        return " AND ".join(parts) or "TRUE"

    keys = ", ".join(q[c] for c in key)
    on = lambda a, b: " AND ".join(f"{a}.{q[c]} = {b}.{q[c]}" for c in key)  # noqa: E731
    last = (f"SELECT * FROM (SELECT h.*, row_number() OVER (PARTITION BY {keys} ORDER BY _cdc_lsn DESC, "
            f"CASE WHEN _cdc_op = 'd' THEN 0 ELSE 1 END DESC) AS _cdc_rank FROM {h_sql} h) x WHERE _cdc_rank = 1")
    read_matches = (f"EXISTS (SELECT 1 FROM {h_sql} s WHERE s._cdc_lsn = {SNAPSHOT_LSN} AND s._cdc_op = 'r' "
                    f"AND {on('s', 't')} AND {same('s', 't')})")
    # Snapshot reads are looked at last, for keys found wrong otherwise (PostgreSQL evaluates CASE lazily).
    why = (f"CASE WHEN t.{q[key[0]]} IS NULL THEN "
           f"CASE WHEN l._cdc_op = 'd' THEN NULL ELSE 'absent from the current state, but its last history entry is "
           f"''' || l._cdc_op || ''' (no delete)' END "
           f"WHEN l.{q[key[0]]} IS NULL THEN 'in the current state, but not in the history' "
           f"WHEN l._cdc_op = 'd' THEN CASE WHEN {read_matches} THEN NULL "
           f"ELSE 'in the current state, but its last history entry is a delete' END "
           f"WHEN NOT ({same('l', 't')}) THEN CASE WHEN {read_matches} THEN NULL "
           f"ELSE 'its current row differs from its last history entry (''' || l._cdc_op || ''' at _cdc_lsn ' "
           f"|| CAST(l._cdc_lsn AS VARCHAR) || ')' END END")
    key_of = [f"coalesce({canon.fetch(kinds[c], 'l.' + q[c], stored.get(c))}, "
              f"{canon.fetch(kinds[c], 't.' + q[c], stored.get(c))}) AS k{i}" for i, c in enumerate(key)]
    problems = (f"SELECT {', '.join(key_of)}, {why} AS why FROM ({last}) l "
                f"FULL OUTER JOIN {target.dst_sql} t ON {on('l', 't')}")
    # One pass: the first few problems, each with the count of all of them.
    rows = run(f"SELECT *, count(*) OVER () AS _cdc_all FROM ({problems}) p WHERE why IS NOT NULL "
               f"ORDER BY {', '.join(f'k{i}' for i in range(len(key)))} LIMIT {HISTORY_EXAMPLES}")
    report.inconsistent = int(rows[0][-1]) if rows else 0
    report.inconsistent_keys = [_shown(list(r[:-2]), [kinds[c] for c in key]) for r in rows]
    report.why = [r[-2] for r in rows]
    return report


def _shown(values: list[Any], kinds: list[Kind]) -> list[Any]:
    """Values as the report shows keys (char padding off, JSON-able)."""
    return [jsonable(v.rstrip(" ") if isinstance(v, str) and k.name == "char" else v) for v, k in zip(values, kinds)]
