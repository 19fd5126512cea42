"""The columnar batch decoder must read exactly what fastavro reads, message by message (the registry is a fake)."""

import io
import math
import struct
from decimal import Decimal

import fastavro
import pyarrow as pa
import pytest

from schemas.batch import BatchDecoder, Unsupported, polars_schema
from schemas.codec import AvroDecoder

VALUE = {
    "type": "record", "name": "Value", "connect.name": "db.public.thing.Value",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "small", "type": ["null", "int"], "default": None},
        {"name": "name", "type": ["null", "string"], "default": None},
        {"name": "price", "type": ["null", {"type": "bytes", "scale": 2, "precision": 12, "logicalType": "decimal",
                                            "connect.name": "org.apache.kafka.connect.data.Decimal"}],
         "default": None},
        {"name": "amount", "type": ["null", {"type": "record", "name": "VariableScaleDecimal",
                                             "namespace": "io.debezium.data",
                                             "fields": [{"name": "scale", "type": "int"},
                                                        {"name": "value", "type": "bytes"}]}], "default": None},
        {"name": "ok", "type": "boolean"},
        {"name": "ratio", "type": "double"},
        {"name": "single", "type": "float"},
        {"name": "blob", "type": ["null", "bytes"], "default": None},
        {"name": "tags", "type": ["null", {"type": "array", "items": ["null", "string"]}], "default": None},
        {"name": "updated_at", "type": {"type": "string", "connect.default": "1970-01-01T00:00:00Z",
                                        "connect.name": "io.debezium.time.ZonedTimestamp"},
         "default": "1970-01-01T00:00:00Z"},
    ],
}
ENVELOPE = {
    "type": "record", "name": "Envelope", "namespace": "db.public.thing",
    "fields": [
        {"name": "before", "type": ["null", VALUE], "default": None},
        {"name": "after", "type": ["null", "Value"], "default": None},
        {"name": "source", "type": {"type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
                                    "fields": [
                                        {"name": "ts_ms", "type": "long"},
                                        {"name": "snapshot", "type": [{"type": "string", "connect.default": "false"},
                                                                      "null"], "default": "false"},
                                        {"name": "schema", "type": "string"},
                                        {"name": "table", "type": "string"},
                                        {"name": "lsn", "type": ["null", "long"], "default": None},
                                    ]}},
        {"name": "transaction", "type": ["null", {"type": "record", "name": "block", "namespace": "event",
                                                  "fields": [{"name": "id", "type": "string"},
                                                             {"name": "total_order", "type": "long"}]}],
         "default": None},
        {"name": "op", "type": "string"},
    ],
}


def row(i):
    return {"id": i * 7919 - 2**40, "small": None if i % 3 == 0 else -i,
            "name": ["", "é ☃ 名前", None, "x" * 300][i % 4],
            "price": None if i % 5 == 0 else Decimal(f"{i * 13 - 500}.{i % 100:02d}"),
            "amount": None if i % 2 else {"scale": i % 4, "value": (i * 1000003).to_bytes(8, "big", signed=True)},
            "ok": i % 2 == 0, "ratio": i / 7, "single": i * 0.25, "blob": None if i % 4 else bytes(range(i % 256)),
            "tags": None if i % 6 == 0 else [None if j % 3 == 2 else f"t{j}" for j in range(i % 5)],
            "updated_at": f"2026-11-23T12:{i % 60:02d}:00.000001Z"}


def envelope(i):
    op = "cdur"[i % 4]
    return {"before": row(i) if op in "ud" else None, "after": None if op == "d" else row(i + 1),
            "source": {"ts_ms": 1_795_000_000_000 + i,
                       "snapshot": None if i % 9 == 0 else ("true" if op == "r" else "false"),
                       "schema": "public", "table": "thing", "lsn": None if i % 11 == 0 else 10_000 + i},
            "transaction": None if op == "r" else {"id": f"{900 + i // 10}:{10_000 + i}", "total_order": i % 10 + 1},
            "op": op}


