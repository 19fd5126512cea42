"""Unit tests of the registry-framed Avro decoder (the registry is a fake: this is pure decoding logic)."""

import io
import struct

import fastavro
import pytest

from schemas.codec import AvroDecoder

SCHEMA = {"type": "record", "name": "Key", "namespace": "t", "fields": [{"name": "id", "type": "long"}]}


class CountingRegistry:
    def __init__(self, schemas):
        self.schemas = schemas
        self.calls = []

    def schema_by_id(self, schema_id):
        self.calls.append(schema_id)
        return self.schemas[schema_id]


def framed(schema_id, record, schema=SCHEMA):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return struct.pack(">bI", 0, schema_id) + buf.getvalue()


def test_decodes_with_the_writer_schema_fetched_once_per_id():
    registry = CountingRegistry({7: SCHEMA})
    decoder = AvroDecoder(registry)
    assert [decoder.decode(framed(7, {"id": i}))["id"] for i in range(100)] == list(range(100))
    assert registry.calls == [7]


def test_tombstone_decodes_to_none():
    assert AvroDecoder(CountingRegistry({})).decode(None) is None


@pytest.mark.parametrize("data, message", [(b"\x01\x00\x00\x00\x07\x02", "magic byte 1"), (b"\x00\x00", "too short")])
def test_unframed_bytes_are_refused_with_the_reason(data, message):
    with pytest.raises(ValueError, match=message):
        AvroDecoder(CountingRegistry({})).decode(data)
