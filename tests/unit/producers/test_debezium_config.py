"""The Debezium connector configuration generated from a pipeline file (pure: reflected tables are given)."""

import pytest

from cdc.config import parse
from cdc.errors import ConfigError
from cdc.source_tables import TableShape
from producers.debezium import connector_config, masked, registry_native_url, routed_topic
from tests.unit.samples import PIPELINE
from tests.unit.samples import SOURCE_TABLES as TABLES
from tests.unit.samples import source_table as table


def config(tables=TABLES, **overrides):
    return connector_config(parse({**PIPELINE, **overrides}, env={}), tables)


def test_connection_and_capture_settings_come_from_the_pipeline():
    c = config()
    assert (c["database.hostname"], c["database.port"], c["database.dbname"]) == ("db.local", "5433", "district")
    assert (c["slot.name"], c["publication.name"], c["topic.prefix"]) == ("district_slot", "district_pub", "district")
    assert c["plugin.name"] == "pgoutput" and c["publication.autocreate.mode"] == "disabled"
    assert c["provide.transaction.metadata"] == "true"
    assert c["table.include.list"].split(",")[-1] == r"public\.cdc_signal"
    assert masked(c)["database.password"] == "********"


def test_members_are_keyed_by_their_root_id_and_routed_to_the_hierarchy_topic():
    c = config()
    assert c["message.key.columns"] == r"public\.person:id;public\.enrollment:person_id;public\.attendance:person_id"
    assert c["replica.identity.autoset.values"] == r"public\.enrollment:FULL,public\.attendance:FULL"
    names = c["transforms"].split(",")
    assert names == ["dropsignals", "nulls", "h0rename0", "h0rename1", "h0nodefaults", "h0key", "h0route"]
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
    ({**TABLES, "public.attendance": table("public.attendance", student_id="bigint")},
     r"hierarchies.person.members\['public.attendance'\]: 'public.attendance' has no column 'person_id'"),
    ({**TABLES, "public.attendance": table("public.attendance", person_id="text")},
     r"hierarchies.person: the root id is bigint in 'public.person' but the members hold it as text"),
    ({**TABLES, "public.person": table("public.person", pk=("id", "name"), name="text")},
     r"hierarchies.person.root: 'public.person' has a composite primary key"),
])
def test_source_tables_that_cannot_form_the_hierarchy_are_refused(tables, message):
    with pytest.raises(ConfigError, match=message):
        config(tables)


def test_a_standalone_table_without_a_primary_key_is_captured_with_its_whole_old_row():
    c = config({**TABLES, "public.school": table("public.school", pk=())})
    autoset = c["replica.identity.autoset.values"].split(",")
    assert r"public\.school:FULL" in autoset and r"public\.enrollment:FULL" in autoset


def test_registry_url_for_the_converter():
    assert registry_native_url("http://h:1/apis/ccompat/v7/") == "http://h:1/apis/registry/v2"


FILM = {
    "pipeline": "rental",
    "kafka": PIPELINE["kafka"],
    "source": {"url": "postgresql://u@h/db", "tables": ["public.film", "public.film_actor", "public.film_category",
                                                        "public.film_text"]},
    "hierarchies": {"film": {"root": "public.film",
                             "members": {"public.film_actor": "film_id", "public.film_category": "film_id"}}},
}
FILM_TABLES = {
    "public.film": table("public.film"),
    "public.film_actor": table("public.film_actor", film_id="bigint"),
    "public.film_category": table("public.film_category", film_id="bigint"),
    "public.film_text": table("public.film_text", title="text"),
}


def test_members_named_like_their_root_are_routed_whole_not_by_prefix():
    pipeline = parse(FILM, env={})
    c = connector_config(pipeline, FILM_TABLES)
    assert {t: routed_topic(c, t) for t in pipeline.source.tables} == {
        "public.film": "rental.film", "public.film_actor": "rental.film", "public.film_category": "rental.film",
        "public.film_text": "rental.public.film_text"}
    assert routed_topic(c, "public.cdc_signal") == ""
    # What Connect did with the unanchored pattern: matches() succeeds, replaceFirst() rewrites the prefix only.
    c["transforms.h0route.regex"] = r"rental\.(public\.film|public\.film_actor|public\.film_category)"
    c["predicates.h0.pattern"] = c["transforms.h0route.regex"]
    assert routed_topic(c, "public.film_actor") == "rental.film_actor"


