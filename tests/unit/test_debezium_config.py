"""The Debezium connector configuration generated from a pipeline file (pure: reflected tables are given)."""

import pytest

from cdc.config import parse
from cdc.errors import ConfigError
from producers.debezium import connector_config, masked, registry_native_url
from producers.source_admin import Column, TableInfo

PIPELINE = {
    "pipeline": "district",
    "kafka": {"bootstrap_servers": "k:9092", "schema_registry_url": "http://r:8081/apis/ccompat/v7",
              "connect_url": "http://c:8083"},
    "source": {"url": "postgresql://u:secret@db.local:5433/district",
               "tables": ["public.school", "public.person", "public.enrollment", "public.attendance"]},
    "hierarchies": {"person": {"root": "public.person",
                               "members": {"public.enrollment": "person_id", "public.attendance": "person_id"}}},
}


def table(qualified, pk=("id",), **cols):
    columns = {"id": Column("id", "bigint", False)}
    columns.update({c: Column(c, t.rstrip("?"), t.endswith("?")) for c, t in cols.items()})
    return TableInfo(qualified, pk, columns)


TABLES = {
    "public.school": table("public.school", name="text"),
    "public.person": table("public.person", name="text"),
    "public.enrollment": table("public.enrollment", person_id="bigint", school_id="bigint"),
    "public.attendance": table("public.attendance", person_id="bigint"),
}


def config(tables=TABLES, **overrides):
    return connector_config(parse({**PIPELINE, **overrides}, env={}), tables)


def test_connection_and_capture_settings_come_from_the_pipeline():
    c = config()
    assert (c["database.hostname"], c["database.port"], c["database.dbname"]) == ("db.local", "5433", "district")
    assert (c["slot.name"], c["publication.name"], c["topic.prefix"]) == ("district_slot", "district_pub", "district")
    assert c["plugin.name"] == "pgoutput" and c["publication.autocreate.mode"] == "disabled"
    assert c["provide.transaction.metadata"] == "true"
    assert c["table.include.list"].split(",")[-2:] == [r"public\.cdc_signal", r"public\.cdc_heartbeat"]
    assert masked(c)["database.password"] == "********"


def test_members_are_keyed_by_their_root_id_and_routed_to_the_hierarchy_topic():
    c = config()
    assert c["message.key.columns"] == r"public\.person:id;public\.enrollment:person_id;public\.attendance:person_id"
    assert c["replica.identity.autoset.values"] == r"public\.enrollment:FULL,public\.attendance:FULL"
    names = c["transforms"].split(",")
    assert names == ["dropsignals", "h0rename0", "h0rename1", "h0key", "h0route"]
    assert c["transforms.h0rename0.renames"] == "person_id:id"
    assert c["transforms.h0key.schema.name"] == "district.person.Key"
    assert c["transforms.h0route.replacement"] == "district.person"
    assert c["transforms.h0route.regex"] == r"^district\.(?:public\.person|public\.enrollment|public\.attendance)$"
    assert "school" not in c["transforms.h0route.regex"]


def test_integer_widths_that_differ_are_cast_to_one_key_type():
    tables = {**TABLES, "public.attendance": table("public.attendance", person_id="integer")}
    c = config(tables)
    assert c["transforms.h0cast.spec"] == "id:int64"
    assert c["transforms"].split(",").index("h0cast") < c["transforms"].split(",").index("h0key")


@pytest.mark.parametrize("tables, message", [
    ({**TABLES, "public.attendance": table("public.attendance", person_id="bigint?")},
     r"hierarchies.person.members\['public.attendance'\]: column 'person_id' is nullable"),
    ({**TABLES, "public.attendance": table("public.attendance", student_id="bigint")},
     r"hierarchies.person.members\['public.attendance'\]: 'public.attendance' has no column 'person_id'"),
    ({**TABLES, "public.attendance": table("public.attendance", person_id="text")},
     r"hierarchies.person: the root id is bigint in 'public.person' but the members hold it as text"),
    ({**TABLES, "public.person": table("public.person", pk=("id", "name"), name="text")},
     r"hierarchies.person.root: 'public.person' has a composite primary key"),
    ({**TABLES, "public.school": table("public.school", pk=())},
     r"source.tables: 'public.school' has no primary key"),
])
def test_source_tables_that_cannot_form_the_hierarchy_are_refused(tables, message):
    with pytest.raises(ConfigError, match=message):
        config(tables)


def test_registry_url_for_the_converter():
    assert registry_native_url("http://h:1/apis/ccompat/v7/") == "http://h:1/apis/registry/v2"
