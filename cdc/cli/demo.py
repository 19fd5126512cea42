"""`cdc demo`: the stack, the built-in district sample, a Debezium connector and change events read back from Kafka."""

from __future__ import annotations

import getpass
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL

from cdc import config
from cdc.cli import verify_report
from cdc.config import Pipeline
from cdc.errors import ConfigError
from consumers.apply.applier import ReplicaApplier
from consumers.apply.events import ChangeEvent
from consumers.apply.stream import ChangeStream
from consumers.ops import verify
from infra import stack
from producers import capture, topics
from producers.source_admin import drop_slot, one_row, slots_of_database
from schemas.codec import AvroDecoder, RegistryClient

SAMPLE_DIR = Path(stack.__file__).resolve().parent / "sample"
SAMPLE_SQL = SAMPLE_DIR / "district.sql"
SAMPLE_PIPELINE = SAMPLE_DIR / "pipeline.yaml"
SAMPLE_ROWS = 103  # rows of the sample database: 3 schools, 20 persons, 20 enrollments, 60 attendance

# A few source transactions that touch every table and every kind of change.
WORKLOAD = [
    # a new person with an enrollment and attendance, in one transaction
    """insert into person (id, first_name, last_name, email, balance)
         values (101, 'Ada', 'Lovelace', 'ada@example.org', 50);
       insert into enrollment (id, person_id, school_id, grade, start_date) values (101, 101, 2, 9, '2026-09-01');
       insert into attendance (id, person_id, enrollment_id, day, status)
         values (1001, 101, 101, '2026-09-02', 'present');""",
    # a transfer of balance between two persons: the total stays constant at every commit
    """update person set balance = balance - 25, updated_at = now() where id = 1;
       update person set balance = balance + 25, updated_at = now() where id = 2;""",
    # a person leaves: children first, then the root
    """delete from attendance where person_id = 3; delete from enrollment where person_id = 3;
       delete from person where id = 3;""",
    "update school set name = 'Jefferson Elementary School' where id = 1;",
]


def demo_env(layout: stack.StackLayout, database: str) -> dict[str, str]:
    """The environment that points the sample pipeline file at this stack."""
    urls = layout.urls()
    return {
        "CDC_KAFKA_BOOTSTRAP": layout.kafka_bootstrap,
        "CDC_SCHEMA_REGISTRY_URL": urls["schema_registry"],
        "CDC_CONNECT_URL": urls["connect"],
        "CDC_POSTGRES_PORT": str(layout.ports["postgres"]),
        "CDC_DEMO_DATABASE": database,
        "CDC_DEMO_REPLICA": f"{database}_replica",
        "CDC_DEMO_ANALYTICS": str(layout.home / f"{database}_analytics.duckdb"),
    }


def sample_pipeline(layout: stack.StackLayout, database: str) -> Pipeline:
    """The sample pipeline file, pointed at this stack's endpoints."""
    return config.load(SAMPLE_PIPELINE, env={**os.environ, **demo_env(layout, database)})


def _database(url: URL) -> str:
    """The database (or DuckDB file) a URL names; the pipeline file's validation already refused one without."""
    if not url.database:
        raise ConfigError(f"the sample pipeline's URL {url.render_as_string()} names no database")
    return url.database


