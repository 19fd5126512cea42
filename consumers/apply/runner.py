"""`cdc run`: one applier per destination, each in its own thread, with a progress line and clean shutdown, and a
watcher that restarts the pipeline's failed Debezium tasks (producers/watch.py). A destination that fails stops
alone; the run ends with its error once the others stop."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError, first_line
from consumers.apply.applier import ReplicaApplier


def _progress_printer(echo: Callable[[str], None]) -> Callable[[ReplicaApplier], None]:
    tty = sys.stdout.isatty()
    last = {"line": 0.0}

    def show(applier: ReplicaApplier) -> None:
        s = applier.stats
        line = f"{applier.name}: {s.rows} rows, {s.transactions} source transactions, {s.rows_per_second:,.0f} rows/s, "
        blocked = applier.blocked
        # While an outage lasts the lag is unknown (nothing new can be read or written): say so, never "0.0 s".
        line += f"BLOCKED: {blocked}" if blocked else f"lag {applier.lag_seconds():.1f} s"
        if tty:
            sys.stdout.write("\r" + line.ljust(100))
            sys.stdout.flush()
        elif time.monotonic() - last["line"] >= 10:
            echo(line)
            last["line"] = time.monotonic()

    return show


def run(pipeline: Pipeline, names: list[str], *, until_caught_up: bool, timeout: float | None,
        echo: Callable[[str], None], metrics_port: int | None = None, watch_connector: bool = True,
        watch_every: float | None = None) -> int:
    """Run the appliers of `names` (all by default). `watch_connector`: also restart the pipeline's failed Debezium
    tasks while they run (a run that waits to catch up would otherwise wait for a task that never comes back)."""
    chosen = names or list(pipeline.destinations)
    if not chosen:
        raise ConfigError("destinations: the pipeline file has no destination to run")
    for name in chosen:
        if name not in pipeline.destinations:
            raise ConfigError(f"destinations: no destination named {name!r} (known: "
                              f"{', '.join(pipeline.destinations) or 'none'})")
    appliers = [ReplicaApplier(pipeline, name, echo=echo) for name in chosen]
    errors: list[BaseException] = []
    if metrics_port is not None:
        from consumers.apply.metrics import serve

        serve(appliers, metrics_port)
        echo(f"metrics: http://127.0.0.1:{metrics_port}/metrics")

    finished: set[str] = set()

    def work(applier: ReplicaApplier) -> None:
        try:
            applier.run(until_caught_up=until_caught_up, timeout=timeout, progress=_progress_printer(echo))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            finished.add(applier.name)
            # One destination's failure is its own (a poison change under `on_error: stop`, a type it cannot
            # follow): the others go on replicating, and the run ends with this error (exit 1) when they stop.
            # Its reason is in its `_cdc_status` too, so `cdc lag` shows it ERROR meanwhile.
            others = [a.name for a in appliers if a.name not in finished]
            if others:
                echo(f"{applier.name}: stopped: {first_line(exc)}; {', '.join(others)} "
                     f"{'goes' if len(others) == 1 else 'go'} on")
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not isinstance(exc, Exception):
                for other in appliers:
                    other.stop()
        finally:
            finished.add(applier.name)

    threads = [threading.Thread(target=work, args=(a,), name=f"applier-{a.name}") for a in appliers]
    from consumers.apply.applier import install_signal_handlers

    if len(appliers) == 1:
        install_signal_handlers(appliers[0])
    else:
        import signal

        def stop_all(signum, frame):  # noqa: ANN001
            for a in appliers:
                a.stop()

        signal.signal(signal.SIGINT, stop_all)
        signal.signal(signal.SIGTERM, stop_all)
    for t in threads:
        t.start()
    watching = threading.Event()
    if watch_connector:
        from producers.watch import CHECK_EVERY_S, watch_in_background

        watch_in_background(pipeline.kafka.connect_url, pipeline.connector_name, echo, watching,
                            every=watch_every or CHECK_EVERY_S)
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.5)
    watching.set()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    for a in appliers:
        echo(f"{a.name}: applied {a.stats.rows} rows in {a.stats.transactions} source transactions"
             + (f" ({a.stats.columnar_rows} through the columnar path)" if a.stats.columnar_rows else ""))
        a.close()
    if errors:
        if len(errors) > 1:
            echo(f"{len(errors)} destinations stopped with an error; the first is below")
        if isinstance(errors[0], CdcError):
            raise errors[0]
        raise CdcError(f"applier failed: {errors[0]!r}") from errors[0]
    return 0
