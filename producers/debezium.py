"""The Debezium PostgreSQL connector configuration generated from the pipeline file (pure: no I/O).

Routing of a hierarchy into one topic keyed by the root id uses Debezium's and Kafka Connect's own settings and
transforms (and two of ours, step 4), applied in this order to each record:

1. `message.key.columns` makes a member's key its root-id column (the root keeps its primary key).
2. `ReplaceField$Key` renames a member's key field to the root's primary-key column name.
3. `Cast$Key` widens the key to int64 when the root and a member hold the id in integers of different widths.
4. `DropKeyDefaults` (the project's own transform, on every hierarchy) removes the DDL default Debezium gives a key
   field from a member's root-id column: the root's key has none, and a NULL root id would be keyed as the default.
   `OptionalFields$Key` (ours too, only where a member's root-id column is nullable) makes the key field optional
   for every table of the hierarchy: a member row whose root id is NULL is keyed by a null root id, and the root's
   key must have the same (optional) schema as the members'.
5. `SetSchemaMetadata$Key` gives every key of the hierarchy one schema name, so that the root's and the members'
   keys have one Avro schema, one registry id, and therefore identical bytes: the default partitioner hashes
   those bytes, and only identical bytes put one root's changes in one partition.
6. `RegexRouter` renames the tables' topics to `<pipeline>.<hierarchy>`.

Steps 2-5 carry a `TopicNameMatches` predicate on the table's original topic. Every pattern is anchored (`^...$`):
Connect's RegexRouter tests with `matches()` but rewrites with `replaceFirst()`, so an unanchored alternative
for `public.film` would rewrite the start of `public.film_actor` and leave `_actor` behind (a topic nobody reads).
`routed_topic` replays these rules in Python, so `cdc connectors apply` checks every table's route before it
changes anything.

Records of the signalling table are dropped with `Filter`: Debezium reads its signals from the WAL itself and
nobody consumes them from Kafka.

Every record's value then goes through `DropOptionalDefaults$Value` (the project's own transform): Debezium puts a
column's DDL default into its field's schema, and Connect's `Struct.get`, which the Avro converter reads every field
with, returns that default where the value is null (KAFKA-8713): an explicit NULL in a nullable column with a default
would reach Kafka as the default. Apicurio 2.6's converter has no setting against it (its AvroData never sets
`ignoreDefaultForNullables`), nor does Debezium; the transform removes optional fields' defaults from the schema.
"""

from __future__ import annotations

import re

from cdc.config import Pipeline, topic_safe
from cdc.errors import ConfigError
from cdc.source_tables import TableShape

AVRO_CONVERTER = "io.apicurio.registry.utils.converter.AvroConverter"
RECORD_ID_STRATEGY = "io.apicurio.registry.serde.avro.strategy.RecordIdStrategy"
TOPIC_NAME_MATCHES = "org.apache.kafka.connect.transforms.predicates.TopicNameMatches"
# The project's own transforms (infra/transforms): Connect's own transforms all keep a field's optionality...
OPTIONAL_FIELDS = "cdc.transforms.OptionalFields$Key"
# ... and the one on every record: keeps an explicit NULL a NULL where the column has a default (see above).
DROP_OPTIONAL_DEFAULTS = "cdc.transforms.DropOptionalDefaults$Value"
# ... and on a hierarchy's keys: no field defaults, so root and members keep one key schema (see connector_config).
DROP_KEY_DEFAULTS = "cdc.transforms.DropKeyDefaults"
# The prefix of the logical decoding message each heartbeat writes (heartbeat.action.query).
HEARTBEAT_PREFIX = "cdc-heartbeat"
INTEGER_TYPES = {"smallint": 16, "integer": 32, "bigint": 64}
# Settings whose values are secrets: masked whenever a configuration is printed, and given to Connect as references.
SECRET_KEYS = ("database.password",)
# The alias of Kafka's DirectoryConfigProvider in the worker's configuration
# (infra/templates/connect-worker.properties): `${dir:<directory>:<file>}` is replaced by the file's content when
# Connect hands the configuration to the connector, so Connect's config topic and its REST API hold the reference,
# never the password. A directory of one file per secret, not a properties file: a password is stored as it is,
# with no escaping to get wrong.
SECRETS_PROVIDER = "dir"


