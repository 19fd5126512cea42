"""The columnar write path: a batch's row images go from the decoder's Arrow columns into the destination without
becoming Python objects (DuckDB analytics replicas, PostgreSQL replicas).

Why: the general path converts every value in Python (RowConverter), collapses rows in dicts (plan.net_changes)
and builds Arrow back from them, about 50 µs a change for a DuckDB replica with its history. Here the changes come
as runs (consumers.apply.runs), which point into the Arrow table their poll was decoded into (schemas.batch); a table's
runs in a batch are gathered with one `take` per decoded poll (`runs_table`), and `flat_images` turns them into
one row per change: its
row image, the values converted by Arrow the way values.py converts them. DuckDB reads that table itself
(`apply_duckdb`: the history insert, the upsert of each key's last change, the delete of keys whose last change is
a delete); PostgreSQL gets it through COPY as CSV written by Arrow, then the same upsert and delete.

It produces what the general path produces, for the cases it takes; anything else is left to the general path
(flat_images gives None, nothing is written): a column type whose conversion Arrow does not do here, a
Debezium placeholder for an unchanged TOASTed value (the general path fills it from earlier changes), a
primary-key update inside one event, a truncate, or changes decoded one by one (events, not runs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cdc.source_tables import LSN_COLUMN, TableShape
from consumers.apply.dialects.base import new_changes_sql
from consumers.apply.runs import ChangeRun
from consumers.apply.shapes import SNAPSHOT_LSN
from consumers.apply.values import _MAX_DAYS, _MAX_US, _MIN_DAYS, _MIN_US, PLACEHOLDER, RowConverter

# The column types taken here: those whose RowConverter conversion Arrow can do (flat_images). Others are not taken.
_KINDS = {"int", "long", "boolean", "float", "double", "string", "org.apache.kafka.connect.data.Decimal",
          "io.debezium.data.Json", "io.debezium.data.Uuid", "io.debezium.data.Enum",
          "io.debezium.time.ZonedTimestamp", "io.debezium.time.MicroTimestamp", "io.debezium.time.Timestamp",
          "io.debezium.time.Date"}
# Text-carried types, where Debezium may put its placeholder for a value it did not send.
_TEXT = {"string", "io.debezium.data.Json", "io.debezium.data.Uuid", "io.debezium.data.Enum",
         "io.debezium.time.ZonedTimestamp"}
# Debezium's temporal numbers: the Arrow type that reads them as values.py does, within the range it reads them
# so (outside: infinities, years beyond 1..9999, spelt out as text by values.py, and the batch is the general
# path's).
_TEMPORAL = {"io.debezium.time.MicroTimestamp": (pa.timestamp("us"), _MIN_US, _MAX_US),
             "io.debezium.time.Timestamp": (pa.timestamp("ms"), _MIN_US // 1000, _MAX_US // 1000),
             "io.debezium.time.Date": (pa.date32(), _MIN_DAYS, _MAX_DAYS)}
# The columns flat_images puts before the row's: the change's place in the batch, its op and LSN (with their
# PostgreSQL types, for a staging table), then its transaction id and commit time (epoch ms).
SEQ, OP, CHANGE_LSN, TX_ID, COMMIT_MS = "_cdc_seq", "_cdc_op", "_cdc_change_lsn", "_cdc_xid", "_cdc_commit_ms"
STAGE_COLUMNS = ((SEQ, "bigint"), (OP, "text"), (CHANGE_LSN, "bigint"))
# Changes of one table written at a time (`chunks`): a batch of ordinary size is one part (PostgreSQL's and MariaDB's
# batches hold 20,000 changes at most); a large source transaction (1,000,000 rows) is written in parts, each
# gathered from its runs (read back from disk when they were spilled). 20,000 rather than 50,000: one transaction of
# 1,000,000 rows peaked about 20 MB lower (MariaDB 288 to 267 MB, DuckDB 389 to 371 MB) at the same speed.
CHUNK_CHANGES = 20_000


def runs_table(runs: list[tuple[int, ChangeRun]], snapshot_steps: set[int]) -> pa.Table | None:
    """A batch's runs of one table (with the number of the step each belongs to) as one Arrow table, a row per
    change: before, after (structs, as decoded), _op, _lsn, _xid, _ts (commit time) and _seq, the change's place in
    apply order. None when the runs' frames have different schemas.

    Apply order is the assembler's: step by step; inside a source transaction by (total_order, lsn), which orders
    the changes of runs from several partitions; snapshot reads as they came. The rows themselves stay in the order
    they were gathered in: what is written only needs each change's place (a history row's, a key's last change)."""
    frames: dict[int, tuple[pa.Table, list[np.ndarray], list[int], list[int], list[int]]] = {}
    place = 0
    for step, run in runs:
        # A spilled run's rows come back from disk as a table of its own (kept in `frames`, so ids stay unique).
        key = id(run.frame) if run.spilled is None else -1 - len(frames)
        entry = frames.get(key)
        if entry is None:
            entry = frames[key] = (run.arrow(), [], [], [], [])
        entry[1].append(run.rows)
        entry[2].append(step)
        entry[3].append(run.count)
        entry[4].append(place)
        place += run.count
    schema = None
    parts, steps, arrivals = [], [], []
    for frame, rows, numbers, counts, places in frames.values():
        if schema is None:
            schema = frame.schema
        elif not frame.schema.equals(schema):
            return None  # another writer schema in the same batch: the general path knows how to merge them
        parts.append(frame.take(pa.array(np.concatenate(rows), pa.int64())))
        steps.append(np.repeat(np.asarray(numbers, np.int64), counts))
        arrivals.extend(np.arange(p, p + c, dtype=np.int64) for p, c in zip(places, counts))
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    step = np.concatenate(steps)
    # The rows are gathered frame by frame; `arrival` is their place in the assembler's order (within a partition,
    # offset order): the tie-breaker that keeps snapshot reads as they came.
    in_snapshot = np.isin(step, list(snapshot_steps))
    order = np.lexsort((
        np.concatenate(arrivals),
        np.where(in_snapshot, 0, pc.fill_null(table.column("_lsn"), 0).to_numpy()),
        np.where(in_snapshot, 0, pc.fill_null(table.column("_order"), 0).to_numpy()),
        step))
    seq = np.empty(len(step), np.int64)
    seq[order] = np.arange(len(step), dtype=np.int64)
    return pa.table({
        "before": table.column("before"), "after": table.column("after"), "_op": table.column("_op"),
        "_lsn": pc.fill_null(table.column("_lsn"), SNAPSHOT_LSN).cast(pa.int64()),
        "_xid": pc.fill_null(table.column("_xid"), ""), "_ts": table.column("_ts").cast(pa.int64()),
        "_seq": pa.array(seq)})