def reset_source(layout: stack.StackLayout, pipeline: Pipeline) -> None:
    """Remove what an earlier run left: its background consumers, the connector, slot, publication, topics and
    the sample databases."""
    pidfile = layout.home / "run" / "demo-run.pid"
    if pidfile.exists():
        try:
            pid = int(pidfile.read_text().split()[0])
            if "cdc" in stack._cmdline(pid):
                stack._stop_pid(pid, timeout=15)
        except (OSError, ValueError, IndexError):
            pass
        pidfile.unlink(missing_ok=True)
    capture.delete(pipeline, purge=True)
    source = _database(pipeline.source.sqlalchemy_url)
    with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
        # Slots of the sample database (this pipeline's, or one left by an older run) block dropping it.
        conn.execute("select pg_terminate_backend(active_pid) from pg_replication_slots "
                     "where database = %s and active_pid is not null", (source,))
        for slot in slots_of_database(conn, source):
            drop_slot(conn, slot, wait=10)
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(source)))
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(source)))
        for dest in pipeline.destinations.values():
            name = _database(dest.sqlalchemy_url)
            if dest.kind == "analytics":
                Path(name).unlink(missing_ok=True)
                continue
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    admin = topics.admin_client(layout.kafka_bootstrap)
    stale = [t for t in topics.existing_topics(admin) if t.startswith(f"{pipeline.name}.")]
    topics.delete_topics(admin, stale)
    deadline = time.monotonic() + 30
    while any(t in topics.existing_topics(admin) for t in stale) and time.monotonic() < deadline:
        time.sleep(0.5)  # topic deletion completes asynchronously in the broker


def describe(event: ChangeEvent) -> str:
    row = event.row or {}
    shown = ", ".join(f"{k}={v!r}" for k, v in list(row.items())[:4])
    return (f"{event.topic}[{event.partition}]@{event.offset:<4} {event.op} {event.table:18} "
            f"key={dict(event.key or {})} lsn={event.lsn} tx={event.tx_id} #{event.tx_order}  {shown}")


def live_workload(url: str, transactions: int, seed: int = 11) -> None:
    """Source transactions while the applier runs: transfers (the total balance never changes), new persons with
    their rows, persons leaving with theirs, and grade changes."""
    rng = random.Random(seed)
    with psycopg.connect(url, autocommit=True) as conn:
        next_id = one_row(conn.execute("select coalesce(max(id), 0) + 1000 from person"), "max(id)")[0]
        for _ in range(transactions):
            ids = [r[0] for r in conn.execute("select id from person order by random() limit 2")]
            with conn.transaction():
                kind = rng.choice(["transfer", "transfer", "transfer", "join", "leave", "grade"])
                if kind == "transfer" and len(ids) == 2:
                    amount = rng.randint(1, 20)
                    conn.execute("update person set balance = balance - %s, updated_at = now() where id = %s",
                                 (amount, ids[0]))
                    conn.execute("update person set balance = balance + %s, updated_at = now() where id = %s",
                                 (amount, ids[1]))
                elif kind == "join":
                    next_id += 1
                    conn.execute("insert into person (id, first_name, last_name) values (%s, 'New', %s)",
                                 (next_id, f"Person {next_id}"))
                    conn.execute("insert into enrollment (id, person_id, school_id, grade, start_date) "
                                 "values (%s, %s, %s, 1, current_date)", (next_id, next_id, rng.randint(1, 3)))
                    conn.execute("insert into attendance (id, person_id, enrollment_id, day, status) "
                                 "values (%s, %s, %s, current_date, 'present')", (next_id, next_id, next_id))
                elif kind == "leave" and len(ids) == 2:
                    conn.execute("update person set balance = balance + (select balance from person where id = %s) "
                                 "where id = %s", (ids[0], ids[1]))
                    conn.execute("delete from attendance where person_id = %s", (ids[0],))
                    conn.execute("delete from enrollment where person_id = %s", (ids[0],))
                    conn.execute("delete from person where id = %s", (ids[0],))
                elif ids:
                    conn.execute("update enrollment set grade = grade %% 12 + 1 where person_id = %s", (ids[0],))


def compare(source_url: str, replica_url: str, tables: tuple[str, ...]) -> list[tuple[str, int, int, bool]]:
    """Rows and a checksum of every table on both sides, read with plain SQL (our `_cdc_lsn` left out)."""
    results = []
    for qualified in tables:
        schema, table = qualified.split(".", 1)
        sums = []
        for url in (source_url, replica_url):
            with psycopg.connect(url) as conn:
                columns = [r[0] for r in conn.execute(
                    "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
                    "and column_name <> '_cdc_lsn' order by column_name", (schema, table))]
                query = sql.SQL("select count(*), coalesce(md5(string_agg(r::text, '|' order by r::text)), '') "
                                "from (select {} from {}) r").format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(schema, table))
                sums.append(one_row(conn.execute(query), "count(*)"))
        results.append((qualified, sums[0][0], sums[1][0], sums[0] == sums[1]))
    return results


