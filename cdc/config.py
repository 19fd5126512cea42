"""The pipeline file: YAML with `${ENV}` interpolation, validated into typed, frozen config objects.

Every mistake is reported as a ConfigError that names the file, the field path and what is wrong, before
anything is changed anywhere. This is the only module that reads the environment for configuration.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from cdc.errors import ConfigError

DEFAULT_FILE = "pipeline.yaml"
# Kafka topic names allow [a-zA-Z0-9._-]; pipeline and hierarchy names become parts of topic names.
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
TABLE_RE = re.compile(r"^[^.]+\.[^.]+$")
# Role names are written unquoted in SQL by the people who use them, so: lower case, digits and '_', at most
# PostgreSQL's 63 bytes, not starting with `pg_` (reserved by PostgreSQL).
ROLE_RE = re.compile(r"^(?!pg_)[a-z_][a-z0-9_]{0,62}$")
_RESERVED_ROLES = {"public", "none", "current_role", "current_user", "session_user", "all"}
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# PostgreSQL cuts identifiers longer than this many bytes (NAMEDATALEN - 1): a longer name names another table.
MAX_IDENTIFIER_BYTES = 63
# Names that become parts of topic names (at most 249 characters in Kafka, `<pipeline>.<dest>.dead-letter` included).
MAX_NAME_CHARS = 100
# How much of a user-supplied value a message shows: enough to recognise it, never a whole 10 MB name.
SHOWN_CHARS = 120
# The longest line one configuration error may print, whatever it quotes (a last guard behind `shown`).
MAX_ERROR_LINE = 1000
# The SQLAlchemy schemes (dialect+driver) the project can write to, per destination kind; the drivers are the ones
# it installs (psycopg 3, PyMySQL, duckdb_engine), consumers/apply/dialects has one dialect per database. A DuckDB file
# of kind replica is written by the DuckDB dialect, as an analytics file is.
DESTINATION_SCHEMES = {
    "replica": ("postgresql", "postgresql+psycopg", "mysql", "mysql+pymysql", "mariadb", "mariadb+pymysql", "duckdb"),
    "analytics": ("duckdb", "postgresql", "postgresql+psycopg"),
}
DESTINATION_DATABASES = {"replica": "a replica destination is PostgreSQL, MariaDB (or MySQL) or DuckDB",
                         "analytics": "an analytics destination is DuckDB or PostgreSQL"}
SOURCE_SCHEMES = ("postgresql", "postgresql+psycopg")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` as a message may show it: at most `limit` characters, then an ellipsis and the full length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def shown(value: Any) -> str:
    """A user-supplied value quoted for a message (its repr), cut to SHOWN_CHARS with its full length."""
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        return f"{value[:SHOWN_CHARS]!r}… ({len(value):,} characters)"
    return cut(repr(value))


def topic_safe(name: str) -> str:
    """Kafka topic names allow [a-zA-Z0-9._-] only; Debezium replaces anything else with '_', and so do we."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _http_url(value: str, what: str) -> str:
    if not re.match(r"^https?://[^/\s:]+(:\d+)?(/\S*)?$", value):
        raise ValueError(f"{what} must be an http:// or https:// URL, got {shown(value)}")
    return value.rstrip("/")


def _sqlalchemy_url(value: str) -> URL:
    try:
        return make_url(value)
    except ArgumentError:
        # The URL itself is not shown: it may hold a password.
        raise ValueError("not a database URL (expected e.g. postgresql://user@host:5432/db)") from None


def masked_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