def chunks(runs: list[tuple[int, ChangeRun]], limit: int | None = None) -> list[list[tuple[int, ChangeRun]]]:
    """A batch's runs of one table (see runs_table) cut, in their order, into parts of about `limit` changes
    (CHUNK_CHANGES by default), each written on its own in the same destination transaction: what one write holds
    in memory (the gathered rows, their images, the CSV or DuckDB's working set) stays bounded whatever the size of
    a source transaction. Sound because the order is kept: a key's changes are in one partition, whose runs come
    in offset order, and each part is written after the one before it (the LSN guard of the upserts and deletes,
    and the history's anti-join, see the earlier parts, written in the same transaction)."""
    limit = limit or CHUNK_CHANGES
    parts: list[list[tuple[int, ChangeRun]]] = [[]]
    held = 0
    for entry in runs:
        if held >= limit:
            parts.append([])
            held = 0
        parts[-1].append(entry)
        held += entry[1].count
    return parts


def supports(shape: TableShape, converter: RowConverter) -> bool:
    """Whether every column of the table is of a type taken here (the batch may still be refused for its values)."""
    avro = converter.avro_names()
    return (bool(shape.primary_key)  # a table without a key: each change on its own (plan.KeylessChange)
            and all(converter.logical_types.get(c) in _KINDS and c in avro for c in shape.column_names)
            and not {SEQ, OP, CHANGE_LSN, TX_ID, COMMIT_MS} & set(shape.column_names))