def avro_name(name: str) -> str:
    """A column name as Debezium's `avro` name adjustment writes it into Connect and Avro schemas."""
    out = []
    for i, ch in enumerate(name):
        valid = ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or (i > 0 and "0" <= ch <= "9")
        out.append(ch if valid else "_")
    return "".join(out)


def table_regex(table: str) -> str:
    """A table name as a Java regex matching only itself. Some Debezium lists refuse white space even escaped,
    so a space is written as \\x20."""
    return re.escape(table).replace("\\ ", "\\x20")


def registry_native_url(ccompat_url: str) -> str:
    """Apicurio's converter speaks the registry's own v2 API; consumers use the Confluent-compatible one."""
    base = re.sub(r"/apis/ccompat/v\d+/?$", "", ccompat_url.rstrip("/"))
    return f"{base}/apis/registry/v2"


def _avro_converter(prefix: str, registry: str, *, per_record: bool) -> dict[str, str]:
    # Confluent framing (magic byte + 4-byte content id in the payload, no headers), so that any
    # Confluent-compatible consumer, ours included, decodes by fetching /schemas/ids/{id}.
    config = {
        prefix: AVRO_CONVERTER,
        f"{prefix}.apicurio.registry.url": registry,
        f"{prefix}.apicurio.registry.auto-register": "true",
        f"{prefix}.apicurio.registry.find-latest": "true",
        f"{prefix}.apicurio.registry.headers.enabled": "false",
        f"{prefix}.apicurio.registry.as-confluent": "true",
        f"{prefix}.apicurio.registry.use-id": "contentId",
    }
    if per_record:
        # Several tables share a hierarchy topic: one subject per record type, not one per topic.
        config[f"{prefix}.apicurio.registry.artifact-resolver-strategy"] = RECORD_ID_STRATEGY
    return config


def _topic_pattern(prefix: str, tables: list[str]) -> str:
    # Anchored: RegexRouter rewrites with replaceFirst(), which would otherwise rewrite a prefix of a longer name.
    names = "|".join(re.escape(topic_safe(t)) for t in tables)
    return f"^{re.escape(prefix)}\\.(?:{names})$"


def routed_topic(config: dict[str, str], table: str) -> str:
    """The topic a change of `table` ends in, replaying the connector's RegexRouter transforms as Connect runs them
    (`matches()` on the whole name, then `replaceFirst()`); dropped records give ''."""
    topic = f"{config['topic.prefix']}.{topic_safe(table)}"
    for name in config.get("transforms", "").split(","):
        kind = config.get(f"transforms.{name}.type", "")
        predicate = config.get(f"transforms.{name}.predicate")
        if predicate and not re.fullmatch(config[f"predicates.{predicate}.pattern"], topic):
            continue
        if kind.endswith(".Filter"):
            return ""
        if kind.endswith(".RegexRouter"):
            regex = config[f"transforms.{name}.regex"]
            if re.fullmatch(regex, topic):
                replacement = config[f"transforms.{name}.replacement"]
                # Taken as it is: re.sub reads backslashes in a replacement string, so they are doubled.
                topic = re.sub(regex, replacement.replace("\\", "\\\\"), topic, count=1)
    return topic


