"""The applier's own tables in a destination, declared once: the stored Kafka offsets, why an applier stopped, the
source transactions whose keyless changes were applied, and the last source commit applied. Every reader and writer
uses these declarations (the dialects write them, `cdc lag` reads them, replays and backups copy them); a dialect
takes its own copy (`tables_for`) so that it can add its table options or move the offsets aside (a shadow replay)
without changing anyone else's."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, MetaData, String, Table, Text

from consumers.apply.shapes import APPLIED_TABLE, LAST_COMMIT_TABLE, OFFSETS_TABLE, STATUS_TABLE

METADATA = MetaData()

# The next Kafka offset to read per pipeline, topic and partition, written in the same destination transaction as the
# rows it covers: the truth an applier resumes from (Kafka's group offsets are only for lag tools).
OFFSETS = Table(
    OFFSETS_TABLE, METADATA,
    Column("pipeline", String(200), primary_key=True),
    Column("topic", String(255), primary_key=True),
    Column("kafka_partition", Integer, primary_key=True, autoincrement=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Why an applier of a pipeline stopped (a transaction that cannot complete...), or what outage blocks it: `cdc lag`
# reports it as ERROR (or BLOCKED).
STATUS = Table(
    STATUS_TABLE, METADATA,
    Column("pipeline", String(200), primary_key=True),
    Column("error", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# The source transactions whose keyless changes were applied here (shapes.APPLIED_TABLE), written in the same
# transaction as the rows and offsets. `end_offset`: where the transaction's END record is in the transaction topic;
# a record counts only while the stored offsets are past it (a replay or a restore that moves them back makes it
# void). Looked up by (pipeline, xid), pruned by source commit time.
APPLIED = Table(
    APPLIED_TABLE, METADATA,
    Column("pipeline", String(200), primary_key=True),
    Column("xid", String(64), primary_key=True),
    Column("source_table", String(255), primary_key=True),
    Column("first_lsn", BigInteger, nullable=False),
    Column("last_lsn", BigInteger, nullable=False),
    Column("end_offset", BigInteger, nullable=False),
    Column("committed_at", DateTime(timezone=True)),
    Column("applied_at", DateTime(timezone=True), nullable=False),
    Index("_cdc_applied_committed", "pipeline", "committed_at"),
)


# The last source commit applied here (consumers/apply/copies.py: re-sent copies of transactions up to it are
# skipped), written in the same transaction as the rows and offsets; `end_offset`: its END record's offset in the
# transaction topic (the mark counts only while the stored offsets are past it).
LAST_COMMIT = Table(
    LAST_COMMIT_TABLE, METADATA,
    Column("pipeline", String(200), primary_key=True),
    Column("commit_lsn", BigInteger, nullable=False),
    Column("commit_ts_ms", BigInteger, nullable=False),
    Column("end_offset", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def tables_for(metadata: MetaData) -> tuple[Table, Table, Table]:
    """Copies of (OFFSETS, STATUS, APPLIED) in `metadata`: a dialect's own, which it may give table options."""
    return OFFSETS.to_metadata(metadata), STATUS.to_metadata(metadata), APPLIED.to_metadata(metadata)


__all__ = ["APPLIED", "LAST_COMMIT", "METADATA", "OFFSETS", "STATUS", "tables_for"]
