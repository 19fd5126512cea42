"""What a source column's PostgreSQL type is (read from the catalog), and which destination kinds cannot hold it.

Reflection through SQLAlchemy knows PostgreSQL's common types only: a domain, a composite type, `point`, `xml` or
`ltree` come back as a domain object or `NullType`, from which no destination DDL can be generated. `describe_columns`
reads the catalog instead and gives each column a `SourceType`: its category (one word per kind of type, the key of
every dialect's mapping in docs/types.md), the PostgreSQL spelling of the type (domains resolved to their base
type), lengths, precision and scale, an enum's labels, a composite's fields, an array's element type, and whether
the column is generated or an identity.

`refusals` is the pure check `cdc connectors apply` runs before anything changes: the columns a destination kind
cannot hold exactly, each with the reason (docs/types.md, "Refused").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.sql import sqltypes
from sqlalchemy.types import TypeEngine, UserDefinedType

# Categories by the base type's name in pg_type (typname).
_BY_NAME = {
    "int2": "int2", "int4": "int4", "int8": "int8", "oid": "int8", "numeric": "numeric", "float4": "float4",
    "float8": "float8", "bool": "bool", "text": "text", "varchar": "varchar", "bpchar": "char", "name": "text",
    "char": "text", "bytea": "bytea", "date": "date", "time": "time", "timetz": "timetz", "timestamp": "timestamp",
    "timestamptz": "timestamptz", "interval": "interval", "uuid": "uuid", "json": "json", "jsonb": "jsonb",
    "tsvector": "tsvector", "tsquery": "tsquery", "hstore": "hstore", "citext": "citext", "ltree": "ltree",
    "money": "money", "bit": "bit", "varbit": "varbit", "inet": "inet", "cidr": "cidr", "macaddr": "macaddr",
    "macaddr8": "macaddr8", "xml": "xml", "point": "point", "line": "line", "lseg": "lseg", "box": "box",
    "path": "path", "polygon": "polygon", "circle": "circle",
}
# Types whose values Debezium 3.6 sends only with `include.unknown.datatypes=true` (as PostgreSQL's text of the value,
# in bytes); without it the column is left out of every change event.
DEBEZIUM_UNKNOWN = frozenset({"composite", "multirange", "tsquery", "line", "lseg", "box", "path", "polygon",
                              "circle", "other"})
# Arrays Debezium 3.6 does not carry, even with include.unknown.datatypes (seen on the stack: "No converter found").
_DROPPED = "leaves columns of this array type out of its change events"
DEBEZIUM_NO_ARRAYS = {"interval": _DROPPED, "money": _DROPPED, "point": _DROPPED, "varbit": _DROPPED, "xml": _DROPPED,
                      "bit": "sends an array of bit(n) as one bit string: the elements are lost"}
# Arrays Debezium 3.6 sends as NULL, whole, when one of their elements is NULL (seen on the stack): nothing downstream
# can tell that from a NULL array. Arrays of domains too.
DEBEZIUM_NULL_ELEMENT_LOST = frozenset({"enum", "composite", "multirange", "tsvector", "tsquery", "ltree", "line",
                                        "lseg", "box", "path", "polygon", "circle"})
# Types that come from an extension: a PostgreSQL replica needs the extension too.
EXTENSION_OF = {"hstore": "hstore", "citext": "citext", "ltree": "ltree"}


@dataclass(frozen=True)
class SourceType:
    """A source column's type. `sql` is PostgreSQL's spelling (schema-qualified for user types); for a domain it is
    the base type's, and `domain` keeps the domain's name."""

    category: str
    sql: str
    length: int | None = None  # char(n), varchar(n), bit(n)
    precision: int | None = None  # numeric(p, s)
    scale: int | None = None
    element: SourceType | None = None  # arrays
    labels: tuple[str, ...] = ()  # enums, in sort order
    fields: tuple[tuple[str, SourceType], ...] = ()  # composite types
    schema: str | None = None  # enums, composites, extension types
    name: str | None = None
    domain: str | None = None
    generated: bool = False  # GENERATED ALWAYS AS (expression) STORED
    expression: str | None = None  # a generated column's expression, as the source prints it
    identity: bool = False

    @property
    def is_array(self) -> bool:
        return self.category == "array"

    def leaf(self) -> SourceType:
        """The element type of an array (of arrays), else itself."""
        return self.element.leaf() if self.element is not None else self


class RawType(UserDefinedType):
    """A column type given as the destination's own SQL text (a PostgreSQL type SQLAlchemy does not know)."""

    cache_ok = True

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def get_col_spec(self, **kw: Any) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"RawType({self.spec!r})"


