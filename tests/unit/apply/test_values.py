"""Unit tests of Debezium value conversion, on hand-built schemas shaped like what Debezium 3.6 + Apicurio register."""

import copy
import hashlib
import io
import pickle
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import fastavro
import pytest

from cdc.errors import CdcError, Terminal
from consumers.apply.values import (
    INFINITY,
    NEG_INFINITY,
    PLACEHOLDER,
    UNAVAILABLE,
    RowConverter,
    RowSchemaError,
    ValueConversionError,
    converters_for_envelope,
    unavailable_columns,
)

PH_BYTES = PLACEHOLDER.encode()
PH_INTS = list(PH_BYTES)  # what Debezium sends for an unchanged TOASTed int4[]/int8[]/date[]
PH_UUID = "b68a35a7-17ad-35b3-af2a-ae46edb4545a"  # ... and for a uuid[] (observed): UUID.nameUUIDFromBytes


def connect(avro_type, name, **extra):
    return {"type": avro_type, "connect.version": 1, "connect.name": name, **extra}


VSD = {"type": "record", "name": "VariableScaleDecimal", "namespace": "io.debezium.data",
       "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
       "connect.doc": "Variable scaled decimal", "connect.version": 1,
       "connect.name": "io.debezium.data.VariableScaleDecimal"}


def decimal_type(precision, scale, logical=True):
    t = {"type": "bytes", "scale": scale, "precision": precision, "connect.version": 1,
         "connect.parameters": {"scale": str(scale), "connect.decimal.precision": str(precision)},
         "connect.name": "org.apache.kafka.connect.data.Decimal"}
    if logical:
        t["logicalType"] = "decimal"
    return t


def array(items):
    return {"type": "array", "items": ["null", items]}


# Column name -> Avro type, in the shapes the real connector registered (see tests/integration/apply/test_values.py).
COLUMNS = {
    "id": "int",
    "small": {"type": "int", "connect.type": "int16"},
    "big": "long",
    "num": decimal_type(12, 2),
    "num_raw": decimal_type(12, 2, logical=False),
    "numv": VSD,
    "re": "float",
    "dbl": "double",
    "flag": "boolean",
    "txt": "string",
    "day": connect("int", "io.debezium.time.Date"),
    "clock": connect("long", "io.debezium.time.MicroTime"),
    "clock_ms": connect("int", "io.debezium.time.Time"),
    "clock_ns": connect("long", "io.debezium.time.NanoTime"),
    "ts": connect("long", "io.debezium.time.MicroTimestamp"),
    "ts_ms": connect("long", "io.debezium.time.Timestamp"),
    "ts_ns": connect("long", "io.debezium.time.NanoTimestamp"),
    "tstz": connect("string", "io.debezium.time.ZonedTimestamp"),
    "timetz": connect("string", "io.debezium.time.ZonedTime"),
    "span": connect("long", "io.debezium.time.MicroDuration"),
    "js": connect("string", "io.debezium.data.Json"),
    "uid": connect("string", "io.debezium.data.Uuid"),
    "blob": "bytes",
    "ints": array("int"),
    "longs": array("long"),
    "smalls": array({"type": "int", "connect.type": "int16"}),
    "texts": array("string"),
    "days": array(connect("int", "io.debezium.time.Date")),
    "uids": array(connect("string", "io.debezium.data.Uuid")),
    "nums": array("io.debezium.data.VariableScaleDecimal"),  # a reference to the record defined in `numv`
    "mood": connect("string", "io.debezium.data.Enum", **{"connect.parameters": {"allowed": "sad,ok,happy"}}),
    "bits": connect("bytes", "io.debezium.data.Bits", **{"connect.parameters": {"length": "3"}}),
    "hs": {"type": "map", "values": ["null", "string"]},
}


def envelope(columns=COLUMNS, namespace="t1234.public.sample"):
    """A Debezium envelope as Apicurio's converter registers it: `before` defines Value, `after` refers to it."""
    fields = [{"name": "id", "type": columns["id"]}] if "id" in columns else []
    fields += [{"name": n, "type": ["null", t], "default": None} for n, t in columns.items() if n != "id"]
    value = {"type": "record", "name": "Value", "fields": fields, "connect.name": f"{namespace}.Value"}
    return {
        "type": "record", "name": "Envelope", "namespace": namespace,
        "fields": [
            {"name": "before", "type": ["null", value], "default": None},
            {"name": "after", "type": ["null", "Value"], "default": None},
            {"name": "op", "type": "string"},
        ],
        "connect.version": 2, "connect.name": f"{namespace}.Envelope",
    }


@pytest.fixture(scope="module")
def conv():
    return converters_for_envelope(envelope())


