"""Debezium row images to Python values ready to bind into PostgreSQL (psycopg 3) and MariaDB (PyMySQL), pure.

A `RowConverter` is built once per writer schema: it reads every column's Avro type and Kafka Connect semantic
name (`connect.name`) up front and keeps one small function per column that needs work, so that converting a
row on the applier's hot path is a dict copy plus those calls, with no schema inspection.

What each Debezium type becomes (with the connector settings producers/debezium.py generates:
`decimal.handling.mode=precise`, `time.precision.mode=adaptive_time_microseconds`):

| Debezium / Avro                                   | Python                                                      |
|---------------------------------------------------|-------------------------------------------------------------|
| io.debezium.time.Date (int days)                  | datetime.date                                               |
| io.debezium.time.Timestamp / MicroTimestamp / NanoTimestamp | naive datetime.datetime (timestamp without time zone) |
| io.debezium.time.ZonedTimestamp (ISO-8601 text)   | aware datetime.datetime in UTC                              |
| io.debezium.time.Time / MicroTime / NanoTime      | datetime.time                                               |
| io.debezium.time.ZonedTime (ISO-8601 text)        | aware datetime.time in UTC                                  |
| io.debezium.time.Interval (ISO-8601 text)         | unchanged: the exact text ('P1Y-2M3DT4H5M6.789S'); the     |
|                                                   | connector sends it (interval.handling.mode=string)          |
| io.debezium.time.MicroDuration (long micros)      | datetime.timedelta (events written before that setting)     |
| org.apache.kafka.connect.data.Decimal             | decimal.Decimal                                             |
| io.debezium.data.VariableScaleDecimal             | decimal.Decimal                                             |
| io.debezium.data.Json (json, jsonb, hstore)       | str: the JSON text as Debezium sent it                      |
| io.debezium.data.Uuid                             | uuid.UUID                                                   |
| bytes (bytea)                                     | bytes                                                       |
| array                                             | list of converted elements                                  |
| everything else (ints, floats, bools, strings, enums, inet, xml, bits, geometry ...) | unchanged   |

What is left as Debezium sent it and needs the source column's type to be read (io.debezium.data.Bits, the Point
record, and the bytes of PostgreSQL's text that `include.unknown.datatypes` gives composites, multiranges, tsquery
and the other geometric types) is turned into each destination's value by its dialect: docs/types.md has the whole
mapping, consumers/apply/dialects/types.py the shared conversions.

Decisions:

- Json stays text. Parsing would cost time on the hot path and lose what `json` (unlike `jsonb`) keeps: key
  order, duplicate keys, spacing. psycopg binds a `str` as an untyped literal that PostgreSQL casts to json/jsonb,
  and MariaDB's JSON is LONGTEXT. Beware SQLAlchemy's JSON/JSONB column types: their bind processor serialises
  whatever it gets, so a str would be stored as a JSON *string*; bind JSON columns as text (or cast), not as JSON.
- Uuid becomes uuid.UUID: psycopg binds it as a native uuid, SQLAlchemy's `Uuid` type (as_uuid=True, its
  default) requires UUID objects on backends without a native uuid, PyMySQL writes it as the canonical
  36-character text MariaDB's UUID type reads, and it compares equal to what psycopg reads from the source.
- ZonedTime becomes an aware time in UTC: psycopg binds an aware time as timetz. Debezium has already normalised
  the value to UTC ('12:00+02' arrives as '10:00Z'), so the original offset is gone before we see it; the instant
  is kept. MariaDB has no timetz: PyMySQL writes the UTC wall time.
- Values PostgreSQL can hold but Python's datetime types cannot come out as PostgreSQL's own input literal (a
  str): 'infinity' / '-infinity' timestamps and dates, years before 1 or after 9999 ('0044-03-15 12:00:00 BC'),
  and time '24:00:00'. psycopg sends a str untyped, so PostgreSQL (and DuckDB, for infinity) parses it into the
  column's type; MariaDB cannot store such values and rejects them, which is better than a silent substitute.
  Debezium encodes a date's infinity differently in a snapshot (JDBC) and when streaming (pgoutput); both
  encodings are recognised.
- Intervals travel as Debezium's ISO-8601 text, exact (PostgreSQL reads it as it is). A MicroDuration (Debezium's
  default, from topics written before) is what Debezium made of the interval: it counts a month as 30.4375 days
  and a year as 365.25 days, so an interval with months or years was approximated on the wire.
- `real` arrives as an Avro float (32-bit); the Python float is the exact float32 value (0.1 comes as
  0.10000000149011612), which a real/FLOAT destination column stores back as the same float32.

Unchanged TOASTed columns (replica identity DEFAULT) arrive as Debezium's placeholder, which this module turns
into the `UNAVAILABLE` sentinel. What Debezium 3.6 sends, by column type:
text-like and json: the placeholder string; bytea: its UTF-8 bytes; hstore (json mode): a JSON object mapping
the placeholder to itself; text/varchar/json arrays: a one-element list of it; int4/int8/date arrays: the list of
the placeholder's bytes as integers; uuid arrays: a one-element list holding the name-based (v3, no namespace)
UUID of the placeholder's bytes. Other arrays (smallint[], float8[], numeric[], timestamp[] ...) arrive as NULL,
which nothing downstream can tell from a real NULL: such tables need REPLICA IDENTITY FULL.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, time, timedelta
from decimal import MAX_PREC, Context, Decimal
from typing import Any

from cdc.errors import CdcError, Terminal

PLACEHOLDER = "__debezium_unavailable_value"  # Debezium's default `unavailable.value.placeholder`

INFINITY = "infinity"
NEG_INFINITY = "-infinity"

Converter = Callable[[Any], Any]


class _Unavailable:
    """The type of `UNAVAILABLE`; a single instance that survives copy and pickle as itself."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNAVAILABLE"

    def __reduce__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE = _Unavailable()