# --- the source's catalog ---------------------------------------------------------------------------------------

_TYPE_QUERY = """
select t.typname, t.typtype, t.typcategory, t.typelem, t.typbasetype, t.typtypmod, t.typrelid, n.nspname,
       format_type(t.oid, %s)
from pg_type t join pg_namespace n on n.oid = t.typnamespace where t.oid = %s
"""
_COLUMNS_QUERY = """
select a.attname, a.atttypid, a.atttypmod, a.attgenerated <> '', a.attidentity <> '',
       case when a.attgenerated <> '' then pg_get_expr(d.adbin, d.adrelid) end
from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped order by a.attnum
"""
_NUMBERS = re.compile(r"\((-?\d+)(?:,\s*(-?\d+))?\)")


def _qualified(schema: str, name: str) -> str:
    quote = lambda s: s if re.fullmatch(r"[a-z_][a-z0-9_]*", s) else '"' + s.replace('"', '""') + '"'  # noqa: E731
    return f"{quote(schema)}.{quote(name)}"


def describe_type(cursor: Any, oid: int, typmod: int, _depth: int = 0) -> SourceType:
    """The SourceType of a type oid with its modifier, read through a DB-API cursor on the source (psycopg)."""
    if _depth > 20:
        raise ValueError(f"type {oid}: nested too deeply")
    cursor.execute(_TYPE_QUERY, (typmod, oid))
    row = cursor.fetchone()
    if row is None:
        raise ValueError(f"type {oid} not found")
    typname, typtype, category, elem, basetype, basemod, relid, schema, spelled = row
    if typtype == "d":
        base = describe_type(cursor, basetype, basemod if basemod != -1 else typmod, _depth + 1)
        return _replace(base, domain=_qualified(schema, typname))
    if category == "A" and elem:
        element = describe_type(cursor, elem, typmod, _depth + 1)
        return SourceType("array", element.sql + "[]", element=element)
    if typtype == "e":
        cursor.execute("select enumlabel from pg_enum where enumtypid = %s order by enumsortorder", (oid,))
        labels = tuple(r[0] for r in cursor.fetchall())
        return SourceType("enum", _qualified(schema, typname), labels=labels, schema=schema, name=typname)
    if typtype == "c":
        cursor.execute("select attname, atttypid, atttypmod from pg_attribute where attrelid = %s and attnum > 0 "
                       "and not attisdropped order by attnum", (relid,))
        fields = tuple((name, describe_type(cursor, t, m, _depth + 1)) for name, t, m in cursor.fetchall())
        return SourceType("composite", _qualified(schema, typname), fields=fields, schema=schema, name=typname)
    if typtype == "r":
        return SourceType("range", spelled)
    if typtype == "m":
        return SourceType("multirange", spelled)
    kind = _BY_NAME.get(typname, "other")
    numbers = _NUMBERS.search(spelled)
    first = int(numbers.group(1)) if numbers else None
    second = int(numbers.group(2)) if numbers and numbers.group(2) is not None else None
    if kind in EXTENSION_OF:
        return SourceType(kind, _qualified(schema, typname), schema=schema, name=typname)
    if kind == "numeric":
        return SourceType(kind, spelled, precision=first, scale=second if first is not None else None)
    if kind in ("char", "varchar", "bit", "varbit"):
        return SourceType(kind, spelled, length=first)
    return SourceType(kind, spelled)


def _replace(t: SourceType, **changes: Any) -> SourceType:
    values = {f: getattr(t, f) for f in t.__dataclass_fields__}
    values.update(changes)
    return SourceType(**values)


def describe_columns(cursor: Any, table: str) -> dict[str, SourceType]:
    """{column: SourceType} of a source table (`schema.table`, as the pipeline names it), in column order."""
    schema, name = table.split(".", 1)
    cursor.execute(_COLUMNS_QUERY, (_qualified(schema, name),))
    out = {}
    for column, oid, typmod, generated, identity, expression in cursor.fetchall():
        out[column] = _replace(describe_type(cursor, oid, typmod), generated=bool(generated), expression=expression,
                               identity=bool(identity))
    return out