def hierarchy_keys(pipeline: Pipeline, tables: dict[str, TableShape]) -> dict[str, tuple[str, str | None, bool]]:
    """For each hierarchy: the root's key column, the Connect type to cast keys to (None: no cast needed), and
    whether the key field must be made optional (a member's root-id column is nullable).

    Raises ConfigError, naming the field, for anything that would break "one key schema per hierarchy".
    """
    keys: dict[str, tuple[str, str | None, bool]] = {}
    nullable: set[str] = set()
    for name, h in pipeline.hierarchies.items():
        root = tables[h.root]
        if len(root.primary_key) != 1:
            what = "has no primary key" if not root.primary_key else f"has a composite primary key {root.primary_key}"
            raise ConfigError(f"hierarchies.{name}.root: {h.root!r} {what}; a hierarchy root needs a "
                              "single-column primary key (its root id)")
        root_col = root.column(root.primary_key[0])
        types = {root_col.type_name}
        for member, column in h.members.items():
            where = f"hierarchies.{name}.members[{member!r}]"
            info = tables[member]
            col = info.column(column) if info.has_column(column) else None
            if col is None:
                raise ConfigError(f"{where}: {member!r} has no column {column!r} "
                                  f"(its columns: {', '.join(info.column_names)})")
            if col.nullable:
                nullable.add(name)
            if not info.primary_key:
                raise ConfigError(f"{where}: {member!r} has no primary key; the applier needs one to identify rows")
            types.add(col.type_name)
        cast = None
        if len(types) > 1:
            if all(t in INTEGER_TYPES for t in types):
                cast = "int64"
            else:
                raise ConfigError(f"hierarchies.{name}: the root id is {root_col.type_name} in {h.root!r} but the "
                                  f"members hold it as {', '.join(sorted(types - {root_col.type_name}))}; "
                                  "they must have one type")
        keys[name] = (root_col.name, cast, name in nullable)
    for table, info in tables.items():
        adjusted: dict[str, str] = {}
        for column in info.column_names:
            other = adjusted.setdefault(avro_name(column), column)
            if other != column:
                raise ConfigError(f"source.tables: {table!r}: columns {other!r} and {column!r} both become "
                                  f"{avro_name(column)!r} in Avro, which allows only letters, digits and '_'")
    for table in pipeline.source.tables:
        listed = [parent for parent in tables[table].partition_of if parent in tables]
        if listed:
            raise ConfigError(f"source.tables: {table!r} is a partition of {listed[0]!r}, which is listed too; a "
                              "partitioned table is captured whole through its parent (the publication publishes "
                              "its partitions' changes under the parent's name), so list only the parent")
    return keys


def full_identity_tables(pipeline: Pipeline, tables: dict[str, TableShape]) -> list[str]:
    """The tables whose changes need their whole old row (REPLICA IDENTITY FULL)."""
    # Without the root id in a delete's before image, a member's delete would have no key; a table without a primary
    # key is told apart by its whole old row, which the applier matches one row by (Dialect.apply_keyless).
    members = [m for h in pipeline.hierarchies.values() for m in h.members]
    return members + [t for t in pipeline.standalone_tables if not tables[t].primary_key]


def secret_values(pipeline: Pipeline) -> dict[str, str]:
    """The connector's secret settings and their values (written to files, never into the configuration)."""
    password = pipeline.source.sqlalchemy_url.password
    return {"database.password": password} if password else {}


def secret_reference(directory: str, key: str) -> str:
    """The config-provider reference Connect resolves to the content of `<directory>/<key>`."""
    # Connect's variable syntax is `${provider:path:key}`, with no escaping: a path holding ':' or '}' cannot be named.
    if ":" in directory or "}" in directory or "{" in directory:
        raise ConfigError(f"the connector secrets directory {directory!r} holds ':', '{{' or '}}', which a Kafka "
                          "Connect config reference cannot name; choose another state directory (CDC_HOME)")
    return f"${{{SECRETS_PROVIDER}:{directory}:{key}}}"