# A Kafka (SCRAM) user name: it becomes the ACL principal `User:<name>`, so no ':' or ',' or spaces.
KAFKA_USER_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class KafkaSasl(_Model):
    """A Kafka login (SASL_PLAINTEXT, SCRAM-SHA-256): the user a pipeline's clients act as. The password is a secret,
    given by `${ENV}` reference in the file; it is never printed (SecretStr)."""

    username: str
    password: SecretStr

    @field_validator("username")
    @classmethod
    def _username(cls, v: str) -> str:
        if not re.match(KAFKA_USER_RE, v):
            raise ValueError(f"{shown(v)} is not a Kafka user name (letters, digits, '.', '_' and '-', at most 100)")
        return v

    @field_validator("password")
    @classmethod
    def _password(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("is empty (give it by reference, e.g. password: ${KAFKA_PASSWORD})")
        return v


class KafkaSettings(_Model):
    bootstrap_servers: str
    schema_registry_url: str
    connect_url: str
    # Unset: the stack's PLAINTEXT listener, no login. Set: every Kafka client of the pipeline logs in as this user.
    sasl: KafkaSasl | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str) -> str:
        # `kafka://host:port` is taken too, as `cdc stack status` prints the broker (every endpoint as a URL), and
        # handed on as the host:port that Kafka's clients take.
        servers = [server.strip() for server in v.split(",")]
        plain = [re.sub(r"^kafka://(.*?)/?$", r"\1", server, flags=re.IGNORECASE) for server in servers]
        for server, written in zip(plain, servers):
            if not re.match(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$", server):
                raise ValueError(f"each server must be host:port, got {shown(written)} (kafka://host:port is taken "
                                 "too)")
        return v if plain == servers else ",".join(plain)

    @field_validator("schema_registry_url")
    @classmethod
    def _registry(cls, v: str) -> str:
        return _http_url(v, "schema_registry_url")

    @field_validator("connect_url")
    @classmethod
    def _connect(cls, v: str) -> str:
        return _http_url(v, "connect_url")


class TopicSettings(_Model):
    partitions: int = Field(6, ge=1, le=10_000)
    # Milliseconds; -1 keeps the history forever (replays need it).
    retention_ms: int = Field(-1, ge=-1)
    replication_factor: int = Field(1, ge=1)


class SourceSettings(_Model):
    url: SecretStr
    tables: tuple[str, ...]
    heartbeat_ms: int = Field(10_000, ge=100)
    snapshot_mode: Literal["initial", "no_data", "when_needed", "never"] = "initial"
    # Debezium's signalling table (ad-hoc snapshots, re-syncs); created by `cdc connectors apply`.
    signal_table: str = "public.cdc_signal"

    @field_validator("signal_table")
    @classmethod
    def _signal_table(cls, v: str) -> str:
        if not TABLE_RE.match(v):
            raise ValueError(f"{shown(v)} is not schema-qualified (write schema.table)")
        _identifier_lengths(v)
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: SecretStr) -> SecretStr:
        url = _sqlalchemy_url(v.get_secret_value())
        if url.drivername not in SOURCE_SCHEMES:
            raise ValueError(f"the source must be PostgreSQL (postgresql://...), got a {shown(url.drivername)} URL; "
                             f"accepted schemes: {', '.join(s + '://' for s in SOURCE_SCHEMES)}")
        if not url.database:
            raise ValueError("the source URL names no database")
        return v

    @model_validator(mode="after")
    def _signal_not_captured(self) -> SourceSettings:
        if self.signal_table in self.tables:
            raise _FieldError("source.tables", f"{self.signal_table!r} is the signalling table (source.signal_table); "
                              "it cannot also be a captured table")
        return self

    @field_validator("tables", mode="before")
    @classmethod
    def _tables_list(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"must be a list of schema.table names, got {shown(v)}")
        if not v:
            raise ValueError("lists no tables; name at least one schema.table to capture")
        return v

    @field_validator("tables")
    @classmethod
    def _tables(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for table in v:
            if table.count(".") > 1:
                # schema.table is split at its one dot, so the name is ambiguous (and Debezium's lists split there).
                raise ValueError(f"{shown(table)}: schema and table names holding a dot cannot be captured")
            if not TABLE_RE.match(table):
                raise ValueError(f"{shown(table)} is not schema-qualified (write it as schema.table, e.g. "
                                 f"public.{cut(table)})")
            _identifier_lengths(table)
            if table in seen:
                raise ValueError(f"{shown(table)} is listed twice")
            if '"' in table:
                # Debezium 3.6 loses such names when it re-reads a table's columns while streaming.
                raise ValueError(f"{shown(table)}: table names holding a double quote cannot be captured by Debezium")
            seen.add(table)
        return v

    @property
    def sqlalchemy_url(self) -> URL:
        return make_url(self.url.get_secret_value())


def _identifier_lengths(table: str) -> None:
    for part in table.split("."):
        if len(part.encode()) > MAX_IDENTIFIER_BYTES:
            raise ValueError(f"{shown(table)}: {shown(part)} is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES}-byte "
                             "identifiers (PostgreSQL would cut it and name another table)")


class Hierarchy(_Model):
    root: str
    # member table -> the member's column that holds the root id
    members: dict[str, str] = Field(default_factory=dict)

    @field_validator("members", mode="before")
    @classmethod
    def _members(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("members must be a mapping of member table to its root-id column")
        for table, column in v.items():
            if column is None or (isinstance(column, str) and not column.strip()):
                raise ValueError(f"member {shown(table)} names no root-id column (write `{cut(str(table))}: "
                                 "<column>`)")
            if not isinstance(column, str):
                raise ValueError(f"member {shown(table)}: the root-id column must be a column name, got "
                                 f"{shown(column)}")
        return v

    @property
    def tables(self) -> tuple[str, ...]:
        return (self.root, *self.members)


def default_read_only_role(destination: str) -> str:
    """`cdc_reader_<destination>`, made a valid unquoted PostgreSQL role name."""
    return ("cdc_reader_" + re.sub(r"[^a-z0-9_]", "_", destination.lower()))[:63]


class Destination(_Model):
    kind: Literal["replica", "analytics"]
    url: SecretStr
    on_error: Literal["stop", "dead-letter"] | None = None
    # How long the applier waits for the missing events of a source transaction once every partition has been read
    # to its end past its END record; then it stops naming them, or dead-letters what arrived (on_error).
    incomplete_transaction_grace_s: float = Field(default=30.0, gt=0)
    # Take over destination tables that exist but were not made by the applier (no `_cdc_lsn`), when their columns
    # and primary key are the source's: emptied and refilled by the snapshot, on the pipeline's first run there.
    adopt_existing_tables: bool = False
    # PostgreSQL analytics destinations only: the role their users read with, and `cdc query` logs in as. Filled
    # with `default_read_only_role(<destination name>)` when absent; without a password `cdc run` generates one
    # (consumers.apply.dialects.postgres.reader_password).
    read_only_role: str | None = None
    read_only_password: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: SecretStr) -> SecretStr:
        _sqlalchemy_url(v.get_secret_value())
        return v

    @field_validator("read_only_role")
    @classmethod
    def _role(cls, v: str | None) -> str | None:
        if v is not None and (not ROLE_RE.match(v) or v in _RESERVED_ROLES):
            raise ValueError(f"{shown(v)} is not a usable role name (lower-case letters, digits and '_', starting "
                             "with a letter or '_', at most 63 characters, not `pg_...` nor a reserved word)")
        return v

    @field_validator("read_only_password", mode="before")
    @classmethod
    def _password(cls, v: Any) -> Any:
        return None if v == "" else v  # `${READER_PASSWORD:-}` unset: no password given, one is generated

    @property
    def is_postgres_analytics(self) -> bool:
        return self.kind == "analytics" and self.sqlalchemy_url.get_backend_name() == "postgresql"

    @property
    def sqlalchemy_url(self) -> URL:
        return make_url(self.url.get_secret_value())

    @property
    def driver_url(self) -> URL:
        """The URL with the driver this project installs for the database (psycopg 3, PyMySQL)."""
        url = self.sqlalchemy_url
        if url.drivername == "postgresql":
            return url.set(drivername="postgresql+psycopg")
        if url.drivername in ("mysql", "mariadb"):
            return url.set(drivername=f"{url.drivername}+pymysql")
        return url



class SyncTable(_Model):
    """One table of a sync's scope: which rows are in it, which never sync, and how rows are matched."""

    # A SQL predicate over the table's columns (e.g. `id between 1000000000 and 1999999999`); absent: every row.
    where: str | None = None
    # Rows that never sync, in either direction (personalised dashboards): a SQL predicate.
    exclude: str | None = None
    # Match rows by these columns (a natural key, e.g. [name]) instead of by primary key: a source row takes the id of
    # the destination row of the same name, and the foreign keys that reference the table follow it.
    match_by: tuple[str, ...] = ()

    @field_validator("where", "exclude")
    @classmethod
    def _predicate(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is empty; leave it out, or write a SQL predicate (e.g. id between 1 and 9)")
        if v is not None and ";" in v:
            raise ValueError(f"{shown(v)}: a predicate is one SQL expression, without ';'")
        return v

    @field_validator("match_by", mode="before")
    @classmethod
    def _match_by(cls, v: Any) -> Any:
        if isinstance(v, str):
            return (v,)
        return v


class SyncObjects(_Model):
    """Schema objects that sync by name pattern (shell-style, case-insensitive: `CT_*`, `qview_*`)."""

    # Tables created at the destination when missing, and their columns; also columns of this name pattern in any
    # table of both sides (`CT_*` columns added to a product table).
    tables: tuple[str, ...] = ()
    views: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    procedures: tuple[str, ...] = ()


class Sync(_Model):
    """A configuration sync: the scope of `source` that replaces the same scope at `destination` (cdc sync)."""

    source: SecretStr
    destination: SecretStr
    tables: dict[str, SyncTable] = Field(default_factory=dict)
    objects: SyncObjects = Field(default_factory=SyncObjects)
    retention_days: int = Field(30, ge=1)

    @field_validator("source", "destination")
    @classmethod
    def _url(cls, v: SecretStr) -> SecretStr:
        url = _sqlalchemy_url(v.get_secret_value())
        if url.drivername not in SOURCE_SCHEMES:
            raise ValueError(f"a sync reads and writes PostgreSQL (postgresql://...), got a {shown(url.drivername)} "
                             "URL")
        if not url.database:
            raise ValueError("the URL names no database")
        return v

    @field_validator("tables", mode="before")
    @classmethod
    def _tables(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, (list, tuple)):  # a plain list of tables: every row of each
            return {t: {} for t in v}
        if isinstance(v, dict):
            for table in v:
                if not isinstance(table, str) or not TABLE_RE.match(table):
                    raise ValueError(f"{shown(table)} is not schema-qualified (write schema.table)")
                _identifier_lengths(table)
            return {t: ({} if s is None else s) for t, s in v.items()}
        raise ValueError("must be a mapping of schema.table to its scope (where:, exclude:, match_by:)")

    @property
    def source_url(self) -> URL:
        return make_url(self.source.get_secret_value()).set(drivername="postgresql+psycopg")

    @property
    def destination_url(self) -> URL:
        return make_url(self.destination.get_secret_value()).set(drivername="postgresql+psycopg")

    def retention(self) -> timedelta:
        return timedelta(days=self.retention_days)


class Pipeline(_Model):
    # `pipeline:` in the file (its first key, what every name derived from it starts with); `name` in the code.
    name: str = Field(alias="pipeline", pattern=NAME_RE, max_length=100)
    kafka: KafkaSettings
    source: SourceSettings
    hierarchies: dict[str, Hierarchy] = Field(default_factory=dict)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    # Configuration syncs between environments (cdc sync; docs/sync.md).
    syncs: dict[str, Sync] = Field(default_factory=dict)

    @field_validator("hierarchies")
    @classmethod
    def _hierarchy_names(cls, v: dict[str, Hierarchy]) -> dict[str, Hierarchy]:
        for name in v:
            if not re.match(NAME_RE, name) or len(name) > MAX_NAME_CHARS:
                raise ValueError(f"hierarchy name {shown(name)} may only hold letters, digits, '_' and '-', at most "
                                 f"{MAX_NAME_CHARS} characters (it becomes part of a topic name)")
        return v

    @field_validator("syncs")
    @classmethod
    def _sync_names(cls, v: dict[str, Sync]) -> dict[str, Sync]:
        for name in v:
            if not re.match(NAME_RE, name) or len(name) > MAX_NAME_CHARS:
                raise ValueError(f"sync name {shown(name)} may only hold letters, digits, '_' and '-', at most "
                                 f"{MAX_NAME_CHARS} characters (it becomes part of a topic name)")
        return v

    @field_validator("destinations", mode="before")
    @classmethod
    def _destination_names(cls, v: Any) -> Any:
        for name in v if isinstance(v, dict) else ():
            if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
                raise ValueError(f"destination name {shown(name)} must be a name of 1 to {MAX_NAME_CHARS} "
                                 "characters (it names the destination's dead-letter topic and consumer group)")
        return v

    @field_validator("destinations")
    @classmethod
    def _analytics_destinations(cls, v: dict[str, Destination]) -> dict[str, Destination]:
        checked = {}
        for name, dest in v.items():
            where = f"destinations.{name}"
            url = dest.sqlalchemy_url
            accepted = DESTINATION_SCHEMES[dest.kind]
            if url.drivername not in accepted:
                # Refused here, before `connectors apply` makes a connector, slot and topics for a destination
                # that `cdc run` could never write.
                backend = url.get_backend_name()
                what = backend if backend not in {s.split("+")[0] for s in accepted} else f"{url.drivername}://"
                raise _FieldError(f"{where}.url", f"{DESTINATION_DATABASES[dest.kind]}, not {shown(what)}; accepted "
                                  f"schemes: {', '.join(s + '://' for s in accepted)}")
            if url.drivername == "duckdb" and url.database in (None, "", ":memory:"):
                raise _FieldError(f"{where}.url", "names no DuckDB file (write duckdb:///path/to/file.duckdb; an "
                                  "in-memory database would lose everything when the applier stops)")
            if not dest.is_postgres_analytics:
                for field in ("read_only_role", "read_only_password"):
                    if getattr(dest, field) is not None:
                        raise _FieldError(f"{where}.{field}", "only a PostgreSQL destination of kind analytics has a "
                                          "read-only role")
                checked[name] = dest
                continue
            role = dest.read_only_role or default_read_only_role(name)
            if role == dest.sqlalchemy_url.username:
                # The role is made read-only by default: the applier itself would lose the right to write.
                raise _FieldError(f"{where}.read_only_role", f"{shown(role)} is the user of destinations.{name}.url; "
                                  "the read-only role must be another role")
            checked[name] = dest.model_copy(update={"read_only_role": role})
        return checked

    @model_validator(mode="after")
    def _hierarchies_cover_captured_tables(self) -> Pipeline:
        captured = set(self.source.tables)
        owner: dict[str, str] = {}
        for name, h in self.hierarchies.items():
            for role, table in [("root", h.root), *(("members", m) for m in h.members)]:
                where = f"hierarchies.{name}.{role}" + (f"[{shown(table)}]" if role == "members" else "")
                if not TABLE_RE.match(table):
                    raise _FieldError(where, f"{shown(table)} is not schema-qualified (write schema.table)")
                if table not in captured:
                    raise _FieldError(where, f"{shown(table)} is not in source.tables")
                if table in owner:
                    other = owner[table]
                    raise _FieldError(where, f"{shown(table)} is already in hierarchy {other!r}" if other != name
                                      else f"{shown(table)} appears twice in this hierarchy")
                owner[table] = name
        return self

    # -- derived names, one place for all of them
    def hierarchy_of(self, table: str) -> str | None:
        for name, h in self.hierarchies.items():
            if table in h.tables:
                return name
        return None

    def topic_of(self, table: str) -> str:
        hierarchy = self.hierarchy_of(table)
        return f"{self.name}.{hierarchy}" if hierarchy else f"{self.name}.{topic_safe(table)}"

    @property
    def standalone_tables(self) -> tuple[str, ...]:
        return tuple(t for t in self.source.tables if self.hierarchy_of(t) is None)

    @property
    def data_topics(self) -> list[str]:
        return [f"{self.name}.{h}" for h in self.hierarchies] + [self.topic_of(t) for t in self.standalone_tables]

    @property
    def transaction_topic(self) -> str:
        return f"{self.name}.transaction"

    @property
    def signal_topic(self) -> str:
        return f"{self.name}.signal"

    @property
    def notification_topic(self) -> str:
        """Debezium's notifications (snapshot started, completed ...), which `cdc replay --from-snapshot` waits on."""
        return f"{self.name}.notification"

    @property
    def connector_name(self) -> str:
        return f"{self.name}-source"

    @property
    def slot_name(self) -> str:
        return re.sub(r"[^a-z0-9_]", "_", self.name.lower()) + "_slot"

    @property
    def publication_name(self) -> str:
        return re.sub(r"[^a-z0-9_]", "_", self.name.lower()) + "_pub"

    def masked(self) -> dict[str, Any]:
        """The configuration as plain data with every secret masked, for printing."""
        data = self.model_dump(mode="json", by_alias=True)
        data["source"]["url"] = masked_url(self.source.sqlalchemy_url)
        for name, dest in self.destinations.items():
            data["destinations"][name]["url"] = masked_url(dest.sqlalchemy_url)
        for name, sync in self.syncs.items():
            data["syncs"][name]["source"] = masked_url(sync.source_url)
            data["syncs"][name]["destination"] = masked_url(sync.destination_url)
        return data

    def sync(self, name: str) -> Sync:
        """The sync named `name`, or a ConfigError listing the known ones."""
        if name not in self.syncs:
            raise ConfigError(f"syncs: no sync named {shown(name)} (known: {', '.join(self.syncs) or 'none'})")
        return self.syncs[name]


class _FieldError(ValueError):
    """A cross-field problem found after the fields parsed, with the path it belongs to."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


# ---------------------------------------------------------------------------------------------------------------
# loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML silently keeps the last of two equal keys; a pipeline file with one is a mistake to report."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _interpolate(value: Any, path: str, env: dict[str, str], source: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), env, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env, source) for i, v in enumerate(value)]
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{source}: {cut(path)}: environment variable {cut(name)} is not set "
                              f"(write ${{{cut(name)}:-default}} for a default)")
        return _ENV_RE.sub(replace, value)
    return value


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif "." in str(item):
            parts.append(f"[{shown(str(item))}]")
        else:
            parts.append(("." if parts else "") + cut(str(item)))
    return "".join(parts) or "(top level)"


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known setting"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    if kind not in ("value_error",) and "input" in error and not isinstance(error["input"], (dict, list)):
        message += f" (got {shown(error['input'])})"
    return message


def parse(data: Any, source: str = DEFAULT_FILE, env: dict[str, str] | None = None) -> Pipeline:
    """Validate already-loaded YAML data; `source` names the file in messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the file must be a mapping of settings (pipeline:, kafka:, source:, ...), "
                          f"not {type(data).__name__}")
    data = _interpolate(data, "", dict(os.environ) if env is None else env, source)
    return validated(Pipeline, data, source)


ModelT = TypeVar("ModelT", bound=BaseModel)


def validated(model: type[ModelT], data: dict[str, Any], source: str) -> ModelT:
    """`data` validated as `model`, or one ConfigError with a line per problem naming the file and the field (the
    pipeline file's and the topology file's models alike)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            ctx_error = error.get("ctx", {}).get("error")
            if isinstance(ctx_error, _FieldError):
                line = f"{source}: {ctx_error.path}: {ctx_error.message}"
            else:
                line = f"{source}: {_field_path(error['loc'])}: {_describe(error)}"
            # The one place every configuration error passes: whatever a message quotes, it stays readable.
            lines.append(cut(line, MAX_ERROR_LINE))
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def load(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Pipeline:
    """Read and validate a pipeline file (default: $CDC_CONFIG, else ./pipeline.yaml)."""
    environ = dict(os.environ) if env is None else env
    file = Path(path or environ.get("CDC_CONFIG") or DEFAULT_FILE)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{file}: file not found (name one with -c/--config or $CDC_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}{where}: invalid YAML: {cut(problem, MAX_ERROR_LINE)}") from None
    return parse(data, str(file), environ)