# The source's CHECK constraints, validated ones only: a NOT VALID constraint's existing rows may violate it, and
# they are replicated as they are. A domain's checks are not here (a domain becomes its base type, docs/types.md).
_CHECKS_QUERY = """
select conname, pg_get_constraintdef(oid) from pg_constraint
where conrelid = %s::regclass and contype = 'c' and convalidated order by conname
"""


def describe_checks(cursor: Any, table: str) -> tuple[tuple[str, str], ...]:
    """((name, definition), ...) of a source table's validated CHECK constraints, the definition as
    pg_get_constraintdef spells it (`CHECK ((qty > 0))`)."""
    schema, name = table.split(".", 1)
    cursor.execute(_CHECKS_QUERY, (_qualified(schema, name),))
    return tuple((conname, definition) for conname, definition in cursor.fetchall())


def from_sqlalchemy(type_: TypeEngine) -> SourceType:
    """A SourceType for a SQLAlchemy type (shapes built in code, without the catalog); unknown types are 'other'."""
    if isinstance(type_, pg.DOMAIN):
        return _replace(from_sqlalchemy(type_.data_type), domain=type_.name)
    if isinstance(type_, sqltypes.ARRAY):
        element = from_sqlalchemy(type_.item_type)
        return SourceType("array", element.sql + "[]", element=element)
    if isinstance(type_, sqltypes.Enum):
        return SourceType("enum", type_.name or "text", labels=tuple(type_.enums), name=type_.name)
    simple = [(pg.JSONB, "jsonb"), (sqltypes.JSON, "json"), (pg.HSTORE, "hstore"), (pg.MONEY, "money"),
              (pg.INET, "inet"), (pg.CIDR, "cidr"), (pg.MACADDR, "macaddr"), (pg.TSVECTOR, "tsvector"),
              (pg.OID, "int8"), (sqltypes.Uuid, "uuid"), (sqltypes.LargeBinary, "bytea"),
              (sqltypes.Interval, "interval"), (pg.INTERVAL, "interval"), (sqltypes.Boolean, "bool"),
              (sqltypes.SmallInteger, "int2"), (sqltypes.BigInteger, "int8"), (sqltypes.Integer, "int4"),
              (sqltypes.Date, "date")]
    for cls, kind in simple:
        if isinstance(type_, cls):
            return SourceType(kind, kind)
    if isinstance(type_, sqltypes.DateTime):
        return SourceType("timestamptz" if type_.timezone else "timestamp", "timestamp")
    if isinstance(type_, sqltypes.Time):
        return SourceType("timetz" if getattr(type_, "timezone", False) else "time", "time")
    if isinstance(type_, sqltypes.REAL):
        return SourceType("float4", "real")
    if isinstance(type_, sqltypes.Float):
        small = type_.precision is not None and type_.precision <= 24
        return SourceType("float4" if small else "float8", "double precision")
    if isinstance(type_, sqltypes.Numeric):
        p, s = type_.precision, type_.scale
        return SourceType("numeric", f"numeric({p},{s or 0})" if p else "numeric", precision=p,
                          scale=(s or 0) if p else None)
    if isinstance(type_, pg.BIT):
        return SourceType("varbit" if type_.varying else "bit", "bit", length=type_.length)
    if isinstance(type_, sqltypes.CHAR):
        return SourceType("char", f"character({type_.length or 1})", length=type_.length or 1)
    if isinstance(type_, sqltypes.Text):
        return SourceType("text", "text")
    if isinstance(type_, sqltypes.String):
        return SourceType("varchar", "varchar", length=type_.length)
    return SourceType("other", str(type_.__class__.__name__).lower())


# --- what destinations cannot hold ------------------------------------------------------------------------------

_FLOATS = frozenset({"float4", "float8"})


