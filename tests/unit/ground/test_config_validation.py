"""Destination kinds and URL schemes are checked when the pipeline file loads, and every value a configuration error
quotes is cut to a readable length (issue 15, item 5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdc import config
from cdc.errors import ConfigError
from tests.unit.samples import PIPELINE_ENV as ENV
from tests.unit.samples import PIPELINE_YAML as VALID

CDC = str(Path(sys.executable).parent / "cdc")


def data() -> dict:
    return yaml.safe_load(VALID)


def refusal(d: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(d, "pipeline.yaml", env=ENV)
    return str(info.value)


@pytest.mark.parametrize("kind, url, named", [
    ("replica", "mongodb://user:pw@db.example/prod", "'mongodb'"),
    ("replica", "sqlite://", "'sqlite'"),
    ("replica", "sqlite:///replica.db", "'sqlite'"),
    ("replica", "oracle://scott@db/orcl", "'oracle'"),
    # PostgreSQL, but through a driver the project does not install.
    ("replica", "postgresql+asyncpg://cdc@localhost/state", "'postgresql+asyncpg://'"),
    ("replica", "mysql+mysqldb://cdc@localhost/state", "'mysql+mysqldb://'"),
    ("analytics", "mysql+pymysql://cdc@localhost/analytics", "'mysql'"),
    ("analytics", "sqlite:///lake.db", "'sqlite'"),
])
def test_a_destination_the_project_cannot_write_is_refused_naming_field_and_schemes(kind, url, named):
    d = data()
    d["destinations"]["state"] = {"kind": kind, "url": url}
    message = refusal(d)
    assert message.startswith("pipeline.yaml: destinations.state.url: "), message
    assert f"not {named}; accepted schemes: " in message
    for scheme in config.DESTINATION_SCHEMES[kind]:
        assert f"{scheme}://" in message
    assert "pw@" not in message  # the URL's password is never quoted


@pytest.mark.parametrize("kind, url", [
    ("replica", "postgresql://cdc@localhost:5432/state"),
    ("replica", "postgresql+psycopg://cdc@localhost:5432/state"),
    ("replica", "mysql+pymysql://cdc@127.0.0.1:3307/state"),
    ("replica", "mariadb://cdc@127.0.0.1:3307/state"),
    ("analytics", "duckdb:///lake.duckdb"),
    ("analytics", "postgresql://loader@localhost/warehouse"),
])
def test_every_supported_scheme_loads(kind, url):
    d = data()
    d["destinations"] = {"d": {"kind": kind, "url": url}}
    assert config.parse(d, env=ENV).destinations["d"].sqlalchemy_url.drivername == url.split(":")[0]


@pytest.mark.parametrize("url", ["duckdb://", "duckdb:///:memory:"])
def test_an_in_memory_duckdb_destination_is_refused(url):
    d = data()
    d["destinations"]["analytics"]["url"] = url
    assert refusal(d).startswith("pipeline.yaml: destinations.analytics.url: names no DuckDB file")


def test_an_unparseable_destination_url_is_refused_without_quoting_it():
    d = data()
    d["destinations"]["state"]["url"] = "not a url, password hunter2"
    message = refusal(d)
    assert message.startswith("pipeline.yaml: destinations.state.url: not a database URL")
    assert "hunter2" not in message


def test_a_source_through_another_driver_is_refused():
    d = data()
    d["source"]["url"] = "postgresql+asyncpg://cdc@localhost/district"
    message = refusal(d)
    assert message.startswith("pipeline.yaml: source.url: the source must be PostgreSQL")
    assert "accepted schemes: postgresql://, postgresql+psycopg://" in message


def test_a_10_mb_pipeline_name_is_cut_in_the_error():
    d = data()
    d["pipeline"] = "p" * 10_000_000
    message = refusal(d)
    assert len(message) < 400, len(message)
    assert message.startswith("pipeline.yaml: pipeline: String should have at most 100 characters")
    assert "'" + "p" * config.SHOWN_CHARS + "'\u2026 (10,000,000 characters)" in message


@pytest.mark.parametrize("where", ["hierarchy name", "destination name", "table", "member", "env path",
                                   "duplicate key", "bootstrap server", "registry url", "role"])
def test_every_quoted_value_is_cut(where, tmp_path):
    huge = "x" * 1_000_000
    d = data()
    if where == "hierarchy name":
        d["hierarchies"][huge + "!"] = {"root": "public.school"}
    elif where == "destination name":
        d["destinations"][huge] = {"kind": "replica", "url": "postgresql://h/d"}
    elif where == "table":
        d["source"]["tables"].append(huge)
    elif where == "member":
        d["hierarchies"]["person"]["members"][huge] = "person_id"
    elif where == "env path":
        d["destinations"]["state"]["url"] = "${" + "X" * 1_000_000 + "}"
    elif where == "bootstrap server":
        d["kafka"]["bootstrap_servers"] = huge
    elif where == "registry url":
        d["kafka"]["schema_registry_url"] = huge
    elif where == "role":
        d["destinations"]["warehouse"] = {"kind": "analytics", "url": "postgresql://loader@h/w",
                                          "read_only_role": huge}
    if where == "duplicate key":
        path = tmp_path / "pipeline.yaml"
        # `? key` (an explicit key): PyYAML allows plain keys of at most 1024 characters.
        path.write_text(VALID + f"? {huge}\n: 1\n? {huge}\n: 2\n")
        with pytest.raises(ConfigError) as info:
            config.load(path, env=ENV)
        message = str(info.value)
    else:
        message = refusal(d)
    assert len(message) <= config.MAX_ERROR_LINE + 100, (where, len(message))
    assert "characters)" in message, message


def test_a_table_name_longer_than_a_postgres_identifier_is_refused():
    d = data()
    d["source"]["tables"].append("public." + "t" * 64)
    assert "longer than PostgreSQL's 63-byte identifiers" in refusal(d)
    d["source"]["tables"][-1] = "public." + "t" * 63
    config.parse(d, env=ENV)


def test_cut_and_shown():
    assert config.cut("abc") == "abc"
    assert config.cut("a" * 200, 10) == "a" * 10 + "\u2026 (200 characters)"
    assert config.shown("abc") == "'abc'"
    assert config.shown("a" * 5000) == repr("a" * config.SHOWN_CHARS) + "\u2026 (5,000 characters)"
    assert config.shown(list(range(10_000))).endswith("characters)")


def test_cdc_connectors_apply_refuses_a_mongodb_replica_before_touching_anything(tmp_path):
    """The command a user runs: exit 2, the field named, nothing reached (the Connect URL below answers nothing)."""
    d = data()
    d["source"]["url"] = "postgresql://cdc:cdc@127.0.0.1:1/none"
    d["kafka"]["connect_url"] = "http://127.0.0.1:1"
    d["destinations"]["state"]["url"] = "mongodb://u:secret@127.0.0.1:1/prod"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(d))
    proc = subprocess.run([CDC, "-c", str(path), "connectors", "apply"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {path}: destinations.state.url: a replica destination is" in proc.stderr
    assert "secret" not in proc.stderr


def test_cdc_with_a_huge_pipeline_name_prints_a_short_error(tmp_path):
    d = data()
    d["pipeline"] = "n" * 1_000_000  # 1 MB, not the tester's 10: PyYAML reads 10 MB in about 10 s
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(d, width=1 << 30))
    proc = subprocess.run([CDC, "-c", str(path), "connectors", "diff"], capture_output=True, text=True, timeout=60,
                          env={"DB_PASSWORD": "x", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert len(proc.stderr) < 600, len(proc.stderr)
    assert "(1,000,000 characters)" in proc.stderr


def test_a_huge_name_on_the_command_line_is_cut_in_the_error(tmp_path):
    """Names given as arguments (up to 128 KiB each) are echoed by many messages; `cdc` cuts every error line."""
    d = data()
    d["source"]["url"] = "postgresql://cdc:cdc@127.0.0.1:1/none"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(d))
    proc = subprocess.run([CDC, "-c", str(path), "run", "d" * 100_000], capture_output=True, text=True, timeout=60,
                          env={"DB_PASSWORD": "x", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "no destination named 'ddd" in proc.stderr
    assert len(proc.stderr) < 2100 and "characters)" in proc.stderr, len(proc.stderr)


def test_an_error_gives_its_reason_in_one_line():
    from sqlalchemy.exc import OperationalError

    from cdc.errors import first_line

    assert first_line(ValueError("\n  first   line \n second")) == "first line"
    assert first_line(ValueError("")) == "ValueError"  # an empty message says at least what it was
    wrapped = OperationalError("SELECT 1", {}, RuntimeError("connection refused\nIs the server running?"))
    assert first_line(wrapped) == "connection refused"  # the driver's own words, not SQLAlchemy's wrapping
    assert len(first_line("x" * 10_000)) == 500 and first_line("x" * 10_000).endswith("...")
