"""The applier's Prometheus metrics as a scrape shows them (consumers/apply/metrics.py): names, labels and values
read from the appliers at scrape time."""

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from consumers.apply.metrics import ApplierCollector


def _applier(paused: int) -> SimpleNamespace:
    """What the collector reads of a consumers.apply.applier.ReplicaApplier."""
    return SimpleNamespace(
        pipeline=SimpleNamespace(name="shop"), name="lake",
        stats=SimpleNamespace(rows=1200, transactions=12, batches=3, last_applied_at=1_700_000_000.0),
        lag_seconds=lambda: 4.5, assembler=SimpleNamespace(buffered=800), reader=SimpleNamespace(paused=paused),
        applied_positions={("shop.public.item", 0): 40}, read_positions={("shop.public.item", 0): 90})


def _scrape(*appliers: SimpleNamespace) -> str:
    registry = CollectorRegistry()
    registry.register(ApplierCollector(list(appliers)))
    return generate_latest(registry).decode()


def test_a_scrape_shows_the_partitions_held_back_and_what_waits():
    text = _scrape(_applier(paused=2))
    labels = '{destination="lake",pipeline="shop"}'
    assert f"cdc_applier_paused_partitions{labels} 2.0" in text
    assert f"cdc_applier_buffered_events{labels} 800.0" in text
    assert f"cdc_applier_lag_seconds{labels} 4.5" in text
    assert f"cdc_applier_rows_total{labels} 1200.0" in text
    part = '{destination="lake",partition="0",pipeline="shop",topic="shop.public.item"}'
    assert f"cdc_applier_applied_offset{part} 40.0" in text and f"cdc_applier_read_offset{part} 90.0" in text


def test_the_values_are_read_at_scrape_time():
    applier = _applier(paused=2)
    collector_text = _scrape(applier)
    applier.reader.paused = 0  # the bound no longer reached: everything is read again
    assert 'cdc_applier_paused_partitions{destination="lake",pipeline="shop"} 2.0' in collector_text
    assert 'cdc_applier_paused_partitions{destination="lake",pipeline="shop"} 0.0' in _scrape(applier)
