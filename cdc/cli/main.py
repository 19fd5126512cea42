"""The `cdc` command line: thin typer commands over the stack launcher, the capture path and the consumers."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from cdc.cli.common import _echo, _pipeline, _run, _state, serve_until_interrupted
from cdc.cli.lag import lag_app
from cdc.errors import CdcError, ConfigError

if TYPE_CHECKING:
    from rich.progress import TaskID

app = typer.Typer(help="Change-data-capture pipeline: Debezium on Kafka Connect into destination databases.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
stack_app = typer.Typer(help="Start, inspect and stop the local stack (PostgreSQL, MariaDB, Kafka, registry, Connect).",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")
connectors_app = typer.Typer(help="Manage the pipeline's Debezium connector over the Kafka Connect REST API.",
                             no_args_is_help=True)
app.add_typer(connectors_app, name="connectors")

CONFIG_HELP = "The pipeline file (default: $CDC_CONFIG, else pipeline.yaml)."


@app.callback()
def _options(config: str | None = typer.Option(None, "-c", "--config", help=CONFIG_HELP)) -> None:
    # $CDC_CONFIG is read by cdc.config.load when no file is named here: this state holds only what was typed.
    _state["config"] = config


def _config_given(config: str | None) -> None:
    """-c/--config given after a command: the same as before it; given twice, both must name the same file."""
    if config is None:
        return
    if _state["config"] not in (None, config):
        raise typer.BadParameter(f"{_state['config']!r} before the command and {config!r} after it; give one",
                                 param_hint="-c/--config")
    _state["config"] = config


def _with_config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """The command with a -c/--config option of its own, so that the option may follow the command's name
    (`cdc lag -c p.yaml`) as well as precede it (`cdc -c p.yaml lag`). typer reads the options from the signature."""
    signature = inspect.signature(command, eval_str=True)
    option = inspect.Parameter("cdc_config", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                               default=typer.Option(None, "-c", "--config", help=CONFIG_HELP))

    @functools.wraps(command)
    def with_config(*args: Any, cdc_config: str | None = None, **kwargs: Any) -> Any:
        _config_given(cdc_config)
        return command(*args, **kwargs)

    with_config.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), option])
    return with_config


def _config_option_everywhere(typer_app: typer.Typer) -> None:
    """Give every command and sub-command group of `typer_app` the -c/--config option (see _with_config_option)."""
    for command in typer_app.registered_commands:
        if command.callback is not None:
            command.callback = _with_config_option(command.callback)
    for group in typer_app.registered_groups:
        sub = group.typer_instance
        if sub is None:
            continue
        if sub.registered_callback is None or sub.registered_callback.callback is None:
            sub.callback()(lambda: None)  # a group level for the option: `cdc stack -c p.yaml status`
        assert sub.registered_callback is not None and sub.registered_callback.callback is not None
        sub.registered_callback.callback = _with_config_option(sub.registered_callback.callback)
        _config_option_everywhere(sub)


@stack_app.command("up")
def stack_up() -> None:
    """Start every component not yet running and wait until all are healthy (idempotent)."""
    from infra import stack

    def body() -> int:
        layout = stack.up(_echo)
        for name, url in layout.masked_urls().items():
            typer.echo(f"  {name:16} {url}")
        typer.echo(f"  state and logs   {layout.home}")
        return 0

    _run(body)


@stack_app.command("status")
def stack_status(as_json: bool = typer.Option(False, "--json", help="Print the endpoints and states as JSON.")) -> None:
    """Show each component's state and endpoint; exit 1 unless all are healthy."""
    from infra import stack

    def body() -> int:
        info = stack.status()
        if as_json:
            typer.echo(json.dumps(info, indent=2))
        else:
            for name, comp in info["components"].items():  # type: ignore[attr-defined]
                pid = f"pid {comp['pid']}" if comp["pid"] else ""
                typer.echo(f"{name:16} {comp['state']:10} {comp['url']:52} {pid}")
                if comp.get("sasl_url"):  # the sites' authenticated Kafka listener
                    typer.echo(f"{'':16} {'':10} {comp['sasl_url']}")
            typer.echo(f"state and logs: {info['home']}")
        return 0 if info["healthy"] else 1

    _run(body)


@stack_app.command("down")
def stack_down() -> None:
    """Stop the components this stack started (and nothing else)."""
    from infra import stack

    _run(lambda: stack.down(_echo))


@connectors_app.command("apply")
def connectors_apply(
    reset_topics: bool = typer.Option(False, "--reset-topics",
                                      help="Delete the pipeline's topics first when they hold another source "
                                           "database's history (destinations fed from them must be replayed)."),
) -> None:
    """Create or update the connector and the pipeline's topics (idempotent; prints what changed)."""
    from producers import capture

    _run(lambda: (capture.apply(_pipeline(), _echo, reset_topics=reset_topics), 0)[1])


@connectors_app.command("diff")
def connectors_diff() -> None:
    """Show what `apply` would change, and change nothing; exit 1 when there are differences."""
    from producers import capture

    def body() -> int:
        pipeline = _pipeline()
        changes = capture.diff(pipeline)
        if not changes:
            typer.echo(f"connector {pipeline.connector_name}: no changes")
            return 0
        for change in changes:
            typer.echo(capture.format_change(change))
        return 1

    _run(body)


