"""`cdc verify`: how well a destination agrees with its source, table by table, without streaming both whole.

The approach of data-diff: each side sums a per-row hash over key ranges in the database; ranges whose
(count, sum) agree are equal and are not read; a range that differs is split into segments and compared again,
down to segments small enough to fetch, whose rows are then compared one by one. A table with a handful of
differences therefore costs a few aggregate queries per level instead of reading every row.

Row hashes must be computed identically on both sides, so the in-database path is used when source and
destination are both PostgreSQL (the applier created the destination tables with the source's types); any other
pair compares rows fetched in key order, in chunks, and hashed in Python after normalising values.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Iterator

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine

from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError
from consumers.dialects import dialect_for
from consumers.shapes import LSN_COLUMN, TableShape, reflect_shapes

SEGMENTS = 16  # how many parts a differing range is split into at each level
FETCH_BELOW = 2000  # a differing range with at most this many rows per side is compared row by row


@dataclass
class TableReport:
    table: str
    source_rows: int = 0
    destination_rows: int = 0
    missing: list[list[Any]] = field(default_factory=list)  # at the source, not at the destination
    extra: list[list[Any]] = field(default_factory=list)  # at the destination, not at the source
    different: list[list[Any]] = field(default_factory=list)
    queries: int = 0
    seconds: float = 0.0

    @property
    def distinct_keys(self) -> int:
        return self.source_rows + len(self.extra)

    @property
    def accuracy(self) -> float:
        """Matching keys / distinct keys of both sides (1.0 for two empty tables)."""
        distinct = self.distinct_keys
        matching = self.source_rows - len(self.missing) - len(self.different)
        return 1.0 if distinct == 0 else matching / distinct

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy"] = round(self.accuracy, 6)
        return data


@dataclass
class Report:
    destination: str
    tables: list[TableReport]

    @property
    def equal(self) -> bool:
        return all(t.equal for t in self.tables)

    def as_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "equal": self.equal, "tables": [t.as_json() for t in self.tables]}


def _normal(value: Any) -> str:
    """A value's text for hashing, identical whichever database and driver returned it."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    if isinstance(value, Decimal):
        value = value.normalize()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


class _Side:
    """One database's view of one table: counts and hash sums over key ranges, and rows of a range."""

    def __init__(self, conn: Connection, quoted_table: str, key: str, columns: list[str], in_db_hash: bool) -> None:
        self.conn = conn
        self.table = quoted_table
        prep = conn.dialect.identifier_preparer
        self.key = prep.quote(key)
        self.columns = [prep.quote(c) for c in columns]
        self.in_db_hash = in_db_hash
        # The first 60 bits of md5 of the row's text form, as a number: summing them is order independent.
        self.row_hash = (f"('x' || substr(md5(row({', '.join(self.columns)})::text), 1, 15))::bit(60)::bigint"
                         if in_db_hash else None)
        self.queries = 0

    def bounds(self) -> tuple[Any, Any, int]:
        self.queries += 1
        row = self.conn.execute(text(f"select min({self.key}), max({self.key}), count(*) from {self.table}")).one()
        return row[0], row[1], row[2]

    def segments(self, lo: int, hi: int, step: int) -> dict[int, tuple[int, int]]:
        """(count, hash sum) per segment of `step` keys in [lo, hi]."""
        self.queries += 1
        rows = self.conn.execute(text(
            f"select ({self.key} - :lo) / :step as seg, count(*), coalesce(sum({self.row_hash}), 0) "
            f"from {self.table} where {self.key} between :lo and :hi group by 1"), {"lo": lo, "hi": hi, "step": step})
        return {int(r[0]): (int(r[1]), int(r[2])) for r in rows}

    def rows(self, lo: Any = None, hi: Any = None) -> Iterator[tuple[Any, str]]:
        """(key, row hash) in key order, for a range or the whole table."""
        self.queries += 1
        where = f" where {self.key} between :lo and :hi" if lo is not None else ""
        result = self.conn.execution_options(stream_results=True, max_row_buffer=10_000).execute(text(
            f"select {self.key}, {', '.join(self.columns)} from {self.table}{where} order by {self.key}"),
            {"lo": lo, "hi": hi})
        for row in result:
            yield row[0], hashlib.md5("\x1f".join(_normal(v) for v in row[1:]).encode()).hexdigest()


def _merge(source: Iterator[tuple[Any, str]], destination: Iterator[tuple[Any, str]], report: TableReport) -> None:
    """Walk two key-ordered streams together, filing each key as missing, extra or different."""
    s, d = next(source, None), next(destination, None)
    while s is not None or d is not None:
        if d is None or (s is not None and s[0] < d[0]):
            report.missing.append([s[0]])
            s = next(source, None)
        elif s is None or d[0] < s[0]:
            report.extra.append([d[0]])
            d = next(destination, None)
        else:
            if s[1] != d[1]:
                report.different.append([s[0]])
            s, d = next(source, None), next(destination, None)


