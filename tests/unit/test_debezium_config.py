"""Unit tests of the Debezium connector configuration we generate."""

from producers.debezium import CaptureSpec, registry_native_url, slot_name, source_connector_config


def spec(**kw):
    base = dict(pipeline="District-1", source_url="postgresql://u:secret@db.local:5433/district",
                tables=("public.person", "public.enrollment"), registry_url="http://r:8081/apis/ccompat/v7")
    return CaptureSpec(**{**base, **kw})


def test_connection_and_capture_settings_come_from_the_spec():
    c = source_connector_config(spec())
    assert (c["database.hostname"], c["database.port"], c["database.dbname"]) == ("db.local", "5433", "district")
    assert c["plugin.name"] == "pgoutput" and c["publication.autocreate.mode"] == "filtered"
    assert c["provide.transaction.metadata"] == "true"
    assert c["table.include.list"] == r"public\.person,public\.enrollment"


def test_slot_names_are_valid_postgres_identifiers():
    assert slot_name("District-1") == "district_1_slot"


def test_avro_is_confluent_framed_through_the_registry():
    c = source_connector_config(spec())
    for side in ("key", "value"):
        assert c[f"{side}.converter"].endswith("AvroConverter")
        assert c[f"{side}.converter.apicurio.registry.url"] == "http://r:8081/apis/registry/v2"
        assert c[f"{side}.converter.apicurio.registry.as-confluent"] == "true"
        assert c[f"{side}.converter.apicurio.registry.headers.enabled"] == "false"
    assert registry_native_url("http://h:1/apis/ccompat/v7/") == "http://h:1/apis/registry/v2"
