"""What the applier keeps beside a replicated table at the destination: its bookkeeping names (the model of a source
table, and the `_cdc_lsn` column each replicated row carries, are in cdc/source_tables.py)."""

from __future__ import annotations

# Each replicated row remembers the source position (LSN) of the change that wrote it, in LSN_COLUMN:
# a conditional upsert in one statement can then refuse to let an older change overwrite a newer one.

# Incremental snapshot reads (ad-hoc snapshots, re-syncs) carry no LSN. They hold the row as it is now, and
# what changes it later comes later in the same partition, so they always win, and keep the stored LSN.
SNAPSHOT_LSN = -1
OFFSETS_TABLE = "_cdc_offsets"
# Why the applier of a pipeline stopped, when it stopped on an error (cdc lag reports it).
STATUS_TABLE = "_cdc_status"
# The source transactions whose changes of a table without a primary key a destination has applied, per pipeline and
# table: such rows carry no LSN guard, so a transaction Debezium re-sends (at-least-once) is recognised here instead
# and its keyless changes are not applied twice (DestinationWriter._keyless_once, consumers/apply/writer.py;
# docs/applier.md).
APPLIED_TABLE = "_cdc_applied_transactions"
LAST_COMMIT_TABLE = "_cdc_last_commit"  # the last source commit applied (consumers/apply/copies.py)