def flat_images(batch: pa.Table, shape: TableShape, converter: RowConverter) -> pa.Table | None:
    """One row per change of `batch` (see runs_table): SEQ, OP, CHANGE_LSN, TX_ID, COMMIT_MS, then each column
    of its row image (before for a delete, after otherwise) converted as values.py would; None when the batch is
    the general path's (see the module's docstring)."""
    if not supports(shape, converter):
        return None
    avro = converter.avro_names()
    types = converter.logical_types
    op = batch.column("_op")
    before, after = batch.column("before"), batch.column("after")

    def any_true(mask: Any) -> bool:
        return bool(pc.any(mask).as_py())

    keyed_update = pc.and_kleene(pc.equal(op, "u"), pc.is_valid(before))
    for c in shape.primary_key:
        changed = pc.not_equal(pc.struct_field(before, avro[c]), pc.struct_field(after, avro[c]))
        if any_true(pc.and_kleene(keyed_update, changed)):
            return None
    is_delete = pc.equal(op, "d")
    columns = {SEQ: batch.column("_seq"), OP: op, CHANGE_LSN: batch.column("_lsn"), TX_ID: batch.column("_xid"),
               COMMIT_MS: batch.column("_ts")}
    for c in shape.column_names:
        kind = types[c]
        value = pc.if_else(is_delete, pc.struct_field(before, avro[c]), pc.struct_field(after, avro[c]))
        if kind in _TEXT:
            if any_true(pc.match_substring(value, PLACEHOLDER)):
                return None
            if kind == "io.debezium.time.ZonedTimestamp" and any_true(pc.invert(pc.match_substring_regex(
                    value, "^[0-9]{4}-"))):
                return None
        if kind in _TEMPORAL:
            arrow_type, low, high = _TEMPORAL[kind]
            if any_true(pc.or_(pc.less(value, low), pc.greater(value, high))):
                return None
            value = value.cast(arrow_type)
        columns[c] = value
    return pa.table(columns)


def apply_duckdb(conn: Any, quote: Callable[[str], str], target: str, history: str, shape: TableShape,
                 flat: pa.Table, column_types: dict[str, str]) -> None:
    """Write one table's changes (flat_images) to its DuckDB current-state and history tables. `conn` is the DuckDB
    connection, `target`/`history` quoted table names, `column_types` each column's destination type."""
    columns = list(shape.column_names)
    names = ", ".join(quote(c) for c in columns)
    values = ", ".join(f"CAST({quote(c)} AS {column_types[c]})" for c in columns)

    def run(statement: str) -> list[tuple]:
        # Fetched to the end: DuckDB refuses the next statement while a result is unfinished.
        return conn.execute(statement).fetchall()

    values_as = ", ".join(f"CAST({quote(c)} AS {column_types[c]}) AS {quote(c)}" for c in columns)
    stage, last, gone = f"_cdc_columnar_{id(flat)}", f"_cdc_last_{id(flat)}", f"_cdc_gone_{id(flat)}"
    final = last_changes(flat, list(shape.primary_key))

    def stream(table: pa.Table) -> pa.RecordBatchReader:
        # Registered as a stream read once, by one statement: a registered table stays referenced by DuckDB until
        # the transaction ends (its view, dropped, is kept for the transaction), so a large source transaction
        # written in parts (chunks) would hold every part's rows until its commit; a stream's batches are let go
        # as they are read.
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())

    # A change the history holds already (Debezium re-sent its transaction) is not stored again: the anti-join of
    # base.new_changes_sql, on the batch's rows with repeats inside it dropped first (history_changes).
    changes, _ = history_changes(flat, list(shape.primary_key))
    conn.register(stage, stream(changes))
    conn.register(last, stream(final))
    try:
        lsns = pc.min_max(flat.column(CHANGE_LSN))
        fresh = new_changes_sql(shape, quote, history, "s", lsn_range=(lsns["min"].as_py(), lsns["max"].as_py()))
        run(f"INSERT INTO {history} ({names}, _cdc_op, _cdc_lsn, _cdc_tx_id, _cdc_commit_ts) "
            f"SELECT {names}, _cdc_op, _cdc_lsn, _cdc_tx_id, _cdc_commit_ts FROM ("
            f"SELECT {values_as}, {OP} AS _cdc_op, {CHANGE_LSN} AS _cdc_lsn, {TX_ID} AS _cdc_tx_id, "
            f"CASE WHEN {COMMIT_MS} IS NULL THEN NULL ELSE epoch_ms({COMMIT_MS})::TIMESTAMPTZ END AS _cdc_commit_ts, "
            f"{SEQ} FROM {stage}) s WHERE {fresh} ORDER BY {SEQ}")
        keys = ", ".join(quote(c) for c in shape.primary_key)
        lsn = quote(LSN_COLUMN)
        sets = [f"{quote(c)} = EXCLUDED.{quote(c)}" for c in columns if c not in shape.primary_key]
        sets.append(f"{lsn} = GREATEST({target}.{lsn}, EXCLUDED.{lsn})")
        run(f"INSERT INTO {target} ({names}, {lsn}) SELECT {values}, {CHANGE_LSN} FROM {last} "
            f"WHERE {OP} <> 'd' ON CONFLICT ({keys}) DO UPDATE SET {', '.join(sets)} "
            f"WHERE {target}.{lsn} < EXCLUDED.{lsn} OR EXCLUDED.{lsn} = {SNAPSHOT_LSN}")
        if pc.any(pc.equal(final.column(OP), "d")).as_py():
            conn.register(gone, stream(final))
            match = " AND ".join(f"t.{quote(c)} = s.k{i}" for i, c in enumerate(shape.primary_key))
            picks = ", ".join(f"CAST({quote(c)} AS {column_types[c]}) AS k{i}"
                              for i, c in enumerate(shape.primary_key))
            run(f"DELETE FROM {target} t USING (SELECT {picks}, {CHANGE_LSN} FROM {gone} WHERE {OP} = 'd') s "
                f"WHERE {match} AND t.{lsn} < s.{CHANGE_LSN}")
    finally:
        # In a transaction a failed statement aborted, DuckDB refuses these too: the first error is the one to
        # report, and the connection is closed with the transaction (Arrow views die with it).
        with contextlib.suppress(Exception):
            conn.unregister(last)
            conn.unregister(stage)
            conn.unregister(gone)