@connectors_app.command("status")
def connectors_status(as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")) -> None:
    """Connector and task states, with the trace of a failed task; exit 1 unless all are running."""
    from producers import capture

    def body() -> int:
        pipeline = _pipeline()
        st = capture.status(pipeline)
        stray = capture.topic_problems(pipeline)
        identity = capture.identity_problems(pipeline)
        if as_json:
            typer.echo(json.dumps(None if st is None else
                                  {"name": st.name, "state": st.state, "tasks": st.tasks,
                                   "unplanned_topics": [{"topic": t, "table": table} for t, table in stray],
                                   "problems": identity},
                                  indent=2))
        elif st is None:
            typer.echo(f"connector {pipeline.connector_name}: not found (run `cdc connectors apply`)")
        else:
            typer.echo(f"connector {st.name}: {st.state}")
            for task in st.tasks:
                typer.echo(f"  task {task['id']}: {task['state']} on {task.get('worker_id', '?')}")
                if task.get("trace"):
                    typer.echo("    " + task["trace"].rstrip().replace("\n", "\n    "))
        if stray:
            typer.echo(f"error: {capture.unplanned_message(pipeline, stray)}", err=True)
        for problem in identity:
            typer.echo(f"error: {problem}", err=True)
        return 0 if st is not None and st.running and not stray and not identity else 1

    _run(body)


def _lifecycle(action: str, done: str) -> None:
    from producers import capture

    def body() -> int:
        pipeline = _pipeline()
        capture.lifecycle(pipeline, action)
        typer.echo(f"connector {pipeline.connector_name}: {done}")
        return 0

    _run(body)


@connectors_app.command("pause")
def connectors_pause() -> None:
    """Pause the connector (its slot keeps the WAL until it resumes)."""
    _lifecycle("pause", "paused")


@connectors_app.command("resume")
def connectors_resume() -> None:
    """Resume a paused or stopped connector."""
    _lifecycle("resume", "resumed")


@connectors_app.command("restart")
def connectors_restart() -> None:
    """Restart the connector and its tasks."""
    _lifecycle("restart", "restarted")


@connectors_app.command("stop")
def connectors_stop() -> None:
    """Stop the connector (keeps its configuration and offsets)."""
    _lifecycle("stop", "stopped")


@connectors_app.command("delete")
def connectors_delete(
    purge: bool = typer.Option(False, "--purge", help="Also drop the replication slot and the publication."),
) -> None:
    """Delete the connector; topics are kept (they are the event log)."""
    from producers import capture

    def body() -> int:
        for line in capture.delete(_pipeline(), purge=purge):
            typer.echo(line)
        return 0

    _run(body)


@app.command("run")
def run(
    destinations: list[str] | None = typer.Argument(None, help="Destinations to feed (default: all replicas)."),
    until_caught_up: bool = typer.Option(False, "--until-caught-up",
                                         help="Exit 0 once every change committed before the call is applied."),
    timeout: float | None = typer.Option(None, "--timeout", help="Give up (exit 1) after this many seconds."),
    metrics_port: int | None = typer.Option(None, "--metrics-port",
                                               help="Serve this process's Prometheus metrics on 127.0.0.1:PORT."),
    watch_connector: bool = typer.Option(True, "--watch-connector/--no-watch-connector",
                                         help="Restart the pipeline's failed Debezium tasks while running "
                                              "(checked every --watch-every seconds, with backoff)."),
    watch_every: float = typer.Option(10.0, "--watch-every", min=1.0,
                                      help="Seconds between two looks at the connector's status."),
) -> None:
    """Run the consumers of the named destinations (all by default).

    A destination that restarts is reconnected to (with backoff), and the applier takes its writer lock again before
    writing; an outage of Kafka is one line every 30 s, and the progress line says BLOCKED meanwhile."""
    from consumers.apply import supervisor

    _run(lambda: supervisor.run(_pipeline(), destinations or [], until_caught_up=until_caught_up, timeout=timeout,
                                echo=_echo, metrics_port=metrics_port, watch_connector=watch_connector,
                                watch_every=watch_every))


@connectors_app.command("watch")
def connectors_watch(
    every: float = typer.Option(10.0, "--every", min=1.0, help="Seconds between two looks at the status."),
    once: bool = typer.Option(False, "--once", help="Look once (restarting what failed), then exit."),
) -> None:
    """Restart the connector's failed tasks whenever they fail (with backoff: 30 s, doubled up to 10 min), a line
    each time. `cdc run` does the same while it runs; this is for when the appliers run elsewhere. Ctrl-C stops."""
    import signal
    import threading

    from producers.watch import ConnectorWatch

    def body() -> int:
        pipeline = _pipeline()
        watch = ConnectorWatch(pipeline.kafka.connect_url, pipeline.connector_name, _echo)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            if once:
                status = watch.check()
                return 0 if status is not None and status.running else 1
            _echo(f"watching connector {pipeline.connector_name} every {every:g} s")
            with contextlib.suppress(KeyboardInterrupt):
                watch.run(stop, every)
            return 0
        finally:
            watch.close()

    _run(body)


@app.command("verify")
def verify_command(
    destination: str | None = typer.Argument(None, help="The destination (default: the first replica)."),
    tables: str | None = typer.Option(None, "--tables", help="Comma-separated tables (default: all captured)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, with the differing keys."),
    settle: float = typer.Option(2.0, "--settle", help="Seconds to wait before re-checking differing keys, so that "
                                 "changes still in flight are not reported."),
    html_file: str | None = typer.Option(None, "--html", help="Also write the summary as an HTML page."),
    fix: bool = typer.Option(False, "--fix", help="Re-sync every differing key and delete rows found only at the "
                             "destination (needs `cdc run` running), then verify again."),
) -> None:
    """Compare source and destination table by table; exit 1 when anything differs."""
    from cdc.cli import verify_report
    from consumers.ops import verify as verify_mod

    def body() -> int:
        pipeline = _pipeline()
        name = destination or next((n for n, d in pipeline.destinations.items() if d.kind == "replica"), None)
        if name is None:
            raise ConfigError("destinations: the pipeline file has no replica destination to verify")
        chosen = [t.strip() for t in tables.split(",")] if tables else None
        report = verify_mod.verify(pipeline, name, chosen, settle=settle)
        if fix and not report.equal:
            # With --json, stdout carries the final report only.
            say = (lambda line: typer.echo(line, err=True)) if as_json else _echo
            say(verify_report.render(report))
            verify_mod.fix(pipeline, report, echo=say)
            report = verify_mod.verify(pipeline, name, chosen, settle=settle)
        from producers import capture

        # Partitions that left a table (DETACH, DROP) took rows the destination may have kept: now known gone here.
        capture.verified_equal(pipeline, name, [t.table for t in report.tables if t.rows_equal])
        if html_file:
            from pathlib import Path

            Path(html_file).write_text(verify_report.render_html(report))
        if as_json:
            typer.echo(json.dumps(report.as_json(), indent=2, default=str))
        else:
            typer.echo(verify_report.render(report))
        return 0 if report.equal else 1

    _run(body)


@app.command("resync")
def resync_command(
    table: str = typer.Argument(..., help="The table: public.person, \"Ops\".\"Person\", or Ops.Person."),
    ids: str | None = typer.Option(None, "--ids", help="Comma-separated primary-key values; a composite key's "
                                      "values joined by ':' (1:a,2:b), or JSON for values holding ',' or ':' "
                                      "([[1, \"a,b\"]]). Left out for a table without a primary key: the whole "
                                      "table is re-synced."),
    destination: str | None = typer.Option(None, "--dest", help="The destination to check (default: first replica)."),
    with_members: bool = typer.Option(False, "--with-members", help="Also the member rows of these roots."),
    with_parents: bool = typer.Option(False, "--with-parents", help="Re-sync the parents of these rows first."),
    requested_by: str | None = typer.Option(None, "--as", help="Who asks (default: the OS user)."),
    wait: float = typer.Option(120.0, "--wait", help="Seconds to wait for the rows to reach the destination."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-send the current source rows of these keys through Debezium; exit 1 unless every key arrived."""
    from consumers.ops import resync as resync_mod

    def body() -> int:
        request = resync_mod.resync(_pipeline(), table, ids,
                                    destination=destination, with_members=with_members, with_parents=with_parents,
                                    requested_by=requested_by, wait=wait,
                                    echo=(lambda line: typer.echo(line, err=True)) if as_json else _echo)
        if as_json:
            typer.echo(json.dumps(request.as_json(), indent=2, default=str))
        else:
            _print_request(request)
        return 0 if request.state == "complete" else 1

    _run(body)


def _print_request(request) -> None:  # noqa: ANN001
    ok = sum(r.ok for r in request.results)
    typer.echo(f"request {request.id}: {request.table} {request.state}, {ok}/{len(request.results)} keys synced "
               f"(requested {request.requested_at:%Y-%m-%d %H:%M:%S} by {request.requested_by})")
    for r in request.results:
        if not r.ok:
            typer.echo(f"  key {r.key}: {r.reason}")


history_app = typer.Typer(help="The history of re-sync requests.", invoke_without_command=True)
app.add_typer(history_app, name="history")


@history_app.callback()
def history_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """List re-sync requests, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    from consumers.ops import resync as resync_mod

    def body() -> int:
        requests = resync_mod.history(_pipeline())
        if as_json:
            typer.echo(json.dumps([r.as_json() for r in requests], indent=2, default=str))
        else:
            for request in requests:
                ok = sum(r.ok for r in request.results)
                typer.echo(f"{request.id:5}  {request.requested_at:%Y-%m-%d %H:%M:%S}  {request.requested_by:12} "
                           f"{request.table:24} {request.state:11} {ok}/{len(request.results)} keys")
        return 0

    _run(body)


@history_app.command("show")
def history_show(
    request_id: int = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json"),
    csv_file: str | None = typer.Option(None, "--csv", help="Write the per-key report as CSV to this file."),
    html_file: str | None = typer.Option(None, "--html", help="Write a one-page HTML report to this file."),
) -> None:
    """One request with its per-key results."""
    from pathlib import Path

    from consumers.ops import resync as resync_mod

    def body() -> int:
        [request] = resync_mod.history(_pipeline(), request_id)
        if csv_file:
            Path(csv_file).write_text(resync_mod.report_csv(request))
        if html_file:
            Path(html_file).write_text(resync_mod.report_html(request))
        if as_json:
            typer.echo(json.dumps(request.as_json(), indent=2, default=str))
        else:
            _print_request(request)
        return 0

    _run(body)


@history_app.command("clear")
def history_clear(before: str | None = typer.Option(None, "--before", help="Only requests before this date.")) -> None:
    """Delete the history (or the part of it before a date)."""

    from consumers.ops import resync as resync_mod

    def body() -> int:
        try:
            cutoff = datetime.fromisoformat(before) if before else None
        except ValueError:
            raise ConfigError(f"--before: {before!r} is not an ISO-8601 date") from None
        typer.echo(f"{resync_mod.clear_history(_pipeline(), cutoff)} requests deleted")
        return 0

    _run(body)


class _ReplayProgress:
    """A progress bar for a replay: messages read of those in the topics when it started (and since), rows/s, and
    an ETA from the remaining lag. Updated by the applier's progress callback, about once a second."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TextColumn("messages"),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.task: TaskID | None = None
        self.start: dict[tuple[str, int], int] = {}

    def __call__(self, applier: Any) -> None:
        try:
            ends = applier.end_offsets()
        except Exception:  # noqa: BLE001 - a progress bar must never stop a replay
            return
        if self.task is None:
            self.start = {tp: applier.applied_positions.get(tp, 0) for tp in ends}
            self.bar.start()
            self.task = self.bar.add_task("replay", total=1, rate="")
        assert self.task is not None
        total = sum(max(0, end - self.start.get(tp, 0)) for tp, end in ends.items())
        done = sum(max(0, min(applier.read_positions.get(tp, 0), end) - self.start.get(tp, 0))
                   for tp, end in ends.items())
        self.bar.update(self.task, total=max(total, 1), completed=done,
                        rate=f"{applier.stats.rows_per_second:,.0f} rows/s")

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


@app.command("replay")
def replay_command(
    destination: str = typer.Argument(..., help="The destination to rebuild: a PostgreSQL replica or a DuckDB "
                                      "analytics file."),
    tables: str | None = typer.Option(None, "--tables", help="Comma-separated tables (default: all captured)."),
    from_: str = typer.Option("earliest", "--from", help="`earliest` (empty the scope, apply the whole history), "
                              "or an ISO-8601 time: keep the tables and re-apply every change committed since."),
    shadow: bool = typer.Option(False, "--shadow", help="Rebuild into a new schema (PostgreSQL) or file (DuckDB) "
                                "while the live one keeps serving, then swap it in atomically."),
    from_snapshot: bool = typer.Option(False, "--from-snapshot", help="When retention deleted the start of the "
                                       "history: empty the scope and take a fresh Debezium snapshot of it."),
    make_backup: bool = typer.Option(True, "--backup/--no-backup", help="Back up the tables (PostgreSQL) or the "
                                     "file (DuckDB) first (default)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Give up (exit 1) after this many seconds."),
) -> None:
    """Rebuild a destination from the topics: back up, empty the scope, apply from the start until caught up."""
    from consumers.ops import replay as replay_mod

    def body() -> int:
        start = None
        if from_ != "earliest":
            try:
                start = datetime.fromisoformat(from_)
            except ValueError:
                raise ConfigError(f"--from: {from_!r} is neither `earliest` nor an ISO-8601 time "
                                  "(2026-11-23T12:00:00+00:00)") from None
            if start.tzinfo is None:
                raise ConfigError(f"--from: {from_!r} has no time zone; add one (+00:00 or Z)")
        bar = _ReplayProgress()
        try:
            saved, applier = replay_mod.replay(
                _pipeline(), destination, tables=[t.strip() for t in tables.split(",")] if tables else None,
                make_backup=make_backup, start=start, shadow=shadow, from_snapshot=from_snapshot, timeout=timeout,
                echo=_echo, progress=bar)
        finally:
            bar.close()
        typer.echo(f"replay: applied {applier.stats.rows} rows from {applier.stats.transactions} source transactions"
                   + (f"; backup {saved.id} ({saved.location}) can be restored with `cdc backups restore {destination} "
                      f"{saved.id}`" if saved else ""))
        applier.close()
        return 0

    _run(body)


backups_app = typer.Typer(help="Backups taken by `cdc replay`.", no_args_is_help=True)
app.add_typer(backups_app, name="backups")


@backups_app.command("list")
def backups_list(destination: str = typer.Argument(...)) -> None:
    """The backups of a destination, newest first: id, time (UTC), where, the tables the replay replaced."""

    from consumers.ops import backups as backups_mod

    def body() -> int:
        for b in backups_mod.list_backups(_pipeline(), destination):
            typer.echo(f"{b.id:5}  {b.created_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {b.location}  "
                       f"{', '.join(b.tables)}")
        return 0

    _run(body)


@backups_app.command("restore")
def backups_restore(destination: str = typer.Argument(...), backup_id: int = typer.Argument(...)) -> None:
    """Put back a backup's tables and stored offsets exactly (DuckDB: the whole file); stop `cdc run` for the
    destination first."""
    from consumers.ops import backups as backups_mod

    def body() -> int:
        b = backups_mod.restore(_pipeline(), destination, backup_id)
        typer.echo(f"backup {b.id} ({b.location}) restored: {', '.join(b.tables)}")
        return 0

    _run(body)


@backups_app.command("prune")
def backups_prune(destination: str = typer.Argument(...),
                  days: float = typer.Option(30.0, "--days", help="Drop backups older than this.")) -> None:
    """Drop backups older than the retention period (default 30 days)."""
    from datetime import timedelta

    from consumers.ops import backups as backups_mod

    def body() -> int:
        dropped = backups_mod.prune(_pipeline(), destination, timedelta(days=days))
        typer.echo(f"{len(dropped)} backups dropped")
        return 0

    _run(body)


@app.command("query")
def query_command(
    sql_text: str = typer.Argument(..., metavar="SQL", help="The query to run on the analytics replica."),
    destination: str | None = typer.Option(None, "--dest", help="The analytics destination (default: the first)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as a JSON list of objects."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds the statement may run before it is stopped."),
) -> None:
    """Run one SELECT on the analytics replica (DuckDB or PostgreSQL) as its read-only reader: anything that would
    write, read files, attach databases or change settings is refused."""
    from consumers.ops import query as query_mod

    def body() -> int:
        pipeline = _pipeline()
        name = destination or next((n for n, d in pipeline.destinations.items() if d.kind == "analytics"), None)
        if name is None or name not in pipeline.destinations:
            raise ConfigError("destinations: no analytics destination to query")
        columns, rows = query_mod.run(name, pipeline.destinations[name], sql_text, timeout)
        if as_json:
            typer.echo(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=2))
        else:
            typer.echo("\t".join(columns))
            for r in rows:
                typer.echo("\t".join("" if v is None else str(v) for v in r))
        return 0

    _run(body)


@app.command("demo")
def demo(
    events: int = typer.Option(12, help="How many change events to print."),
    keep_running: bool = typer.Option(True, "--keep-running/--stop", help="Leave the stack running afterwards."),
) -> None:
    """Everything end to end on a built-in sample: stack, sample source, Debezium connector, change events."""
    from cdc.cli import demo as demo_mod

    _run(lambda: demo_mod.run(events=events, keep_running=keep_running, echo=_echo))


hierarchy_app = typer.Typer(help="Object hierarchies: propose them from the source's foreign keys.",
                            no_args_is_help=True)
app.add_typer(hierarchy_app, name="hierarchy")


@hierarchy_app.command("suggest")
def hierarchy_suggest(
    url: str | None = typer.Option(None, "--url",
                                      help="SQLAlchemy URL of the source (default: source.url of the pipeline file)."),
    tables: str | None = typer.Option(None, "--tables", help="Comma-separated schema-qualified tables "
                                         "(default: source.tables of the pipeline file)."),
    all_tables: bool = typer.Option(False, "--all", help="Every table of every schema of the source (but the "
                                    "system's; partitions count as their parent), read in one pass."),
    schemas: list[str] | None = typer.Option(None, "--schema", help="With --all, only this schema (repeat it, "
                                                "or separate names by commas); implies --all."),
) -> None:
    """Print a proposed `hierarchies` section for the pipeline file: roots at the tables that own rows (not at
    lookup tables), with the reason for each root, member and standalone table in comments."""
    from cdc.errors import ConfigError
    from producers import hierarchy

    def body() -> int:
        chosen = [n.strip() for s in schemas or [] for n in s.split(",") if n.strip()]
        every = all_tables or bool(chosen)
        if every and tables is not None:
            raise ConfigError("hierarchy suggest: give either --tables or --all/--schema, not both")
        source_url, names = url, [t.strip() for t in (tables or "").split(",") if t.strip()]
        if source_url is None or (not names and not every):
            pipeline = _pipeline()
            source_url = source_url or pipeline.source.url.get_secret_value()
            names = names or list(pipeline.source.tables)
        if every:
            graph = hierarchy.reflect_all(source_url, chosen or None)
        else:
            graph = hierarchy.reflect_source(source_url, names)
        typer.echo(hierarchy.render_yaml(hierarchy.suggest(graph)), nl=False)
        return 0

    _run(body)


sync_app = typer.Typer(help="Configuration sync between environments: a scope of a source database replaces the same "
                       "scope at a destination, backed up first (docs/sync.md).", no_args_is_help=True)
app.add_typer(sync_app, name="sync")


def _print_sync_plan(result: Any) -> None:
    for name in result.order:
        p = result.tables[name]
        typer.echo(f"{name}: {len(p.deletes)} to delete, {len(p.inserts)} to insert, {len(p.updates)} to update, "
                   f"{p.unchanged} unchanged" + (f", {len(p.matched)} matched by name" if p.matched else ""))
        for natural, source_id, dest_id in p.matched:
            same = "" if source_id != dest_id else " (same id)"
            typer.echo(f"  matched {', '.join(map(str, natural))}: source id {', '.join(map(str, source_id))} -> "
                       f"destination id {', '.join(map(str, dest_id))}{same}")
    for action in result.objects:
        typer.echo(f"{action.kind} {action.name}: {action.action}")
        for line in action.ddl.splitlines():
            typer.echo(f"    {line}")
    for line in result.drift:
        typer.echo(f"drift: {line}")


@sync_app.command("plan")
def sync_plan(name: str = typer.Argument(..., help="The sync (syncs.<name> in the pipeline file)."),
              as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
              from_log: str | None = typer.Option(None, "--from-log", metavar="SYNC_ID", help="Compare the "
                                                  "destination with a past sync as its topic holds it, instead of "
                                                  "with the source now.")) -> None:
    """What `cdc sync apply` would change, per table and schema object (with DDL); exit 1 when anything would."""
    from consumers.sync import apply as sync_mod
    from consumers.sync import log as sync_log

    def body() -> int:
        pipeline = _pipeline()
        past = sync_log.read(pipeline, name, from_log) if from_log else None
        result = sync_mod.dry_run(name, pipeline.sync(name), past)
        if as_json:
            typer.echo(json.dumps(result.as_json(), indent=2, default=str))
        else:
            _print_sync_plan(result)
            typer.echo(f"{result.changes} changes" if result.changes else "nothing to change")
        return 1 if result.changes else 0

    _run(body)


class _SyncProgress:
    """A progress bar on a terminal, one line per table and action otherwise."""

    def __init__(self) -> None:
        self.terminal = sys.stderr.isatty()
        self.bar: Any = None
        self.task: Any = None
        self.last = ""

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.terminal:
            if what != self.last:
                typer.echo(f"sync: {what}", err=True)
                self.last = what
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("rows"), TimeElapsedColumn(), console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(what, total=max(total, 1))
        self.bar.update(self.task, description=what, completed=done, total=max(total, 1))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@sync_app.command("apply")
def sync_apply(name: str = typer.Argument(..., help="The sync (syncs.<name> in the pipeline file)."),
               force: bool = typer.Option(False, "--force", help="Sync even though the destination changed the "
                                          "scope since the last sync (the drift is shown, and overwritten)."),
               from_log: str | None = typer.Option(None, "--from-log", metavar="SYNC_ID", help="Apply a past sync "
                                                   "again, as its topic holds it (its id: `cdc sync show ID`), "
                                                   "instead of reading the source now.")) -> None:
    """Write the source's scope to the sync's topic, read it back, back up the destination's scope, then replace
    it in one transaction with a history entry; anything fails, nothing changed."""
    from consumers.sync import apply as sync_mod

    def body() -> int:
        bar = _SyncProgress()
        try:
            done = sync_mod.apply(_pipeline(), name, force=force, progress=bar, echo=_echo, from_log=from_log)
        finally:
            bar.close()
        for line in done.plan.drift:
            typer.echo(f"drift overwritten: {line}")
        entry = done.entry
        assert entry is not None
        counts = entry.tables
        typer.echo(f"sync {entry.id} applied: " + ", ".join(
            f"{t} -{c['deleted']} +{c['inserted']} ~{c['updated']}" for t, c in counts.items())
            + f"; {len(entry.objects)} schema objects; backup {entry.backup_id} ({entry.backup_schema}); undo with "
            f"`cdc sync restore {entry.id}`")
        return 0

    _run(body)


def _print_sync_entry(entry: Any, detailed: bool) -> None:
    totals = {k: sum(c.get(k, 0) for c in entry.tables.values()) for k in ("deleted", "inserted", "updated")}
    restored = f", restored by {entry.restored_by}" if entry.restored_by else ""
    what = f"restore of {entry.restores}" if entry.kind == "restore" else "sync"
    typer.echo(f"{entry.id:5}  {entry.finished_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {entry.sync:16} {what:14} "
               f"-{totals['deleted']} +{totals['inserted']} ~{totals['updated']}  by {entry.requested_by}"
               + (" (forced)" if entry.forced else "") + restored)
    if detailed:
        typer.echo(f"  from {entry.source}; backup {entry.backup_id} ({entry.backup_schema})"
                   + (f"; sync {entry.sync_id} in topic {entry.topic}" if entry.sync_id else ""))
        for table, c in entry.tables.items():
            typer.echo(f"  {table}: {c.get('deleted', 0)} deleted, {c.get('inserted', 0)} inserted, "
                       f"{c.get('updated', 0)} updated, {c.get('unchanged', 0)} unchanged, {c.get('matched', 0)} "
                       "matched by name")
        for action in entry.objects:
            typer.echo(f"  {action['kind']} {action['name']}: {action['action']}")
        for line in entry.drift:
            typer.echo(f"  drift overwritten: {line}")


def _sync_entries(name: str | None, entry_id: int | None = None) -> list[Any]:
    from consumers.sync import apply as sync_mod

    pipeline = _pipeline()
    syncs = {name: pipeline.sync(name)} if name else pipeline.syncs
    seen: dict[str, Any] = {}
    entries = []
    for sync_name, sync in syncs.items():
        url = sync.destination_url
        key = url.render_as_string(hide_password=False)
        if key in seen and name is None:
            continue  # several syncs to one destination: its history lists them all once
        seen[key] = True
        entries += sync_mod.history(url, None if name is None else sync_name, entry_id)
    entries = [e for e in entries if e.sync in syncs]
    return sorted(entries, key=lambda e: (e.finished_at, e.id), reverse=True)


@sync_app.command("history")
def sync_history(name: str | None = typer.Argument(None, help="Only this sync (default: every sync of the file)."),
                 as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON.")) -> None:
    """The syncs and restores recorded at the destinations, newest first, with per-table counts."""

    def body() -> int:
        entries = _sync_entries(name)
        if as_json:
            typer.echo(json.dumps([e.as_json() for e in entries], indent=2, default=str))
        else:
            for entry in entries:
                _print_sync_entry(entry, detailed=False)
        return 0

    _run(body)


@sync_app.command("show")
def sync_show(entry_id: int = typer.Argument(..., metavar="ID"),
              as_json: bool = typer.Option(False, "--json", help="Print the entry as JSON.")) -> None:
    """One sync (or restore) with its per-table results, schema objects and backup."""

    def body() -> int:
        entries = _sync_entries(None, entry_id)
        if not entries:
            raise CdcError(f"sync history: no entry {entry_id}")
        if as_json:
            typer.echo(json.dumps(entries[0].as_json(), indent=2, default=str))
        else:
            _print_sync_entry(entries[0], detailed=True)
        return 0

    _run(body)


@sync_app.command("backups")
def sync_backups(name: str = typer.Argument(..., help="The sync (syncs.<name> in the pipeline file)."),
                 prune: bool = typer.Option(False, "--prune", help="Drop the backups older than the sync's "
                                            "retention_days first (every apply does this too).")) -> None:
    """The backups syncs took of the destination's scope, newest first: id, time (UTC), schema, tables."""
    from consumers.sync import apply as sync_mod

    def body() -> int:
        pipeline = _pipeline()
        if prune:
            dropped = sync_mod.prune_backups(pipeline, name)
            typer.echo(f"{len(dropped)} backups older than {pipeline.sync(name).retention_days} days dropped")
        for b in sync_mod.backups(pipeline, name):
            typer.echo(f"{b.id:5}  {b.created_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {b.location}  "
                       f"{', '.join(b.tables)}")
        return 0

    _run(body)


@sync_app.command("restore")
def sync_restore(entry_id: int = typer.Argument(..., metavar="ID"),
                 name: str | None = typer.Option(None, "--sync", help="The sync the entry belongs to, when several "
                                                 "syncs share a destination.")) -> None:
    """Put back the destination's scope and schema objects exactly as they were before sync ID (from its backup)."""
    from consumers.sync import apply as sync_mod

    def body() -> int:
        entry = sync_mod.restore(_pipeline(), name, entry_id, echo=_echo)
        typer.echo(f"sync {entry_id} restored (history entry {entry.id})")
        return 0

    _run(body)


# -- sites: a master and its satellites (cdc.topology; docs/sites.md) ----------------------------------------------
topology_app = typer.Typer(help="A topology of sites (a master and satellites): plan and apply its links' "
                                "connectors and topics. -c names the topology file (default: $CDC_TOPOLOGY, else "
                                "topology.yaml).", no_args_is_help=True)
app.add_typer(topology_app, name="topology")
sites_app = typer.Typer(help="Run a topology's links, and see each site's state. -c names the topology file.",
                        no_args_is_help=True)
app.add_typer(sites_app, name="sites")


def _topology():
    from cdc import topology

    return topology.load(_state["config"])


def _topology_file() -> str:
    import os

    return _state["config"] or os.environ.get("CDC_TOPOLOGY") or "topology.yaml"


def _error_book(topo):  # noqa: ANN001, ANN202
    """The links whose last sync failed (consumers/sites/schedule.py), kept beside the topology file."""
    from consumers.sites.schedule import ErrorBook, error_book_path

    return ErrorBook(error_book_path(_topology_file(), topo.topology))


@contextlib.contextmanager
def _topology_file_named():
    """A topology that does not fit its databases (producers.sites.SitesError) is reported with the file's name."""
    from producers.sites import SitesError

    try:
        yield
    except SitesError as exc:
        raise SitesError(f"{_topology_file()}: {exc}") from None


@topology_app.command("plan")
def topology_plan(sites: list[str] = typer.Argument(None, metavar="[SATELLITE]...")) -> None:
    """Print what `cdc topology apply` would create or change, link by link (changes nothing)."""
    from producers import sites as sites_mod

    def body() -> int:
        topo = _topology()
        for name in sites or []:
            topo.site(name)
        with _topology_file_named():
            plans = sites_mod.plan(topo, sites or None)
        for p in plans:
            for line in p.lines():
                typer.echo(line)
        return 0

    _run(body)


@topology_app.command("apply")
def topology_apply(sites: list[str] = typer.Argument(None, metavar="[SATELLITE]...")) -> None:
    """Create or update every link's publication, connector and topics (idempotent); a new satellite gets a full
    sync of its subset (its connector's snapshot), then incremental changes."""
    from producers import sites as sites_mod

    def body() -> int:
        topo = _topology()
        for name in sites or []:
            topo.site(name)
        with _topology_file_named():
            sites_mod.apply(topo, sites or None, echo=_echo)
        return 0

    _run(body)


@topology_app.command("remove")
def topology_remove(satellite: str = typer.Argument(..., metavar="SATELLITE"),
                    purge: bool = typer.Option(False, "--purge", help="Also drop the links' replication slots, "
                                               "publications and signalling tables.")) -> None:
    """Delete a satellite's links' connectors (run it before taking the satellite out of the file); topics are
    kept."""
    from producers import sites as sites_mod

    def body() -> int:
        for line in sites_mod.remove(_topology(), satellite, purge=purge):
            typer.echo(line)
        return 0

    _run(body)


@sites_app.command("run")
def sites_run(sites: list[str] = typer.Argument(None, metavar="[SATELLITE]..."),
              until_caught_up: bool = typer.Option(False, "--until-caught-up",
                                                   help="Sync every chosen link once (both ways) and exit."),
              timeout: float | None = typer.Option(None, "--timeout", help="Give up after this many seconds.")) -> None:
    """Run the links' appliers per their sync mode (continuous, every N minutes, triggered: after start, after a
    change, back online; on-demand links only when their satellite is named or with --until-caught-up). A link whose
    last sync failed waits until its satellite is named here."""
    from consumers.sites import SitesRunner, chosen_links

    def body() -> int:
        import signal

        topo = _topology()
        links = chosen_links(topo, sites or None, include_on_demand=until_caught_up)
        if not links:
            raise ConfigError("no link to run (every chosen satellite syncs on demand: name it, or give "
                              "--until-caught-up)")
        runner = SitesRunner(links, _echo, until_caught_up=until_caught_up, timeout=timeout, topology=topo,
                             book=_error_book(topo), by_hand=sites or None)
        signal.signal(signal.SIGINT, lambda *_: runner.stop())
        signal.signal(signal.SIGTERM, lambda *_: runner.stop())
        return runner.run()

    _run(body)


@sites_app.command("resync")
def sites_resync(satellite: str = typer.Argument(..., metavar="SATELLITE"),
                 table: str | None = typer.Option(None, "--table", help="Only this master-owned table of its subset."),
                 wait: float = typer.Option(300.0, "--wait", help="Seconds to wait for the rows to arrive."),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """A forced full sync: the master re-sends the satellite's subset (of one table, or all) through its down link,
    this command applies it, and rows outside the subset are deleted; exit 1 unless the satellite ends equal."""
    from consumers.sites.resync import resync_satellite

    def body() -> int:
        results = resync_satellite(_topology(), satellite, table, wait=wait,
                                   echo=(lambda line: typer.echo(line, err=True)) if as_json else _echo)
        if as_json:
            typer.echo(json.dumps({"satellite": satellite, "tables": [r.as_json() for r in results]}, indent=2,
                                  default=str))
        else:
            for r in results:
                typer.echo(f"{r.table}: {'equal' if r.equal else 'NOT equal'} ({r.master_rows} rows in the subset, "
                           f"{r.deleted} deleted at {satellite})")
                for line in r.differences:
                    typer.echo(f"  {line}")
        return 0 if all(r.equal for r in results) else 1

    _run(body)


@sites_app.command("serve")
def sites_serve(port: int = typer.Option(9109, "--port", help="Port of the metrics endpoint and the page."),
                host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
                interval: float = typer.Option(10.0, "--interval", min=1.0,
                                               help="Seconds between statuses (each probes every link).")) -> None:
    """Serve the sites' status as Prometheus metrics at /metrics (cdc_site_*), a live page at /, and its JSON feed
    at /api/sites, until Ctrl-C."""
    from consumers.lag.server import SitesServer
    from consumers.sites import status

    def body() -> int:
        topo = _topology()
        book = _error_book(topo)
        server = SitesServer(topo.topology, lambda: status(topo, book), host=host, port=port, interval=interval)
        return serve_until_interrupted(server, "cdc sites serve", host)

    _run(body)


@sites_app.command("status")
def sites_status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Per site: status, last sync, lag and errors of its links."""
    from consumers.sites import status

    def body() -> int:
        topo = _topology()
        doc = status(topo, _error_book(topo))
        if as_json:
            typer.echo(json.dumps(doc, indent=2, default=str))
            return 0
        for site in doc["sites"]:
            last = (datetime.fromtimestamp(site["last_sync_at"], UTC).isoformat(timespec="seconds")
                    if site["last_sync_at"] else "never")
            waiting = site.get("conflicts_waiting")
            held = "" if not waiting else f", {waiting} conflict(s) waiting"
            typer.echo(f"{site['sync_id']:>2} {site['site']:<16} {site['role']:<9} {site['status']:<7} "
                       f"last sync {last}, lag {site['lag_messages']} messages / {site['lag_seconds']:.1f} s{held}")
            for error in site["errors"]:
                typer.echo(f"     error: {error}")
        return 0

    _run(body)


conflicts_app = typer.Typer(help="Conflicts of a topology's two-way tables: list them, resolve the manual queue. -c "
                                  "names the topology file.", no_args_is_help=True)
app.add_typer(conflicts_app, name="conflicts")


@conflicts_app.command("list")
def conflicts_list(site: str | None = typer.Option(None, "--site", help="Only this site's."),
                   waiting: bool = typer.Option(False, "--waiting", help="Only those held for a decision."),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Every conflict the sites recorded: table, key, both versions with their sites and times, the decision."""
    from consumers.sites.queue import list_conflicts

    def body() -> int:
        topo = _topology()
        if site:
            topo.site(site)
        found = list_conflicts(topo, site, "waiting" if waiting else None)
        if as_json:
            typer.echo(json.dumps(found, indent=2, default=str))
            return 0
        for c in found:
            local = f"site {c['local_site']} at {c['local_at']}" if c["local"] is not None else "deleted"
            incoming = "a delete" if c["incoming_op"] == "d" else f"site {c['incoming_site']} at {c['incoming_at']}"
            typer.echo(f"{c['site']} #{c['id']} {c['table_name']} {json.dumps(c['key'])}: {c['state']}, "
                       f"{c['decision']} ({c['policy']}); local {local}, incoming {incoming}")
            if c["reason"]:
                typer.echo(f"    {c['reason']}")
        if not found:
            typer.echo("no conflicts")
        return 0

    _run(body)


@conflicts_app.command("resolve")
def conflicts_resolve(conflict_id: int = typer.Argument(..., metavar="ID"),
                      keep: str = typer.Option(..., "--keep", help="local: keep the row as it is; incoming: write "
                                               "the held version."),
                      site: str | None = typer.Option(None, "--site", help="The site holding it (the master by "
                                                      "default: manual conflicts wait there).")) -> None:
    """Decide a conflict held in the manual queue; the row then flows on to every site as an ordinary change."""
    from consumers.sites.queue import resolve

    def body() -> int:
        done = resolve(_topology(), conflict_id, keep, site)
        typer.echo(f"{done['site']} #{done['id']} {done['table']} {json.dumps(done['key'])}: resolved, "
                   f"{done['kept']} version kept")
        return 0

    _run(body)


app.add_typer(lag_app, name="lag")
_config_option_everywhere(app)


def main(argv: list[str] | None = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], prog_name="cdc")


if __name__ == "__main__":
    main()
