"""Applying changes to a destination: reading and assembling source transactions from Kafka, planning the writes,
and writing them through a dialect exactly once (the applier, its parts and the dialects)."""