class Registry:
    def __init__(self, schemas):
        self.schemas = schemas

    def schema_by_id(self, schema_id):
        return self.schemas[schema_id]


def framed(schema_id, record, schema):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return struct.pack(">bI", 0, schema_id) + buf.getvalue()


def same(a, b):
    """Equal, with NaN equal to NaN and Decimals compared with their exponent (what the destination would store)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        return type(a) is type(b) and a.as_tuple() == b.as_tuple()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_columns_equal_what_fastavro_reads_message_by_message():
    decoder = AvroDecoder(Registry({3: ENVELOPE}))
    payloads = [framed(3, envelope(i), ENVELOPE) for i in range(400)]
    paths = [("op",), ("before",), ("after",), ("source", "snapshot"), ("source", "lsn"), ("transaction", "id"),
             ("transaction", "total_order"), ("source", "no_such_field"), ("no_such_field",)]
    decoded = BatchDecoder(decoder).columns(3, payloads, paths, arrow=("before", "after"))
    assert decoded is not None, "the fast path refused a schema it should take"
    columns, table = decoded
    assert table.column_names == ["before", "after"] and table.num_rows == len(payloads)
    assert same(table.column("after").to_pylist(), columns[2])
    for i, payload in enumerate(payloads):
        exact = decoder.decode(payload)
        expected = [exact["op"], exact["before"], exact["after"], exact["source"]["snapshot"], exact["source"]["lsn"],
                    (exact["transaction"] or {}).get("id"), (exact["transaction"] or {}).get("total_order"), None, None]
        got = [column[i] for column in columns]
        assert same(got, expected), f"message {i}: {got} != {expected}"


def test_an_arrow_column_of_payloads_decodes_as_the_list_does():
    # The applier hands over the poll's payloads as an Arrow binary column (taken or sliced from a larger one, so
    # its values need not start at the buffer's beginning): the same frame as from a list of bytes.
    decoder = BatchDecoder(AvroDecoder(Registry({3: ENVELOPE})))
    payloads = [framed(3, envelope(i), ENVELOPE) for i in range(50)]
    expected = decoder.frame(3, payloads[7:40])
    column = pa.array([b"junk", *payloads], pa.binary())
    for arrow in (column.slice(8, 33), column.take(pa.array(range(8, 41)))):
        got = decoder.frame(3, arrow)
        assert got is not None and got.equals(expected)
    broken = pa.array([*payloads[:3], payloads[3][:20]], pa.binary())
    assert decoder.frame(3, broken) is None  # cut short: the exact path's, as with bytes


def test_an_undecodable_message_sends_the_batch_to_the_exact_path():
    decoder = AvroDecoder(Registry({3: ENVELOPE}))
    payloads = [framed(3, envelope(i), ENVELOPE) for i in range(10)]
    payloads[4] = payloads[4][:20]  # cut short
    assert BatchDecoder(decoder).columns(3, payloads, [("op",)]) is None


@pytest.mark.parametrize("field_type, reason", [
    ({"type": "long", "logicalType": "timestamp-millis"}, "timestamp-millis"),
    ({"type": "bytes", "logicalType": "decimal", "precision": 50, "scale": 2}, "precision 50"),
    ({"type": "map", "values": "string"}, "map"),
])
def test_schemas_read_differently_are_left_to_fastavro(field_type, reason):
    schema = {"type": "record", "name": "R", "fields": [{"name": "f", "type": field_type}]}
    with pytest.raises(Unsupported, match=reason):
        polars_schema(schema)
    decoder = AvroDecoder(Registry({5: schema}))
    value = ({"f": 5} if "timestamp" in reason else {"f": Decimal("1.25")} if "precision" in reason
             else {"f": {"a": "b"}})
    assert BatchDecoder(decoder).columns(5, [framed(5, value, schema)], [("f",)]) is None
