"""Runs of changes: consecutive changes of one partition, one source transaction and one writer schema, left in the
decoder's Arrow columns. The columnar path's unit of work, as ChangeEvent is the general path's.

Why: a ChangeEvent per change costs about 8 µs of Python between Kafka and the destination (building it, and the
assembler's bookkeeping of it), more than decoding and writing the change together. The transaction assembler
needs no more than a change's partition, offset and transaction, and those are the same for a whole run, so it
takes a run as one item. The message-by-message work left is Kafka's and the decoder's; splitting a poll into runs
is done on arrays (`split`), and writing a table's runs is done on Arrow tables (consumers.apply.columnar).

A run is only ever a prefix-preserving slice of its partition: its changes are consecutive messages of the
partition (no other message of the partition lies between two of them), so the assembler's argument that it
takes a prefix of each partition (consumers.apply.transactions) holds for runs as it does for events.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from consumers.apply.events import OPS, ChangeEvent, build_events


def envelope_table(frame: Any) -> tuple[str, pa.Table] | None:
    """A decoded poll's messages of one writer schema (a polars DataFrame of Debezium envelopes) as the Arrow table
    runs point into, and the one source table they all belong to; None when they are not all change envelopes of
    one table, or hold a truncate (the general path orders a batch around one)."""
    try:
        decoded = frame.to_arrow()  # in Arrow from here: its struct fields cost nothing to take apart
        source, transaction, op = decoded.column("source"), decoded.column("transaction"), decoded.column("op")
        schemas, tables = pc.unique(pc.struct_field(source, "schema")), pc.unique(pc.struct_field(source, "table"))
        if len(schemas) != 1 or len(tables) != 1 or schemas.null_count or tables.null_count:
            return None
        ops = set(pc.unique(op).to_pylist())
        if not ops <= OPS.keys() or "t" in ops:
            return None
        txid = pc.struct_field(transaction, "id")
        # Debezium's id is "txId:lsn"; only the txId part is stable (as ChangeEvent.xid).
        xid = pc.struct_field(pc.extract_regex(txid, r"^(?P<xid>[^:]*)"), [0])
        arrow = pa.table({
            "before": decoded.column("before"), "after": decoded.column("after"), "_op": op,
            "_lsn": pc.struct_field(source, "lsn"), "_ts": pc.struct_field(source, "ts_ms"), "_txid": txid,
            "_xid": pc.if_else(pc.equal(xid, ""), pa.scalar(None, xid.type), xid),
            "_order": pc.struct_field(transaction, "total_order"),
            "_snapshot": pc.struct_field(source, "snapshot").cast(pa.large_string()),
        })
        # A copy in Arrow's own memory, of these columns only. The decoded columns are polars' memory, imported
        # whole: any one of them kept (`_lsn`) keeps every column of the poll alive, `source` and its strings
        # included, until the last run pointing into it is applied. A source transaction of 300,000 rows held
        # 830 bytes a change that way; runs of a large transaction stay until its END, so this bounds what they cost.
        arrow = arrow.take(pa.array(np.arange(arrow.num_rows, dtype=np.int64)))
    except (KeyError, pa.ArrowException):  # not an envelope as expected: the general path names what is wrong
        return None
    return f"{schemas[0].as_py()}.{tables[0].as_py()}", arrow


def xid_codes(arrow: pa.Table) -> tuple[np.ndarray, list[str]]:
    """Each change's transaction as a number (-1 outside transactions: snapshot reads), and the ids they stand for."""
    encoded = pc.dictionary_encode(arrow.column("_xid")).combine_chunks()
    return (encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64),
            encoded.dictionary.to_pylist())


def partition_codes(topics: list[str], partitions: list[int], transaction_topic: str) -> tuple[np.ndarray, np.ndarray]:
    """A number per (topic, partition) of each message of a poll, and which messages are data (not of the
    transaction topic)."""
    encoded = pc.dictionary_encode(pa.array(topics, pa.string()))
    topic_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    numbers = np.asarray(partitions, np.int64)
    codes = topic_codes * (int(numbers.max(initial=0)) + 1) + numbers
    names = encoded.dictionary.to_pylist()
    data = topic_codes != names.index(transaction_topic) if transaction_topic in names else np.ones(len(topics), bool)
    return codes, data


def schema_groups(column: pa.BinaryArray, data: np.ndarray) -> dict[int, np.ndarray]:
    """The positions of the data messages (a poll's values, `column`) framed for the registry (magic byte 0, then a
    4-byte schema id), by writer schema id, in poll order."""
    framed = pc.and_(pc.greater_equal(pc.binary_length(column), 5),
                     pc.equal(pc.binary_slice(column, 0, 1), pa.scalar(b"\x00", pa.binary())))
    framed = pc.and_(pc.fill_null(framed, False), pa.array(data))
    heads = pc.dictionary_encode(pc.if_else(framed, pc.binary_slice(column, 1, 5), pa.scalar(None, pa.binary())))
    codes = heads.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    return {int.from_bytes(head, "big"): np.flatnonzero(codes == k)
            for k, head in enumerate(heads.dictionary.to_pylist())}