"""Debezium did not send this column's value (an unchanged TOASTed column): never write it, keep what is there."""


class ValueConversionError(CdcError, Terminal):
    """A column value could not be converted; names the column, its Debezium type and the value."""

    def __init__(self, column: str, logical_type: str, value: Any, reason: str) -> None:
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"column {column!r} ({logical_type}): cannot convert {shown}: {reason}")
        self.column = column
        self.logical_type = logical_type
        self.value = value


class RowSchemaError(CdcError, Terminal):
    """The schema given is not a Debezium row image (or envelope) this module can build a converter for."""


# --- dates and times ------------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_MIN_DAYS = date.min.toordinal() - _EPOCH_ORDINAL
_MAX_DAYS = date.max.toordinal() - _EPOCH_ORDINAL
_DAY_US = 86_400_000_000
_MIN_US = _MIN_DAYS * _DAY_US
_MAX_US = (_MAX_DAYS + 1) * _DAY_US - 1
_UTC = UTC

# How Debezium 3.6 sends PostgreSQL's +/-infinity (observed on both of its paths; see the module docstring).
# Timestamps: these micro- (or milli-) second counts, from PGStatement.DATE_POSITIVE_INFINITY.
_TS_INFINITY_US = 9_223_372_036_825_200_000
_TS_NEG_INFINITY_US = -9_223_372_036_832_400_000
# Dates: a snapshot (JDBC) sends the millisecond count above in days, wrapped to 32 bits; streaming (pgoutput)
# sends the epoch days of its sentinel dates -5877611-06-21 (+infinity, sic) and -5877611-06-22 (-infinity).
_DATE_INFINITY = frozenset({-622_191_234, -2_147_472_692})
_DATE_NEG_INFINITY = frozenset({-625_821_272, -2_147_472_691})
# The range of PostgreSQL's date: 4714-11-24 BC .. 5874897-12-31. A later count can only be a sentinel for
# +infinity (Debezium means to move it to +5877611-06-21); an earlier unknown one is an error.
_PG_MIN_DAYS = -2_440_588
_PG_MAX_DAYS = 2_145_042_905
# Debezium clamps a timestamp whose microseconds overflow a long (years near 294276) to the long's bounds.
_LONG_BOUNDS = frozenset({2**63 - 1, -(2**63)})
_CLAMPED = "Debezium clamped an out-of-range timestamp to the bounds of a long: the value is lost"