def vsd(unscaled, scale):
    length = max(1, (unscaled.bit_length() + 8) // 8)
    return {"scale": scale, "value": unscaled.to_bytes(length, "big", signed=True)}


def micros(dt):
    return (dt - datetime(1970, 1, 1)) // timedelta(microseconds=1)


def test_columns_in_schema_order_from_plain_and_fastavro_parsed_schemas():
    for schema in (envelope(), fastavro.parse_schema(envelope())):
        conv = converters_for_envelope(schema)
        assert conv.columns == list(COLUMNS)
        assert conv.logical_types["day"] == "io.debezium.time.Date"
        assert conv.logical_types["nums"] == "array<io.debezium.data.VariableScaleDecimal>"
        assert conv.convert({"id": 1, "nums": [vsd(15, 1)]})["nums"] == [Decimal("1.5")]


def test_a_row_round_tripped_through_fastavro_converts_to_bindable_values(conv):
    schema = fastavro.parse_schema(envelope())
    raw = {
        "id": 7, "small": -32768, "big": -9223372036854775808, "num": Decimal("-1234567890.12"),
        "num_raw": (-123456789012).to_bytes(8, "big", signed=True),
        "numv": vsd(-31415926535897932384626433832795028841, 37),
        "re": 1.5, "dbl": -2.25e100, "flag": True, "txt": "héllo ✓ 日本",
        "day": -165, "clock": 86_399_999_999, "clock_ms": 3_723_456, "clock_ns": 3_723_456_789_000,
        "ts": micros(datetime(1900, 1, 1, 12, 34, 56, 123456)), "ts_ms": 946_684_800_123,
        "ts_ns": 1_500_000_000_123_456_000,
        "tstz": "2024-02-29T18:29:59.654321Z", "timetz": "10:00:00Z", "span": -86_399_000_000,
        "js": '{"a": [1, 2.5, null]}', "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "blob": b"\x00\xff\x10",
        "ints": [1, None, 3], "longs": [2**40], "smalls": [1, 2], "texts": ["x", "y z", None], "days": [0, None, -1],
        "uids": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", None], "nums": [vsd(15, 1), vsd(-2, 0), None],
        "mood": "happy", "bits": b"\x05", "hs": {"k": "v", "n": None},
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, {"before": None, "after": raw, "op": "c"})
    buf.seek(0)
    decoded = fastavro.schemaless_reader(buf, schema, None)["after"]
    assert decoded["num"] == Decimal("-1234567890.12") and isinstance(decoded["num_raw"], bytes)

    row = conv.convert(decoded)
    assert row == {
        "id": 7, "small": -32768, "big": -9223372036854775808, "num": Decimal("-1234567890.12"),
        "num_raw": Decimal("-1234567890.12"), "numv": Decimal("-3.1415926535897932384626433832795028841"),
        "re": 1.5, "dbl": -2.25e100, "flag": True, "txt": "héllo ✓ 日本",
        "day": date(1969, 7, 20), "clock": time(23, 59, 59, 999999), "clock_ms": time(1, 2, 3, 456000),
        "clock_ns": time(1, 2, 3, 456789), "ts": datetime(1900, 1, 1, 12, 34, 56, 123456),
        "ts_ms": datetime(2000, 1, 1, 0, 0, 0, 123000), "ts_ns": datetime(2017, 7, 14, 2, 40, 0, 123456),
        "tstz": datetime(2024, 2, 29, 18, 29, 59, 654321, tzinfo=UTC),
        "timetz": time(10, 0, tzinfo=UTC), "span": timedelta(days=-1, seconds=1),
        "js": '{"a": [1, 2.5, null]}', "uid": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        "blob": b"\x00\xff\x10", "ints": [1, None, 3], "longs": [2**40], "smalls": [1, 2], "texts": ["x", "y z", None],
        "days": [date(1970, 1, 1), None, date(1969, 12, 31)],
        "uids": [uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), None],
        "nums": [Decimal("1.5"), Decimal("-2"), None], "mood": "happy", "bits": b"\x05", "hs": {"k": "v", "n": None},
    }
    assert row["ts"].tzinfo is None and row["tstz"].tzinfo is UTC
    assert row["numv"].as_tuple().exponent == -37  # exact: no rounding to the default 28 digits


def test_nulls_stay_null_and_the_input_row_is_not_modified(conv):
    assert conv.convert(None) is None
    nulls = dict.fromkeys(COLUMNS)
    nulls["id"] = 1
    assert conv.convert(nulls) == nulls
    source = {"id": 1, "day": 0}
    converted = conv.convert(source)
    assert source == {"id": 1, "day": 0} and converted == {"id": 1, "day": date(1970, 1, 1)}