def test_truncates_are_captured_and_heartbeats_write_an_uncaptured_message():
    c = config()
    assert c["skipped.operations"] == "none"
    assert c["heartbeat.action.query"] == "select pg_logical_emit_message(false, 'cdc-heartbeat', '')"
    assert c["message.prefix.exclude.list"] == "cdc-heartbeat"
    assert c["predicates.signals.pattern"] == r"^district\.(?:public\.cdc_signal)$"


def test_a_partition_beside_its_parent_is_refused():
    tables = {**TABLES, "public.school": TableShape("public.school", TABLES["public.school"].columns, ("id",),
                                                    partition_of=("public.person",))}
    with pytest.raises(ConfigError, match=r"source.tables: 'public.school' is a partition of 'public.person', which "
                                          r"is listed too; a partitioned table is captured whole through its parent"):
        config(tables)
    alone = {**TABLES, "public.school": TableShape("public.school", TABLES["public.school"].columns, ("id",),
                                                   partition_of=("public.school_all",))}
    assert config(alone)["table.include.list"].startswith(r"public\.school,")


def test_a_nullable_root_id_makes_the_key_field_optional_for_the_whole_hierarchy():
    assert "h0optional" not in config()["transforms"]
    c = config({**TABLES, "public.attendance": table("public.attendance", person_id="bigint?")})
    names = c["transforms"].split(",")
    assert names == ["dropsignals", "nulls", "h0rename0", "h0rename1", "h0nodefaults", "h0optional", "h0key",
                     "h0route"]
    assert c["transforms.h0optional.type"] == "cdc.transforms.OptionalFields$Key"
    # On every table of the hierarchy (predicate h0), after the renames: the root's key too.
    assert (c["transforms.h0optional.fields"], c["transforms.h0optional.predicate"]) == ("id", "h0")


def test_topics_under_the_prefix_outside_the_plan_are_named_with_their_table():
    from producers.capture import unplanned_message, unplanned_topics

    pipeline = parse({**PIPELINE, "destinations": {"state": {"kind": "replica", "url": "postgresql://u@h/state"}}},
                     env={})
    existing = {"district.person", "district.public.school", "district.transaction", "district.signal",
                "district.notification", "district._source", "district.state.dead-letter", "districts.public.x",
                "district.public.enrollment", "district.old.dead-letter"}
    found = unplanned_topics(pipeline, existing)
    assert found == [("district.old.dead-letter", "old.dead-letter"),
                     ("district.public.enrollment", "public.enrollment")]
    assert unplanned_message(pipeline, found[1:]) == (
        "topic district.public.enrollment is not planned by pipeline 'district': it holds events of table "
        "public.enrollment that no applier reads")


def test_a_route_that_would_leak_is_refused_before_anything_changes():
    from producers.capture import CaptureError, check_routes

    pipeline = parse(FILM, env={})
    c = connector_config(pipeline, FILM_TABLES)
    check_routes(pipeline, c)
    c["transforms.h0route.regex"] = r"rental\.(public\.film|public\.film_actor|public\.film_category)"
    c["predicates.h0.pattern"] = c["transforms.h0route.regex"]
    with pytest.raises(CaptureError) as info:
        check_routes(pipeline, c)
    assert str(info.value) == ("the connector's routing would send public.film_actor's events to topic "
                               "rental.film_actor instead of rental.film; public.film_category's events to topic "
                               "rental.film_category instead of rental.film")


def test_every_record_value_loses_its_optional_defaults_so_an_explicit_null_stays_null():
    """Debezium's column defaults in the value schema would be substituted for explicit NULLs by the converter."""
    for c in (config(), config(hierarchies={})):
        names = c["transforms"].split(",")
        assert names[:2] == ["dropsignals", "nulls"]  # the signals are dropped before, nothing else comes first
        assert c["transforms.nulls.type"] == "cdc.transforms.DropOptionalDefaults$Value"
        # On every table, including ones given a defaulted column after the connector was created.
        assert "transforms.nulls.predicate" not in c


def test_a_hierarchys_key_fields_lose_their_defaults_after_the_renames_and_casts():
    """A member's root-id column's default would make its key schema differ from the root's."""
    tables = {**TABLES, "public.attendance": table("public.attendance", person_id="integer")}
    c = config(tables)
    names = c["transforms"].split(",")
    assert names.index("h0cast") < names.index("h0nodefaults") < names.index("h0key")
    assert c["transforms.h0nodefaults.type"] == "cdc.transforms.DropKeyDefaults"
    assert c["transforms.h0nodefaults.predicate"] == "h0"  # the root's and every member's topic
