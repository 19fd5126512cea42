"""`cdc lag serve`: Prometheus metrics at /metrics, a live page at / (a chart of lag per destination over time, the
statuses and the connector's state), and the page's JSON feed at /api/lag.

One thread samples the pipeline every `interval` seconds into a sliding window (`status.History`); the HTTP
handlers only read the latest report, so a slow scrape never triggers a measurement. The page is plain HTML and
JavaScript with inline SVG charts: no CDN, it works on machines without internet.

Metrics (all gauges; labels in braces):
- `cdc_lag_messages{pipeline,destination,topic,partition}`, `cdc_lag_seconds{...}`: per partition
- `cdc_applied_offset{...}`, `cdc_end_offset{...}`, `cdc_group_offset{...}` (Kafka's committed view)
- `cdc_destination_lag_messages{pipeline,destination}`, `cdc_destination_lag_seconds{pipeline,destination}`
- `cdc_destination_status{pipeline,destination,status}`: 1 for the current status, 0 for the others
- `cdc_slot_retained_bytes{pipeline,slot}`, `cdc_connector_state{pipeline,connector,state}` (1 for the current state),
  `cdc_connector_task_state{pipeline,connector,task,state}`
- `cdc_lag_sample_timestamp_seconds{pipeline}`, `cdc_lag_sample_errors_total{pipeline}`

`cdc sites serve` (SitesServer) serves the same page, with a section of sites, from a topology's status document
(`consumers.sites.status`, passed in as a function: this layer knows nothing of sites), its feed at /api/sites, and:
- `cdc_site_status{topology,site,link,status}`: 1 for the current status (`link=""`: the site as a whole)
- `cdc_site_lag_seconds{topology,site,link}`, `cdc_site_lag_messages{topology,site,link}`
- `cdc_site_last_sync_timestamp_seconds{topology,site,link}` (absent while never synced)
- `cdc_site_conflicts_waiting{topology,site}`, `cdc_site_sync_blocked{topology,site,link}` (1: its last sync failed)
- `cdc_sites_sample_timestamp_seconds{topology}`, `cdc_sites_sample_errors_total{topology}`
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cdc.config import Pipeline
from cdc.errors import CdcError, first_line
from consumers.lag.probe import LagProbe
from consumers.lag.status import STATUSES, History, report

PAGE = Path(__file__).resolve().parent / "page.html"
CONNECTOR_STATES = ("RUNNING", "PAUSED", "STOPPED", "FAILED", "UNASSIGNED", "RESTARTING", "MISSING", "UNKNOWN")


class _SamplingServer:
    """What the lag page and the sites page share: a sampler thread taking `sample_once` every `interval` seconds,
    and an HTTP server (Prometheus metrics from `collector`, the page, the JSON `feed` at `feed_path`); subclasses
    sample."""

    feed_path = "/api/lag"

    def _serve(self, host: str, port: int, interval: float, collector: Any, name: str) -> None:
        self.interval = interval
        self.last_error: str | None = None
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.registry = CollectorRegistry()
        self.registry.register(collector)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.port = self.httpd.server_address[1]
        self._sampler = threading.Thread(target=self._sample_loop, name=f"{name}-sampler", daemon=True)
        self._http_thread: threading.Thread | None = None
        self._name = name

    def sample_once(self) -> None:
        raise NotImplementedError

    def feed(self) -> dict[str, Any]:
        raise NotImplementedError

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample_once()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> None:
        """Sample once (so the first scrape has data), then sample and serve in background threads."""
        self.sample_once()
        self._sampler.start()
        self._http_thread = threading.Thread(target=self.httpd.serve_forever, name=f"{self._name}-http", daemon=True)
        self._http_thread.start()

    def serve_forever(self) -> None:
        """Sample once, then sample in the background and serve in this thread until interrupted."""
        self.sample_once()
        self._sampler.start()
        self.httpd.serve_forever()

    def close(self) -> None:
        self._stop.set()
        if self._http_thread is not None:
            self.httpd.shutdown()  # waits for serve_forever in the other thread to return
            self._http_thread.join(timeout=10)
        self.httpd.server_close()
        if self._sampler.is_alive():
            self._sampler.join(timeout=60)


class LagServer(_SamplingServer):
    def __init__(self, pipeline: Pipeline, *, host: str = "127.0.0.1", port: int = 9108, interval: float = 2.0,
                 window: float = 30.0, stop_after: float = 30.0, destinations: list[str] | None = None,
                 keep_seconds: float = 900.0) -> None:
        self.pipeline = pipeline
        self.stop_after = stop_after
        self.probe = LagProbe(pipeline, destinations)
        self.history = History(window_seconds=window, keep_seconds=keep_seconds)
        self.series: list[dict[str, Any]] = []  # chart points: {"t", "destinations": {name: [msgs, secs]}}
        self.keep_seconds = keep_seconds
        self.latest: dict[str, Any] | None = None
        self._serve(host, port, interval, _Collector(self), "lag")

    # -- sampling ---------------------------------------------------------------------------------------------------
    def sample_once(self) -> None:
        try:
            samples, source = self.probe.sample()
        except CdcError as exc:
            with self._lock:
                self.errors += 1
                self.last_error = first_line(exc)
            return
        with self._lock:
            for s in samples.values():
                self.history.add(s)
            doc = report(self.history.windows(), source, pipeline=self.pipeline.name, stop_after=self.stop_after)
            now = time.time()
            self.series.append({"t": now, "destinations": {
                d["name"]: [d["lag_messages"], d["lag_seconds"]] for d in doc["destinations"]}})
            while self.series and self.series[0]["t"] < now - self.keep_seconds:
                self.series.pop(0)
            self.latest = doc
            self.last_error = None

    def feed(self) -> dict[str, Any]:
        with self._lock:
            return {"report": self.latest, "series": list(self.series), "error": self.last_error,
                    "interval": self.interval, "window": self.history.window_seconds}

    def close(self) -> None:
        super().close()
        self.probe.close()


class _Collector:
    """Builds the metric families from the latest report at scrape time (no stale label sets linger)."""

    def __init__(self, server: LagServer) -> None:
        self.server = server

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        s = self.server
        pipeline = s.pipeline.name
        with s._lock:
            doc, errors = s.latest, s.errors
        part_labels = ["pipeline", "destination", "topic", "partition"]
        lag_msgs = GaugeMetricFamily("cdc_lag_messages", "Messages not yet applied, per partition.",
                                     labels=part_labels)
        lag_secs = GaugeMetricFamily("cdc_lag_seconds", "Now minus the source commit time of the oldest change "
                                     "not yet applied, per partition (0 when caught up).", labels=part_labels)
        applied = GaugeMetricFamily("cdc_applied_offset", "Next offset the destination will apply (from "
                                    "_cdc_offsets).", labels=part_labels)
        end = GaugeMetricFamily("cdc_end_offset", "Log-end offset of the partition.", labels=part_labels)
        group = GaugeMetricFamily("cdc_group_offset", "Offset the applier's consumer group committed to Kafka.",
                                  labels=part_labels)
        d_msgs = GaugeMetricFamily("cdc_destination_lag_messages", "Messages not yet applied by a destination.",
                                   labels=["pipeline", "destination"])
        d_secs = GaugeMetricFamily("cdc_destination_lag_seconds", "Now minus the source commit time of the "
                                   "oldest change a destination has not applied.", labels=["pipeline", "destination"])
        d_status = GaugeMetricFamily("cdc_destination_status", "1 for the destination's current status.",
                                     labels=["pipeline", "destination", "status"])
        slot = GaugeMetricFamily("cdc_slot_retained_bytes", "WAL retained by the pipeline's replication slot.",
                                 labels=["pipeline", "slot"])
        conn = GaugeMetricFamily("cdc_connector_state", "1 for the connector's current state.",
                                 labels=["pipeline", "connector", "state"])
        tasks = GaugeMetricFamily("cdc_connector_task_state", "1 for each task's current state.",
                                  labels=["pipeline", "connector", "task", "state"])
        stamp = GaugeMetricFamily("cdc_lag_sample_timestamp_seconds", "When the latest sample was taken.",
                                  labels=["pipeline"])
        failures = CounterMetricFamily("cdc_lag_sample_errors", "Samples that could not be taken.",
                                       labels=["pipeline"])
        failures.add_metric([pipeline], errors)
        if doc is not None:
            for d in doc["destinations"]:
                name = d["name"]
                d_msgs.add_metric([pipeline, name], d["lag_messages"])
                d_secs.add_metric([pipeline, name], d["lag_seconds"])
                for status in STATUSES:
                    d_status.add_metric([pipeline, name, status], 1.0 if d["status"] == status else 0.0)
                for p in d["partitions"]:
                    labels = [pipeline, name, p["topic"], str(p["partition"])]
                    lag_msgs.add_metric(labels, p["lag_messages"])
                    lag_secs.add_metric(labels, p["lag_seconds"])
                    applied.add_metric(labels, p["applied_offset"])
                    end.add_metric(labels, p["end_offset"])
                    if p.get("group_offset") is not None:
                        group.add_metric(labels, p["group_offset"])
                stamp_value = d["sampled_at"]
            src = doc["source"]
            if src["slot_retained_bytes"] is not None:
                slot.add_metric([pipeline, s.pipeline.slot_name], src["slot_retained_bytes"])
            connector = s.pipeline.connector_name
            for state in CONNECTOR_STATES:
                conn.add_metric([pipeline, connector, state], 1.0 if src["connector_state"] == state else 0.0)
            for t in src["tasks"]:
                for state in CONNECTOR_STATES[:6]:
                    tasks.add_metric([pipeline, connector, str(t["id"]), state], 1.0 if t["state"] == state else 0.0)
            if doc["destinations"]:
                stamp.add_metric([pipeline], stamp_value)
        yield from (lag_msgs, lag_secs, applied, end, group, d_msgs, d_secs, d_status, slot, conn, tasks, stamp,
                    failures)


def _handler(server: _SamplingServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: scrapes are frequent
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            feed_path = server.feed_path
            if path == "/metrics":
                self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
            elif path == feed_path:
                self._send(200, json.dumps(server.feed(), default=str).encode(), "application/json")
            elif path in ("/", "/index.html"):
                # the page polls the feed its <body data-feed> names
                page = PAGE.read_bytes().replace(b'data-feed="/api/lag"', f'data-feed="{feed_path}"'.encode())
                self._send(200, page, "text/html; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain")

    return Handler


# -- sites (`cdc sites serve`) ---------------------------------------------------------------------------------------
def site_families(doc: dict[str, Any] | None, errors: int = 0, sampled_at: float | None = None,
                  topology: str | None = None) -> list[Any]:
    """The sites' metric families from a status document (`consumers.sites.status`'s shape): pure, so that a
    made-up document can be checked."""
    name = topology or (doc or {}).get("topology", "")
    labels = ["topology", "site", "link"]
    status = GaugeMetricFamily("cdc_site_status", "1 for the current status of a site (link=\"\") or of one of its "
                               "links.", labels=[*labels, "status"])
    lag_secs = GaugeMetricFamily("cdc_site_lag_seconds", "Now minus the commit time of the oldest change not yet "
                                 "applied (a site: the largest of its links').", labels=labels)
    lag_msgs = GaugeMetricFamily("cdc_site_lag_messages", "Messages not yet applied (a site: the sum of its links').",
                                 labels=labels)
    last = GaugeMetricFamily("cdc_site_last_sync_timestamp_seconds", "When the link last applied a batch (a site: "
                             "the older of its links', when both ways were last exchanged).", labels=labels)
    waiting = GaugeMetricFamily("cdc_site_conflicts_waiting", "Conflicts held for `cdc conflicts resolve` and "
                                "satellite edits reported at the site.", labels=["topology", "site"])
    blocked = GaugeMetricFamily("cdc_site_sync_blocked", "1 when the link's last sync failed: it is not started "
                                "automatically until its satellite is run by hand.", labels=labels)
    stamp = GaugeMetricFamily("cdc_sites_sample_timestamp_seconds", "When the latest status was taken.",
                              labels=["topology"])
    failures = CounterMetricFamily("cdc_sites_sample_errors", "Statuses that could not be taken.",
                                   labels=["topology"])
    failures.add_metric([name], errors)
    for site in (doc or {}).get("sites", []):
        rows = [("", site)] + [(link["pipeline"], link) for link in site.get("links", [])]
        for link_name, row in rows:
            key = [name, site["site"], link_name]
            for s in STATUSES:
                status.add_metric([*key, s], 1.0 if row.get("status") == s else 0.0)
            lag_secs.add_metric(key, row.get("lag_seconds") or 0.0)
            lag_msgs.add_metric(key, row.get("lag_messages") or 0)
            if row.get("last_sync_at") is not None:
                last.add_metric(key, row["last_sync_at"])
            if link_name:
                blocked.add_metric(key, 1.0 if row.get("sync_blocked") else 0.0)
        waiting.add_metric([name, site["site"]], site.get("conflicts_waiting") or 0)
    if doc is not None and sampled_at is not None:
        stamp.add_metric([name], sampled_at)
    return [status, lag_secs, lag_msgs, last, waiting, blocked, stamp, failures]


class SitesServer(_SamplingServer):
    """`cdc sites serve`: takes `sample()` (a topology's status document) every `interval` seconds in a thread and
    serves it as Prometheus metrics at /metrics, JSON at /api/sites and the lag page's sites section at /."""

    feed_path = "/api/sites"

    def __init__(self, topology: str, sample: Callable[[], dict[str, Any]], *, host: str = "127.0.0.1",
                 port: int = 9109, interval: float = 10.0) -> None:
        self.topology = topology
        self._take = sample
        self.latest: dict[str, Any] | None = None
        self.sampled_at: float | None = None
        self._serve(host, port, interval, _SitesCollector(self), "sites")

    def sample_once(self) -> None:
        try:
            doc = self._take()
        except Exception as exc:  # noqa: BLE001 - a database or Kafka away: counted and shown, the server goes on
            with self._lock:
                self.errors += 1
                self.last_error = first_line(exc)
            return
        with self._lock:
            self.latest, self.sampled_at, self.last_error = doc, time.time(), None

    def feed(self) -> dict[str, Any]:
        with self._lock:
            return {"sites": self.latest, "sampled_at": self.sampled_at, "error": self.last_error,
                    "interval": self.interval}


class _SitesCollector:
    def __init__(self, server: SitesServer) -> None:
        self.server = server

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        s = self.server
        with s._lock:
            doc, errors, at = s.latest, s.errors, s.sampled_at
        yield from site_families(doc, errors, at, s.topology)