@pytest.mark.parametrize("column, raw, expected", [
    ("num", Decimal("0.00"), Decimal("0.00")),
    ("num_raw", b"\x00", Decimal("0.00")),
    ("num_raw", (-5).to_bytes(1, "big", signed=True), Decimal("-0.05")),
    ("numv", vsd(0, 0), Decimal(0)),
    ("numv", vsd(1, 30), Decimal("1E-30")),
    ("numv", vsd(12345678901234567890123456789012345678123456789, 9),
     Decimal("12345678901234567890123456789012345678.123456789")),
    ("numv", vsd(5, -3), Decimal("5E+3")),  # PostgreSQL 15 allows a negative numeric scale
])
def test_decimals_are_exact(conv, column, raw, expected):
    value = conv.convert({"id": 1, column: raw})[column]
    assert value == expected and value.as_tuple() == expected.as_tuple()


@pytest.mark.parametrize("column, raw, expected", [
    ("day", -719162, date(1, 1, 1)),
    ("day", 2932896, date(9999, 12, 31)),
    ("day", -622191234, INFINITY),  # date 'infinity' in a Debezium 3.6 snapshot (wrapped to 32 bits)
    ("day", -625821272, NEG_INFINITY),
    ("day", -2147472692, INFINITY),  # ... and when streaming: the epoch day of -5877611-06-21
    ("day", -2147472691, NEG_INFINITY),
    ("day", 2146033979, INFINITY),  # +5877611-06-21, where Debezium means to move it: past PostgreSQL's last date
    ("day", 2932897, "10000-01-01"),
    ("day", 2145042905, "5874897-12-31"),
    ("day", -719163, "0001-12-31 BC"),
    ("day", -2440588, "4714-11-24 BC"),
    ("ts", 9223372036825200000, INFINITY),
    ("ts", -9223372036832400000, NEG_INFINITY),
    ("ts", -63517780800000000, "0044-03-15 12:00:00 BC"),
    ("ts", -63517780799500000, "0044-03-15 12:00:00.500000 BC"),
    ("ts", 253402300800000000, "10000-01-01 00:00:00"),
    ("ts", micros(datetime(1, 1, 1)), datetime(1, 1, 1)),
    ("ts", micros(datetime(9999, 12, 31, 23, 59, 59, 999999)), datetime(9999, 12, 31, 23, 59, 59, 999999)),
    ("ts_ms", 9223372036825200, INFINITY),
    ("ts_ms", -9223372036832400, NEG_INFINITY),
    ("ts_ms", -1, datetime(1969, 12, 31, 23, 59, 59, 999000)),
    ("tstz", "infinity", INFINITY),
    ("tstz", "-infinity", NEG_INFINITY),
    ("tstz", "2024-01-01T00:00:00Z", datetime(2024, 1, 1, tzinfo=UTC)),
    ("tstz", "2024-01-01T02:00:00+02:00", datetime(2024, 1, 1, tzinfo=UTC)),
    ("tstz", "0001-01-01T00:00:00.000000Z", datetime(1, 1, 1, tzinfo=UTC)),
    ("tstz", "-0043-03-15T12:00:00.000000Z", "0044-03-15 12:00:00.000000+00 BC"),
    ("tstz", "+10000-01-01T00:00:00Z", "10000-01-01 00:00:00+00"),
    ("clock", 0, time(0)),
    ("clock", 86_400_000_000, "24:00:00"),
    ("timetz", "23:00:00.5Z", time(23, 0, 0, 500000, tzinfo=UTC)),
    ("span", 0, timedelta(0)),
    ("span", 37_091_106_789_000, timedelta(days=429, seconds=25506, microseconds=789000)),
])
def test_dates_and_times_including_what_python_cannot_hold(conv, column, raw, expected):
    value = conv.convert({"id": 1, column: raw})[column]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("column", ["txt", "js", "tstz", "timetz", "uid", "mood"])
def test_the_placeholder_in_text_columns_is_unavailable(conv, column):
    assert conv.convert({"id": 1, column: PLACEHOLDER})[column] is UNAVAILABLE


@pytest.mark.parametrize("column, raw", [
    ("blob", PH_BYTES),
    ("bits", PH_BYTES),
    ("js", '{"__debezium_unavailable_value":"__debezium_unavailable_value"}'),  # hstore in json mode
    ("hs", {PLACEHOLDER: PLACEHOLDER}),  # hstore in map mode
    ("texts", [PLACEHOLDER]),
    ("ints", PH_INTS),
    ("longs", PH_INTS),
    ("days", PH_INTS),  # must not become 28 dates in January 1970
    ("uids", [PH_UUID]),
])
def test_the_placeholder_in_binary_json_and_array_columns_is_unavailable(conv, column, raw):
    assert conv.convert({"id": 1, column: raw})[column] is UNAVAILABLE