def connector_config(pipeline: Pipeline, tables: dict[str, TableShape], secrets: str | None = None) -> dict[str, str]:
    """The complete connector configuration, as Kafka Connect stores it (every value a string).

    With `secrets` (the directory `cdc connectors apply` writes `secret_values` to, one file each), every secret is
    a reference to its file; without it (pure tests), the values themselves."""
    keys = hierarchy_keys(pipeline, tables)
    url = pipeline.source.sqlalchemy_url
    prefix = pipeline.name
    registry = registry_native_url(pipeline.kafka.schema_registry_url)
    captured = [*pipeline.source.tables, pipeline.source.signal_table]
    config: dict[str, str] = {
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "database.hostname": url.host or "localhost",
        "database.port": str(url.port or 5432),
        "database.user": url.username or "",
        "database.password": url.password or "",  # replaced by its reference below when `secrets` is given
        "database.dbname": url.database or "",
        "topic.prefix": prefix,
        "plugin.name": "pgoutput",
        "slot.name": pipeline.slot_name,
        "publication.name": pipeline.publication_name,
        # `cdc connectors apply` keeps the publication naming exactly the captured tables (a publication FOR ALL
        # TABLES needs a superuser); Debezium only uses it.
        "publication.autocreate.mode": "disabled",
        "table.include.list": ",".join(table_regex(t) for t in captured),
        "snapshot.mode": pipeline.source.snapshot_mode,
        "provide.transaction.metadata": "true",
        "heartbeat.interval.ms": str(pipeline.source.heartbeat_ms),
        # A heartbeat moves the slot only past WAL of the captured database that Debezium was sent. While the
        # captured database is idle and others fill the WAL, nothing is sent; so each heartbeat writes a logical
        # decoding message into it: non-transactional (no BEGIN/END records, which appliers would count as lag),
        # and dropped by its prefix (no `<pipeline>.message` topic).
        "heartbeat.action.query": f"select pg_logical_emit_message(false, '{HEARTBEAT_PREFIX}', '')",
        "message.prefix.exclude.list": HEARTBEAT_PREFIX,
        # Debezium skips truncates by default ("t"): a destination would keep rows the source no longer has.
        "skipped.operations": "none",
        # Debezium waits this long for more changes before handing a batch to Connect (default 500 ms): a large
        # part of end-to-end latency at modest rates.
        "poll.interval.ms": "50",
        # Hierarchy topics are keyed by root id, not by row: a tombstone would mean nothing there.
        "tombstones.on.delete": "false",
        "decimal.handling.mode": "precise",
        # Types Debezium has no converter for (composite types, multiranges, tsquery, line, lseg, box, path, polygon,
        # circle, arrays of domains) are otherwise left out of every event: with this they arrive as the bytes of
        # PostgreSQL's text of the value, which the destinations read back (docs/types.md).
        "include.unknown.datatypes": "true",
        # Intervals as ISO-8601 text ('P1Y2M3DT4H5M6.789S'), exact: the default (numeric, microseconds) counts a
        # month as 30.4375 days, so '1 mon' would reach a destination as '30 days 10:30:00'.
        "interval.handling.mode": "string",
        # Debezium 3 otherwise adds four `__debezium.context.*` headers (about 150 bytes) to every record: more
        # than half the size of a small change, read and parsed per message by every consumer, and used by none.
        "extended.headers.enabled": "false",
        # Avro names allow [A-Za-z0-9_] only: Debezium writes any other character as "_", and the applier maps
        # the names back to the real columns it reflected (`cdc connectors apply` refuses names that collide).
        "field.name.adjustment.mode": "avro",
        "schema.name.adjustment.mode": "avro",
        "time.precision.mode": "adaptive_time_microseconds",
        "signal.enabled.channels": "source,kafka",
        "signal.data.collection": pipeline.source.signal_table,
        "signal.kafka.topic": pipeline.signal_topic,
        "signal.kafka.bootstrap.servers": pipeline.kafka.bootstrap_servers,
        "signal.kafka.groupId": f"{prefix}-signal",
        # Notifications on a topic: how `cdc replay --from-snapshot` learns that the snapshot it asked for is done.
        "notification.enabled.channels": "sink",
        "notification.sink.topic.name": pipeline.notification_topic,
        "topic.creation.default.replication.factor": str(pipeline.topics.replication_factor),
        "topic.creation.default.partitions": "1",
        **_avro_converter("key.converter", registry, per_record=False),
        **_avro_converter("value.converter", registry, per_record=True),
    }
    members = [(m, col) for h in pipeline.hierarchies.values() for m, col in h.members.items()]
    key_columns = [f"{table_regex(h.root)}:{tables[h.root].primary_key[0]}" for h in pipeline.hierarchies.values()]
    key_columns += [f"{table_regex(m)}:{col}" for m, col in members]
    if key_columns:
        config["message.key.columns"] = ";".join(key_columns)
    full = full_identity_tables(pipeline, tables)
    if full:
        config["replica.identity.autoset.values"] = ",".join(f"{table_regex(t)}:FULL" for t in full)

    transforms: list[str] = ["dropsignals"]
    config["transforms.dropsignals.type"] = "org.apache.kafka.connect.transforms.Filter"
    config["transforms.dropsignals.predicate"] = "signals"
    config["predicates.signals.type"] = TOPIC_NAME_MATCHES
    config["predicates.signals.pattern"] = _topic_pattern(prefix, [pipeline.source.signal_table])
    predicates = ["signals"]
    # No predicate: a column with a default may be added to any table later, and a schema without optional
    # defaults (heartbeats, transaction metadata) passes through unchanged.
    transforms.append("nulls")
    config["transforms.nulls.type"] = DROP_OPTIONAL_DEFAULTS
    for i, (name, h) in enumerate(pipeline.hierarchies.items()):
        key_col, cast, optional = keys[name]
        for j, (member, column) in enumerate(h.members.items()):
            if column == key_col:
                continue
            t, p = f"h{i}rename{j}", f"h{i}m{j}"
            transforms.append(t)
            predicates.append(p)
            config[f"transforms.{t}.type"] = "org.apache.kafka.connect.transforms.ReplaceField$Key"
            config[f"transforms.{t}.renames"] = f"{avro_name(column)}:{avro_name(key_col)}"
            config[f"transforms.{t}.predicate"] = p
            config[f"predicates.{p}.type"] = TOPIC_NAME_MATCHES
            config[f"predicates.{p}.pattern"] = _topic_pattern(prefix, [member])
        pattern = _topic_pattern(prefix, list(h.tables))
        config[f"predicates.h{i}.type"] = TOPIC_NAME_MATCHES
        config[f"predicates.h{i}.pattern"] = pattern
        predicates.append(f"h{i}")
        if cast:
            transforms.append(f"h{i}cast")
            config[f"transforms.h{i}cast.type"] = "org.apache.kafka.connect.transforms.Cast$Key"
            config[f"transforms.h{i}cast.spec"] = f"{avro_name(key_col)}:{cast}"
            config[f"transforms.h{i}cast.predicate"] = f"h{i}"
        # Debezium gives a key field its column's DDL default; the root's key has none: without this, a member
        # whose root-id column has a default would have another key schema (other key bytes for one root id), and
        # its NULL root ids would be keyed as the default.
        transforms.append(f"h{i}nodefaults")
        config[f"transforms.h{i}nodefaults.type"] = DROP_KEY_DEFAULTS
        config[f"transforms.h{i}nodefaults.predicate"] = f"h{i}"
        if optional:
            # A member's root id may be NULL, so its key field is optional: the root's must be too, or the two
            # would be different key schemas (different registry ids, different key bytes for one root id).
            transforms.append(f"h{i}optional")
            config[f"transforms.h{i}optional.type"] = OPTIONAL_FIELDS
            config[f"transforms.h{i}optional.fields"] = avro_name(key_col)
            config[f"transforms.h{i}optional.predicate"] = f"h{i}"
        transforms.append(f"h{i}key")
        config[f"transforms.h{i}key.type"] = "org.apache.kafka.connect.transforms.SetSchemaMetadata$Key"
        config[f"transforms.h{i}key.schema.name"] = f"{topic_safe(prefix)}.{name}.Key"
        config[f"transforms.h{i}key.predicate"] = f"h{i}"
        transforms.append(f"h{i}route")
        config[f"transforms.h{i}route.type"] = "org.apache.kafka.connect.transforms.RegexRouter"
        config[f"transforms.h{i}route.regex"] = pattern
        config[f"transforms.h{i}route.replacement"] = f"{prefix}.{name}"
    config["transforms"] = ",".join(transforms)
    config["predicates"] = ",".join(predicates)
    if secrets is not None:
        for key in secret_values(pipeline):
            config[key] = secret_reference(secrets, key)
    return config


def is_reference(value: str) -> bool:
    return value.startswith("${") and value.endswith("}")


def masked(config: dict[str, str]) -> dict[str, str]:
    """The configuration for printing: secrets masked, references to them shown (they hold no secret)."""
    return {k: ("********" if k in SECRET_KEYS and v and not is_reference(v) else v) for k, v in config.items()}
