"""The columnar write path: a batch's row images go from the decoder's Arrow columns into the destination without
becoming Python objects (DuckDB analytics replicas, PostgreSQL replicas).

Why: the general path converts every value in Python (RowConverter), collapses rows in dicts (plan.net_changes)
and builds Arrow back from them, about 50 µs a change for a DuckDB replica with its history. Here each change keeps
a reference to the Arrow table its poll was decoded into (schemas.batch) and its row there; a table's changes in a
batch are gathered with one `take` per decoded poll. DuckDB reads that Arrow table itself, and three statements do
the rest: the history insert, the upsert of each key's last change, the delete of keys whose last change is a
delete. PostgreSQL gets it through COPY as CSV written by Arrow (`flat_images`: each change's row image, its values
converted by Arrow the way values.py converts them), then the same upsert and delete.

It produces what the general path produces, for the cases it takes; anything else is left to the general path
(the caller gets False, nothing written): a column type without a SQL twin of its Python converter below, a
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

# The SQL twin of each RowConverter conversion taken here ({} is the Avro value). Types absent here are not taken.
_SQL: dict[str, str] = {
    "int": "{}", "long": "{}", "boolean": "{}", "float": "{}", "double": "{}", "string": "{}",
    "org.apache.kafka.connect.data.Decimal": "{}",
    "io.debezium.data.Json": "{}", "io.debezium.data.Uuid": "{}", "io.debezium.data.Enum": "{}",
    "io.debezium.time.ZonedTimestamp": "CAST({} AS TIMESTAMPTZ)",
    "io.debezium.time.MicroTimestamp": "make_timestamp({})",
    "io.debezium.time.Timestamp": "epoch_ms({})",
    "io.debezium.time.Date": "(DATE '1970-01-01' + CAST({} AS INTEGER))",
}
# Text-carried types, where Debezium may put its placeholder for a value it did not send.
_TEXT = {"string", "io.debezium.data.Json", "io.debezium.data.Uuid", "io.debezium.data.Enum",
         "io.debezium.time.ZonedTimestamp"}
# Values whose Python conversion is special (infinities, years outside 1..9999: values.py spells them out as
# text): the batch is the general path's. {} is the Avro value.
_SPECIAL: dict[str, str] = {
    "io.debezium.time.MicroTimestamp": f"{{}} NOT BETWEEN {_MIN_US} AND {_MAX_US}",
    "io.debezium.time.Timestamp": f"{{}} NOT BETWEEN {_MIN_US // 1000} AND {_MAX_US // 1000}",
    "io.debezium.time.Date": f"{{}} NOT BETWEEN {_MIN_DAYS} AND {_MAX_DAYS}",
    "io.debezium.time.ZonedTimestamp": "NOT regexp_matches({}, '^[0-9]{{4}}-')",
}


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
    """Whether every column of the table has a SQL twin here (the batch may still be refused for its values)."""
    avro = converter.avro_names()
    return all(converter.logical_types.get(c) in _SQL and c in avro for c in shape.column_names)


def apply_table(conn: Any, quote: Callable[[str], str], target: str, history: str, shape: TableShape,
                converter: RowConverter, batch: pa.Table, column_types: dict[str, str]) -> bool:
    """Write one table's batch (see batch_table) to its DuckDB current-state and history tables; False, having
    written nothing, when the batch is one the general path must take. `conn` is the DuckDB connection,
    `target`/`history` quoted table names, `column_types` the destination type of each column (for the casts)."""
    if not supports(shape, converter):
        return False
    avro = converter.avro_names()
    types = converter.logical_types
    columns = list(shape.column_names)

    def value(column: str, image: str = "img") -> str:
        expr = _SQL[types[column]].format(f"{image}.{quote(avro[column])}")
        return f"CAST({expr} AS {column_types[column]})"

    def run(statement: str) -> list[tuple]:
        # Fetched to the end: DuckDB refuses the next statement while a result is unfinished.
        return conn.execute(statement).fetchall()

    stage = f"_cdc_columnar_{id(batch)}"
    conn.register(stage, batch)
    try:
        key_changed = " OR ".join(f"before.{quote(avro[c])} IS DISTINCT FROM after.{quote(avro[c])}"
                                  for c in shape.primary_key)
        unsent = [f"position('{PLACEHOLDER}' IN CAST({image}.{quote(avro[c])} AS VARCHAR)) > 0"
                  for c in columns if types[c] in _TEXT for image in ("before", "after")]
        special = [_SPECIAL[types[c]].format(f"{image}.{quote(avro[c])}")
                   for c in columns if types[c] in _SPECIAL for image in ("before", "after")]
        refuse = [f"(_op = 'u' AND before IS NOT NULL AND ({key_changed}))", *unsent, *special]
        if run(f"SELECT count(*) FROM {stage} WHERE {' OR '.join(refuse)}")[0][0]:
            return False
        images = f"(SELECT *, CASE WHEN _op = 'd' THEN before ELSE after END AS img FROM {stage})"
        names = ", ".join(quote(c) for c in columns)
        run(
            f"INSERT INTO {history} ({names}, _cdc_op, _cdc_lsn, _cdc_tx_id, _cdc_commit_ts) "
            f"SELECT {', '.join(value(c) for c in columns)}, _op, _lsn, _xid, "
            f"CASE WHEN _ts IS NULL THEN NULL ELSE epoch_ms(_ts)::TIMESTAMPTZ END FROM {images} ORDER BY _seq")
        last = f"_cdc_last_{id(batch)}"
        keys = ", ".join(f"img.{quote(avro[c])}" for c in shape.primary_key)
        run(f"CREATE TEMP TABLE {last} AS SELECT _op, _lsn, img FROM {images} "
                     f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY _seq DESC) = 1")
        try:
            lsn = quote(LSN_COLUMN)
            sets = [f"{quote(c)} = EXCLUDED.{quote(c)}" for c in columns if c not in shape.primary_key]
            sets.append(f"{lsn} = GREATEST({target}.{lsn}, EXCLUDED.{lsn})")
            run(
                f"INSERT INTO {target} ({names}, {lsn}) SELECT {', '.join(value(c) for c in columns)}, _lsn "
                f"FROM {last} WHERE _op <> 'd' ON CONFLICT ({', '.join(quote(c) for c in shape.primary_key)}) "
                f"DO UPDATE SET {', '.join(sets)} "
                f"WHERE {target}.{lsn} < EXCLUDED.{lsn} OR EXCLUDED.{lsn} = {SNAPSHOT_LSN}")
            match = " AND ".join(f"t.{quote(c)} = s.k{i}" for i, c in enumerate(shape.primary_key))
            picks = ", ".join(f"{value(c)} AS k{i}" for i, c in enumerate(shape.primary_key))
            run(f"DELETE FROM {target} t USING (SELECT {picks}, _lsn FROM {last} WHERE _op = 'd') s "
                         f"WHERE {match} AND t.{lsn} < s._lsn")
        finally:
            run(f"DROP TABLE IF EXISTS {last}")
    finally:
        conn.unregister(stage)
    return True


# Arrow casts that turn Debezium's temporal numbers into what values.py makes of them (in range: see _SPECIAL).
_ARROW_CASTS = {"io.debezium.time.MicroTimestamp": pa.timestamp("us"), "io.debezium.time.Timestamp": pa.timestamp("ms"),
                "io.debezium.time.Date": pa.date32()}
_ARROW_SPECIAL = {"io.debezium.time.MicroTimestamp": (_MIN_US, _MAX_US),
                  "io.debezium.time.Timestamp": (_MIN_US // 1000, _MAX_US // 1000),
                  "io.debezium.time.Date": (_MIN_DAYS, _MAX_DAYS)}
SEQ, OP, CHANGE_LSN = "_cdc_seq", "_cdc_op", "_cdc_change_lsn"  # the extra columns of flat_images


def flat_images(batch: pa.Table, shape: TableShape, converter: RowConverter) -> pa.Table | None:
    """One row per change of `batch` (see batch_table): SEQ, OP, CHANGE_LSN, then each column of its row image
    (before for a delete, after otherwise) converted as values.py would; None when the batch is the general
    path's, for the reasons apply_table gives."""
    if not supports(shape, converter) or {SEQ, OP, CHANGE_LSN} & set(shape.column_names):
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
    columns = {SEQ: batch.column("_seq"), OP: op, CHANGE_LSN: batch.column("_lsn")}
    for c in shape.column_names:
        kind = types[c]
        value = pc.if_else(is_delete, pc.struct_field(before, avro[c]), pc.struct_field(after, avro[c]))
        if kind in _TEXT:
            if any_true(pc.match_substring(value, PLACEHOLDER)):
                return None
            if kind == "io.debezium.time.ZonedTimestamp" and any_true(pc.invert(pc.match_substring_regex(
                    value, "^[0-9]{4}-"))):
                return None
        if kind in _ARROW_SPECIAL:
            low, high = _ARROW_SPECIAL[kind]
            if any_true(pc.or_(pc.less(value, low), pc.greater(value, high))):
                return None
            value = value.cast(_ARROW_CASTS[kind])
        columns[c] = value
    return pa.table(columns)
