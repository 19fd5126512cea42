"""Prometheus metrics of the appliers running in this process (`cdc run --metrics-port`), read at scrape time.

Names (labels pipeline and destination; partition metrics add topic and partition):
- `cdc_applier_rows_total`, `cdc_applier_source_transactions_total`, `cdc_applier_batches_total` (counters)
- `cdc_applier_lag_seconds`: now minus the commit time of the oldest source transaction read but not yet applied
- `cdc_applier_buffered_events`: events read and waiting for their transaction to complete
- `cdc_applier_paused_partitions`: data partitions not read for now, the changes read ahead being at their bound
- `cdc_applier_applied_offset`, `cdc_applier_read_offset`: next offset to apply / to read, per partition
- `cdc_applier_last_applied_timestamp_seconds`: when the last batch committed (0 before the first)
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from consumers.apply.applier import ReplicaApplier


class ApplierCollector:
    def __init__(self, appliers: list[ReplicaApplier]) -> None:
        self.appliers = appliers

    def collect(self) -> Iterable:  # prometheus_client's protocol
        labels = ["pipeline", "destination"]
        part_labels = [*labels, "topic", "partition"]
        rows = CounterMetricFamily("cdc_applier_rows", "Changes applied.", labels=labels)
        txs = CounterMetricFamily("cdc_applier_source_transactions", "Source transactions applied.", labels=labels)
        batches = CounterMetricFamily("cdc_applier_batches", "Destination transactions committed.", labels=labels)
        lag = GaugeMetricFamily("cdc_applier_lag_seconds", "Now minus the commit time of the oldest source "
                                "transaction read but not applied.", labels=labels)
        buffered = GaugeMetricFamily("cdc_applier_buffered_events", "Events waiting for their transaction.",
                                     labels=labels)
        paused = GaugeMetricFamily("cdc_applier_paused_partitions", "Data partitions not read for now: the changes "
                                   "read ahead are at their bound.", labels=labels)
        last = GaugeMetricFamily("cdc_applier_last_applied_timestamp_seconds", "When the last batch committed.",
                                 labels=labels)
        applied = GaugeMetricFamily("cdc_applier_applied_offset", "Next offset to apply.", labels=part_labels)
        read = GaugeMetricFamily("cdc_applier_read_offset", "Next offset to read.", labels=part_labels)
        for a in self.appliers:
            key = [a.pipeline.name, a.name]
            rows.add_metric(key, a.stats.rows)
            txs.add_metric(key, a.stats.transactions)
            batches.add_metric(key, a.stats.batches)
            lag.add_metric(key, a.lag_seconds())
            buffered.add_metric(key, a.assembler.buffered)
            paused.add_metric(key, a.reader.paused)
            last.add_metric(key, a.stats.last_applied_at or 0.0)
            for (topic, partition), offset in dict(a.applied_positions).items():
                applied.add_metric([*key, topic, str(partition)], offset)
            for (topic, partition), offset in dict(a.read_positions).items():
                read.add_metric([*key, topic, str(partition)], offset)
        yield from (rows, txs, batches, lag, buffered, paused, last, applied, read)


def serve(appliers: list[ReplicaApplier], port: int, host: str = "127.0.0.1") -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ApplierCollector(appliers))
    start_http_server(port, addr=host, registry=registry)
    return registry
