"""The sites' Prometheus metrics and feed (consumers/lag/server.py, `cdc sites serve`) from a made-up status
document in `consumers.sites.status`'s shape: the text a scrape returns, and the page naming its feed."""

from __future__ import annotations

import json
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest

from consumers.lag.server import SitesServer, site_families

DOC = {"topology": "shop", "sites": [
    {"site": "hq", "sync_id": 1, "role": "master", "status": "OK", "last_sync_at": 1796074640.5, "lag_messages": 0,
     "lag_seconds": 0.0, "errors": [], "conflicts_waiting": 2,
     "links": [{"pipeline": "shop-north-up", "direction": "up", "status": "OK", "lag_messages": 0, "lag_seconds": 0.0,
                "last_sync_at": 1796074640.5, "sync_blocked": None}]},
    {"site": "north", "sync_id": 2, "role": "satellite", "status": "ERROR", "last_sync_at": None, "lag_messages": 7,
     "lag_seconds": 12.5, "errors": ["shop-north-down: last sync failed"], "conflicts_waiting": 0,
     "links": [{"pipeline": "shop-north-up", "direction": "up", "status": "OK", "lag_messages": 0,
                "lag_seconds": 0.0, "last_sync_at": 1796074640.5, "sync_blocked": None},
               {"pipeline": "shop-north-down", "direction": "down", "status": "ERROR", "lag_messages": 7,
                "lag_seconds": 12.5, "last_sync_at": None, "sync_blocked": "permission denied"}]},
]}


class _Families:
    def __init__(self, *args):
        self.args = args

    def collect(self):
        return site_families(*self.args)


def scrape(*args) -> str:
    registry = CollectorRegistry()
    registry.register(_Families(*args))
    return generate_latest(registry).decode()


def test_the_metrics_of_a_made_up_status():
    text = scrape(DOC, 1, 1796074650.0)
    lines = set(text.splitlines())
    assert 'cdc_site_status{link="",site="north",status="ERROR",topology="shop"} 1.0' in lines
    assert 'cdc_site_status{link="",site="north",status="OK",topology="shop"} 0.0' in lines
    assert 'cdc_site_status{link="shop-north-down",site="north",status="ERROR",topology="shop"} 1.0' in lines
    assert 'cdc_site_status{link="shop-north-up",site="north",status="OK",topology="shop"} 1.0' in lines
    assert 'cdc_site_lag_seconds{link="",site="north",topology="shop"} 12.5' in lines
    assert 'cdc_site_lag_seconds{link="shop-north-down",site="north",topology="shop"} 12.5' in lines
    assert 'cdc_site_lag_messages{link="shop-north-down",site="north",topology="shop"} 7.0' in lines
    assert 'cdc_site_conflicts_waiting{site="hq",topology="shop"} 2.0' in lines
    assert 'cdc_site_conflicts_waiting{site="north",topology="shop"} 0.0' in lines
    assert 'cdc_site_sync_blocked{link="shop-north-down",site="north",topology="shop"} 1.0' in lines
    assert 'cdc_site_sync_blocked{link="shop-north-up",site="north",topology="shop"} 0.0' in lines
    assert 'cdc_site_last_sync_timestamp_seconds{link="",site="hq",topology="shop"} 1.7960746405e+09' in lines
    # never synced: no sample rather than a made-up 0
    assert 'cdc_site_last_sync_timestamp_seconds{link="",site="north"' not in text
    assert 'cdc_sites_sample_timestamp_seconds{topology="shop"} 1.79607465e+09' in lines
    assert 'cdc_sites_sample_errors_total{topology="shop"} 1.0' in lines


def test_no_status_yet_only_counts_errors():
    text = scrape(None, 3, None, "shop")
    assert 'cdc_sites_sample_errors_total{topology="shop"} 3.0' in text
    assert "cdc_site_status{" not in text and "cdc_sites_sample_timestamp_seconds{" not in text


def test_the_server_serves_metrics_feed_and_page():
    failing = []

    def sample():
        if failing:
            raise RuntimeError("hq does not answer")
        return DOC

    server = SitesServer("shop", sample, port=0, interval=3600)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert 'cdc_site_status{link="",site="north",status="ERROR",topology="shop"} 1.0' in metrics
        feed = json.loads(urllib.request.urlopen(base + "/api/sites", timeout=10).read())
        assert feed["sites"] == DOC and feed["error"] is None
        page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
        assert 'data-feed="/api/sites"' in page and 'id="sites-section"' in page
        failing.append(True)
        server.sample_once()  # a failing status: counted and shown, the last good one kept
        feed = json.loads(urllib.request.urlopen(base + "/api/sites", timeout=10).read())
        assert feed["error"] == "hq does not answer" and feed["sites"] == DOC
        assert 'cdc_sites_sample_errors_total{topology="shop"} 1.0' in urllib.request.urlopen(
            base + "/metrics", timeout=10).read().decode()
    finally:
        server.close()
