"""The topology file of a deployment of sites (a master, sync id 1, and satellites 2-64), and the pipelines it implies.

A topology is built from ordinary pipelines (DESIGN.md, "Several pipelines, one deployment"):
- one *up* pipeline per satellite: its source is the satellite, it captures the site-owned tables (only the rows whose
  site column holds the satellite's sync id) and its one destination is the master;
- one *down* pipeline per satellite: its source is the master, it captures the master-owned tables of the satellite's
  subset, and its one destination is that satellite. One per satellite, not one for all, so that every satellite has
  topics of its own (what per-site Kafka ACLs will grant) and its subset is cut at capture: rows outside it never
  reach Kafka under the satellite's topics, let alone the satellite.
- two-way (shared) tables travel both ways: in every up pipeline and every down pipeline, with the marker table
  `public._cdc_origin` (consumers/sites/screen.py: how loops are avoided and conflicts decided).

The ground modules (cdc/config.py, cdc/errors.py) do not import this one; it builds on them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from sqlalchemy.engine import URL, make_url

from cdc import config
from cdc.config import (
    MAX_ERROR_LINE,
    NAME_RE,
    SOURCE_SCHEMES,
    TABLE_RE,
    KafkaSasl,
    KafkaSettings,
    Pipeline,
    cut,
    shown,
)
from cdc.errors import ConfigError

DEFAULT_FILE = "topology.yaml"
MASTER_ID = 1
MAX_SYNC_ID = 64
# A column name in a subset's column list or a site column: an identifier, written as the table spells it.
COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
# Two-way tables: the marker table every site's appliers write, in the same transaction as the rows they apply, and
# which travels with them (captured in every link of a topology with shared tables): where a transaction came from.
MARKER_TABLE = "public._cdc_origin"
POLICIES = ("newer", "priority", "manual")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


_FieldError = config._FieldError  # the pipeline file's: config.validated names its path


def _table_name(table: Any) -> str:
    if not isinstance(table, str) or not TABLE_RE.match(table):
        raise ValueError(f"{shown(table)} is not schema-qualified (write schema.table)")
    return table


def _seconds(v: Any) -> Any:
    """A delay: a number of seconds, or `30s`, `30 seconds`, `2m`, `2 minutes`."""
    if isinstance(v, bool):
        raise ValueError(f"{shown(v)} is not a delay (write e.g. 30s or 2 minutes)")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?)?\s*", v)
        if m:
            return float(m.group(1)) * (60 if (m.group(2) or "s").startswith("m") else 1)
    raise ValueError(f"{shown(v)} is not a delay (write e.g. 30s or 2 minutes)")


class SyncMode(_Model):
    """How often a link applies what reached Kafka: all the time, every N minutes, only when asked, or when
    triggered (the mobile CRM's automatic sync): `after_start` seconds after `cdc sites run` starts, `after_change`
    seconds after a change began waiting in the link's topics, and when the satellite's database answers again after
    being unreachable. Triggers combine with `every` (`sync: {every: 15 minutes, after_change: 10s}`); on their own
    the mode is `triggered`."""

    mode: Literal["continuous", "every", "on_demand", "triggered"] = "continuous"
    minutes: float | None = Field(None, gt=0)
    after_start: float | None = Field(None, ge=0)
    after_change: float | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        # `sync: continuous`, `sync: on_demand`, `sync: every 15 minutes` are taken as well as the mapping.
        if isinstance(v, str):
            m = re.fullmatch(r"\s*every\s+(\d+(?:\.\d+)?)\s*(?:m|min|minutes?)?\s*", v)
            if m:
                return {"mode": "every", "minutes": float(m.group(1))}
            return {"mode": v.strip()}
        if isinstance(v, dict):
            v = dict(v)
            if "every" in v:  # {every: 15 minutes, after_change: 10s}
                every = v.pop("every")
                m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:m|min|minutes?)?\s*", str(every))
                if "mode" in v or "minutes" in v or not m:
                    raise ValueError(f"every: {shown(every)}: write `every: N minutes` (and no mode/minutes with it)")
                v.update(mode="every", minutes=float(m.group(1)))
            for key in ("after_start", "after_change"):
                if v.get(key) is not None:
                    try:
                        v[key] = _seconds(v[key])
                    except ValueError as exc:
                        raise ValueError(f"{key}: {exc}") from None
            if "mode" not in v and (v.get("after_start") is not None or v.get("after_change") is not None):
                v["mode"] = "triggered"
        return v

    @model_validator(mode="after")
    def _minutes(self) -> SyncMode:
        if self.mode == "every" and self.minutes is None:
            raise ValueError("mode `every` needs `minutes` (e.g. `sync: every 15 minutes`)")
        if self.mode != "every" and self.minutes is not None:
            raise ValueError(f"`minutes` only goes with mode `every` (mode is {self.mode!r})")
        triggers = self.after_start is not None or self.after_change is not None
        if triggers and self.mode in ("continuous", "on_demand"):
            raise ValueError(f"after_start/after_change trigger a sync; mode {self.mode!r} takes none (they go alone "
                             "or with `every`)")
        if self.mode == "triggered" and not triggers:
            raise ValueError("mode `triggered` needs after_start and/or after_change (e.g. `after_change: 10s`)")
        return self

    @property
    def scheduled(self) -> bool:
        """Applied in rounds the scheduler starts (every N minutes, triggered), not all the time or only by hand."""
        return self.mode in ("every", "triggered")

    def describe(self) -> str:
        parts = [f"every {self.minutes:g} min"] if self.mode == "every" else [] if self.mode == "triggered" \
            else [self.mode]
        if self.after_start is not None:
            parts.append(f"after start {self.after_start:g}s")
        if self.after_change is not None:
            parts.append(f"after change {self.after_change:g}s")
        if self.mode == "triggered":
            parts.append("when back online")
        return ", ".join(parts)


class Site(_Model):
    sync_id: int = Field(ge=1, le=MAX_SYNC_ID)
    url: SecretStr
    sync: SyncMode = Field(default_factory=SyncMode)
    # A satellite's Kafka user ({username, password: ${ENV}}): its links log in as it at `site_bootstrap_servers`, and
    # `cdc topology apply` creates it with ACLs for the satellite's own topics only. Unset: the satellite's links use
    # `kafka:` as it is (no login, no ACLs).
    kafka_user: KafkaSasl | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: SecretStr) -> SecretStr:
        try:
            url = make_url(v.get_secret_value())
        except Exception:
            raise ValueError("not a database URL (expected e.g. postgresql://user:${PASSWORD}@host:5432/db)") from None
        if url.drivername not in SOURCE_SCHEMES:
            raise ValueError(f"a site's database is PostgreSQL (postgresql://...), got a {shown(url.drivername)} URL")
        if not url.database:
            raise ValueError("the URL names no database")
        return v

    @property
    def sqlalchemy_url(self) -> URL:
        return make_url(self.url.get_secret_value())


class SubsetTable(_Model):
    """What of one master-owned table a satellite receives: rows by a predicate, and which columns."""

    where: str | None = None
    columns: tuple[str, ...] | None = None

    @field_validator("where")
    @classmethod
    def _where(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is empty; leave it out (every row), or write a SQL predicate")
        if v is not None and ";" in v:
            raise ValueError(f"{shown(v)}: a predicate is one SQL expression, without ';'")
        return v

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError("must be a non-empty list of column names")
        for c in v:
            if not isinstance(c, str) or not COLUMN_RE.match(c):
                raise ValueError(f"{shown(c)} is not a column name")
        if len(set(v)) != len(v):
            raise ValueError("lists a column twice")
        return v


class SharedTable(_Model):
    """A two-way table's conflict policy: `newer` (the later write wins, by the time it was written at its site; a
    tie goes to the lower sync id), `priority` (the version written at the site first in `priority` wins; sites it
    does not list come after, by sync id), `manual` (the master holds the incoming version in its queue, keeping its
    own, until `cdc conflicts resolve`)."""

    policy: Literal["newer", "priority", "manual"] = "newer"
    priority: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        # `public.contact: newer`, `public.contact: master wins`, `public.deal: {priority: [hq, north]}`.
        if v is None:
            return {}
        if isinstance(v, str):
            word = v.strip().replace("_", " ")
            if word == "master wins":
                return {"policy": "priority", "priority": ["<master>"]}
            return {"policy": v.strip()}
        if isinstance(v, dict) and "priority" in v and "policy" not in v:
            return {**v, "policy": "priority"}
        return v

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a non-empty list of site names, highest priority first")
        if len(set(v)) != len(v):
            raise ValueError("lists a site twice")
        return v

    @model_validator(mode="after")
    def _order(self) -> SharedTable:
        if self.policy == "priority" and not self.priority:
            raise ValueError("policy `priority` needs `priority:`, the sites highest first (e.g. [hq, north, south]), "
                             "or write `master wins`")
        if self.policy != "priority" and self.priority:
            raise ValueError(f"`priority` only goes with policy `priority` (policy is {self.policy!r})")
        return self


class Topology(_Model):
    topology: str = Field(pattern=NAME_RE, max_length=40)
    kafka: KafkaSettings
    sites: dict[str, Site]
    # Tables only the master writes, pushed to every satellite (each receiving its subset).
    master_tables: tuple[str, ...] = ()
    # Tables every site writes its own rows of: table -> the column holding the writing site's sync id.
    site_tables: dict[str, str] = Field(default_factory=dict)
    # Per satellite: the master-owned tables it receives (all of them when the satellite is not listed).
    subsets: dict[str, dict[str, SubsetTable]] = Field(default_factory=dict)
    # Two-way tables: edited at the master and at the satellites, every row at every site; table -> conflict policy.
    shared_tables: dict[str, SharedTable] = Field(default_factory=dict)
    # A master-owned table edited at a satellite: `reject` (a trigger `apply` installs at the satellite refuses the
    # edit), `report` (the edit is kept there and recorded in the satellite's `_cdc_conflicts`); unset: not watched.
    on_satellite_edit: Literal["reject", "report"] | None = None
    # The authenticated Kafka listener (SASL_PLAINTEXT, SCRAM-SHA-256; the local stack's `kafka_sasl` port) at which
    # the clients acting for a satellite with a `kafka_user` log in. The master's own clients use `kafka:`.
    site_bootstrap_servers: str | None = None

    @field_validator("site_bootstrap_servers")
    @classmethod
    def _site_servers(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return KafkaSettings._servers(v)

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: dict[str, Site]) -> dict[str, Site]:
        for name in v:
            if not re.match(NAME_RE, name) or len(name) > 40:
                raise ValueError(f"site name {shown(name)} may only hold letters, digits, '_' and '-', at most 40 "
                                 "characters (it becomes part of topic names)")
        ids: dict[int, str] = {}
        for name, site in v.items():
            if site.sync_id in ids:
                raise _FieldError(f"sites.{name}.sync_id", f"sync id {site.sync_id} is already site "
                                  f"{ids[site.sync_id]!r}'s (each site has its own, 1 to {MAX_SYNC_ID})")
            ids[site.sync_id] = name
        if MASTER_ID not in ids:
            raise ValueError(f"no site has sync id {MASTER_ID} (the master)")
        users: dict[str, str] = {}
        for name, site in v.items():
            if site.kafka_user is None:
                continue
            if site.sync_id == MASTER_ID:
                raise _FieldError(f"sites.{name}.kafka_user", "the master's clients use `kafka:` (the broker's own "
                                  "listener); kafka_user is for satellites")
            if site.kafka_user.username in users:
                raise _FieldError(f"sites.{name}.kafka_user.username", f"{site.kafka_user.username!r} is already "
                                  f"site {users[site.kafka_user.username]!r}'s user (each satellite has its own, "
                                  "which its ACLs are granted to)")
            users[site.kafka_user.username] = name
        return v

    @field_validator("master_tables", mode="before")
    @classmethod
    def _master_tables(cls, v: Any) -> Any:
        if v is None:
            return ()
        if not isinstance(v, (list, tuple)):
            raise ValueError("must be a list of schema.table names")
        seen = set()
        for t in v:
            _table_name(t)
            if t in seen:
                raise ValueError(f"{shown(t)} is listed twice")
            seen.add(t)
        return v

    @field_validator("site_tables", mode="before")
    @classmethod
    def _site_tables(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of schema.table to the column holding the site's sync id")
        for t, column in v.items():
            _table_name(t)
            if not isinstance(column, str) or not COLUMN_RE.match(column):
                raise ValueError(f"{shown(t)}: the site column must be a column name, got {shown(column)}")
        return v

    @field_validator("shared_tables", mode="before")
    @classmethod
    def _shared_tables(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, (list, tuple)):  # a plain list: every table `newer`
            v = {t: None for t in v}
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of schema.table to its conflict policy (newer, priority, manual)")
        for t in v:
            try:
                _table_name(t)
            except ValueError as exc:
                raise _FieldError("shared_tables", str(exc)) from None
            if t == MARKER_TABLE:
                raise _FieldError("shared_tables", f"{t} is the topology's own marker table")
        return v

    @field_validator("subsets", mode="before")
    @classmethod
    def _subsets_shape(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of satellite name to its tables")
        out = {}
        for site, tables in v.items():
            if isinstance(tables, (list, tuple)):  # a plain list: every row and column of each
                tables = {t: {} for t in tables}
            if not isinstance(tables, dict):
                raise _FieldError(f"subsets.{site}", "must be a mapping of master-owned table to {where:, columns:}")
            for t in tables:
                try:
                    _table_name(t)
                except ValueError as exc:
                    raise _FieldError(f"subsets.{site}", str(exc)) from None
            out[site] = {t: ({} if s is None else s) for t, s in tables.items()}
        return out

    @model_validator(mode="after")
    def _cross(self) -> Topology:
        if self.site_bootstrap_servers is None and any(s.kafka_user for s in self.sites.values()):
            raise _FieldError("site_bootstrap_servers", "is required when a site has a kafka_user: the authenticated "
                              "listener its links log in at (the local stack's: 127.0.0.1:9094, see "
                              "`cdc stack status`)")
        both = set(self.master_tables) & set(self.site_tables)
        if both:
            raise _FieldError("site_tables", f"{', '.join(sorted(both))} also in master_tables: a table is owned by "
                              "the master or by the sites, not both (a table both edit is a shared_tables one)")
        for table, shared in self.shared_tables.items():
            owner = "master_tables" if table in self.master_tables else "site_tables" if table in self.site_tables \
                else None
            if owner:
                raise _FieldError(f"shared_tables[{table!r}]", f"is also in {owner}: a table is master-owned, "
                                  "site-owned or shared (edited everywhere), one of the three")
            for site in shared.priority or ():
                if site != "<master>" and site not in self.sites:
                    raise _FieldError(f"shared_tables[{table!r}].priority", f"no site named {site!r} (sites: "
                                      f"{', '.join(self.sites)})")
        if not self.master_tables and not self.site_tables and not self.shared_tables:
            raise _FieldError("master_tables", "neither master_tables, site_tables nor shared_tables lists a table: "
                              "nothing to sync")
        for site, tables in self.subsets.items():
            if site not in self.sites:
                raise _FieldError(f"subsets.{site}", f"no site named {site!r} (sites: {', '.join(self.sites)})")
            if self.sites[site].sync_id == MASTER_ID:
                raise _FieldError(f"subsets.{site}", "the master holds everything; subsets are for satellites")
            for table in tables:
                if table not in self.master_tables:
                    raise _FieldError(f"subsets.{site}.{table}", "is not a master-owned table (master_tables); a "
                                      "satellite receives master-owned tables only")
        return self

    # -- the pipelines ------------------------------------------------------------------------------------------
    def priority_order(self, table: str) -> list[int]:
        """A `priority` table's sync ids, highest priority first, then every site it does not list, by sync id."""
        named = [self.sites[self.master].sync_id if s == "<master>" else self.sites[s].sync_id
                 for s in self.shared_tables[table].priority or ()]
        return named + sorted(s.sync_id for s in self.sites.values() if s.sync_id not in named)

    def site_of(self, sync_id: int) -> str | None:
        return next((n for n, s in self.sites.items() if s.sync_id == sync_id), None)

    @property
    def shared(self) -> list[str]:
        """The two-way tables and, when there are any, the marker table that travels with them."""
        return [*self.shared_tables, MARKER_TABLE] if self.shared_tables else []

    @property
    def master(self) -> str:
        return next(n for n, s in self.sites.items() if s.sync_id == MASTER_ID)

    @property
    def satellites(self) -> list[str]:
        return sorted((n for n, s in self.sites.items() if s.sync_id != MASTER_ID), key=lambda n: self.sites[n].sync_id)

    def site(self, name: str) -> Site:
        if name not in self.sites:
            raise ConfigError(f"sites: no site named {shown(name)} (known: {', '.join(self.sites)})")
        return self.sites[name]

    def subset(self, satellite: str) -> dict[str, SubsetTable]:
        """The master-owned tables a satellite receives, each with its row predicate and columns."""
        if satellite in self.subsets:
            return dict(self.subsets[satellite])
        return {t: SubsetTable() for t in self.master_tables}

    def up_name(self, satellite: str) -> str:
        return f"{self.topology}-{satellite}-up"

    def down_name(self, satellite: str) -> str:
        return f"{self.topology}-{satellite}-down"

    def site_kafka(self, satellite: str) -> KafkaSettings:
        """The Kafka settings of the clients acting for a satellite: its user at the authenticated listener when it
        has one, else the topology's `kafka:`."""
        user = self.site(satellite).kafka_user
        if user is None:
            return self.kafka
        return self.kafka.model_copy(update={"bootstrap_servers": self.site_bootstrap_servers, "sasl": user})

    def _pipeline(self, name: str, source: Site, tables: list[str], destination: str, target: Site,
                  kafka: KafkaSettings) -> Pipeline:
        data = {"pipeline": name, "kafka": kafka.model_dump(),
                # A signalling table per link: the master is the source of every down link, and a signal row
                # written for one link (a snapshot request, a catch-up marker) would be a change of all the others.
                "source": {"url": source.url.get_secret_value(), "tables": tables, "heartbeat_ms": 1000,
                           "signal_table": "public." + signal_table(name)},
                "destinations": {destination: {"kind": "replica", "url": target.url.get_secret_value()}}}
        try:
            return Pipeline.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"pipeline {name} (from the topology {self.topology}): {exc}") from None

    def up_pipeline(self, satellite: str) -> Pipeline | None:
        """The satellite's own rows to the master; None when there are no site-owned tables."""
        if not self.site_tables and not self.shared_tables:
            return None
        # The master applies the up link (its clients use `kafka:`); the satellite's connector writes its topics
        # as the satellite's user (Connect's producer overrides, producers/sites.py).
        return self._pipeline(self.up_name(satellite), self.site(satellite), [*self.site_tables, *self.shared],
                              self.master, self.sites[self.master], self.kafka)

    def down_pipeline(self, satellite: str) -> Pipeline | None:
        """The master-owned tables of the satellite's subset, to the satellite; None when its subset is empty."""
        tables = [*self.subset(satellite), *self.shared]
        if not tables:
            return None
        # Planned and applied by the master (its topics, its connector); Link.site_pipeline is the same pipeline as
        # the satellite's applier sees it: read as the satellite's user.
        return self._pipeline(self.down_name(satellite), self.sites[self.master], tables, satellite,
                              self.site(satellite), self.kafka)

    def links(self) -> list[Link]:
        """Every link of the topology: per satellite its up pipeline and its down pipeline, in sync-id order."""
        out = []
        for satellite in self.satellites:
            for direction, pipeline in (("up", self.up_pipeline(satellite)), ("down", self.down_pipeline(satellite))):
                if pipeline is not None:
                    site_pipeline = pipeline
                    if direction == "down" and self.sites[satellite].kafka_user is not None:
                        site_pipeline = pipeline.model_copy(update={"kafka": self.site_kafka(satellite)})
                    out.append(Link(satellite, direction, pipeline, self.sites[satellite].sync, site_pipeline))
        return out


