"""Capture management: `cdc connectors apply/diff/status/...` from the pipeline file, over the Kafka Connect REST API."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import psycopg

from cdc.config import Pipeline
from producers import debezium, topics
from producers.connect import ConnectClient, ConnectorStatus
from producers.source_admin import (
    describe_tables, drop_publication, drop_slot, ensure_publication, ensure_signal_table, psycopg_conninfo,
    send_incremental_snapshot,
)


@dataclass
class ApplyReport:
    connector: str
    action: str  # created, updated, unchanged
    changes: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    topics_created: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    snapshot_requested: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"connector {self.connector}: {self.action}"]
        out += [f"  {format_change(c)}" for c in self.changes if self.action == "updated"]
        out += [f"topic {name}: created" for name in self.topics_created]
        out += [f"incremental snapshot requested for {', '.join(self.snapshot_requested)}"] if self.snapshot_requested else []
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
    tables = describe_tables(pipeline.source.sqlalchemy_url, pipeline.source.tables)
    return debezium.connector_config(pipeline, tables)


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
        return diff_configs(connect.config(pipeline.connector_name), desired)


def apply(pipeline: Pipeline, echo: Callable[[str], None] | None = None, *, wait: float = 120.0) -> ApplyReport:
    """Create or update the connector and its topics; idempotent. Tables new to a running connector are
    snapshotted incrementally (through the signalling table) without re-snapshotting the others."""
    desired = desired_config(pipeline)  # validates against the source before anything changes
    name = pipeline.connector_name
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        current = connect.config(name)
        changes = diff_configs(current, desired)
        report = ApplyReport(name, "created" if current is None else ("updated" if changes else "unchanged"), changes)

        admin = topics.admin_client(pipeline.kafka.bootstrap_servers)
        to_create, report.warnings = topics.plan_topics(topics.pipeline_topics(pipeline), topics.existing_topics(admin))
        report.topics_created = topics.create_topics(admin, to_create, pipeline.topics.replication_factor)

        with psycopg.connect(psycopg_conninfo(pipeline.source.sqlalchemy_url), autocommit=True) as conn:
            ensure_signal_table(conn, pipeline.source.signal_table)
            ensure_publication(conn, pipeline.publication_name,
                               [*pipeline.source.tables, pipeline.source.signal_table])
            if changes and current is not None:
                # Stop first, so that once the connector runs again it is surely the new configuration that
                # runs: a signal sent while the old task still streams would be handled by the old task.
                connect.stop(name)
                connect.wait_state(name, "STOPPED")
                connect.put_config(name, desired)
                connect.resume(name)
            elif changes:
                connect.put_config(name, desired)
            connect.wait_running(name, timeout=wait)
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
    return report


def status(pipeline: Pipeline) -> ConnectorStatus | None:
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        return connect.status(pipeline.connector_name)


def lifecycle(pipeline: Pipeline, action: str) -> None:
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        if action == "restart":
            connect.restart(pipeline.connector_name, include_tasks=True, only_failed=False)
        else:
            getattr(connect, action)(pipeline.connector_name)


def delete(pipeline: Pipeline, *, purge: bool) -> list[str]:
    """Delete the connector; with purge, also its source offsets, replication slot and publication.

    Connect keeps a deleted connector's offsets under its name, so a connector re-created with that name would
    resume from them; purge forgets them (Connect only resets the offsets of a STOPPED connector). Topics are
    kept: they are the event log.
    """
    done = []
    name = pipeline.connector_name
    with ConnectClient(pipeline.kafka.connect_url) as connect:
        if purge and connect.status(name) is not None:
            connect.stop(name)
            connect.wait_state(name, "STOPPED")
            connect.reset_offsets(name)
            done.append(f"connector {name}: source offsets reset")
        if connect.delete(name):
            done.append(f"connector {pipeline.connector_name}: deleted")
        else:
            done.append(f"connector {pipeline.connector_name}: not found")
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
    return done