def _reasons(t: SourceType, backend: str, *, key: bool, unknown_types_sent: bool, kind: str) -> list[str]:
    reasons = []
    if t.generated and not (backend == "postgresql" and kind == "replica"):
        reasons.append("a generated column: PostgreSQL's logical replication (before version 18) never sends its "
                       "values, and only a PostgreSQL replica computes them itself, with the source's expression")
    leaf = t.leaf()
    kinds = {t.category, leaf.category}
    if t.is_array and leaf.category == "other" or (not t.is_array and t.category == "other"):
        reasons.append(f"type {t.sql}: no mapping for this type (docs/types.md lists the types replicated)")
    if not unknown_types_sent and (kinds & DEBEZIUM_UNKNOWN or (t.is_array and leaf.domain)):
        reasons.append(f"type {t.sql}: Debezium leaves columns of this type out of its change events unless "
                       "include.unknown.datatypes is on")
    if t.is_array and leaf.category in DEBEZIUM_NO_ARRAYS:
        reasons.append(f"type {t.sql}: Debezium 3.6 {DEBEZIUM_NO_ARRAYS[leaf.category]}")
    elif t.is_array and (leaf.category in DEBEZIUM_NULL_ELEMENT_LOST or leaf.domain):
        reasons.append(f"type {t.sql}: Debezium 3.6 sends an array of this type that holds a NULL element as NULL, "
                       "whole (store the elements as text[], or in a table of their own)")
    elif "varbit" in kinds:
        reasons.append(f"type {t.sql}: Debezium sends bit varying as bytes without the value's length, so leading "
                       "zero bits are lost (use bit(n), or text of '0'/'1')")
    if key and backend == "mariadb" and kinds & _FLOATS:
        reasons.append(f"type {t.sql} in the primary key: MariaDB cannot store NaN, Infinity or -Infinity, which a "
                       "PostgreSQL float key may hold, so such a row could be neither written nor deleted")
    if backend == "mariadb" and leaf.category == "numeric" and leaf.precision is not None and (
            (leaf.scale or 0) > 30 or leaf.precision - (leaf.scale or 0) > 35):
        reasons.append(f"type {t.sql}: MariaDB's DECIMAL holds 65 digits, 30 of them after the point (it would round "
                       "the others away)")
    if key and backend == "duckdb" and t.is_array:
        reasons.append(f"type {t.sql} in the primary key: DuckDB cannot index a LIST")
    return reasons


def refusals(shapes: Mapping[str, Any], backend: str, *, kind: str = "replica", unknown_types_sent: bool = True
             ) -> list[tuple[str, str, str]]:
    """[(table, column, reason)] of the columns a destination of `backend` (postgresql, mariadb, duckdb) and `kind`
    (replica, analytics) cannot hold exactly; pure. `shapes` maps table names to cdc.source_tables.TableShape;
    `unknown_types_sent` says whether the connector sends the types Debezium does not know
    (include.unknown.datatypes)."""
    out = []
    for table, shape in shapes.items():
        keys = set(shape.primary_key)
        for column in shape.columns:
            source = column.source if column.source is not None else from_sqlalchemy(column.type)
            for reason in _reasons(source, backend, key=column.name in keys, unknown_types_sent=unknown_types_sent,
                                   kind=kind):
                out.append((table, column.name, reason))
    return out


def backend_of(url: str) -> str:
    """The backend name `refusals` takes for a destination URL (postgresql, mariadb, duckdb)."""
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    return {"postgres": "postgresql", "mysql": "mariadb"}.get(scheme, scheme)


def format_refusals(found: Iterable[tuple[str, str, str, str]]) -> str:
    """One line per (destination, table, column, reason)."""
    return "\n".join(f"destination {d}: {t}.{c}: {r}" for d, t, c, r in found)


__all__ = ["RawType", "SourceType", "backend_of", "describe_checks", "describe_columns", "describe_type",
           "from_sqlalchemy", "refusals"]


# --- values Debezium sends that need the source type to be read (shared by the dialects) -----------------------

def bits_text(length: int | None) -> Any:
    """bit(n) as '0'/'1' text: bit(1) arrives as a boolean, longer ones as io.debezium.data.Bits, the value's bits
    as a little-endian number (the last bit is the lowest)."""
    def convert(value: Any) -> str:
        if isinstance(value, bool):
            return "1" if value else "0"
        number = int.from_bytes(bytes(value), "little")
        return format(number, f"0{length}b" if length else "b")
    return convert


