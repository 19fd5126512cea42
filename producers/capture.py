"""Capture management: `cdc connectors apply/diff/status/...` from the pipeline file, over Kafka Connect's REST API."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from cdc.config import Pipeline, topic_safe
from cdc.errors import CdcError, ConnectError, first_line
from cdc.source_tables import TableShape
from consumers.apply.dialects.types import check_pipeline
from producers import debezium, partitions, topics
from producers.connect import ConnectClient, ConnectorStatus, changed_secrets, remove_secrets, write_secrets
from producers.source_admin import (
    SourceIdentity,
    describe_tables,
    drop_publication,
    drop_slot,
    ensure_publication,
    ensure_signal_table,
    partitions_not_full,
    psycopg_conninfo,
    send_incremental_snapshot,
    set_replica_identity_full,
    source_identity,
)


class CaptureError(CdcError):
    """The capture path would lose or mix events (a route to an unplanned topic, topics of another source)."""


@dataclass
class ApplyReport:
    connector: str
    action: str  # created, updated, unchanged
    changes: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    topics_created: list[str] = field(default_factory=list)
    topics_deleted: list[str] = field(default_factory=list)
    identity_set: list[str] = field(default_factory=list)  # partitions given REPLICA IDENTITY FULL
    warnings: list[str] = field(default_factory=list)
    snapshot_requested: list[str] = field(default_factory=list)
    partitions_followed: list[str] = field(default_factory=list)  # partitioned tables under the event trigger

    def lines(self) -> list[str]:
        out = [f"topic {name}: deleted (--reset-topics)" for name in self.topics_deleted]
        out += [f"connector {self.connector}: {self.action}"]
        out += [f"  {format_change(c)}" for c in self.changes if self.action == "updated"]
        out += [f"topic {name}: created" for name in self.topics_created]
        out += [f"partition {name}: replica identity FULL" for name in self.identity_set]
        if self.snapshot_requested:
            out.append(f"incremental snapshot requested for {', '.join(self.snapshot_requested)}")
        if self.partitions_followed:
            out.append(f"partitions attached to or detached from {', '.join(self.partitions_followed)}: followed "
                       "(event trigger)")
        out += [f"warning: {w}" for w in self.warnings]
        return out


def format_change(change: tuple[str, str | None, str | None]) -> str:
    key, old, new = change
    if old is None:
        return f"+ {key} = {new}"
    if new is None:
        return f"- {key} = {old}"
    return f"~ {key}: {old} -> {new}"


def desired_config(pipeline: Pipeline) -> dict[str, str]:
    """The connector configuration the pipeline file asks for, checked against the source's real tables."""
    return _desired(pipeline)[0]


def secrets_directory(pipeline: Pipeline) -> Path:
    """Where the connector's secrets are stored for Connect to read (the local stack's state directory)."""
    from infra.stack import secrets_dir

    return secrets_dir() / pipeline.connector_name


def _secret_changes(pipeline: Pipeline, current: dict[str, str] | None, desired: dict[str, str],
                    changes: list[tuple[str, str | None, str | None]]) -> list[tuple[str, str | None, str | None]]:
    """Secrets whose stored value is not the pipeline file's: the configuration holds the same reference, but the
    running connector must restart to read the new value."""
    if current is None:
        return []
    listed = {key for key, _, _ in changes}
    return [(key, "********", "******** (a new value)") for key in
            changed_secrets(secrets_directory(pipeline), debezium.secret_values(pipeline))
            if key not in listed and debezium.is_reference(desired.get(key, ""))]


def _reference_hint(pipeline: Pipeline) -> str:
    return (f"The connector's password is a reference to {secrets_directory(pipeline)}, which the Kafka Connect worker "
            f"at {pipeline.kafka.connect_url} must resolve with its `{debezium.SECRETS_PROVIDER}` config provider "
            f"(config.providers={debezium.SECRETS_PROVIDER}, DirectoryConfigProvider, allowed.paths holding that "
            "directory, read access to it): a worker without it passes the reference itself as the password. "
            "`cdc stack up` restarts the local stack's worker with it.")


def _desired(pipeline: Pipeline) -> tuple[dict[str, str], dict[str, TableShape]]:
    # With the catalog's types, which the refusal of columns a destination cannot hold reads (one reflection for both).
    tables = describe_tables(pipeline.source.sqlalchemy_url, pipeline.source.tables, catalog=True)
    config = debezium.connector_config(pipeline, tables, secrets=str(secrets_directory(pipeline)))
    check_pipeline(pipeline, config, tables)  # refused here, never at the first write
    return config, tables