def test_values_that_merely_contain_the_placeholder_are_data(conv):
    row = conv.convert({"id": 1, "texts": [PLACEHOLDER, "x"], "txt": PLACEHOLDER + " ", "ints": PH_INTS[:-1],
                        "smalls": PH_INTS, "blob": PH_BYTES + b"\x00", "js": f'"{PLACEHOLDER}"'})
    assert row["texts"] == [PLACEHOLDER, "x"] and row["txt"] == PLACEHOLDER + " " and row["ints"] == PH_INTS[:-1]
    # Debezium sends an unchanged TOASTed smallint[] as NULL, never as the byte list: here it is data.
    assert row["smalls"] == PH_INTS and row["blob"] == PH_BYTES + b"\x00" and row["js"] == f'"{PLACEHOLDER}"'
    assert unavailable_columns(row) == []


def test_unavailable_columns_lists_what_debezium_did_not_send(conv):
    row = conv.convert({"id": 1, "txt": PLACEHOLDER, "blob": PH_BYTES, "flag": False})
    assert unavailable_columns(row) == ["txt", "blob"]
    assert unavailable_columns(None) == []


def test_a_configured_placeholder_is_recognised_in_every_shape():
    conv = converters_for_envelope(envelope(), placeholder="§gone")
    raw = "§gone".encode()
    row = conv.convert({"id": 1, "txt": "§gone", "blob": raw, "ints": [b - 256 if b > 127 else b for b in raw],
                        "uids": [str(uuid.UUID(bytes=hashlib.md5(raw).digest(), version=3))],
                        "texts": [PLACEHOLDER]})
    assert unavailable_columns(row) == ["txt", "blob", "ints", "uids"] and row["texts"] == [PLACEHOLDER]


def test_unavailable_is_one_object_through_copy_and_pickle():
    assert copy.copy(UNAVAILABLE) is UNAVAILABLE and copy.deepcopy({"a": UNAVAILABLE})["a"] is UNAVAILABLE
    assert pickle.loads(pickle.dumps(UNAVAILABLE)) is UNAVAILABLE
    assert repr(UNAVAILABLE) == "UNAVAILABLE" and UNAVAILABLE != PLACEHOLDER


def test_unknown_types_pass_through_unchanged():
    point = {"type": "record", "name": "Point", "namespace": "io.debezium.data.geometry",
             "fields": [{"name": "x", "type": "double"}, {"name": "y", "type": "double"}],
             "connect.name": "io.debezium.data.geometry.Point"}
    conv = converters_for_envelope(envelope({
        "id": "int",
        "pt": point,
        "later": connect("long", "io.debezium.time.SomethingNew"),
        "either": ["int", "string"],
        "ref": "com.example.Undefined",
        "iv": connect("string", "io.debezium.time.Interval"),
    }))
    row = {"id": 1, "pt": {"x": 1.0, "y": 2.0}, "later": 5, "either": "x", "ref": object(), "iv": "P1Y2M3DT4H5M6.789S"}
    assert conv.convert(row) == row


def test_a_key_record_converts_like_a_value_record():
    key = {"type": "record", "name": "Key", "namespace": "t.public.x",
           "fields": [{"name": "id", "type": connect("string", "io.debezium.data.Uuid")}]}
    conv = RowConverter(key)
    assert conv.columns == ["id"]
    assert conv.convert({"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}) == {
        "id": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")}


@pytest.mark.parametrize("column, raw, reason", [
    ("clock", 86_400_000_001, "outside 00:00:00..24:00:00"),
    ("day", -2440589, "before PostgreSQL's first date"),
    ("ts", 2**63 - 1, "clamped"),
    ("ts_ms", -(2**63), "clamped"),
    ("uid", "not-a-uuid", "hexadecimal"),
    ("tstz", "yesterday", "yesterday"),
    ("tstz", "2024-01-01T00:00:00", "no time zone"),
    ("numv", {"scale": 2}, "'value'"),
])
def test_impossible_values_raise_a_terminal_error_naming_the_column(conv, column, raw, reason):
    with pytest.raises(ValueConversionError) as info:
        conv.convert({"id": 1, column: raw})
    err = info.value
    assert isinstance(err, CdcError) and isinstance(err, Terminal)
    assert err.column == column and err.logical_type == conv.logical_types[column] and err.value == raw
    assert f"column {column!r}" in str(err) and reason in str(err)


def test_schemas_that_are_not_row_images_are_refused():
    with pytest.raises(RowSchemaError, match="not a Debezium envelope"):
        converters_for_envelope({"type": "record", "name": "Key", "fields": [{"name": "id", "type": "int"}]})
    with pytest.raises(RowSchemaError, match="must be an Avro record"):
        RowConverter({"type": "array", "items": "int"})


def test_the_converter_keeps_work_only_for_columns_that_need_it():
    conv = converters_for_envelope(envelope({"id": "int", "n": "long", "f": "double", "b": "boolean", "s": "string"}))
    assert repr(conv) == "RowConverter(5 columns, 1 converted)"  # only the string, for the placeholder
