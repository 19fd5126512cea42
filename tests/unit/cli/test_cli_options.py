"""Options of the command line as a user types them: -c/--config before or after the command, and the endpoints
`cdc stack status` prints, copied into a pipeline file as they are. Nothing needs to run (the stack is looked at in
a state directory of its own, where every component is stopped)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from cdc import config
from cdc.cli import main as cli

runner = CliRunner()

# A pipeline file with one deliberate mistake: loading it fails with a message naming the file and the field, which
# shows which file the command read.
BROKEN = """\
pipeline: options
kafka:
  bootstrap_servers: no-port-here
  schema_registry_url: http://127.0.0.1:1
  connect_url: http://127.0.0.1:1
source:
  url: postgresql://u@127.0.0.1:1/db
  tables: [public.t]
"""


@pytest.fixture
def broken_file(tmp_path, monkeypatch):
    monkeypatch.delenv("CDC_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./pipeline.yaml to fall back on
    path = tmp_path / "named.yaml"
    path.write_text(BROKEN)
    return str(path)


def refused_for(path: str) -> str:
    return f"error: {path}: kafka.bootstrap_servers: each server must be host:port, got 'no-port-here'"


@pytest.mark.parametrize("command", [["lag", "--window", "0"], ["connectors", "diff"]], ids=["lag", "connectors diff"])
@pytest.mark.parametrize("where", ["before", "after"])
def test_config_option_before_or_after_the_command_names_the_same_file(broken_file, command, where):
    option = ["-c", broken_file]
    args = option + command if where == "before" else command + option
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    assert refused_for(broken_file) in result.stderr


def test_long_config_option_after_a_subcommand_of_a_group(broken_file):
    result = runner.invoke(cli.app, ["lag", "serve", "--config", broken_file])
    assert result.exit_code == 2, result.output
    assert refused_for(broken_file) in result.stderr


def test_config_option_given_twice_must_name_one_file(broken_file, tmp_path):
    other = str(tmp_path / "other.yaml")
    result = runner.invoke(cli.app, ["-c", broken_file, "lag", "-c", other])
    assert result.exit_code == 2
    assert "-c/--config" in result.output and broken_file in result.output and other in result.output
    # The same file on both sides is one file.
    result = runner.invoke(cli.app, ["-c", broken_file, "connectors", "diff", "-c", broken_file])
    assert result.exit_code == 2 and refused_for(broken_file) in result.stderr


def test_without_the_option_the_environment_names_the_file(broken_file, monkeypatch):
    monkeypatch.setenv("CDC_CONFIG", broken_file)
    result = runner.invoke(cli.app, ["connectors", "diff"])
    assert result.exit_code == 2 and refused_for(broken_file) in result.stderr


# -- `cdc stack status` endpoints in a pipeline file ---------------------------------------------------------------


@pytest.fixture
def own_stack_home(tmp_path, monkeypatch):
    """A state directory where no stack runs, with ports of its own (to see them come through)."""
    monkeypatch.setenv("CDC_HOME", str(tmp_path / "home"))
    ports = {"POSTGRES": 15432, "MARIADB": 13307, "KAFKA": 19092, "SCHEMA_REGISTRY": 18081, "CONNECT": 18083}
    for name, port in ports.items():
        monkeypatch.setenv(f"CDC_{name}_PORT", str(port))
    return ports


def pipeline_from(endpoints: dict[str, str], tmp_path) -> config.Pipeline:
    """A pipeline file written with the printed endpoints pasted in as they are, then loaded."""
    text = f"""\
pipeline: pasted
kafka:
  bootstrap_servers: {endpoints['kafka']}
  schema_registry_url: {endpoints['schema_registry']}
  connect_url: {endpoints['connect']}
source:
  url: {endpoints['postgres']}
  tables: [public.person]
destinations:
  state:
    kind: replica
    url: {endpoints['postgres']}
  mirror:
    kind: replica
    url: {endpoints['mariadb']}
"""
    path = tmp_path / "pasted.yaml"
    path.write_text(text)
    return config.load(path, env={})


def test_status_json_endpoints_pasted_into_a_pipeline_file_load(own_stack_home, tmp_path):
    result = runner.invoke(cli.app, ["stack", "status", "--json"])
    assert result.exit_code == 1  # nothing runs here
    info = json.loads(result.stdout)
    assert info["kafka"] == "kafka://127.0.0.1:19092"  # every endpoint a URL (the contract of `status --json`)
    pipeline = pipeline_from(info, tmp_path)
    # Kafka's clients take host:port: that is what the pipeline hands them.
    assert pipeline.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert pipeline.kafka.schema_registry_url == "http://127.0.0.1:18081/apis/ccompat/v7"
    assert pipeline.kafka.connect_url == "http://127.0.0.1:18083"
    assert pipeline.source.sqlalchemy_url.port == 15432 and pipeline.source.sqlalchemy_url.database == "postgres"
    assert pipeline.destinations["mirror"].sqlalchemy_url.port == 13307


def test_status_table_endpoints_pasted_into_a_pipeline_file_load(own_stack_home, tmp_path):
    result = runner.invoke(cli.app, ["stack", "status"])
    assert result.exit_code == 1
    endpoints = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(postgres|mariadb|kafka|schema_registry|connect)\s+stopped\s+(\S+)", line)
        if match:
            endpoints[match[1]] = match[2]
    assert set(endpoints) == {"postgres", "mariadb", "kafka", "schema_registry", "connect"}, result.stdout
    assert pipeline_from(endpoints, tmp_path).kafka.bootstrap_servers == "127.0.0.1:19092"


@pytest.mark.parametrize("servers, handed_on", [
    ("kafka://b1:9092", "b1:9092"),
    ("kafka://b1:9092,KAFKA://b2:9093/", "b1:9092,b2:9093"),
    ("b1:9092, b2:9093", "b1:9092, b2:9093"),  # host:port lists are kept as they were written
])
def test_bootstrap_servers_as_kafka_urls(servers, handed_on):
    settings = config.KafkaSettings(bootstrap_servers=servers, schema_registry_url="http://r:1",
                                    connect_url="http://c:1")
    assert settings.bootstrap_servers == handed_on


@pytest.mark.parametrize("servers", ["kafka://b1", "kafka://b1:9092/topic", "http://b1:9092", "kafka://"])
def test_bootstrap_servers_that_are_no_broker_address_are_refused(servers, tmp_path):
    data = yaml.safe_load(BROKEN)
    data["kafka"]["bootstrap_servers"] = servers
    with pytest.raises(config.ConfigError) as info:
        config.parse(data, "p.yaml", env={})
    assert str(info.value) == (f"p.yaml: kafka.bootstrap_servers: each server must be host:port, got {servers!r} "
                               "(kafka://host:port is taken too)")