def _civil(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (astronomical year, month, day) of a day count from 1970-01-01, for any range."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _pg_date(year: int, month: int, day: int) -> tuple[str, str]:
    """PostgreSQL's spelling of a date, and its era suffix (' BC' for astronomical years <= 0, else '')."""
    if year <= 0:
        return f"{1 - year:04d}-{month:02d}-{day:02d}", " BC"
    return f"{year:04d}-{month:02d}-{day:02d}", ""


def _days_to_date(days: int) -> date | str:
    if _MIN_DAYS <= days <= _MAX_DAYS:
        return date.fromordinal(days + _EPOCH_ORDINAL)
    if days in _DATE_INFINITY or days > _PG_MAX_DAYS:
        return INFINITY
    if days in _DATE_NEG_INFINITY:
        return NEG_INFINITY
    if days < _PG_MIN_DAYS:
        raise ValueError("before PostgreSQL's first date, and not a known encoding of -infinity")
    text, era = _pg_date(*_civil(days))
    return text + era


def _micros_to_timestamp(micros: int) -> datetime | str:
    if _MIN_US <= micros <= _MAX_US:
        return _EPOCH + timedelta(microseconds=micros)
    if micros == _TS_INFINITY_US:
        return INFINITY
    if micros == _TS_NEG_INFINITY_US:
        return NEG_INFINITY
    if micros in _LONG_BOUNDS:
        raise ValueError(_CLAMPED)
    days, rest = divmod(micros, _DAY_US)
    text, era = _pg_date(*_civil(days))
    return f"{text} {_clock(rest)}{era}"


def _millis_to_timestamp(millis: int) -> datetime | str:
    # Debezium's millisecond infinities are the microsecond ones divided by 1000.
    if millis * 1000 == _TS_INFINITY_US:
        return INFINITY
    if millis * 1000 == _TS_NEG_INFINITY_US:
        return NEG_INFINITY
    if millis in _LONG_BOUNDS:
        raise ValueError(_CLAMPED)
    return _micros_to_timestamp(millis * 1000)


def _nanos_to_timestamp(nanos: int) -> datetime | str:
    return _micros_to_timestamp(nanos // 1000)  # PostgreSQL keeps microseconds: nothing is lost


def _clock(micros: int) -> str:
    seconds, us = divmod(micros, 1_000_000)
    minutes, s = divmod(seconds, 60)
    h, m = divmod(minutes, 60)
    return f"{h:02d}:{m:02d}:{s:02d}.{us:06d}" if us else f"{h:02d}:{m:02d}:{s:02d}"


def _micros_to_time(micros: int) -> time | str:
    if 0 <= micros < _DAY_US:
        seconds, us = divmod(micros, 1_000_000)
        minutes, s = divmod(seconds, 60)
        h, m = divmod(minutes, 60)
        return time(h, m, s, us)
    if micros == _DAY_US:
        return "24:00:00"  # PostgreSQL's time allows the end of the day; Python's does not
    raise ValueError("outside 00:00:00..24:00:00")


def _millis_to_time(millis: int) -> time | str:
    return _micros_to_time(millis * 1000)


def _nanos_to_time(nanos: int) -> time | str:
    return _micros_to_time(nanos // 1000)


# ISO-8601 as java.time prints years outside 0000..9999: a sign and at least four digits.
_WIDE_ISO = re.compile(r"([+-]?\d{4,})-(\d\d)-(\d\d)T(\d\d:\d\d:\d\d(?:\.\d+)?)(Z|[+-]\d\d(?::?\d\d){0,2})")


def _zoned_timestamp(text: str) -> datetime | str:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        if text in (INFINITY, NEG_INFINITY):
            return text
        match = _WIDE_ISO.fullmatch(text)
        if match is None:
            raise
        year, month, day, clock, offset = match.groups()
        date_text, era = _pg_date(int(year), int(month), int(day))
        return f"{date_text} {clock}{'+00' if offset == 'Z' else offset}{era}"
    if value.tzinfo is None:
        raise ValueError("no time zone in a ZonedTimestamp")
    return value if value.tzinfo is _UTC else value.astimezone(_UTC)


def _zoned_time(text: str) -> time:
    value = time.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError("no time zone in a ZonedTime")
    return value


def _micro_duration(micros: int) -> timedelta:
    return timedelta(microseconds=micros)


# --- numbers --------------------------------------------------------------------------------------------------

_EXACT = Context(prec=MAX_PREC)  # scaleb under the default context would round beyond 28 digits


def _unscaled(raw: bytes, scale: int) -> Decimal:
    return Decimal(int.from_bytes(raw, "big", signed=True)).scaleb(-scale, _EXACT)


def _fixed_decimal(scale: int) -> Converter:
    def convert(value: Any) -> Decimal:
        # fastavro already gives a Decimal when the writer schema has logicalType decimal (Apicurio's converter
        # writes it); raw bytes only come from a schema without it.
        if type(value) is Decimal:
            return value
        return _unscaled(value, scale)
    return convert


def _variable_decimal(value: Mapping[str, Any]) -> Decimal:
    return _unscaled(value["value"], value["scale"])


# --- placeholders ---------------------------------------------------------------------------------------------

class _Placeholders:
    """Every shape Debezium gives its placeholder, derived from the placeholder text (see the module docstring)."""

    def __init__(self, text: str) -> None:
        raw = text.encode()
        self.text = text
        self.raw = raw
        self.text_list = [text]
        # Java bytes are signed: that is what the connector puts in an int/bigint/date array.
        self.int_list = [b - 256 if b > 127 else b for b in raw]
        self.uuid_list = [str(uuid.UUID(bytes=hashlib.md5(raw).digest(), version=3))]
        self.hstore_json = f'{{"{text}":"{text}"}}'
        self.hstore_map = {text: text}


# --- schema walking -------------------------------------------------------------------------------------------

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_NAMED = frozenset({"record", "error", "enum", "fixed"})


def _full_name(name: str, namespace: str | None) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def named_types(schema: Any, namespace: str | None = None, out: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every named type (record, enum, fixed) defined in `schema`, by full name; plain or fastavro-parsed form."""
    out = {} if out is None else out
    if isinstance(schema, list):
        for branch in schema:
            named_types(branch, namespace, out)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in _NAMED and isinstance(schema.get("name"), str):
            full = _full_name(schema["name"], schema.get("namespace", namespace))
            out.setdefault(full, schema)
            namespace = full.rpartition(".")[0] or None
        if isinstance(kind, (dict, list)):
            named_types(kind, namespace, out)
        for field in schema.get("fields", ()) if kind in ("record", "error") else ():
            named_types(field.get("type"), namespace, out)
        if kind == "array":
            named_types(schema.get("items"), namespace, out)
        elif kind == "map":
            named_types(schema.get("values"), namespace, out)
    return out


def _resolve(schema: Any, names: Mapping[str, dict], namespace: str | None) -> Any:
    """A named reference replaced by its definition; a {"type": {...}} wrapper unwrapped; else as given."""
    while True:
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            found = names.get(_full_name(schema, namespace)) or names.get(schema)
            if found is None:
                return schema  # an unknown reference: its values pass through
            schema = found
        elif isinstance(schema, dict) and isinstance(schema.get("type"), (dict, list)):
            schema = schema["type"]
        else:
            return schema


def _namespace_of(schema: Any, namespace: str | None) -> str | None:
    if isinstance(schema, dict) and schema.get("type") in _NAMED and isinstance(schema.get("name"), str):
        full = _full_name(schema["name"], schema.get("namespace", namespace))
        return full.rpartition(".")[0] or None
    return namespace


def _non_null(schema: Any) -> Any:
    """The one non-null branch of a union with null (None when there are several); other schemas as given."""
    if not isinstance(schema, list):
        return schema
    branches = [b for b in schema if b != "null"]
    return branches[0] if len(branches) == 1 else None


def _describe(schema: Any, names: Mapping[str, dict], namespace: str | None) -> str:
    """A column's type as error messages and callers name it: the Connect name, else the Avro type."""
    base, props = _shape(schema, names, namespace)
    if base == "array":
        return f"array<{_describe(props.get('items'), names, namespace)}>"
    return _logical_name(props or base or "union")


def _logical_name(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        name = schema.get("connect.name") or schema.get("logicalType")
        if name:
            return name
        kind = schema.get("type")
        if kind in _NAMED and isinstance(schema.get("name"), str):
            return _full_name(schema["name"], schema.get("namespace"))
        return kind if isinstance(kind, str) else "unknown"
    return "union"


_TIME_CONVERTERS: dict[str, Converter] = {
    "io.debezium.time.Date": _days_to_date,
    "io.debezium.time.Timestamp": _millis_to_timestamp,
    "io.debezium.time.MicroTimestamp": _micros_to_timestamp,
    "io.debezium.time.NanoTimestamp": _nanos_to_timestamp,
    "io.debezium.time.ZonedTimestamp": _zoned_timestamp,
    "io.debezium.time.Time": _millis_to_time,
    "io.debezium.time.MicroTime": _micros_to_time,
    "io.debezium.time.NanoTime": _nanos_to_time,
    "io.debezium.time.ZonedTime": _zoned_time,
    "io.debezium.time.MicroDuration": _micro_duration,
}
_VARIABLE_SCALE_DECIMAL = "io.debezium.data.VariableScaleDecimal"
_DECIMAL = "org.apache.kafka.connect.data.Decimal"


def _guarded(placeholder: Any, convert: Converter | None) -> Converter | None:
    """`convert`, with the placeholder turned into UNAVAILABLE first (convert None: no conversion besides that;
    placeholder None: no placeholder to look for)."""
    if placeholder is None:
        return convert
    if convert is None:
        return lambda v: UNAVAILABLE if v == placeholder else v
    return lambda v: UNAVAILABLE if v == placeholder else convert(v)


def _array(items: Converter | None, placeholder: Any) -> Converter:
    if items is None:
        return lambda v: UNAVAILABLE if v == placeholder else v
    if placeholder is None:
        return lambda v: [None if x is None else items(x) for x in v]
    # The whole list is compared before any element is converted: a date array's placeholder is a list of ints.
    return lambda v: UNAVAILABLE if v == placeholder else [None if x is None else items(x) for x in v]


def _shape(schema: Any, names: Mapping[str, dict], namespace: str | None) -> tuple[Any, dict]:
    """(Avro base type, properties) of a schema with references resolved and a union with null unwrapped;
    the base type is None for a union of several types."""
    schema = _resolve(_non_null(_resolve(schema, names, namespace)), names, namespace)
    if schema is None or isinstance(schema, list):
        return None, {}
    if isinstance(schema, str):
        return schema, {}
    return schema.get("type"), schema


def _array_placeholder(items: Any, names: Mapping[str, dict], namespace: str | None, ph: _Placeholders) -> Any:
    """The list Debezium sends for an unchanged TOASTed array of these items; None when it sends NULL."""
    base, props = _shape(items, names, namespace)
    name = props.get("connect.name")
    if name == "io.debezium.data.Uuid":
        return ph.uuid_list
    if base == "string":
        return ph.text_list  # text, varchar, json, jsonb and bpchar arrays
    if (base == "int" and name is None and props.get("connect.type") is None) or (base == "long" and name is None):
        return ph.int_list  # int4[] and int8[] (int2[] is int with connect.type int16: sent as NULL)
    if name == "io.debezium.time.Date":
        return ph.int_list
    return None


def _value_converter(schema: Any, names: Mapping[str, dict], namespace: str | None,
                     ph: _Placeholders | None) -> Converter | None:
    """The converter of one non-null value of `schema`; None when the value is used as it is.

    `ph` is None for the elements of an array or map: Debezium replaces a whole column, never an element.
    """
    base, props = _shape(schema, names, namespace)
    text = ph.text if ph else None
    name = props.get("connect.name")
    if name in _TIME_CONVERTERS:
        convert = _TIME_CONVERTERS[name]
        # Text-typed temporal values could carry the placeholder; numbers cannot.
        return _guarded(text, convert) if base == "string" else convert
    if name == _DECIMAL or props.get("logicalType") == "decimal":
        scale = props.get("scale")
        if scale is None:
            scale = (props.get("connect.parameters") or {}).get("scale", 0)
        return _fixed_decimal(int(scale))
    if base in ("record", "error"):
        full = _full_name(props.get("name", ""), props.get("namespace", namespace))
        if name == _VARIABLE_SCALE_DECIMAL or full == _VARIABLE_SCALE_DECIMAL:
            return _variable_decimal
        return None  # geometry and other structs: as fastavro gives them
    if name == "io.debezium.data.Uuid":
        return _guarded(text, uuid.UUID)
    if name == "io.debezium.data.Json":
        if ph is None:
            return None
        hstore = ph.hstore_json  # hstore, in its default json mode, is a Json field too
        return lambda v: UNAVAILABLE if v in (text, hstore) else v
    if base == "string":
        return _guarded(text, None)
    if base == "bytes":
        return _guarded(ph.raw if ph else None, None)
    if base == "array":
        items = _value_converter(props.get("items"), names, namespace, None)
        placeholder = _array_placeholder(props.get("items"), names, namespace, ph) if ph else None
        if items is None and placeholder is None:
            return None
        return _array(items, placeholder)
    if base == "map":
        values = _value_converter(props.get("values"), names, namespace, None)
        hstore_map = ph.hstore_map if ph else None  # hstore.handling.mode=map
        if hstore_map is None:
            return None if values is None else lambda v: {k: None if x is None else values(x) for k, x in v.items()}
        if values is None:
            return lambda v: UNAVAILABLE if v == hstore_map else v
        return lambda v: (UNAVAILABLE if v == hstore_map
                          else {k: None if x is None else values(x) for k, x in v.items()})
    return None


class RowConverter:
    """Converts the row images (`before`/`after`) of one writer schema; built once, then reused for every message.

    `value_schema` is the row record (Debezium's `Value`, or a `Key` record), plain or as fastavro parses it.
    `named` supplies named types the record refers to but does not define (converters_for_envelope passes the
    envelope's). `placeholder` is the connector's `unavailable.value.placeholder`.
    """

    __slots__ = ("columns", "logical_types", "_converters", "_renames")

    def __init__(self, value_schema: Mapping[str, Any], *, named: Mapping[str, dict] | None = None,
                 placeholder: str = PLACEHOLDER) -> None:
        if not isinstance(value_schema, Mapping) or value_schema.get("type") not in ("record", "error"):
            raise RowSchemaError(f"a row image schema must be an Avro record, not {_logical_name(value_schema)!r}")
        names = dict(named or {})
        names = named_types(value_schema, None, names)
        namespace = _namespace_of(value_schema, None)
        ph = _Placeholders(placeholder)
        self.columns: list[str] = []
        self.logical_types: dict[str, str] = {}
        converters: list[tuple[str, Converter]] = []
        for field in value_schema.get("fields", ()):
            column = field["name"]
            self.columns.append(column)
            self.logical_types[column] = _describe(field["type"], names, namespace)
            convert = _value_converter(field["type"], names, namespace, ph)
            if convert is not None:
                converters.append((column, convert))
        self._converters = tuple(converters)
        self._renames: tuple[tuple[str, str], ...] = ()

    def rename(self, real_names: Mapping[str, str]) -> RowConverter:
        """Key rows by real column names: Debezium writes a character Avro forbids in a name as "_", and the
        caller, which knows the table's real columns, says which field is which ({avro name: real name})."""
        self._renames = tuple((a, r) for a, r in real_names.items() if a != r and a in self.columns)
        lookup = dict(self._renames)
        self.columns = [lookup.get(c, c) for c in self.columns]
        self.logical_types = {lookup.get(c, c): t for c, t in self.logical_types.items()}
        return self

    def convert(self, row: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """A new dict of every column converted (None for None); raises ValueConversionError naming the column."""
        if row is None:
            return None
        out = dict(row)
        for column, convert in self._converters:
            value = out.get(column)
            if value is not None:
                try:
                    out[column] = convert(value)
                except (ValueError, TypeError, OverflowError, ArithmeticError, KeyError, AttributeError) as exc:
                    raise ValueConversionError(column, value=value, logical_type=self._logical(column),
                                               reason=str(exc) or type(exc).__name__) from exc
        for avro_name, column in self._renames:
            out[column] = out.pop(avro_name, None)
        return out

    def avro_names(self) -> dict[str, str]:
        """{real column name: the field's name in the Avro record} for every column."""
        back = {real: avro for avro, real in self._renames}
        return {c: back.get(c, c) for c in self.columns}

    def _logical(self, avro_column: str) -> str:
        return self.logical_types.get(dict(self._renames).get(avro_column, avro_column), "?")

    def __repr__(self) -> str:
        return f"RowConverter({len(self.columns)} columns, {len(self._converters)} converted)"


def converters_for_envelope(envelope_schema: Mapping[str, Any], *, placeholder: str = PLACEHOLDER) -> RowConverter:
    """The RowConverter of a Debezium change-event envelope's row images (its `after`, else `before`, record)."""
    if not isinstance(envelope_schema, Mapping) or envelope_schema.get("type") != "record":
        raise RowSchemaError("a Debezium envelope schema must be an Avro record")
    names = named_types(envelope_schema)
    namespace = _namespace_of(envelope_schema, None)
    fields = {f.get("name"): f for f in envelope_schema.get("fields", ())}
    for image in ("after", "before"):
        field = fields.get(image)
        if field is None:
            continue
        base, record = _shape(field["type"], names, namespace)
        if base == "record":
            return RowConverter(record, named=names, placeholder=placeholder)
    name = envelope_schema.get("connect.name") or envelope_schema.get("name")
    raise RowSchemaError(f"schema {name!r} is not a Debezium envelope: no record-typed 'after' or 'before' field")


def unavailable_columns(row: Mapping[str, Any] | None) -> list[str]:
    """The columns of a converted row that Debezium did not send (UNAVAILABLE), in row order."""
    if not row:
        return []
    return [column for column, value in row.items() if value is UNAVAILABLE]
