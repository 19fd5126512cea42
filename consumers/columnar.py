"""The columnar write path: a batch's row images go from the decoder's Arrow columns into the destination without
becoming Python objects (DuckDB analytics replicas, PostgreSQL replicas).

Why: the general path converts every value in Python (RowConverter), collapses rows in dicts (plan.net_changes)
and builds Arrow back from them, about 50 µs a change for a DuckDB replica with its history. Here each change keeps
a reference to the Arrow table its poll was decoded into (schemas.batch) and its row there; a table's changes in a
batch are gathered with one `take` per decoded poll, and `flat_images` turns them into one row per change: its
row image, the values converted by Arrow the way values.py converts them. DuckDB reads that table itself
(`apply_duckdb`: the history insert, the upsert of each key's last change, the delete of keys whose last change is
a delete); PostgreSQL gets it through COPY as CSV written by Arrow, then the same upsert and delete.

It produces what the general path produces, for the cases it takes; anything else is left to the general path
(flat_images gives None, nothing is written): a column type whose conversion Arrow does not do here, a
Debezium placeholder for an unchanged TOASTed value (the general path fills it from earlier changes), a
primary-key update inside one event, a truncate, or changes decoded one by one (no Arrow row to point at).
"""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from consumers.events import ChangeEvent
from consumers.shapes import LSN_COLUMN, SNAPSHOT_LSN, TableShape
from consumers.values import _MAX_DAYS, _MAX_US, _MIN_DAYS, _MIN_US, PLACEHOLDER, RowConverter

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


def batch_table(events: list[ChangeEvent]) -> pa.Table | None:
    """The batch's changes of one table as Arrow, in batch order: before, after (structs, as decoded), _op, _lsn,
    _xid, _ts (commit time) and _seq; None when a change has no decoded Arrow row or the polls' schemas differ."""
    frames: dict[int, tuple[pa.Table, list[int], list[int]]] = {}
    for seq, event in enumerate(events):
        frame = event.source_frame
        if frame is None or event.op == "t":
            return None
        entry = frames.get(id(frame))
        if entry is None:
            entry = frames[id(frame)] = (frame, [], [])
        entry[1].append(event.frame_row)
        entry[2].append(seq)
    parts = []
    schema = None
    for frame, rows, seqs in frames.values():
        if schema is None:
            schema = frame.schema
        elif not frame.schema.equals(schema):
            return None  # another writer schema in the same batch: the general path knows how to merge them
        parts.append(frame.take(pa.array(rows, pa.int64())).append_column("_seq", pa.array(seqs, pa.int64())))
    # Each part is in batch order already; several (polls) are interleaved back into it.
    table = pa.concat_tables(parts).sort_by("_seq") if len(parts) > 1 else parts[0]
    return (table
            .append_column("_op", pa.array([e.op for e in events], pa.string()))
            .append_column("_lsn", pa.array([e.lsn if e.lsn is not None else SNAPSHOT_LSN for e in events],
                                            pa.int64()))
            .append_column("_xid", pa.array([e.xid or "" for e in events], pa.string()))
            .append_column("_ts", pa.array([e.commit_ts_ms for e in events], pa.int64())))


def supports(shape: TableShape, converter: RowConverter) -> bool:
    """Whether every column of the table is of a type taken here (the batch may still be refused for its values)."""
    avro = converter.avro_names()
    return (all(converter.logical_types.get(c) in _KINDS and c in avro for c in shape.column_names)
            and not {SEQ, OP, CHANGE_LSN, TX_ID, COMMIT_MS} & set(shape.column_names))


def flat_images(batch: pa.Table, shape: TableShape, converter: RowConverter) -> pa.Table | None:
    """One row per change of `batch` (see batch_table): SEQ, OP, CHANGE_LSN, TX_ID, COMMIT_MS, then each column
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

    stage, last = f"_cdc_columnar_{id(flat)}", f"_cdc_last_{id(flat)}"
    conn.register(stage, flat)
    try:
        run(f"INSERT INTO {history} ({names}, _cdc_op, _cdc_lsn, _cdc_tx_id, _cdc_commit_ts) "
            f"SELECT {values}, {OP}, {CHANGE_LSN}, {TX_ID}, "
            f"CASE WHEN {COMMIT_MS} IS NULL THEN NULL ELSE epoch_ms({COMMIT_MS})::TIMESTAMPTZ END "
            f"FROM {stage} ORDER BY {SEQ}")
        keys = ", ".join(quote(c) for c in shape.primary_key)
        run(f"CREATE TEMP TABLE {last} AS SELECT * FROM {stage} "
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {SEQ} DESC) = 1")
        try:
            lsn = quote(LSN_COLUMN)
            sets = [f"{quote(c)} = EXCLUDED.{quote(c)}" for c in columns if c not in shape.primary_key]
            sets.append(f"{lsn} = GREATEST({target}.{lsn}, EXCLUDED.{lsn})")
            run(f"INSERT INTO {target} ({names}, {lsn}) SELECT {values}, {CHANGE_LSN} FROM {last} "
                f"WHERE {OP} <> 'd' ON CONFLICT ({keys}) DO UPDATE SET {', '.join(sets)} "
                f"WHERE {target}.{lsn} < EXCLUDED.{lsn} OR EXCLUDED.{lsn} = {SNAPSHOT_LSN}")
            match = " AND ".join(f"t.{quote(c)} = s.k{i}" for i, c in enumerate(shape.primary_key))
            picks = ", ".join(f"CAST({quote(c)} AS {column_types[c]}) AS k{i}" for i, c in enumerate(shape.primary_key))
            run(f"DELETE FROM {target} t USING (SELECT {picks}, {CHANGE_LSN} FROM {last} WHERE {OP} = 'd') s "
                f"WHERE {match} AND t.{lsn} < s.{CHANGE_LSN}")
        finally:
            run(f"DROP TABLE IF EXISTS {last}")
    finally:
        conn.unregister(stage)
