"""`cdc run`'s supervisor: one applier per destination, each in its own thread, with a progress line, clean shutdown,
and a watcher that restarts the pipeline's failed Debezium tasks (producers/watch.py). A destination that fails stops
alone, started again after a backoff when its error is transient (errors.retry_reason); the run ends with the first
terminal error once the others stop."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from cdc.config import Pipeline
from cdc.errors import CdcError, ConfigError, first_line
from consumers.apply.applier import ReplicaApplier
from consumers.apply.errors import retry_reason


def _progress_printer(echo: Callable[[str], None]) -> Callable[[ReplicaApplier], None]:
    tty = sys.stdout.isatty()
    last = {"line": 0.0}

    def show(applier: ReplicaApplier) -> None:
        s = applier.stats
        line = f"{applier.name}: {s.rows} rows, {s.transactions} source transactions, {s.rows_per_second:,.0f} rows/s, "
        blocked = applier.blocked
        # While an outage lasts the lag is unknown (nothing new can be read or written): say so, never "0.0 s".
        line += f"BLOCKED: {blocked}" if blocked else f"lag {applier.lag_seconds():.1f} s"
        paused = applier.reading_paused
        if paused and not blocked:
            line += f", {paused}"
        if tty:
            sys.stdout.write("\r" + line.ljust(100))
            sys.stdout.flush()
        elif time.monotonic() - last["line"] >= 10:
            echo(line)
            last["line"] = time.monotonic()

    return show


# How long a destination whose applier stopped on a transient error (errors.retry_reason) waits before a fresh applier
# starts, the first time, and at most: doubled each time, as the applier's own reconnection does (applier._recover).
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0


def run(pipeline: Pipeline, names: list[str], *, until_caught_up: bool, timeout: float | None,
        echo: Callable[[str], None], metrics_port: int | None = None, watch_connector: bool = True,
        watch_every: float | None = None,
        make_applier: Callable[[Pipeline, str], ReplicaApplier] | None = None) -> int:
    """Run the appliers of `names` (all by default). `watch_connector`: also restart the pipeline's failed Debezium
    tasks while they run (a run that waits to catch up would otherwise wait for a task that never comes back).

    A destination whose applier stops on an error stops alone: the others go on. When the error is transient
    (errors.retry_reason: a service that did not answer, a destination that went away or lost a deadlock), a fresh
    applier of that destination starts after a backoff, for as long as the run lasts (its timeout, a signal), one
    line per attempt naming the destination and the reason; it resumes from the offsets the destination stored
    with its rows, so nothing is applied twice or skipped. A terminal error (a poison change under `on_error: stop`,
    a type it cannot follow, bad configuration) stops that destination for good, and the run ends with it (exit 1)
    once the others stop. `make_applier`: how an applier is made (ReplicaApplier by default)."""
    chosen = names or list(pipeline.destinations)
    if not chosen:
        raise ConfigError("destinations: the pipeline file has no destination to run")
    for name in chosen:
        if name not in pipeline.destinations:
            raise ConfigError(f"destinations: no destination named {name!r} (known: "
                              f"{', '.join(pipeline.destinations) or 'none'})")
    make = make_applier or (lambda p, name: ReplicaApplier(p, name, echo=echo))
    # The current applier of each destination, in `chosen` order (replaced in place when one is started again, so
    # that the metrics server and the signal handler always see the current ones), and those it replaced.
    appliers = [make(pipeline, name) for name in chosen]
    deadline = time.monotonic() + timeout if timeout else None
    replaced: list[ReplicaApplier] = []
    closed: set[int] = set()  # the ids of the appliers closed already (before a fresh one started)
    errors: list[BaseException] = []
    stopping = threading.Event()
    if metrics_port is not None:
        from consumers.apply.metrics import serve

        serve(appliers, metrics_port)
        echo(f"metrics: http://127.0.0.1:{metrics_port}/metrics")

    finished: set[str] = set()

    def work(slot: int) -> None:
        delay = RESTART_FIRST_S
        attempt = 0
        while True:
            applier = appliers[slot]
            # A fresh applier gets what is left of the run's timeout.
            remaining = timeout if deadline is None or not attempt else max(deadline - time.monotonic(), 0.001)
            try:
                applier.run(until_caught_up=until_caught_up, timeout=remaining, progress=_progress_printer(echo))
                return
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                reason = retry_reason(exc) if isinstance(exc, Exception) else None
                if reason is not None and not stopping.is_set() \
                        and (deadline is None or time.monotonic() + delay < deadline):
                    attempt += 1
                    echo(f"{applier.name}: stopped on a transient error: {reason}; starting it again in "
                         f"{delay:.0f} s from the offsets its destination stored (attempt {attempt})")
                    applier.close()  # its writer lock and Kafka consumer go with it
                    closed.add(id(applier))
                    if stopping.wait(delay):
                        return
                    delay = min(delay * 2, RESTART_MAX_S)
                    try:
                        fresh = make(pipeline, applier.name)
                    except Exception as made:  # noqa: BLE001 - one that cannot even be made: the destination stops
                        exc = made
                    else:
                        replaced.append(applier)
                        appliers[slot] = fresh
                        continue
                errors.append(exc)
                finished.add(applier.name)
                # One destination's failure is its own: the others go on replicating, and the run ends with this
                # error (exit 1) when they stop. Its reason is in its `_cdc_status` too, so `cdc lag` shows it ERROR
                # meanwhile.
                others = [a.name for a in appliers if a.name not in finished]
                if others:
                    echo(f"{applier.name}: stopped: {first_line(exc)}; {', '.join(others)} "
                         f"{'goes' if len(others) == 1 else 'go'} on")
                if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not isinstance(exc, Exception):
                    stop_all()
                return

    def stop_all() -> None:
        stopping.set()
        for a in appliers:
            a.stop()

    def on_signal(signum, frame):  # noqa: ANN001
        """SIGINT/SIGTERM finish the batches in flight and stop; a second signal interrupts at once."""
        if stopping.is_set() and len(appliers) == 1:
            raise KeyboardInterrupt
        stop_all()

    threads = [threading.Thread(target=work, args=(slot,), name=f"applier-{name}") for slot, name in enumerate(chosen)]
    import signal

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
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
        runs_of = [a, *(r for r in replaced if r.name == a.name)]  # a destination started again: all its runs
        rows = sum(r.stats.rows for r in runs_of)
        transactions = sum(r.stats.transactions for r in runs_of)
        columnar_rows = sum(r.stats.columnar_rows for r in runs_of)
        echo(f"{a.name}: applied {rows} rows in {transactions} source transactions"
             + (f" ({columnar_rows} through the columnar path)" if columnar_rows else ""))
        if id(a) not in closed:
            a.close()
    if errors:
        if len(errors) > 1:
            echo(f"{len(errors)} destinations stopped with an error; the first is below")
        if isinstance(errors[0], CdcError):
            raise errors[0]
        raise CdcError(f"applier failed: {errors[0]!r}") from errors[0]
    return 0