def run(events: int = 12, keep_running: bool = True, echo: Callable[[str], None] = print,
        database: str = "cdc_demo_district") -> int:
    started = time.monotonic()
    layout = stack.up(echo)
    pipeline = sample_pipeline(layout, database)
    echo(f"\n== sample source: database {database!r} ({', '.join(pipeline.source.tables)})")
    reset_source(layout, pipeline)
    with psycopg.connect(layout.postgres_url(database), autocommit=True) as conn:
        conn.execute(SAMPLE_SQL.read_text())
    echo(f"== cdc connectors apply ({SAMPLE_PIPELINE.name}: hierarchy person = person, enrollment, attendance)")
    capture.apply(pipeline, lambda line: echo("   " + line))

    registry = RegistryClient(pipeline.kafka.schema_registry_url)
    decoder = AvroDecoder(registry)
    stream = ChangeStream(layout.kafka_bootstrap, decoder, pipeline.data_topics, group=f"cdc-demo-{getpass.getuser()}")
    try:
        # Wait for the snapshot before the workload, so the two are easy to tell apart in the output.
        snapshot = stream.collect(lambda seen: sum(e.snapshot for e in seen) >= SAMPLE_ROWS, timeout=120)
        echo(f"== snapshot: {sum(e.snapshot for e in snapshot)} rows read from Kafka")
        echo(f"== workload: {len(WORKLOAD)} source transactions")
        with psycopg.connect(layout.postgres_url(database)) as conn:
            for statements in WORKLOAD:
                with conn.transaction():
                    conn.execute(statements)
        streamed = stream.collect(
            lambda seen: any(e.table == "public.school" and e.op == "u" for e in seen), timeout=120
        )
    finally:
        stream.close()
        registry.close()
    changes = [e for e in snapshot + streamed if not e.snapshot]
    echo(f"== {len(changes)} change events read from Kafka (Avro, writer schemas from the registry "
         f"by id: {decoder.cached_ids}):")
    for event in changes[: max(events, 0)] if events else changes:
        echo("  " + describe(event))
    if len(changes) > events > 0:
        echo(f"  ... and {len(changes) - events} more")
    code = 0 if changes else 1
    code = max(code, replicate(layout, pipeline, database, echo))
    analyse(pipeline, echo)
    show_lag(layout, pipeline, database, echo)
    if not keep_running:
        stack.down(echo)
    echo(f"== demo finished in {time.monotonic() - started:.1f} s")
    return code


def analyse(pipeline: Pipeline, echo: Callable[[str], None]) -> None:
    """Fill the analytics replica (DuckDB) and run one query on it, read-only."""
    import duckdb

    echo("\n== cdc run lake: the analytics replica (DuckDB, with a change history per table)")
    applier = ReplicaApplier(pipeline, "lake", echo=lambda line: echo("   " + line))
    applier.run(until_caught_up=True, timeout=120)
    applier.close()
    path = _database(pipeline.destinations["lake"].sqlalchemy_url)
    query = ('select s.name as school, count(*) as pupils, sum(p.balance) as balance from "public.enrollment" e '
             'join "public.person" p on p.id = e.person_id join "public.school" s on s.id = e.school_id '
             'group by s.name order by s.name')
    echo(f"== cdc query (read-only): {query}")
    with duckdb.connect(path, read_only=True) as conn:
        for school, pupils, balance in conn.execute(query).fetchall():
            echo(f"   {school:30} {pupils:4} pupils  balance {balance}")
        changes = one_row(conn.execute('select count(*) from "public.person__history"'), "count(*)")[0]
    echo(f"   ({changes} changes of public.person in its history table, for point-in-time questions)")



