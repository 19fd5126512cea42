"""`cdc lag`: consumer lag per destination and partition, in messages and seconds (table, --watch, --json, --check,
and `cdc lag serve` for Prometheus metrics and a live page). The rules are in `consumers/lag/status.py`."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import typer

from cdc.cli.common import _pipeline, _run, serve_until_interrupted
from cdc.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import JustifyMethod

lag_app = typer.Typer(help="Consumer lag per destination and partition, in messages and seconds.",
                      invoke_without_command=True)


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(doc: dict[str, Any], *, partitions: bool = True, wide: bool = False):
    """The report as rich renderables: one table of destinations (and partitions), and the source's line."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    colors = {"OK": "green", "BEHIND": "cyan", "WARN": "yellow", "STALL": "magenta", "STOP": "red", "ERROR": "bold red"}
    table = Table(title=f"lag of pipeline {doc['pipeline']}", title_justify="left")
    columns: list[tuple[str, JustifyMethod]] = [
        ("destination", "left"), ("status", "left"), ("topic", "left"), ("part.", "right"), ("applied", "right"),
        ("end", "right"), ("lag msgs", "right"), ("lag", "right")]
    for name, justify in columns:
        # Names are folded onto more lines when the terminal is narrow, never cut with an ellipsis: a cut topic
        # name (`district.…`) does not say which topic lags. --wide keeps each on one line.
        table.add_column(name, justify=justify, overflow="fold", no_wrap=wide,
                         min_width=len(name) if name in ("destination", "topic") else None)
    for dest in doc["destinations"]:
        table.add_row(dest["name"], Text(dest["status"], style=colors.get(dest["status"], "")), "(all)", "",
                      "", "", str(dest["lag_messages"]), _format_seconds(dest["lag_seconds"]))
        if partitions:
            for p in dest["partitions"]:
                if p["lag_messages"] or p["end_offset"]:
                    table.add_row("", "", p["topic"], str(p["partition"]), str(p["applied_offset"]),
                                  str(p["end_offset"]), str(p["lag_messages"]), _format_seconds(p["lag_seconds"]))
        table.add_section()
    src = doc["source"]
    retained = src["slot_retained_bytes"]
    lines = [f"connector {src['connector_state']}"
             + (f" (tasks: {', '.join(t['state'] for t in src['tasks'])})" if src["tasks"] else ""),
             "slot retains " + ("?" if retained is None else f"{retained:,} bytes of WAL")]
    if src.get("error"):
        lines.append(f"source error: {src['error']}")
    reasons = [f"{d['name']}: {d['status']} ({d['reason']})" for d in doc["destinations"]]
    return Group(table, Text("; ".join(lines)), Text("\n".join(reasons), style="dim"))


@lag_app.callback()
def lag(
    ctx: typer.Context,
    destinations: list[str] | None = typer.Option(None, "--destination", "-d",
                                                     help="Only these destinations (default: all)."),
    watch: bool = typer.Option(False, "--watch", help="Refresh live, keeping a sliding window, until Ctrl-C."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (stable field names)."),
    check: bool = typer.Option(False, "--check", help="Exit 1 when any destination is not OK (OK means no message "
                                                      "waits)."),
    wide: bool = typer.Option(False, "--wide", help="Whole names on one line, whatever the terminal's width."),
    window: float = typer.Option(5.0, "--window", min=0.0,
                                 help="Seconds between the two samples (or the sliding window with --watch)."),
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between samples with --watch."),
    stop_after: float = typer.Option(30.0, "--stop-after", min=0.0,
                                     help="Unmoving lag is STOP (not STALL) once nothing was applied this long."),
) -> None:
    """Lag per destination and partition: messages, seconds (measured from source commit times) and a status."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"stop_after": stop_after, "window": window, "destinations": destinations}
        return
    from consumers.lag.probe import LagProbe
    from consumers.lag.status import History, report

    def body() -> int:
        if watch and as_json:
            raise ConfigError("cdc lag: --watch and --json do not go together (use `cdc lag serve` for a feed)")
        pipeline = _pipeline()
        probe = LagProbe(pipeline, destinations)
        try:
            history = History(window_seconds=window, keep_seconds=window)
            if watch:
                return _watch(probe, history, interval, stop_after, pipeline.name)
            samples, source = probe.sample()
            for s in samples.values():
                history.add(s)
            if window > 0:
                time.sleep(window)
                samples, source = probe.sample()
                for s in samples.values():
                    history.add(s)
            doc = report(history.windows(), source, pipeline=pipeline.name, stop_after=stop_after)
        finally:
            probe.close()
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
        else:
            from rich.console import Console

            table = render(doc, wide=wide)
            console = Console(width=max(Console().width, _needed_width(doc))) if wide else Console()
            console.print(table, crop=not wide)
        if check and any(d["status"] != "OK" for d in doc["destinations"]):
            return 1
        return 0

    _run(body)


def _needed_width(doc: dict[str, Any]) -> int:
    """Columns a table with every name on one line needs (for --wide)."""
    longest = max([len(p["topic"]) for d in doc["destinations"] for p in d["partitions"]] + [5])
    names = max([len(d["name"]) for d in doc["destinations"]] + [11])
    return longest + names + 80


def _watch(probe, history, interval: float, stop_after: float, pipeline: str) -> int:
    from rich.console import Console
    from rich.live import Live

    from consumers.lag.status import report

    console = Console()
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                started = time.monotonic()
                samples, source = probe.sample()
                for s in samples.values():
                    history.add(s)
                doc = report(history.windows(), source, pipeline=pipeline, stop_after=stop_after)
                live.update(render(doc), refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a watch ends


@lag_app.command("serve")
def serve(
    ctx: typer.Context,
    port: int = typer.Option(9108, "--port", help="Port of the metrics endpoint and the page."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between samples."),
    window: float = typer.Option(30.0, "--window", min=1.0, help="The sliding window of the status rules, seconds."),
) -> None:
    """Serve Prometheus metrics at /metrics, a live page at /, and its JSON feed at /api/lag, until Ctrl-C."""
    from consumers.lag import server as lag_server

    options = ctx.obj or {}

    def body() -> int:
        pipeline = _pipeline()
        server = lag_server.LagServer(pipeline, host=host, port=port, interval=interval, window=window,
                                      stop_after=options.get("stop_after", 30.0),
                                      destinations=options.get("destinations"))
        return serve_until_interrupted(server, "cdc lag serve", host)

    _run(body)
