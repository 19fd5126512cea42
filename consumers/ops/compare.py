"""One comparison rule per source column type, shared by `cdc verify`, `cdc resync` and the tests.

Two values are equal exactly when their normal forms are. The normal form is decided by the SOURCE column's type
(the destination may hold the value in another type: MariaDB has no interval, DuckDB may keep JSON as text) and
accepts whatever Python value a destination's driver returns for it:

| source type            | normal form                                                                        |
|------------------------|------------------------------------------------------------------------------------|
| smallint/int/bigint    | int                                                                                |
| boolean                | 0 / 1 (MariaDB has tinyint)                                                        |
| real (float4)          | its float32 value to 6 significant digits (6.3139997 = 6.313999652862549 = 6.314)   |
| double precision       | the float64 value, exactly; NaN equals NaN                                         |
| numeric(p, s)          | the Decimal without trailing zeros (1.50 = 1.5); a float destination: as that float |
| char(n)                | the text without trailing spaces (the padding is not data)                         |
| text, varchar, enum    | the text                                                                           |
| uuid                   | lower-case canonical text                                                          |
| bytea                  | hex of the bytes                                                                   |
| timestamp(tz)          | microseconds since 1970-01-01 UTC (naive values are UTC); infinity as text         |
| date                   | days since 1970-01-01; infinity as text                                            |
| time(tz)               | microseconds since midnight (UTC for timetz)                                       |
| interval               | (months, days, microseconds) where both sides hold intervals; against a destination |
|                        | holding microseconds (MariaDB), microseconds with a month of 30.4375 days            |
| json, jsonb            | canonical JSON: keys sorted, no spaces, numbers as exact decimals                  |
| arrays                 | a tuple of the elements' normal forms (by the element type), nested for dimensions |
| anything else          | its text                                                                           |

The same rules exist as SQL (consumers/apply/dialects/canon.py, one class per backend, which each dialect gives
through `Dialect.canon`), one expression per type and engine, giving a text identical on PostgreSQL,
MariaDB and DuckDB whenever the normal forms are equal; `cdc verify` hashes that text inside each database. Where
an engine cannot spell a type's canonical text (JSON spacing, arrays stored as JSON text, float exponents), the
texts may differ for equal values: verify then fetches those rows and lets the Python rule decide, so such a
difference costs time, never a false alarm.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.types import (
    ARRAY,
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    Enum,
    Float,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    SmallInteger,
    String,
    Time,
    TypeEngine,
    Uuid,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_DATE = date(1970, 1, 1)
# Debezium's MicroDuration (io.debezium.time.MicroDuration): a month is 365.25 / 12 = 30.4375 days.
MONTH_MICROS = 2_629_800_000_000
DAY_MICROS = 86_400_000_000


@dataclass(frozen=True)
class Kind:
    """What the comparison rule needs to know of a source column type."""

    name: str  # int, bool, float4, float8, numeric, char, text, uuid, bytes, timestamp, date, time, interval, json,
    #            array, other
    element: Kind | None = None  # arrays: the element's kind
    scale: int | None = None  # numeric(p, s)
    sql_type: str | None = None  # "other" kinds: the source type's name (inet, int4range...)


def kind_of(type_: TypeEngine) -> Kind:
    """The comparison kind of a source (PostgreSQL-reflected SQLAlchemy) column type."""
    if isinstance(type_, pg.DOMAIN):
        return kind_of(type_.data_type)
    if isinstance(type_, (ARRAY, pg.ARRAY)):
        return Kind("array", element=kind_of(type_.item_type))
    if isinstance(type_, (JSON, pg.JSON, pg.JSONB, pg.HSTORE)):
        return Kind("json")  # hstore too: the destinations without it hold it as a JSON object
    if isinstance(type_, pg.BIT):
        return Kind("bits", scale=type_.length if not type_.varying else None)
    if isinstance(type_, Boolean):
        return Kind("bool")
    if isinstance(type_, (SmallInteger, Integer, BigInteger, pg.OID)):
        return Kind("int")
    if isinstance(type_, pg.REAL) or (isinstance(type_, Float) and not isinstance(type_, Double)
                                     and type_.precision is not None and type_.precision <= 24):
        return Kind("float4")
    if isinstance(type_, (Double, pg.DOUBLE_PRECISION, Float)):
        return Kind("float8")
    if isinstance(type_, pg.MONEY):
        return Kind("money")
    if isinstance(type_, Numeric):
        return Kind("numeric", scale=type_.scale)
    if isinstance(type_, (Uuid, pg.UUID)):
        return Kind("uuid")
    if isinstance(type_, (LargeBinary, pg.BYTEA)):
        return Kind("bytes")
    if isinstance(type_, (pg.INTERVAL, Interval)):
        return Kind("interval")
    if isinstance(type_, DateTime):
        return Kind("timestamp")
    if isinstance(type_, Date):
        return Kind("date")
    if isinstance(type_, Time):
        return Kind("time")
    if isinstance(type_, Enum):
        return Kind("text")
    if isinstance(type_, String):
        # char(n) / character(n) (bpchar): padded with spaces to n, which is not data.
        if type(type_).__name__ in ("CHAR", "NCHAR") or getattr(type_, "__visit_name__", "") in ("CHAR", "NCHAR"):
            return Kind("char")
        return Kind("text")
    return Kind("other", sql_type=type(type_).__name__.lower())


# ---------------------------------------------------------------------------------------------------------------
# Python


def normal(kind: Kind, value: Any) -> Any:
    """The normal form of a value of a column of this kind, whatever driver returned it (None stays None)."""
    if value is None:
        return None
    try:
        return _NORMAL[kind.name](kind, value)
    except (ValueError, TypeError, ArithmeticError, InvalidOperation, OverflowError):
        return ("unreadable", str(value))  # equal only to the same unreadable text


def normal_row(kinds: list[Kind], row: Any) -> tuple:
    return tuple(normal(k, v) for k, v in zip(kinds, row))


def equal(kind: Kind, a: Any, b: Any) -> bool:
    """Whether two values of a column of this kind are the same value (a from the source, b from a destination)."""
    na, nb = normal(kind, a), normal(kind, b)
    if kind.name == "numeric" and isinstance(b, float) and not isinstance(a, float) and a is not None:
        # A destination that keeps numerics as binary floats holds the source value to its own precision.
        return _float8(kind, a) == nb if isinstance(nb, float) else na == nb
    return na == nb


def _int(kind: Kind, v: Any) -> int:
    if isinstance(v, (bytes, bytearray)):
        return int.from_bytes(v, "big")
    return int(v)


def _bool(kind: Kind, v: Any) -> int:
    if isinstance(v, str):
        return 1 if v.strip().lower() in ("1", "t", "true", "y", "yes", "on") else 0
    return 1 if v else 0


def _float4(kind: Kind, v: Any) -> Any:
    # A real holds 6 significant decimal digits for sure (FLT_DIG), and that is all some destinations hand out
    # (MariaDB prints a FLOAT with 6 digits: the float32 6.3139997 comes back as 6.314), so that is the rule.
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return f
    return float(f"{struct.unpack('f', struct.pack('f', f))[0]:.6g}")


def _float8(kind: Kind, v: Any) -> Any:
    if isinstance(v, str):
        v = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}.get(v.strip().lower(), v)
    f = float(v)
    return "NaN" if math.isnan(f) else f


def _numeric(kind: Kind, v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return v  # compared as a float (see `equal`)
    d = v if isinstance(v, Decimal) else Decimal(str(v).strip())
    if d.is_nan():
        return "NaN"
    if d.is_infinite():
        return str(d)
    if d == 0:
        return Decimal(0)
    return d.normalize()


def _char(kind: Kind, v: Any) -> str:
    return str(v).rstrip(" ")


def _text(kind: Kind, v: Any) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "surrogateescape")
    return str(v)


def _uuid(kind: Kind, v: Any) -> str:
    if isinstance(v, (bytes, bytearray)) and len(v) == 16:
        return str(uuid.UUID(bytes=bytes(v)))
    return str(uuid.UUID(str(v)))


def _bytes(kind: Kind, v: Any) -> str:
    if isinstance(v, str):
        text = v[2:] if v.startswith("\\x") else v
        return text.lower()
    return bytes(v).hex()


def _micros(d: datetime) -> int:
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    delta = d - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _timestamp(kind: Kind, v: Any) -> Any:
    if isinstance(v, datetime):
        return _micros(v)
    if isinstance(v, (int, Decimal)):
        return int(v)
    if isinstance(v, date):
        return _micros(datetime(v.year, v.month, v.day))
    text = str(v).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return _micros(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return text.lower()  # infinity, BC dates: as text


def _date(kind: Kind, v: Any) -> Any:
    if isinstance(v, datetime):
        v = v.date()
    if isinstance(v, date):
        return (v - EPOCH_DATE).days
    if isinstance(v, (int, Decimal)):
        return int(v)
    text = str(v).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return (date.fromisoformat(text[:10]) - EPOCH_DATE).days
    except ValueError:
        return text.lower()


def _time(kind: Kind, v: Any) -> Any:
    if isinstance(v, timedelta):  # PyMySQL returns TIME as a timedelta
        return v // timedelta(microseconds=1)
    if isinstance(v, (int, Decimal)):
        return int(v)
    if isinstance(v, str):
        text = v.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        if text == "24:00:00":
            return DAY_MICROS
        v = time.fromisoformat(text)
    micros = ((v.hour * 60 + v.minute) * 60 + v.second) * 1_000_000 + v.microsecond
    offset = v.utcoffset()
    if offset:
        micros = (micros - offset // timedelta(microseconds=1)) % DAY_MICROS
    return micros


_INTERVAL_PART = re.compile(r"(-?\d+)\s*(years?|mons?|months?|days?)", re.I)
_INTERVAL_CLOCK = re.compile(r"(-?)(\d+):(\d\d):(\d\d(?:\.\d+)?)")


def _interval(kind: Kind, v: Any) -> Any:
    """(months, days, microseconds) from the exact text 'M/D/U' both sides give when both hold real intervals;
    otherwise microseconds, a month counted as 30.4375 days (what MariaDB's BIGINT holds)."""
    if isinstance(v, str) and v.count("/") == 2:
        months, days, micros = v.split("/")
        return int(months), int(days), int(micros)
    if isinstance(v, timedelta):
        return v // timedelta(microseconds=1)
    if isinstance(v, (int, Decimal)):
        return int(v)
    if isinstance(v, float):
        return round(v)
    months_days = getattr(v, "months", None)  # DuckDB / psycopg Relativedelta-like objects
    if months_days is not None and hasattr(v, "days"):
        return (v.months * MONTH_MICROS + v.days * DAY_MICROS + getattr(v, "microseconds", 0))
    text = str(v).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    micros = 0
    for number, unit in _INTERVAL_PART.findall(text):
        unit = unit.lower()
        n = int(number)
        micros += n * (12 * MONTH_MICROS if unit.startswith("year") else MONTH_MICROS if unit.startswith("mon")
                       else DAY_MICROS)
    clock = _INTERVAL_CLOCK.search(text)
    if clock:
        sign = -1 if clock.group(1) else 1
        micros += sign * (int(clock.group(2)) * 3_600_000_000 + int(clock.group(3)) * 60_000_000
                          + round(Decimal(clock.group(4)) * 1_000_000))
    if not clock and not _INTERVAL_PART.search(text):
        raise ValueError(f"not an interval: {text!r}")
    return micros


def _canon_json(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + _canon_json(value[k]) for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_canon_json(x) for x in value) + "]"
    if isinstance(value, Decimal):
        return str(value.normalize()) if value == value.to_integral_value() or True else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(Decimal(value))
    return json.dumps(value)


def _json(kind: Kind, v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        v = v.decode()
    parsed = json.loads(v, parse_float=Decimal, parse_int=Decimal) if isinstance(v, str) else _decimals(v)
    return _canon_json(parsed)


def _decimals(v: Any) -> Any:
    """A value already parsed by a driver, with its numbers as Decimals (as `_json` parses text)."""
    if isinstance(v, dict):
        return {k: _decimals(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_decimals(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
    return v


def pg_array(text: str) -> list:
    """PostgreSQL's text of an array ('{1,NULL,"a b","q\\"u"}', nested braces for dimensions) as a list of texts
    and Nones: what psycopg returns for arrays of types it does not know (arrays of a domain)."""
    text = text.strip()
    if text.startswith("[") and "=" in text[:text.find("{")]:  # explicit bounds: '[0:1]={1,2}'
        text = text[text.index("=") + 1:]
    pos = 0

    def parse() -> list:
        nonlocal pos
        if text[pos] != "{":
            raise ValueError(f"not an array literal: {text!r}")
        pos += 1
        items: list = []
        while pos < len(text):
            c = text[pos]
            if c == "}":
                pos += 1
                return items
            if c == ",":
                pos += 1
            elif c == "{":
                items.append(parse())
            elif c == '"':
                pos += 1
                out = []
                while text[pos] != '"':
                    if text[pos] == "\\":
                        pos += 1
                    out.append(text[pos])
                    pos += 1
                pos += 1
                items.append("".join(out))
            else:
                end = pos
                while text[end] not in ",}":
                    end += 1
                word = text[pos:end].strip()
                items.append(None if word.upper() == "NULL" else word)
                pos = end
        raise ValueError(f"unterminated array literal: {text!r}")

    return parse()


def _array(kind: Kind, v: Any) -> tuple:
    if isinstance(v, (bytes, bytearray)):
        v = v.decode()
    if isinstance(v, str):
        # MariaDB, and DuckDB text columns, hold arrays as JSON text; psycopg gives PostgreSQL's array text for
        # arrays of types it does not know.
        v = pg_array(v) if _is_pg_array(v) else json.loads(v, parse_float=Decimal)
    element = kind.element or Kind("other")
    if element.name == "json":
        # An element that is JSON null: psycopg reads it as None, a JSON[] column as 'null'.
        return tuple("null" if x is None else normal(element, x) for x in v)

    def each(items: Any) -> tuple:
        return tuple(each(x) if isinstance(x, (list, tuple)) and element.name not in ("json", "array")
                     else normal(element, x) for x in items)

    return each(v)


def _is_pg_array(v: str) -> bool:
    text = v.strip()
    return text.startswith("{") or (text.startswith("[") and "]={" in text)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _other(kind: Kind, v: Any) -> str:
    """Types carried as PostgreSQL's text (ranges, geometry, network, text search, xml...): that text, with every
    number read as a float (a destination may print 1 as 1.0); DuckDB's point STRUCT as '(x,y)'."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        v = bytes(v).decode("utf-8", "surrogateescape")
    if isinstance(v, dict) and set(v) == {"x", "y"}:
        v = f"({v['x']},{v['y']})"
    elif isinstance(v, dict):
        v = _composite_text(v)  # DuckDB's STRUCT of a composite type: as PostgreSQL writes the composite
    elif isinstance(v, list):
        return json.dumps(v, sort_keys=True, default=str)
    return _NUMBER.sub(lambda m: repr(float(m.group())), str(v))


def _composite_text(fields: dict) -> str:
    """PostgreSQL's text of a composite value: '(a,"b c",,1000)' (NULL empty; quoted when it must be)."""
    out = []
    for value in fields.values():
        if value is None:
            out.append("")
            continue
        text = _composite_text(value) if isinstance(value, dict) else str(value)
        if text == "" or any(c in text for c in '",\\() \t\n'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '""') + '"'
        out.append(text)
    return "(" + ",".join(out) + ")"


def _money(kind: Kind, v: Any) -> Any:
    if isinstance(v, str):
        negative = "-" in v or "(" in v
        v = re.sub(r"[^0-9.]", "", v)
        v = ("-" if negative else "") + v
    return _numeric(kind, v)


def _bits(kind: Kind, v: Any) -> str:
    """A bit string as its 0s and 1s (MariaDB's BIT gives bytes)."""
    if isinstance(v, (bytes, bytearray)):
        n = kind.scale or len(v) * 8
        return format(int.from_bytes(v, "big"), f"0{n}b")[-n:]
    if isinstance(v, int) and not isinstance(v, bool):
        return format(v, f"0{kind.scale or 1}b")
    return str(v)


_NORMAL = {"int": _int, "bool": _bool, "float4": _float4, "float8": _float8, "numeric": _numeric, "char": _char,
           "text": _text, "uuid": _uuid, "bytes": _bytes, "timestamp": _timestamp, "date": _date, "time": _time,
           "interval": _interval, "json": _json, "array": _array, "other": _other, "money": _money,
           "bits": _bits}


def jsonable(value: Any) -> Any:
    """A key value as `cdc verify --json` prints it: numbers and text as they are, anything else as its text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, (list, tuple)):
        return [jsonable(x) for x in value]
    return str(value)