def show_lag(layout: stack.StackLayout, pipeline: Pipeline, database: str, echo: Callable[[str], None]) -> None:
    """`cdc lag` once, and `cdc lag serve` left running in the background with its page's address."""
    from rich.console import Console

    from cdc.cli.lag import render
    from consumers.lag.probe import LagProbe
    from consumers.lag.status import History, report

    env = {**os.environ, **demo_env(layout, database), "CDC_CONFIG": str(SAMPLE_PIPELINE)}
    (layout.home / "run").mkdir(parents=True, exist_ok=True)
    # `cdc run` for every destination keeps going in the background (`cdc stack down` stops it with the stack),
    # like a deployed pipeline: the lag below is that of running consumers.
    if not (layout.home / "run" / "demo-run.pid").exists():
        with open(layout.home / "logs" / "demo-run.log", "ab") as log:  # the child keeps its own copy
            runner = subprocess.Popen([sys.executable, "-m", "cdc.cli.main", "run"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        (layout.home / "run" / "demo-run.pid").write_text(f"{runner.pid}\n")
        time.sleep(5)
    echo("\n== cdc lag (with `cdc run` running in the background)")
    probe = LagProbe(pipeline, None)
    try:
        history = History(window_seconds=2, keep_seconds=2)
        for _ in range(2):
            samples, source = probe.sample()
            for sample in samples.values():
                history.add(sample)
            time.sleep(1)
        Console(width=120).print(render(report(history.windows(), source, pipeline=pipeline.name, stop_after=30)))
    finally:
        probe.close()
    port = 9108
    url = f"http://127.0.0.1:{port}/"
    with socket.socket() as s:
        taken = s.connect_ex(("127.0.0.1", port)) == 0
    if not taken:
        with open(layout.home / "logs" / "lag-serve.log", "ab") as log:  # the child keeps its own copy
            command = [sys.executable, "-m", "cdc.cli.main", "lag", "serve", "--port", str(port)]
            proc = subprocess.Popen(command, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        # `cdc stack down` stops it with the stack.
        (layout.home / "run" / "lag-serve.pid").write_text(f"{proc.pid}\n")
    echo(f"== live lag page and Prometheus metrics: {url} (and {url}metrics); `cdc lag serve` runs in the "
         f"background, log in {layout.home / 'logs' / 'lag-serve.log'}")


def replicate(layout: stack.StackLayout, pipeline: Pipeline, database: str, echo: Callable[[str], None]) -> int:
    """The replica applier feeding destination `state` while a live workload runs, then both sides compared."""
    replica_url = pipeline.destinations["state"].sqlalchemy_url.render_as_string(hide_password=False)
    echo(f"\n== cdc run state: replicating into {pipeline.destinations['state'].sqlalchemy_url.database!r} "
         "while 300 more source transactions run")
    applier = ReplicaApplier(pipeline, "state", echo=lambda line: echo("   " + line))
    failure: list[BaseException] = []

    def apply_forever() -> None:
        try:
            applier.run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    worker = threading.Thread(target=apply_forever)
    worker.start()
    live_workload(layout.postgres_url(database), 300)
    applier.stop()
    worker.join()
    if failure:
        raise failure[0]
    applier._stop.clear()
    applier.run(until_caught_up=True, timeout=120)
    s = applier.stats
    echo(f"   applied {s.rows} rows from {s.transactions} source transactions in {s.batches} destination "
         f"transactions")
    applier.close()
    echo("== source and replica compared (rows and checksum of every table, read with plain SQL):")
    results = compare(layout.postgres_url(database), replica_url, pipeline.source.tables)
    for table, source_rows, replica_rows, equal in results:
        echo(f"   {table:20} source {source_rows:5}  replica {replica_rows:5}  {'equal' if equal else 'DIFFERENT'}")
    echo("\n== cdc verify state")
    report = verify.verify(pipeline, "state", settle=0)
    for line in verify_report.render(report).splitlines():
        echo("   " + line)
    if not report.equal:
        return 1
    return 0 if all(r[3] for r in results) else 1
