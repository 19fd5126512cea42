"""The conflicts every site of a topology recorded (`_cdc_conflicts`, written by consumers/sites/screen.py and by the
satellite-edit trigger): listed for `cdc conflicts list`, counted for `cdc sites status`, and the manual queue's
held versions resolved (`cdc conflicts resolve`). Formats nothing for people (the command line does)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from cdc.errors import CdcError, ConfigError, first_line
from cdc.topology import Topology
from consumers.sites.screen import APPLYING, CONFLICTS_TABLE
from producers.source_admin import psycopg_conninfo

FIELDS = ("id", "table_name", "key", "policy", "decision", "state", "local", "incoming", "incoming_op", "local_site",
          "local_at", "incoming_site", "incoming_at", "reason", "pipeline", "xid", "detected_at", "resolved_at",
          "resolved_as")


def _connect(topology: Topology, site: str) -> psycopg.Connection:
    url = topology.site(site).sqlalchemy_url
    try:
        return psycopg.connect(psycopg_conninfo(url), row_factory=dict_row)  # type: ignore[return-value]
    except psycopg.OperationalError as exc:
        raise CdcError(f"site {site} ({url.database}) did not answer: {first_line(exc)}") from None


def _has_table(conn: psycopg.Connection) -> bool:
    return conn.execute("select to_regclass(%s) is not null as present", (CONFLICTS_TABLE,)).fetchone()["present"]


def list_conflicts(topology: Topology, site: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
    """Every conflict recorded at the sites (or at one), oldest first, each with its `site`."""
    out = []
    for name in [site] if site else sorted(topology.sites, key=lambda n: topology.sites[n].sync_id):
        with _connect(topology, name) as conn:
            if not _has_table(conn):
                continue
            query = sql.SQL("select {} from {} {} order by id").format(
                sql.SQL(", ").join(map(sql.Identifier, FIELDS)), sql.SQL(CONFLICTS_TABLE),
                sql.SQL("where state = %s") if state else sql.SQL(""))
            for row in conn.execute(query, (state,) if state else ()).fetchall():
                out.append({"site": name, **row})
    return out


def waiting(topology: Topology) -> dict[str, int | None]:
    """Per site, the conflicts held for `cdc conflicts resolve` (None when the site did not answer)."""
    counts: dict[str, int | None] = {}
    for name in topology.sites:
        try:
            with _connect(topology, name) as conn:
                counts[name] = conn.execute(f"select count(*) as n from {CONFLICTS_TABLE} where state = 'waiting'"
                                            ).fetchone()["n"] if _has_table(conn) else 0
        except CdcError:
            counts[name] = None
    return counts


def resolve(topology: Topology, conflict_id: int, keep: str, site: str | None = None) -> dict[str, Any]:
    """Decide a held conflict (the master's queue unless `site` says otherwise): `local` keeps the row as it is;
    `incoming` writes the held version (or the held delete). Either way the row then flows on as an ordinary change
    of the site: written here, captured, applied everywhere (the held version keeps the site and time it was written
    with: the applier's setting stops the stamping trigger)."""
    if keep not in ("local", "incoming"):
        raise ConfigError(f"--keep: {keep!r} is not local or incoming")
    name = site or topology.master
    with _connect(topology, name) as conn:
        if not _has_table(conn):
            raise ConfigError(f"site {name} has recorded no conflict (no {CONFLICTS_TABLE})")
        row = conn.execute(f"select * from {CONFLICTS_TABLE} where id = %s for update", (conflict_id,)).fetchone()
        if row is None:
            raise ConfigError(f"no conflict {conflict_id} at site {name} (`cdc conflicts list` shows them)")
        if row["state"] != "waiting":
            raise ConfigError(f"conflict {conflict_id} at site {name} is not waiting: it was {row['state']} "
                              f"({row['resolved_as'] or row['decision']})")
        table = row["table_name"]
        schema, tname = table.split(".", 1)
        ident = sql.Identifier(schema, tname)
        if keep == "incoming":
            conn.execute("select set_config(%s, %s, true)", (APPLYING, "cdc conflicts resolve"))
            key = row["key"] or {}
            match = sql.SQL(" AND ").join(sql.SQL("{} = (jsonb_populate_record(null::{}, %s::jsonb)).{}").format(
                sql.Identifier(c), ident, sql.Identifier(c)) for c in key)
            if row["incoming_op"] == "d" or row["incoming"] is None:
                conn.execute(sql.SQL("delete from {} where {}").format(ident, match),
                             [Jsonb(key)] * len(key))
            else:
                columns = list(row["incoming"])
                names = sql.SQL(", ").join(map(sql.Identifier, columns))
                conn.execute(sql.SQL(
                    "insert into {t} ({names}) select {names} from jsonb_populate_record(null::{t}, %s::jsonb) "
                    "on conflict ({key}) do update set {sets}").format(
                    t=ident, names=names, key=sql.SQL(", ").join(map(sql.Identifier, key)),
                    sets=sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c))
                                            for c in columns if c not in key)),
                    [Jsonb(row["incoming"])])
        conn.execute(f"update {CONFLICTS_TABLE} set state = 'resolved', decision = %s, resolved_as = %s, "
                     "resolved_at = now() where id = %s", (keep, keep, conflict_id))
        conn.commit()
    return {"site": name, "id": conflict_id, "table": table, "key": row["key"], "kept": keep}