def point_text(value: Any) -> str:
    """io.debezium.data.geometry.Point {x, y, wkb, srid} as PostgreSQL's point text; repr keeps every float bit."""
    return f"({value['x']!r},{value['y']!r})"


def hstore_text(value: Any) -> str:
    """hstore, which Debezium sends as a JSON object of strings (hstore.handling.mode=json), as hstore text."""
    import json

    pairs = json.loads(value) if isinstance(value, str) else value
    quote = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
    return ", ".join(f"{quote(k)}=>{'NULL' if v is None else quote(str(v))}" for k, v in pairs.items())


def as_text(value: Any) -> Any:
    """A type Debezium does not know (include.unknown.datatypes) arrives as the bytes of PostgreSQL's text of it."""
    return bytes(value).decode() if isinstance(value, (bytes, bytearray, memoryview)) else value


def numeric_text(value: Any) -> Any:
    """A Decimal as plain digits (str() would write 1E+3), for destinations that keep numbers wider than theirs."""
    return format(value, "f") if not isinstance(value, str) else value


def elements(convert: Any) -> Any:
    """An array's converter from its elements'."""
    return lambda values: [None if v is None else convert(v) for v in values]


def check_pipeline(pipeline: Any, config: Mapping[str, str], shapes: Mapping[str, Any]) -> None:
    """Refuse, before `cdc connectors apply` changes anything, a pipeline whose captured columns some destination
    cannot hold exactly: one ConfigError naming every destination, table, column and reason. `config` is the
    connector configuration about to be applied (whether Debezium sends the types it does not know); `shapes` the
    captured tables, reflected with the catalog's types (cdc.source_tables.reflect_tables)."""
    from cdc.errors import ConfigError

    sent = str(config.get("include.unknown.datatypes", "false")).lower() == "true"
    found = [(name, *refusal) for name, destination in pipeline.destinations.items()
             for refusal in refusals(shapes, backend_of(destination.url.get_secret_value()), kind=destination.kind,
                                     unknown_types_sent=sent)]
    if found:
        raise ConfigError("columns that a destination cannot hold exactly (nothing was changed):\n"
                          + format_refusals(found),
                          hint="Change the column's type at the source, or leave its table out of that destination's "
                               "pipeline; docs/types.md lists each destination's types.")


_ISO_INTERVAL = re.compile(r"P(-?\d+)Y(-?\d+)M(-?\d+)DT(-?\d+)H(-?\d+)M(-?[\d.]+)S")


def interval_words(value: Any) -> Any:
    """Debezium's interval text (interval.handling.mode=string: 'P1Y2M3DT4H5M6.789S', each field signed) spelt as
    '1 years 2 months 3 days 4 hours 5 minutes 6.789 seconds', which DuckDB reads (it does not read ISO-8601
    durations); anything else (a timedelta from events written before that mode) as it is."""
    if not isinstance(value, str):
        return value
    match = _ISO_INTERVAL.fullmatch(value)
    if match is None:
        raise ValueError(f"not an ISO-8601 interval as Debezium writes it: {value!r}")
    units = ("years", "months", "days", "hours", "minutes", "seconds")
    return " ".join(f"{n} {u}" for n, u in zip(match.groups(), units))


def composite_fields(text: str) -> list[str | None]:
    """The fields of PostgreSQL's text of a composite value, as texts (None for NULL): a quoted field may hold
    doubled quotes and backslash escapes; an empty unquoted field is NULL."""
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise ValueError(f"not a composite value: {text!r}")
    body, i, fields = text[1:-1], 0, []
    while True:
        buf: list[str] = []
        present = False
        while i < len(body) and body[i] != ",":
            present = True
            c = body[i]
            if c == '"':
                i += 1
                while i < len(body):
                    c = body[i]
                    if c == '"' and body[i + 1:i + 2] == '"':
                        buf.append('"')
                        i += 2
                    elif c == '"':
                        i += 1
                        break
                    elif c == "\\":
                        buf.append(body[i + 1])
                        i += 2
                    else:
                        buf.append(c)
                        i += 1
            elif c == "\\":
                buf.append(body[i + 1])
                i += 2
            else:
                buf.append(c)
                i += 1
        fields.append("".join(buf) if present else None)
        if i >= len(body):
            return fields
        i += 1
