"""The pipeline file: valid files load into typed config, and each kind of mistake gets its exact message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cdc import config
from cdc.errors import ConfigError
from tests.unit.samples import PIPELINE_ENV as ENV
from tests.unit.samples import PIPELINE_YAML as VALID

# A PostgreSQL analytics destination, appended to VALID's destinations.
PG_ANALYTICS = "  warehouse:\n    kind: analytics\n    url: postgresql://loader@localhost:5432/warehouse\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def edit(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new)


def test_a_valid_file_loads_with_secrets_interpolated_and_masked(tmp_path):
    p = config.load(write(tmp_path, VALID), env=ENV)
    assert p.source.sqlalchemy_url.password == "s3cret"
    assert "s3cret" not in repr(p) and "s3cret" not in str(p.masked())
    assert p.masked()["source"]["url"] == "postgresql://cdc:***@localhost:5432/district"
    assert p.topic_of("public.attendance") == "district.person"
    assert p.topic_of("public.school") == "district.public.school"
    assert p.data_topics == ["district.person", "district.public.school"]
    assert p.topics.partitions == 6 and p.topics.retention_ms == -1
    assert p.connector_name == "district-source" and p.slot_name == "district_slot"


def test_environment_defaults_apply(tmp_path):
    p = config.load(write(tmp_path, edit("${DB_PASSWORD}", "${DB_PASSWORD:-fallback}")), env={})
    assert p.source.sqlalchemy_url.password == "fallback"


def test_a_postgres_analytics_destination_gets_a_read_only_role(tmp_path):
    text = VALID + PG_ANALYTICS + "  Sales Mart:\n    kind: analytics\n    url: postgresql://loader@localhost/mart\n" \
        "    read_only_role: analysts\n    read_only_password: ${READER_PASSWORD}\n"
    p = config.load(write(tmp_path, text), env={**ENV, "READER_PASSWORD": "r3ader"})
    assert p.destinations["warehouse"].read_only_role == "cdc_reader_warehouse"
    assert p.destinations["warehouse"].read_only_password is None
    mart = p.destinations["Sales Mart"]
    assert mart.read_only_role == "analysts" and mart.read_only_password.get_secret_value() == "r3ader"
    assert "r3ader" not in str(p.masked()) and "r3ader" not in repr(p)
    assert config.default_read_only_role("Sales Mart-2") == "cdc_reader_sales_mart_2"
    assert len(config.default_read_only_role("x" * 100)) == 63
    # Not for DuckDB replicas nor PostgreSQL replicas; an empty password (an unset `${VAR:-}`) means none.
    assert p.destinations["analytics"].read_only_role is None and p.destinations["state"].read_only_role is None
    unset = config.load(write(tmp_path, VALID + PG_ANALYTICS + "    read_only_password: ${NOPE:-}\n"), env=ENV)
    assert unset.destinations["warehouse"].read_only_password is None


def test_config_path_comes_from_the_environment(tmp_path, monkeypatch):
    path = write(tmp_path, VALID)
    assert config.load(None, env={**ENV, "CDC_CONFIG": str(path)}).name == "district"


F = "pipeline.yaml"
MALFORMED = [
    ("unknown top-level key", edit("pipeline: district", "pipeline: district\npipelin: x"),
     f"{F}: pipelin: is not a known setting"),
    ("missing pipeline name", edit("pipeline: district\n", ""), f"{F}: pipeline: is required"),
    ("pipeline name with a space", edit("pipeline: district", "pipeline: my district"),
     f"{F}: pipeline: String should match pattern"),
    ("missing bootstrap servers", edit("  bootstrap_servers: localhost:9092\n", ""),
     f"{F}: kafka.bootstrap_servers: is required"),
    ("bootstrap server without port", edit("bootstrap_servers: localhost:9092", "bootstrap_servers: localhost"),
     f"{F}: kafka.bootstrap_servers: each server must be host:port, got 'localhost'"),
    ("unknown kafka key", edit("  connect_url:", "  conect: x\n  connect_url:"),
     f"{F}: kafka.conect: is not a known setting"),
    ("registry URL without scheme", edit("http://localhost:8081/apis", "localhost:8081/apis"),
     f"{F}: kafka.schema_registry_url: schema_registry_url must be an http:// or https:// URL"),
    ("connect URL with a wrong scheme", edit("connect_url: http://localhost:8083", "connect_url: ftp://localhost:8083"),
     f"{F}: kafka.connect_url: connect_url must be an http:// or https:// URL, got 'ftp://localhost:8083'"),
    ("source URL that is no URL",
     edit("url: postgresql://cdc:${DB_PASSWORD}@localhost:5432/district", "url: not a url"),
     f"{F}: source.url: not a database URL"),
    ("source that is not PostgreSQL", edit("url: postgresql://cdc:${DB_PASSWORD}@localhost:5432/district",
                                           "url: mysql://cdc@localhost/district"),
     f"{F}: source.url: the source must be PostgreSQL (postgresql://...), got a 'mysql' URL"),
    ("source URL without database", edit("@localhost:5432/district", "@localhost:5432"),
     f"{F}: source.url: the source URL names no database"),
    ("no tables", edit("tables: [public.school, public.person, public.enrollment, public.attendance]", "tables: []"),
     f"{F}: source.tables: lists no tables; name at least one schema.table to capture"),
    ("table without schema", edit("[public.school,", "[school,"),
     f"{F}: source.tables: 'school' is not schema-qualified (write it as schema.table, e.g. public.school)"),
    ("table listed twice", edit("[public.school,", "[public.school, public.school,"),
     f"{F}: source.tables: 'public.school' is listed twice"),
    ("tables not a list", edit("tables: [public.school, public.person, public.enrollment, public.attendance]",
                               "tables: 7"), f"{F}: source.tables: must be a list of schema.table names, got 7"),
    ("root not captured", edit("root: public.person", "root: public.people"),
     f"{F}: hierarchies.person.root: 'public.people' is not in source.tables"),
    ("member not captured", edit("public.enrollment: person_id", "public.enrolment: person_id"),
     f"{F}: hierarchies.person.members['public.enrolment']: 'public.enrolment' is not in source.tables"),
    ("member without root-id column", edit("public.enrollment: person_id", "public.enrollment:"),
     f"{F}: hierarchies.person.members: member 'public.enrollment' names no root-id column"),
    ("members as a list", edit("      public.enrollment: person_id\n      public.attendance: person_id",
                               "      - public.enrollment\n      - public.attendance"),
     f"{F}: hierarchies.person.members: members must be a mapping of member table to its root-id column"),
    ("table in two hierarchies", VALID.replace("destinations:", "  school:\n    root: public.school\n    members:\n"
                                                                 "      public.enrollment: school_id\ndestinations:"),
     f"{F}: hierarchies.school.members['public.enrollment']: 'public.enrollment' is already in hierarchy 'person'"),
    ("root as its own member",
     edit("public.attendance: person_id", "public.attendance: person_id\n      public.person: id"),
     f"{F}: hierarchies.person.members['public.person']: 'public.person' appears twice in this hierarchy"),
    ("hierarchy name unfit for a topic", edit("  person:\n    root", "  per son:\n    root"),
     f"{F}: hierarchies: hierarchy name 'per son' may only hold letters, digits"),
    ("zero partitions", VALID + "topics:\n  partitions: 0\n",
     f"{F}: topics.partitions: Input should be greater than or equal to 1 (got 0)"),
    ("partitions as words", VALID + "topics:\n  partitions: six\n",
     f"{F}: topics.partitions: Input should be a valid integer, unable to parse string as an integer (got 'six')"),
    ("unknown destination kind", edit("kind: analytics", "kind: warehouse"),
     f"{F}: destinations.analytics.kind: Input should be 'replica' or 'analytics' (got 'warehouse')"),
    ("destination URL that is no URL", edit("url: duckdb:///analytics.duckdb", "url: analytics file"),
     f"{F}: destinations.analytics.url: not a database URL"),
    ("unset environment variable", edit("${DB_PASSWORD}", "${NO_SUCH_VARIABLE}"),
     f"{F}: source.url: environment variable NO_SUCH_VARIABLE is not set"),
    ("duplicate key", edit("pipeline: district", "pipeline: district\npipeline: other"),
     f"{F}:2:1: invalid YAML: duplicate key 'pipeline'"),
    ("broken YAML", edit("  connect_url: http://localhost:8083", "  connect_url: [http://localhost:8083"),
     f"{F}:"),
    ("a list instead of a mapping", "- pipeline: district\n",
     f"{F}: the file must be a mapping of settings (pipeline:, kafka:, source:, ...), not list"),
    ("table name with a double quote", edit("[public.school,", '[\'public.my"table\', public.school,'),
     f"{F}: source.tables: 'public.my\"table': table names holding a double quote cannot be captured by Debezium"),
    ("signal table captured", edit("tables: [public.school,", "signal_table: public.school\n  tables: [public.school,"),
     f"{F}: source.tables: 'public.school' is the signalling table (source.signal_table)"),
    ("read-only role in capitals", VALID + PG_ANALYTICS + "    read_only_role: Analysts\n",
     f"{F}: destinations.warehouse.read_only_role: 'Analysts' is not a usable role name (lower-case letters"),
    ("read-only role reserved by PostgreSQL", VALID + PG_ANALYTICS + "    read_only_role: pg_reader\n",
     f"{F}: destinations.warehouse.read_only_role: 'pg_reader' is not a usable role name"),
    ("read-only role that is a reserved word", VALID + PG_ANALYTICS + "    read_only_role: public\n",
     f"{F}: destinations.warehouse.read_only_role: 'public' is not a usable role name"),
    ("read-only role too long", VALID + PG_ANALYTICS + f"    read_only_role: {'r' * 64}\n",
     f"{F}: destinations.warehouse.read_only_role: '{'r' * 64}' is not a usable role name"),
    ("read-only role as a number", VALID + PG_ANALYTICS + "    read_only_role: 7\n",
     f"{F}: destinations.warehouse.read_only_role: Input should be a valid string (got 7)"),
    ("read-only role that is the applier's user", VALID + PG_ANALYTICS + "    read_only_role: loader\n",
     f"{F}: destinations.warehouse.read_only_role: 'loader' is the user of destinations.warehouse.url"),
    ("read-only role on a DuckDB replica", edit("url: duckdb:///analytics.duckdb",
                                                "url: duckdb:///analytics.duckdb\n    read_only_role: reader"),
     f"{F}: destinations.analytics.read_only_role: only a PostgreSQL destination of kind analytics has a "
     "read-only role"),
    ("read-only password on a replica", edit("url: postgresql://cdc@localhost:5432/state",
                                             "url: postgresql://cdc@localhost:5432/state\n    read_only_password: x"),
     f"{F}: destinations.state.read_only_password: only a PostgreSQL destination of kind analytics has a "
     "read-only role"),
    ("analytics on MariaDB", VALID.replace("duckdb:///analytics.duckdb", "mysql://cdc@localhost/analytics"),
     f"{F}: destinations.analytics.url: an analytics destination is DuckDB or PostgreSQL, not 'mysql'"),
]


@pytest.mark.parametrize("text, message", [(t, m) for _, t, m in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_files_are_refused_naming_file_field_and_problem(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / F).write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(F, env=ENV)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.exit_code == 2


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: file not found"):
        config.load(tmp_path / "nowhere.yaml", env={})


def test_broken_yaml_points_at_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / F).write_text(edit("  connect_url: http://localhost:8083", "  connect_url: [http://localhost:8083"))
    with pytest.raises(ConfigError, match=r"^pipeline\.yaml:\d+:\d+: invalid YAML"):
        config.load(F, env=ENV)


def test_all_mistakes_of_a_file_are_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / F).write_text(edit("pipeline: district", "pipeline: my district\nextra: 1"))
    with pytest.raises(ConfigError) as info:
        config.load(F, env=ENV)
    assert len(str(info.value).splitlines()) == 2
