"""The `ChangeEvent` model and its construction from a decoded Debezium envelope (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

OPS = {"c": "create", "u": "update", "d": "delete", "r": "read", "t": "truncate"}


@dataclass(slots=True)
class ChangeEvent:
    """One row change as Debezium captured it, with where it sits in Kafka and in the source's history.

    Treated as immutable. Not declared frozen: a frozen dataclass sets each field through object.__setattr__, which
    triples the cost of making one, and the applier makes one per message."""

    topic: str
    partition: int
    offset: int
    table: str  # schema-qualified source table
    op: str  # c, u, d, r (snapshot read) or t (truncate)
    key: Mapping[str, Any] | None
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    lsn: int | None
    tx_id: str | None  # Debezium's transaction id ("txId:lsn" on PostgreSQL); None for snapshot reads
    tx_order: int | None  # position of this event in its transaction (total_order, from 1)
    commit_ts_ms: int | None  # source commit time
    snapshot: bool
    schema_id: int | None = None  # the registry id of the value's writer schema (selects the row converter)
    # The source transaction's id: Debezium's id is "txId:lsn", and only the txId part is stable. A field, not a
    # property: the assembler asks for it several times per event.
    xid: str | None = None
    count: ClassVar[int] = 1  # changes it stands for (as consumers.apply.runs.ChangeRun)

    def __post_init__(self) -> None:
        if self.xid is None and self.tx_id:
            self.xid = self.tx_id.split(":", 1)[0]

    @property
    def commit_time(self) -> datetime | None:
        if self.commit_ts_ms is None:
            return None
        return datetime.fromtimestamp(self.commit_ts_ms / 1000, tz=UTC)

    @property
    def last_offset(self) -> int:
        return self.offset

    @property
    def row(self) -> Mapping[str, Any] | None:
        """The row image that describes the row after the change (the before image for a delete)."""
        return self.before if self.op == "d" else self.after


def from_envelope(
    value: Mapping[str, Any], key: Mapping[str, Any] | None, *, topic: str, partition: int, offset: int,
    schema_id: int | None = None,
) -> ChangeEvent:
    """Build a ChangeEvent from a decoded Debezium value envelope; raises ValueError naming what is missing."""
    try:
        op = value["op"]
        source = value["source"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a Debezium change envelope (missing {exc})") from None
    if op not in OPS:
        raise ValueError(f"unknown Debezium op {op!r}")
    tx = value.get("transaction") or {}
    snapshot = source.get("snapshot")
    return ChangeEvent(
        topic=topic,
        partition=partition,
        offset=offset,
        table=f"{source.get('schema')}.{source.get('table')}",
        op=op,
        key=key,
        before=value.get("before"),
        after=value.get("after"),
        lsn=source.get("lsn"),
        tx_id=tx.get("id"),
        tx_order=tx.get("total_order"),
        commit_ts_ms=source.get("ts_ms"),
        snapshot=snapshot not in (None, "false"),
        schema_id=schema_id,
    )


# The envelope fields the applier reads, as paths for a columnar decode (schemas.batch.BatchDecoder.columns).
ENVELOPE_PATHS: tuple[tuple[str, ...], ...] = (
    ("op",), ("before",), ("after",), ("source", "schema"), ("source", "table"), ("source", "lsn"),
    ("source", "ts_ms"), ("source", "snapshot"), ("transaction", "id"), ("transaction", "total_order"),
)



def from_columns(columns: list[list[Any]], *, topics: list[str], partitions: list[int], offsets: list[int],
                 schema_id: int) -> list[ChangeEvent] | None:
    """ChangeEvents from the ENVELOPE_PATHS columns of a batch; None when one of them is not a change envelope (the
    caller then builds them one by one with from_envelope, which names what is wrong)."""
    ops, befores, afters, schemas, tables, lsns, commit_ts, snapshots, tx_ids, tx_orders = columns
    if not set(ops) <= OPS.keys() or None in schemas or None in tables:
        return None
    names: dict[tuple[str, str], str] = {}
    qualified = []
    for key in zip(schemas, tables):
        table = names.get(key)
        if table is None:
            table = names[key] = f"{key[0]}.{key[1]}"
        qualified.append(table)
    return build_events(ops, befores, afters, qualified, lsns, commit_ts, snapshots, tx_ids, tx_orders,
                        topics=topics, partitions=partitions, offsets=offsets, schema_id=schema_id)


def build_events(ops: list[str], befores: list[Any], afters: list[Any], tables: list[str], lsns: list[Any],
                 commit_ts: list[Any], snapshots: list[Any], tx_ids: list[Any], tx_orders: list[Any], *,
                 topics: list[str], partitions: list[int], offsets: list[int], schema_id: int) -> list[ChangeEvent]:
    """ChangeEvents from columns of decoded envelope fields, `tables` schema-qualified (one place for what a
    snapshot flag and a transaction id mean, for from_columns and consumers.apply.runs)."""
    return [ChangeEvent(topic, partition, offset, table, op, None, before, after, lsn, tx_id, tx_order, ts,
                        snapshot is not None and snapshot != "false", schema_id,
                        tx_id.split(":", 1)[0] if tx_id else None)
            for topic, partition, offset, table, op, before, after, lsn, ts, snapshot, tx_id, tx_order
            in zip(topics, partitions, offsets, tables, ops, befores, afters, lsns, commit_ts, snapshots, tx_ids,
                   tx_orders)]


@dataclass(frozen=True, slots=True)
class TransactionMarker:
    """A record of Debezium's transaction topic: BEGIN, or END with the event count per table."""

    status: str  # BEGIN or END
    xid: str
    event_counts: Mapping[str, int]  # schema-qualified table -> events of this transaction (END only)
    commit_ts_ms: int | None
    offset: int
    # The source's commit LSN, from an END record's id ("txId:lsn": the LSN Debezium last saw, its COMMIT's; the
    # same in a re-sent copy, and increasing in commit order). None where the id carries none.
    commit_lsn: int | None = None


def marker_from_record(value: Mapping[str, Any], offset: int) -> TransactionMarker:
    try:
        status, tx_id = value["status"], value["id"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a Debezium transaction record (missing {exc})") from None
    counts = {c["data_collection"]: c["event_count"] for c in value.get("data_collections") or ()}
    xid, _, lsn = str(tx_id).partition(":")
    return TransactionMarker(status, xid, counts, value.get("ts_ms"), offset, int(lsn) if lsn.isdigit() else None)