def history_changes(flat: pa.Table, keys: list[str]) -> tuple[pa.Table, bool]:
    """The rows of `flat` (flat_images) with each change once, and whether some were repeats: a change is its key,
    LSN and op (and, for reads without a position, its commit time), as base.distinct_changes counts it. The
    columnar path only takes tables with a key."""
    read_time = pc.if_else(pc.equal(flat.column(CHANGE_LSN), SNAPSHOT_LSN), flat.column(COMMIT_MS),
                           pa.scalar(None, flat.schema.field(COMMIT_MS).type))
    identity = flat.select([*keys, CHANGE_LSN, OP]).append_column("_cdc_read_time", read_time)
    firsts = group_ends(identity, flat.column(SEQ), last=False)
    if len(firsts) == flat.num_rows:
        return flat, False
    return flat.take(firsts), True


def last_changes(flat: pa.Table, keys: list[str]) -> pa.Table:
    """Each key's last change in `flat` (by SEQ): the batch itself when no key changes twice, as in a bulk load."""
    latest = group_ends(flat.select(keys), flat.column(SEQ), last=True)
    if len(latest) == flat.num_rows:
        return flat
    return flat.take(latest)


def group_ends(identity: pa.Table, seq: Any, *, last: bool) -> np.ndarray:
    """The rows (ascending positions) holding the first, or the `last`, `seq` of each group of rows equal in every
    column of `identity` (nulls equal to nulls, as a GROUP BY has them).

    Sorting and comparing neighbours with pyarrow.compute rather than Table.group_by: group_by runs on Acero, whose
    import brings pyarrow's datasets, Parquet and cloud file systems into the applier (about 15 MB of its resident
    memory, benchmarks/memory_bench.py) for two aggregates."""
    n = identity.num_rows
    if n == 0:
        return np.zeros(0, np.int64)
    names = identity.column_names
    order = pc.sort_indices(identity.append_column("_cdc_group_seq", seq),
                            sort_keys=[*((c, "ascending") for c in names), ("_cdc_group_seq", "ascending")])
    starts = np.zeros(n, bool)
    starts[0] = True
    for name in names:
        column = identity.column(name).take(order).combine_chunks()
        here, before = column.slice(1), column.slice(0, n - 1)
        differs = pc.or_(pc.fill_null(pc.not_equal(here, before), False), pc.xor(here.is_null(), before.is_null()))
        if pa.types.is_floating(column.type):  # NaN is not equal to itself, but one group, as GROUP BY has it
            differs = pc.and_(differs, pc.invert(pc.and_(pc.fill_null(pc.is_nan(here), False),
                                                         pc.fill_null(pc.is_nan(before), False))))
        starts[1:] |= differs.to_numpy(zero_copy_only=False)
    ends = np.flatnonzero(np.append(starts[1:], True) if last else starts)
    return np.sort(order.to_numpy()[ends])