def _bisect(src: _Side, dst: _Side, lo: int, hi: int, report: TableReport) -> None:
    pending = [(lo, hi)]
    while pending:
        lo, hi = pending.pop()
        step = max(1, -(-(hi - lo + 1) // SEGMENTS))
        a, b = src.segments(lo, hi, step), dst.segments(lo, hi, step)
        for seg in sorted(set(a) | set(b)):
            if a.get(seg) == b.get(seg):
                continue
            s_lo, s_hi = lo + seg * step, min(hi, lo + (seg + 1) * step - 1)
            small = max(a.get(seg, (0, 0))[0], b.get(seg, (0, 0))[0]) <= FETCH_BELOW
            if small or s_lo == s_hi:
                _merge(src.rows(s_lo, s_hi), dst.rows(s_lo, s_hi), report)
            else:
                pending.append((s_lo, s_hi))


def verify_table(source: Connection, destination: Connection, shape: TableShape, destination_table: str,
                 *, in_db_hash: bool) -> TableReport:
    started = time.monotonic()
    report = TableReport(shape.name)
    columns = [c for c in shape.column_names if c != LSN_COLUMN]
    prep = source.dialect.identifier_preparer
    src_table = f"{prep.quote(shape.schema)}.{prep.quote(shape.table)}"
    if len(shape.primary_key) != 1:
        raise ConfigError(f"verify: {shape.name} has no single-column primary key to compare by")
    key = shape.primary_key[0]
    src = _Side(source, src_table, key, columns, in_db_hash)
    dst = _Side(destination, destination_table, key, columns, in_db_hash)
    s_min, s_max, report.source_rows = src.bounds()
    d_min, d_max, report.destination_rows = dst.bounds()
    integer_key = all(isinstance(v, int) for v in (s_min, s_max, d_min, d_max) if v is not None)
    if in_db_hash and integer_key and (s_min is not None or d_min is not None):
        lo = min(v for v in (s_min, d_min) if v is not None)
        hi = max(v for v in (s_max, d_max) if v is not None)
        _bisect(src, dst, lo, hi, report)
    elif s_min is not None or d_min is not None:
        _merge(src.rows(), dst.rows(), report)
    for bucket in (report.missing, report.extra, report.different):
        bucket.sort()
    report.queries = src.queries + dst.queries
    report.seconds = time.monotonic() - started
    return report


def _recheck(src: Connection, dst: Connection, shape: TableShape, destination_table: str,
             report: TableReport) -> None:
    """Compare the reported keys once more: a change that was still in flight (within the destination's lag) when
    the ranges were compared has been applied since, and is no difference."""
    columns = [c for c in shape.column_names if c != LSN_COLUMN]
    prep = src.dialect.identifier_preparer
    src_side = _Side(src, f"{prep.quote(shape.schema)}.{prep.quote(shape.table)}", shape.primary_key[0], columns, False)
    dst_side = _Side(dst, destination_table, shape.primary_key[0], columns, False)
    for bucket in (report.missing, report.extra, report.different):
        still = []
        for key in bucket:
            fresh = TableReport(shape.name)
            _merge(src_side.rows(key[0], key[0]), dst_side.rows(key[0], key[0]), fresh)
            if not fresh.equal:
                still.append(key)
        bucket[:] = still


def verify(pipeline: Pipeline, destination: str, tables: list[str] | None = None, *,
           settle: float = 2.0) -> Report:
    if destination not in pipeline.destinations:
        raise ConfigError(f"destinations: no destination named {destination!r} "
                          f"(known: {', '.join(pipeline.destinations) or 'none'})")
    chosen = tables or list(pipeline.source.tables)
    unknown = [t for t in chosen if t not in pipeline.source.tables]
    if unknown:
        raise ConfigError(f"--tables: {', '.join(unknown)} not in source.tables")
    shapes = reflect_shapes(pipeline.source.sqlalchemy_url, chosen)
    src_engine: Engine = create_engine(pipeline.source.sqlalchemy_url.set(drivername="postgresql+psycopg"))
    dst_engine: Engine = create_engine(pipeline.destinations[destination].driver_url)
    dialect = dialect_for(dst_engine)
    in_db_hash = dst_engine.url.get_backend_name() == "postgresql"
    reports = []
    try:
        with src_engine.connect() as src, dst_engine.connect() as dst:
            # One snapshot per side, so that a table is compared as of one moment on each side.
            src.exec_driver_sql("set transaction isolation level repeatable read")
            if in_db_hash:
                dst.exec_driver_sql("set transaction isolation level repeatable read")
            quoted = {}
            insp = inspect(dst)
            for name in chosen:
                target = dialect.table(shapes[name])
                if not insp.has_table(target.name, schema=target.schema):
                    raise CdcError(f"verify: the destination {destination} has no table {target.fullname} yet "
                                   "(`cdc run` creates it when it applies the first changes)")
                quoted[name] = dst.dialect.identifier_preparer.format_table(dialect.table(shapes[name]))
                reports.append(verify_table(src, dst, shapes[name], quoted[name], in_db_hash=in_db_hash))
        if any(not r.equal for r in reports) and settle > 0:
            time.sleep(settle)
            with src_engine.connect() as src, dst_engine.connect() as dst:
                for report in reports:
                    if not report.equal:
                        _recheck(src, dst, shapes[report.table], quoted[report.table], report)
    finally:
        src_engine.dispose()
        dst_engine.dispose()
    return Report(destination, reports)


def render(report: Report) -> str:
    """The verification summary as a table, one line per table and an overall accuracy."""
    lines = [f"Verification summary: destination {report.destination}",
             f"{'table':28} {'source':>9} {'destination':>11} {'missing':>8} {'extra':>6} {'different':>9} "
             f"{'accuracy':>9}"]
    for t in report.tables:
        lines.append(f"{t.table:28} {t.source_rows:9} {t.destination_rows:11} {len(t.missing):8} {len(t.extra):6} "
                     f"{len(t.different):9} {t.accuracy:9.2%}")
    distinct = sum(t.distinct_keys for t in report.tables)
    matching = sum(t.source_rows - len(t.missing) - len(t.different) for t in report.tables)
    overall = 1.0 if distinct == 0 else matching / distinct
    lines.append(f"overall accuracy {overall:.2%}: {'equal' if report.equal else 'DIFFERENT'}")
    return "\n".join(lines)


def fix(pipeline: Pipeline, report: Report, *, wait: float = 120.0, echo=lambda line: None) -> None:  # noqa: ANN001
    """Make the destination agree: re-sync every missing or different key from the source (through Debezium and
    the running applier), and delete the rows that exist only at the destination."""
    from consumers import resync

    engine = create_engine(pipeline.destinations[report.destination].driver_url)
    dialect = dialect_for(engine)
    shapes = reflect_shapes(pipeline.source.sqlalchemy_url, [t.table for t in report.tables])
    try:
        for table in report.tables:
            if table.extra:
                target = dialect.table(shapes[table.table])
                key = target.c[shapes[table.table].primary_key[0]]
                with engine.begin() as conn:
                    conn.execute(target.delete().where(key.in_([k[0] for k in table.extra])))
                echo(f"{table.table}: deleted {len(table.extra)} rows that exist only at the destination")
            keys = [k[0] for k in table.missing + table.different]
            if keys:
                request = resync.resync(pipeline, table.table, [str(k) for k in keys],
                                        destination=report.destination, requested_by="cdc verify --fix",
                                        wait=wait, echo=echo)
                echo(f"{table.table}: re-sync request {request.id} {request.state}, "
                     f"{sum(r.ok for r in request.results)}/{len(request.results)} keys synced")
    finally:
        engine.dispose()


def render_html(report: Report) -> str:
    """The verification summary as a one-page HTML report."""
    import html as _html

    rows = "".join(
        f"<tr><td>{_html.escape(t.table)}</td><td>{t.source_rows}</td><td>{t.destination_rows}</td>"
        f"<td>{len(t.missing)}</td><td>{len(t.extra)}</td><td>{len(t.different)}</td><td>{t.accuracy:.2%}</td></tr>"
        for t in report.tables)
    keys = "".join(
        f"<h3>{_html.escape(t.table)}</h3><p>missing: {_html.escape(str([k[0] for k in t.missing][:200]))}<br>"
        f"extra: {_html.escape(str([k[0] for k in t.extra][:200]))}<br>"
        f"different: {_html.escape(str([k[0] for k in t.different][:200]))}</p>"
        for t in report.tables if not t.equal)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Verification summary</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;
padding:.2em .6em;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>Verification summary: {_html.escape(report.destination)}</h1>
<p>{'Source and destination agree.' if report.equal else 'Source and destination differ.'}</p>
<table><tr><th>table</th><th>source</th><th>destination</th><th>missing</th><th>extra</th><th>different</th>
<th>accuracy</th></tr>{rows}</table>{keys}</body></html>"""