def signal_table(pipeline: str) -> str:
    """The link's signalling table (unqualified): `cdc_signal_<pipeline>`, a valid unquoted name of at most 63
    bytes."""
    return ("cdc_signal_" + re.sub(r"[^a-z0-9_]", "_", pipeline.lower()))[:63]


class Link:
    """One pipeline of the topology: which satellite, which way, and how often it is applied."""

    def __init__(self, satellite: str, direction: str, pipeline: Pipeline, sync: SyncMode,
                 site_pipeline: Pipeline | None = None) -> None:
        self.satellite = satellite
        self.direction = direction
        # As the master plans, applies and watches it (its connector, its topics): Kafka as `kafka:` gives it.
        self.pipeline = pipeline
        self.sync = sync
        # As the link's applier runs it: a down link of a satellite with a kafka_user reads as that user at
        # site_bootstrap_servers; an up link is applied by the master, as `pipeline`.
        self.site_pipeline = site_pipeline or pipeline

    @property
    def destination(self) -> str:
        return next(iter(self.pipeline.destinations))

    def __repr__(self) -> str:
        return f"Link({self.satellite}, {self.direction}, {self.pipeline.name})"


def parse(data: Any, source: str = DEFAULT_FILE, env: dict[str, str] | None = None) -> Topology:
    """Validate already-loaded YAML data; `source` names the file in messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the file must be a mapping of settings (topology:, kafka:, sites:, ...)")
    data = config._interpolate(data, "", dict(os.environ) if env is None else env, source)
    return config.validated(Topology, data, source)


def load(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Topology:
    """Read and validate a topology file (default: $CDC_TOPOLOGY, else ./topology.yaml)."""
    environ = dict(os.environ) if env is None else env
    file = Path(path or environ.get("CDC_TOPOLOGY") or DEFAULT_FILE)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{file}: file not found (name one with -c/--config or $CDC_TOPOLOGY)") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=config._UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {cut(str(exc), MAX_ERROR_LINE)}") from None
    return parse(data, str(file), environ)