def diff_configs(current: dict[str, str] | None, desired: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """Differences as (key, current, desired), secrets masked; Connect adds `name`, which we ignore."""
    current = {k: v for k, v in (current or {}).items() if k != "name"}
    cur, want = debezium.masked(current), debezium.masked(desired)
    changes: list[tuple[str, str | None, str | None]] = []
    for key in sorted(set(current) | set(desired)):
        if current.get(key) != desired.get(key):
            changes.append((key, cur.get(key), want.get(key)))
    return changes


def _captured(config: dict[str, str]) -> set[str]:
    return {re.sub(r"\\(.)", r"\1", t) for t in config.get("table.include.list", "").split(",") if t}


def diff(pipeline: Pipeline) -> list[tuple[str, str | None, str | None]]:
    desired = desired_config(pipeline)
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        current = connect.config(pipeline.connector_name)
    changes = diff_configs(current, desired)
    return changes + _secret_changes(pipeline, current, desired, changes)


def check_routes(pipeline: Pipeline, config: dict[str, str]) -> None:
    """Every captured table's events must end in the topic its applier reads (replaying the connector's routing)."""
    wrong = [(t, debezium.routed_topic(config, t)) for t in pipeline.source.tables
             if debezium.routed_topic(config, t) != pipeline.topic_of(t)]
    if wrong:
        raise CaptureError("the connector's routing would send " + "; ".join(
            f"{t}'s events to topic {got or '(dropped)'} instead of {pipeline.topic_of(t)}" for t, got in wrong))


def check_plugins(pipeline: Pipeline, connect: ConnectClient, config: dict[str, str]) -> None:
    """The project's own transforms must be on the worker's plugin path before a connector names them."""
    needed = {v for k, v in config.items() if k.startswith("transforms.") and k.endswith(".type")}
    if not needed & {debezium.OPTIONAL_FIELDS, debezium.DROP_OPTIONAL_DEFAULTS, debezium.DROP_KEY_DEFAULTS}:
        return
    plugins = {p.get("class") for p in connect.plugins()}
    if debezium.OPTIONAL_FIELDS in needed and debezium.OPTIONAL_FIELDS not in plugins:
        hierarchies = list(pipeline.hierarchies)
        names = [hierarchies[int(m.group(1))] for k in config
                 if (m := re.fullmatch(r"transforms\.h(\d+)optional\.type", k))]
        raise CaptureError(
            f"hierarchies {', '.join(names)}: a member's root-id column is nullable, so the hierarchy's keys need the "
            f"transform {debezium.OPTIONAL_FIELDS}, which Kafka Connect at {pipeline.kafka.connect_url} does not "
            "have; `cdc stack up` builds it into the plugin path, and Connect loads it when it starts. Nothing was "
            "changed.")
    missing = sorted(needed & {debezium.DROP_OPTIONAL_DEFAULTS, debezium.DROP_KEY_DEFAULTS} - plugins)
    if missing:
        raise CaptureError(
            f"the connector needs the transforms {', '.join(missing)} (without them an explicit NULL in a column "
            f"with a default reaches Kafka as the default), which Kafka Connect at {pipeline.kafka.connect_url} does "
            "not have; `cdc stack up` builds them into the plugin path, and Connect loads them when it starts. "
            "Nothing was changed.")


def unplanned_topics(pipeline: Pipeline, existing: dict[str, int] | set[str]) -> list[tuple[str, str]]:
    """Topics under `<pipeline>.` that the plan does not name, each with the table its events came from."""
    prefix = f"{pipeline.name}."
    planned = topics.planned_topics(pipeline)
    by_topic = {topic_safe(t): t for t in pipeline.source.tables}
    return [(name, by_topic.get(name[len(prefix):], name[len(prefix):])) for name in sorted(existing)
            if name.startswith(prefix) and name not in planned]


def unplanned_message(pipeline: Pipeline, found: list[tuple[str, str]]) -> str:
    return "; ".join(
        f"topic {topic} is not planned by pipeline {pipeline.name!r}: " + (
            f"the dead-letter topic of destination {table.removesuffix('.dead-letter')!r}, which the pipeline file "
            "no longer names" if table.endswith(".dead-letter") else
            f"it holds events of table {table} that no applier reads") for topic, table in found)


def _recorded_identity(record: dict | None) -> SourceIdentity | None:
    if record is None:
        return None
    return SourceIdentity(str(record["system_identifier"]), int(record["database_oid"]), str(record["database"]))


def check_source(pipeline: Pipeline, identity: SourceIdentity, existing: dict[str, int], *, connector_exists: bool,
                 reset: bool) -> tuple[list[str], bool]:
    """Refuse topics holding another source database's history; returns (topics to delete first, record needed).

    A source is PostgreSQL's system identifier (one per cluster, new after initdb or a restore elsewhere) and the
    database's oid (new when the database is re-created under the same name), as `apply` recorded them in the
    pipeline's compacted `<pipeline>._source` topic: the topics are the only thing that outlives the connector,
    slot and publication, so the record of whose history they hold lives beside them.
    """
    prefix = f"{pipeline.name}."
    mine = sorted(t for t in existing if t.startswith(prefix))
    source = topics.source_topic(pipeline)
    recorded = _recorded_identity(topics.read_source_record(pipeline.kafka, source)
                                  if source in existing else None)
    same = recorded is not None and (recorded.system_identifier, recorded.database_oid) == (
        identity.system_identifier, identity.database_oid)
    if same:
        return [], False
    # Signals and notifications are messages to and from the connector, not the history appliers read.
    history = [t for t in mine if t not in (source, pipeline.signal_topic, pipeline.notification_topic)]
    holding = sorted(t for t, n in topics.message_counts(pipeline.kafka, history).items() if n)
    if not holding or (recorded is None and connector_exists):
        # Nothing recorded yet, by a pipeline that runs (made before sources were recorded): its own history.
        return [], True
    whose = (f"the history of {recorded.describe()}" if recorded is not None
             else "events of a source database that was never recorded")
    if not reset:
        raise CaptureError(
            f"topics {', '.join(holding)} hold {whose}, but source.url reaches {identity.describe()}: the pipeline "
            f"name {pipeline.name!r} was used before for another source database. Nothing was changed. Adding "
            "this source's events to them would mix two histories in one topic. Run `cdc connectors apply "
            "--reset-topics` to delete the pipeline's topics first (then replay the destinations fed from them), "
            "or give this pipeline another name.")
    if connector_exists:
        raise CaptureError(f"--reset-topics: connector {pipeline.connector_name} exists and its stored offsets "
                           "belong to the other source; run `cdc connectors delete --purge` first. Nothing was "
                           "changed.")
    return mine, True


def _wait_for_snapshot(pipeline: Pipeline, start: int, timeout: float) -> bool:
    """Wait until Debezium's notifications after offset `start` say the initial snapshot completed (or was
    skipped); False on timeout."""
    from confluent_kafka import TopicPartition

    from cdc import kafka as kafka_clients
    from schemas.codec import AvroDecoder, RegistryClient

    consumer = kafka_clients.consumer(pipeline.kafka, {"group.id": "cdc-apply-snapshot", "enable.auto.commit": False,
                                                       "log_level": 3})
    registry = RegistryClient(pipeline.kafka.schema_registry_url)
    decoder = AvroDecoder(registry)
    try:
        consumer.assign([TopicPartition(pipeline.notification_topic, 0, start)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.5):
                if msg.error() is not None or msg.value() is None:
                    continue
                note = decoder.decode(msg.value())
                if note.get("aggregate_type") == "Initial Snapshot" and note.get("type") in (
                        "COMPLETED", "SKIPPED", "ABORTED"):
                    return True
        return False
    finally:
        consumer.close()
        registry.close()


def apply(pipeline: Pipeline, echo: Callable[[str], None] | None = None, *, wait: float = 120.0,
          reset_topics: bool = False, settle: float = 30.0) -> ApplyReport:
    """Create or update the connector and its topics; idempotent. Tables new to a running connector are
    snapshotted incrementally (through the signalling table) without re-snapshotting the others.

    Refused before anything changes: a routing that would send a table's events to a topic nobody reads, and
    topics holding another source database's history (unless `reset_topics`, which deletes them first). After a
    new connector starts, waits (at most `settle` seconds) for its snapshot to finish, then fails if a topic
    outside the plan appeared under the pipeline's prefix."""
    desired, tables = _desired(pipeline)  # validates against the source before anything changes
    check_routes(pipeline, desired)
    name = pipeline.connector_name
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        identity = source_identity(conn)
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        check_plugins(pipeline, connect, desired)
        current = connect.config(name)
        changes = diff_configs(current, desired)
        changes += _secret_changes(pipeline, current, desired, changes)
        report = ApplyReport(name, "created" if current is None else ("updated" if changes else "unchanged"), changes)

        admin = topics.admin_client(pipeline.kafka)
        existing = topics.existing_topics(admin)
        to_delete, record = check_source(pipeline, identity, existing, connector_exists=current is not None,
                                         reset=reset_topics)
        if to_delete:
            topics.delete_topics_and_wait(admin, to_delete)
            report.topics_deleted = to_delete
            existing = topics.existing_topics(admin)
        to_create, report.warnings = topics.plan_topics(topics.pipeline_topics(pipeline), existing)
        report.topics_created = topics.create_topics(admin, to_create, pipeline.topics.replication_factor)
        if record:
            topics.write_source_record(pipeline.kafka, topics.source_topic(pipeline), {
                "system_identifier": identity.system_identifier, "database_oid": identity.database_oid,
                "database": identity.database})

        notified = topics.message_counts(pipeline.kafka, [pipeline.notification_topic],
                                         ends=True).get(pipeline.notification_topic, 0)
        with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
            ensure_signal_table(conn, pipeline.source.signal_table)
            ensure_publication(conn, pipeline.publication_name,
                               [*pipeline.source.tables, pipeline.source.signal_table])
            # Debezium sets REPLICA IDENTITY FULL on the tables named (replica.identity.autoset.values), and
            # PostgreSQL does not pass it on to a partitioned table's partitions, whose rows the old images come from.
            partitions = partitions_not_full(conn, debezium.full_identity_tables(pipeline, tables))
            set_replica_identity_full(conn, [p for p, _ in partitions])
            report.identity_set = [p for p, _ in partitions]
            _follow_partitions(pipeline, conn, tables, report)
            # Before the connector (re)starts: Connect reads the files when it hands the connector its configuration.
            write_secrets(secrets_directory(pipeline), {k: v for k, v in debezium.secret_values(pipeline).items()
                                                        if debezium.is_reference(desired.get(k, ""))})
            if changes and current is not None:
                # Stop first, so that once the connector runs again it is surely the new configuration that
                # runs: a signal sent while the old task still streams would be handled by the old task.
                connect.stop(name)
                connect.wait_state(name, "STOPPED")
                connect.put_config(name, desired)
                connect.resume(name)
            elif changes:
                connect.put_config(name, desired)
            try:
                connect.wait_running(name, timeout=wait)
            except ConnectError as exc:
                if any(debezium.is_reference(desired.get(key, "")) for key in debezium.SECRET_KEYS):
                    exc.hint = _reference_hint(pipeline)
                raise
            if current is not None:
                added = sorted(_captured(desired) - _captured(current) - {pipeline.source.signal_table})
                if added:
                    # An incremental snapshot de-duplicates the rows of a chunk by record key, and a hierarchy
                    # member's key is its root's id, shared by many rows: all but one would be lost. Such tables
                    # take a blocking snapshot (streaming pauses while it reads them).
                    members = {m for h in pipeline.hierarchies.values() for m in h.members}
                    kind = "blocking" if members & set(added) else "incremental"
                    send_incremental_snapshot(conn, pipeline.source.signal_table, added, kind=kind)
                    report.snapshot_requested = added
    if echo:
        for line in report.lines():
            echo(line)
    if (current is None and pipeline.source.snapshot_mode in ("initial", "when_needed") and settle > 0
            and not _wait_for_snapshot(pipeline, notified, settle)):
        report.warnings.append(f"the snapshot is still running after {settle:.0f} s; `cdc connectors status` "
                               "checks the topics again")
        if echo:
            echo(f"warning: {report.warnings[-1]}")
    stray = unplanned_topics(pipeline, topics.existing_topics(admin))
    if stray:
        raise CaptureError(unplanned_message(pipeline, stray))
    return report


def _follow_partitions(pipeline: Pipeline, conn: psycopg.Connection, tables: dict[str, TableShape],
                       report: ApplyReport) -> None:
    """Install (or refresh, or remove) the event trigger that follows partitions attached, detached or dropped
    later (producers.partitions); without a superuser, say what is then not followed."""
    parents = partitions.partitioned(conn, list(pipeline.source.tables))
    if not parents:
        if partitions.can_install(conn):
            partitions.uninstall(conn, pipeline.name, pipeline.source.signal_table)
        return
    if not partitions.can_install(conn):
        report.warnings.append(
            f"{', '.join(parents)}: rows of a partition ATTACHed later, or DETACHed or DROPped, are not followed (the "
            "event trigger that follows them needs a superuser source login): re-sync the table after such a change "
            "(`cdc verify --fix`)")
        return
    full = set(debezium.full_identity_tables(pipeline, tables))
    members = {m for h in pipeline.hierarchies.values() for m in h.members}
    partitions.install(conn, pipeline.name, pipeline.source.signal_table, [
        partitions.Parent(t, blocking=t in members or not tables[t].primary_key, full_identity=t in full)
        for t in parents])
    report.partitions_followed = parents


def identity_problems(pipeline: Pipeline) -> list[str]:
    """Partitions (created or attached after the last `apply`) of tables that need REPLICA IDENTITY FULL, and
    partitions that left a captured table taking rows the destinations still hold (producers.partitions)."""
    tables = describe_tables(pipeline.source.sqlalchemy_url, pipeline.source.tables)
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        found = partitions_not_full(conn, debezium.full_identity_tables(pipeline, tables))
        left = partitions.departures(conn, pipeline.name, pipeline.source.signal_table,
                                     list(pipeline.destinations))
    return [f"partition {p} of {parent} lacks REPLICA IDENTITY FULL (PostgreSQL does not pass it on to partitions "
            "created or attached later): its updates and deletes carry an incomplete old row; run `cdc connectors "
            "apply`" for p, parent in found] + [departure.describe() for departure in left]


def verified_equal(pipeline: Pipeline, destination: str, tables: list[str]) -> None:
    """`cdc verify` found `destination` equal to the source on `tables`: partitions that left them are resolved
    there."""
    with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
        partitions.mark_resolved(conn, pipeline.name, pipeline.source.signal_table, destination, tables)


def topic_problems(pipeline: Pipeline) -> list[tuple[str, str]]:
    """Unplanned topics under the pipeline's prefix, for `cdc connectors status`."""
    return unplanned_topics(pipeline, topics.existing_topics(topics.admin_client(pipeline.kafka)))


def status(pipeline: Pipeline) -> ConnectorStatus | None:
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        return connect.status(pipeline.connector_name)


def lifecycle(pipeline: Pipeline, action: str) -> None:
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        if action == "restart":
            connect.restart(pipeline.connector_name, include_tasks=True, only_failed=False)
        else:
            getattr(connect, action)(pipeline.connector_name)


def _stand_in(pipeline: Pipeline, connect: ConnectClient, done: list[str]) -> bool:
    """A connector deleted without purge (or lost with Connect's configuration) leaves its offsets under its name, and
    a connector created later with the name would resume from them: from a position a re-created source database
    never had ("no longer available on the server"). Connect resets only the offsets of an existing, stopped
    connector, so one is created STOPPED (it runs nothing) to reset them. True when it was; when it cannot be (the
    source is gone, say), said in `done`."""
    name = pipeline.connector_name
    try:
        write_secrets(secrets_directory(pipeline), debezium.secret_values(pipeline))
        connect.create_stopped(name, desired_config(pipeline))
    except Exception as exc:  # noqa: BLE001 - best effort: whatever stops it (a source gone), the delete goes on
        done.append(f"connector {name}: not found; offsets it may have left were not reset ({first_line(exc)})")
        return False
    return True


def delete(pipeline: Pipeline, *, purge: bool) -> list[str]:
    """Delete the connector; with purge, also its source offsets, replication slot and publication.

    Connect keeps a deleted connector's offsets under its name, so a connector re-created with that name would
    resume from them; purge forgets them (Connect only resets the offsets of a STOPPED connector). Topics are
    kept: they are the event log.
    """
    done: list[str] = []
    name = pipeline.connector_name
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        exists = connect.status(name) is not None
        if purge and not exists:
            exists = _stand_in(pipeline, connect, done)
        if purge and exists:
            connect.stop(name)
            connect.wait_state(name, "STOPPED")
            connect.reset_offsets(name)
            done.append(f"connector {name}: source offsets reset")
        if connect.delete(name):
            done.append(f"connector {pipeline.connector_name}: deleted")
        else:
            done.append(f"connector {pipeline.connector_name}: not found")
    if remove_secrets(secrets_directory(pipeline)):
        done.append(f"connector {name}: stored secrets removed")
    if purge:
        try:
            conn = psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True)
        except psycopg.OperationalError as exc:
            # A source database that is gone (or not made yet) holds no publication; its slot, if any, is
            # dropped by whoever drops the database.
            done.append(f"source database not reachable, slot and publication left alone: {str(exc).strip()}")
            return done
        with conn:
            if drop_slot(conn, pipeline.slot_name):
                done.append(f"replication slot {pipeline.slot_name}: dropped")
            if drop_publication(conn, pipeline.publication_name):
                done.append(f"publication {pipeline.publication_name}: dropped")
            if partitions.can_install(conn) and partitions.uninstall(conn, pipeline.name,
                                                                     pipeline.source.signal_table):
                done.append("event trigger following partitions: dropped")
    return done