def split(partitions: np.ndarray, groups: np.ndarray, transactions: np.ndarray,
          skipped: np.ndarray | None = None) -> tuple[list[int], list[int], np.ndarray]:
    """Runs of a poll: its messages ordered by partition (poll order kept within each), cut wherever the partition,
    the group (a writer schema's decode; a message on its own has a group of its own), the transaction or whether
    the message is `skipped` changes. Returns each run's first and end position in that order, and the order
    itself (poll positions)."""
    order = np.argsort(partitions, kind="stable")
    n = len(order)
    cut = np.zeros(n, bool)
    if n:
        cut[0] = True
        for key in (partitions, groups, transactions, *(() if skipped is None else (skipped,))):
            ordered = key[order]
            cut[1:] |= ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(cut)
    return starts.tolist(), [*starts[1:].tolist(), n], order


class SpillFile:
    """Arrow tables set aside on disk, in one anonymous temporary file, and read back by their place in it. The runs
    of a source transaction too large to hold until its END are kept here (TransactionAssembler); the file goes
    away with the last run pointing into it (the system deletes an anonymous temporary file when it is closed).
    Written from the reading thread and read from the writing thread: positional reads and writes, no shared
    file position."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="cdc-spill-")  # noqa: SIM115 - lives as long as the runs in it
        self._end = 0
        self._lock = threading.Lock()

    def put(self, table: pa.Table) -> tuple[int, int]:
        """Write `table`; its place (offset, size) in the file."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue()
        with self._lock:
            at = self._end
            self._end += data.size
        written = 0
        while written < data.size:  # pwrite may write less than asked
            written += os.pwrite(self._file.fileno(), memoryview(data)[written:], at + written)
        return at, data.size

    def get(self, at: int, size: int) -> pa.Table:
        data = os.pread(self._file.fileno(), size, at)
        if len(data) != size:
            raise OSError(f"spill file: {len(data)} of {size} bytes read back at {at}")
        return pa.ipc.open_stream(data).read_all()


@dataclass(slots=True, eq=False)
class ChangeRun:
    """`count` consecutive changes of one partition, one source transaction (xid; None for snapshot reads) and one
    writer schema: rows `rows` of `frame` (envelope_table), whose offsets are `offsets`."""

    topic: str
    partition: int
    offset: int  # the first change's
    last_offset: int
    table: str
    xid: str | None
    schema_id: int
    frame: pa.Table | None  # None once spilled
    rows: np.ndarray
    offsets: np.ndarray
    spilled: tuple[SpillFile, int, int] | None = None  # where its rows are on disk (spill), rows then 0..count-1
    # The assembler orders a transaction's events by these; a run's own order is kept by the columnar write, which
    # orders by the rows' values (consumers.apply.columnar.runs_table).
    tx_order: ClassVar[None] = None
    lsn: ClassVar[None] = None

    @property
    def count(self) -> int:
        return len(self.rows)

    def since(self, offset: int) -> ChangeRun | None:
        """The changes at `offset` and after (None when there are none)."""
        if self.offset >= offset:
            return self
        if self.last_offset < offset:
            return None
        keep = self.offsets >= offset  # offsets increase along a run
        return ChangeRun(self.topic, self.partition, int(self.offsets[keep][0]), self.last_offset, self.table,
                         self.xid, self.schema_id, self.frame, self.rows[keep], self.offsets[keep], self.spilled)

    def spill(self, file: SpillFile) -> None:
        """Move the run's rows to `file`, out of memory (and out of the poll's table it pointed into)."""
        if self.frame is None:  # spilled already: the frame is let go when the rows go to disk
            return
        part = self.frame.take(pa.array(self.rows, pa.int64()))
        self.spilled = (file, *file.put(part))
        self.frame = None
        self.rows = np.arange(len(self.rows), dtype=np.int64)

    def arrow(self) -> pa.Table:
        """The Arrow table `rows` index into: the poll's, or the run's own read back from its spill file."""
        if self.spilled is None:
            return self.frame
        file, at, size = self.spilled
        return file.get(at, size)

    def events(self) -> list[ChangeEvent]:
        """The run as ChangeEvents, for the general path."""
        part = self.arrow().take(pa.array(self.rows, pa.int64()))
        ops, befores, afters, lsns, tx_ids, orders, commit_ts, snapshots = (
            part.column(c).to_pylist() for c in ("_op", "before", "after", "_lsn", "_txid", "_order", "_ts",
                                                 "_snapshot"))
        n = len(ops)
        return build_events(ops, befores, afters, [self.table] * n, lsns, commit_ts, snapshots, tx_ids, orders,
                            topics=[self.topic] * n, partitions=[self.partition] * n,
                            offsets=self.offsets.tolist(), schema_id=self.schema_id)


def expand(items: Iterable[ChangeEvent | ChangeRun]) -> list[ChangeEvent]:
    """Events and runs as events, in the same order."""
    out: list[ChangeEvent] = []
    for item in items:
        if isinstance(item, ChangeRun):
            out.extend(item.events())
        else:
            out.append(item)
    return out


def count(items: Iterable[ChangeEvent | ChangeRun]) -> int:
    """How many changes events and runs stand for."""
    return sum(item.count for item in items)
