"""The type zoo shared by integration tests (test_type_zoo, test_verify): a source schema with every PostgreSQL type a
real schema uses (and arrays of them), domains, an enum and a composite type; its rows and workload; and the tests' own
comparison: every value read with each database's driver and brought to one canonical form by the source column's
type (`COLUMNS`), without the code under test."""

from __future__ import annotations

import json
import re
import struct
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import duckdb
import psycopg
from sqlalchemy import create_engine

SCHEMA = r"""
create extension if not exists hstore;
create extension if not exists citext;
create extension if not exists ltree;
create domain year as integer check (value >= 1901 and value <= 2155);
create domain short_code as varchar(8) not null;
create type mood as enum ('sad', 'ok', 'happy');
create type address as (street text, zip integer);
create table zoo (
    id int primary key,
    yr year, sc short_code, m mood not null default 'ok', addr address,
    i4r int4range, i8r int8range, nr numrange, tsr tsrange, tstzr tstzrange, dr daterange, i4mr int4multirange,
    tsv tsvector, tsq tsquery, hs hstore, ci citext, lt ltree, mon money,
    b1 bit(1), b16 bit(16), ip inet, net cidr, mac macaddr, mac8 macaddr8, x xml,
    pt point, ln line, ls lseg, bx box, pth path, pg polygon, cr circle,
    u uuid, js json, jb jsonb, iv interval, f4 real, f8 double precision not null, n numeric, n52 numeric(5, 2),
    n0 numeric(12, 0), c5 char(5), vc varchar(20), t text not null, tm time, ttz timetz, ts timestamp,
    tstz timestamptz, d date, by bytea,
    ia int[], ta text[], ua uuid[], jba jsonb[], na numeric[], da date[], tsa timestamptz[], f8a float8[],
    ba bool[], ipa inet[], ca char(3)[], hsa hstore[], ra int4range[]
);
create table char_key (code char(5) primary key, label text not null);
-- Only types the columnar write path takes (hstore arrives as JSON, enums and uuids as text).
create table kv (id bigint primary key, h hstore, m mood not null, u uuid, n numeric(10, 3));
-- No primary key: an update or delete changes one row equal to its before image, compared by type.
create table nokey (c char(5), j jsonb, js json, p point, l int[], x xml, f real);
alter table nokey replica identity full;
create table uuid_key (id uuid primary key, n integer not null);
create table ident (id int generated always as identity primary key, v text);
"""

# One row per i: every column a value that depends on i, with the awkward ones (quotes, backslashes, unicode,
# trailing spaces, negative numbers, times before 1970, multi-byte bit strings) among them.
ROWS = r"""
insert into zoo (id, yr, sc, m, addr, i4r, i8r, nr, tsr, tstzr, dr, i4mr, tsv, tsq, hs, ci, lt, mon, b1, b16, ip, net,
                 mac, mac8, x, pt, ln, ls, bx, pth, pg, cr, u, js, jb, iv, f4, f8, n, n52, n0, c5, vc, t, tm, ttz,
                 ts, tstz, d, by, ia, ta, ua, jba, na, da, tsa, f8a, ba, ipa, ca, hsa, ra)
select i, 1901 + i % 255, 'c' || i, (array['sad', 'ok', 'happy'])[1 + i % 3]::mood,
       row('street "' || i || '" \ é', nullif(i % 4, 0) * 1000)::address,
       int4range(i, i + 10), int8range(i * 10000000000, null), numrange(i / 7.0, i, '(]'),
       tsrange('2020-01-01'::timestamp + i * interval '1 hour', null),
       tstzrange('2020-01-01 10:00+02'::timestamptz, '2020-01-01 10:00+02'::timestamptz + i * interval '1 day'),
       daterange('2020-01-01'::date + i, '2020-02-01'::date + i),
       int4multirange(int4range(1, 3 + i), int4range(100 + i, 200 + i)),
       to_tsvector('english', 'the fat cats ' || i || ' sat on mats'), ('fat & cat' || (i % 3))::tsquery,
       hstore(array['k', 'q"uote', 'n'], array[i::text, 'a\b', null]), 'MiXeD ' || i, ('top.science.n' || i)::ltree,
       (i * 12.34 - 1000)::numeric::money, (i % 2)::bit(1), (i * 2027 % 65536)::bit(16),
       ('192.168.' || (i % 256) || '.5/24')::inet, ('10.' || (i % 256) || '.0.0/16')::cidr,
       ('08:00:2b:01:02:' || lpad(to_hex(i % 256), 2, '0'))::macaddr,
       ('08:00:2b:01:02:03:04:' || lpad(to_hex(i % 256), 2, '0'))::macaddr8,
       ('<a n="' || i || '">x &amp; y</a>')::xml,
       point(i / 4.0, -i), line(point(0, 0), point(i, i + 1)), lseg(point(0, 0), point(i, 1.5)),
       box(point(0, 0), point(i, 2)), path(polygon(box(point(0, 0), point(i, 1)))),
       polygon(box(point(0, 0), point(i, 3))), circle(point(i, i), i / 8.0),
       md5(i::text)::uuid, ('{"b": ' || i || ', "a": [1, 2.5, "é\"q"], "b": null}')::json,
       ('{"k": {"n": [' || i || ', false, null]}, "s": "\\u00e9"}')::jsonb,
       i * interval '1 day 02:03:04.5' + (i % 13) * interval '1 mon' - (i % 3) * interval '1 year', i / 3.0,
       i * 1.0e-5 - 1e300 * (i % 2), (i * 1.1)^10 / 3, i / 7.0, i * 1000,
       lpad(i::text, 3, 'x'), 'vc ' || i, 'line ' || i || E' with ''quotes'' \\ and\ttabs ✓',
       '00:00:00'::time + i * interval '7 minutes 3.25 seconds', ('12:00:00+0' || (i % 5))::timetz,
       '1969-07-20 20:17:40'::timestamp + i * interval '1 day 1 microsecond',
       '2024-02-29 23:59:59.654321+05:30'::timestamptz - i * interval '13 hours',
       '1960-01-01'::date + i * 17, decode(lpad(to_hex(i), 6, '0') || '00ff', 'hex'),
       array[i, null, -i], array['a' || i, 'b c', null, 'q"u,o{te}'],
       array[md5(i::text)::uuid, md5((i + 1)::text)::uuid], array[('{"a": ' || i || '}')::jsonb, 'null'::jsonb],
       array[i / 3.0, null, -i], array['2020-01-01'::date + i, null],
       array['2020-01-01 00:00:00+00'::timestamptz + i * interval '1 minute'], array[i * 0.5, -0.0, 1e-300],
       array[i % 2 = 0, null], array[('10.0.0.' || (i % 256))::inet],
       array['ab', 'c', lpad(i::text, 3, '0')]::char(3)[],
       array[hstore('k', i::text), hstore('e"', null)], array[int4range(i, null), 'empty']
from generate_series(FIRST, LAST) i;
"""
# A row of NULLs where the source allows them.
NULL_ROW = "insert into zoo (id, sc, t, f8) values (%s, 'nulls', 'nulls', 0)"


def rows(first: int, last: int) -> str:
    return ROWS.replace("FIRST", str(first)).replace("LAST", str(last))

WORKLOAD = r"""
update zoo set yr = 2155, m = 'sad', addr = row(null, 7)::address, i4r = 'empty', tsv = 'updated:1A', hs = '',
    mon = -0.01, b16 = B'1000000000000011', pt = point(-0.1, 1e-10), js = '[]', jb = '{"new": true}',
    iv = interval '-1 mon -3 days 00:00:00.000001', f4 = 3.4e38, f8 = -0.0, n = -0.000000000000000000000000000001,
    c5 = ' a', ts = '0001-01-01 00:00:00', tstz = '9999-12-31 23:59:59.999999+00', by = '', ia = '{}',
    ta = array[''], ua = '{}', ca = array['  x']::char(3)[], cr = '<(0,0),0>'
where id % 5 = 0;
update zoo set yr = null, addr = null, i4mr = null, tsq = null, ln = null, pth = null, pg = null, u = null,
    js = null, iv = null, n = null, tm = null, ttz = null, ia = null, jba = null, ca = null
where id % 7 = 0;
delete from zoo where id % 11 = 0;
delete from char_key where code = 'W05';
update kv set h = h || hstore('added', 'yes'), m = 'happy' where id % 4 = 0;
update nokey set j = '{"changed": 1}', l = array[0], f = f + 1 where c = 'b';
delete from nokey where c = 'c';
insert into nokey values ('d', '[]', '{"d" : 1}', point(0.1, 0.2), '{}', '<d/>', 1.25);
delete from kv where id % 9 = 0;
insert into kv select i, hstore('k', i::text), 'ok', md5(i::text)::uuid, i / 8.0 from generate_series(200, 230) i;
update char_key set label = 'renamed' where code = 'A  ';
insert into char_key values ('W06 ', 'six'), (' B', 'leading space');
delete from uuid_key where n % 3 = 0;
update uuid_key set n = n + 1000 where n % 3 = 1;
insert into uuid_key select gen_random_uuid(), i from generate_series(100, 120) i;
insert into ident (v) values ('three');
update ident set v = 'ONE' where id = 1;
delete from ident where id = 2;
"""

# An interval as PostgreSQL and DuckDB keep it: months, days and microseconds, each signed on its own.
INTERVAL_PARTS = ("array[(extract(year from iv) * 12 + extract(month from iv))::bigint, extract(day from iv)::bigint, "
                  "(extract(hour from iv) * 3600000000 + extract(minute from iv) * 60000000 "
                  "+ extract(microseconds from iv))::bigint]")
DUCKDB_INTERVAL_PARTS = ("[datepart('year', iv) * 12 + datepart('month', iv), datepart('day', iv), "
                         "datepart('hour', iv) * 3600000000 + datepart('minute', iv) * 60000000 "
                         "+ datepart('microseconds', iv)]")
# MariaDB has no interval: microseconds, a month counted as 30.4375 days (docs/types.md).
MONTH_MICROS, DAY_MICROS = 2_629_800_000_000, 86_400_000_000

# Every column: the kind the comparison normalises it by, and how the source (and the PostgreSQL replica, which has
# the same types) is read; None reads the column as psycopg gives it.
COLUMNS = {
    "zoo": [
        ("id", "int", None), ("yr", "int", None), ("sc", "text", None), ("m", "text", "m::text"),
        ("addr", "composite", "case when addr::text is not null "
                              "then array[addr::text, (addr).street, (addr).zip::text] end"),
        ("i4r", "text", "i4r::text"), ("i8r", "text", "i8r::text"),
        ("nr", "numbers", "nr::text"), ("tsr", "text", "tsr::text"), ("tstzr", "tstzrange", "tstzr::text"),
        ("dr", "text", "dr::text"), ("i4mr", "text", "i4mr::text"), ("tsv", "text", "tsv::text"),
        ("tsq", "text", "tsq::text"), ("hs", "json", "hstore_to_json(hs)::text"), ("ci", "text", "ci::text"),
        ("lt", "text", "lt::text"), ("mon", "num", "mon::numeric"), ("b1", "bits", "b1::text"),
        ("b16", "bits", "b16::text"), ("ip", "text", "ip::text"), ("net", "text", "net::text"),
        ("mac", "text", "mac::text"), ("mac8", "text", "mac8::text"), ("x", "text", "x::text"),
        ("pt", "numbers", "pt::text"), ("ln", "numbers", "ln::text"), ("ls", "numbers", "ls::text"),
        ("bx", "numbers", "bx::text"), ("pth", "numbers", "pth::text"), ("pg", "numbers", "pg::text"),
        ("cr", "numbers", "cr::text"), ("u", "uuid", None), ("js", "json", "js::text"), ("jb", "json", "jb::text"),
        ("iv", "interval", INTERVAL_PARTS), ("f4", "f4", None), ("f8", "f8", None), ("n", "num", None),
        ("n52", "num", None),
        ("n0", "num", None), ("c5", "char", None), ("vc", "text", None), ("t", "text", None), ("tm", "time", None),
        ("ttz", "timetz", None), ("ts", "ts", None), ("tstz", "tstz", None), ("d", "date", None),
        ("by", "bytes", None),
        ("ia", "list:int", None), ("ta", "list:text", None), ("ua", "list:uuid", None), ("jba", "list:json", None),
        ("na", "list:num", None), ("da", "list:date", None), ("tsa", "list:tstz", None),
        ("f8a", "list:f8", None), ("ba", "list:bool", None),
        # inet's own text (inet::text would add /32 to a host address)
        ("ipa", "list:text", "string_to_array(trim(both '{}' from ipa::text), ',')"),
        ("ca", "list:char", None),
        ("hsa", "list:json", "(select array_agg(hstore_to_json(h)::text order by o) "
                             "from unnest(hsa) with ordinality u(h, o))"),
        ("ra", "list:text", "ra::text[]"),
    ],
    "char_key": [("code", "char", None), ("label", "text", None)],
    "uuid_key": [("id", "uuid", None), ("n", "int", None)],
    "ident": [("id", "int", None), ("v", "text", None)],
    "nokey": [("c", "char", None), ("j", "json", "j::text"), ("js", "json", "js::text"), ("p", "numbers", "p::text"),
              ("l", "list:int", None), ("x", "text", "x::text"), ("f", "f4", None)],
    "kv": [("id", "int", None), ("h", "json", "hstore_to_json(h)::text"), ("m", "text", "m::text"), ("u", "uuid", None),
           ("n", "num", None)],
}
TABLES = [f"public.{t}" for t in COLUMNS]
KEYLESS = {"nokey"}

TOASTED = 149  # untouched by the workload's updates and deletes
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)


def float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def canonical(kind: str, value):
    """One form for what a value means, whatever database it was read from (see the module docstring)."""
    if value is None:
        return None
    if kind.startswith("list:"):
        if isinstance(value, str):
            value = json.loads(value)  # MariaDB keeps arrays as JSON
        return tuple(canonical(kind[5:], v) for v in value)
    if kind == "int":
        return int(value)
    if kind == "bool":
        return bool(value)
    if kind == "num":
        return Decimal(str(value))
    if kind == "f4":
        return float32(float(value))
    if kind == "f8":
        return float(value)
    if kind == "text":
        return str(value)
    if kind == "char":
        return str(value).rstrip(" ")  # PostgreSQL's character(n) ignores trailing spaces
    if kind == "numbers":
        # Geometric and numeric-range texts: the same numbers, however their digits are written ('1' or '1.0').
        if isinstance(value, dict):
            value = f"({value['x']!r},{value['y']!r})"
        return (_NUMBER.sub("#", str(value)), tuple(float(n) for n in _NUMBER.findall(str(value))))
    if kind == "tstzrange":
        bounds = re.findall(r'"([^"]+)"', value)
        return value[0], value[-1], tuple(utc(datetime.fromisoformat(b + ("00" if re.search(r"[+-]\d\d$", b) else "")))
                                          for b in bounds)
    if kind == "bits":
        if isinstance(value, (bytes, bytearray)):  # MariaDB's BIT, big-endian
            return int.from_bytes(value, "big")
        return int(value, 2)
    if kind == "composite":
        # The source: [its text, each field's text]; MariaDB: the text; DuckDB: a STRUCT of the fields.
        if isinstance(value, dict):
            return tuple(None if v is None else str(v) for v in value.values())
        if isinstance(value, list):
            return None if all(v is None for v in value) else tuple(value)
        return value
    if kind == "uuid":
        return str(value).lower()
    if kind == "json":
        return json.loads(value) if isinstance(value, (str, bytes)) else value
    if kind == "interval":
        if isinstance(value, int):  # MariaDB: microseconds
            return value
        return None if all(v is None for v in value) else tuple(int(v) for v in value)  # the parts of a NULL
    if kind == "time":
        if isinstance(value, timedelta):  # PyMySQL reads TIME as a timedelta
            return (datetime.min + value).time()
        return value
    if kind == "timetz":
        if isinstance(value, timedelta):
            return (datetime.min + value).time()  # MariaDB holds the UTC wall time
        offset = value.utcoffset() or timedelta(0)
        return (datetime.combine(date(2000, 1, 1), value.replace(tzinfo=None)) - offset).time()
    if kind == "ts":
        return datetime.fromisoformat(value) if isinstance(value, str) else value  # str: in MariaDB's JSON arrays
    if kind == "tstz":
        return utc(datetime.fromisoformat(value) if isinstance(value, str) else value)
    if kind == "date":
        return date.fromisoformat(value) if isinstance(value, str) else value
    if kind == "bytes":
        return bytes(value)
    raise AssertionError(f"no canonical form for {kind}")


def canonical_rows(table: str, rows: list[tuple]) -> dict:
    """Rows by their first column (the key), or for a table without a key by their whole value, counted."""
    kinds = [kind for _, kind, _ in COLUMNS[table]]
    out = {}
    for row in rows:
        values = tuple(canonical(k, v) for k, v in zip(kinds, row))
        if table in KEYLESS:
            key = repr(values)
            out[key] = (key, out.get(key, (key, 0))[1] + 1)
        else:
            out[values[0]] = values
    return out


def read_postgres(url: str, table: str) -> dict:
    select = ", ".join(expr or f'"{name}"' for name, _, expr in COLUMNS[table])
    with psycopg.connect(url) as conn:
        return canonical_rows(table, conn.execute(f"select {select} from public.{table}").fetchall())


def read_mariadb(url: str, table: str) -> dict:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            select = ", ".join(f"`{name}`" for name, _, _ in COLUMNS[table])
            return canonical_rows(table, [tuple(r) for r in conn.exec_driver_sql(f"select {select} from `{table}`")])
    finally:
        engine.dispose()


def read_duckdb(path: str, table: str) -> dict:
    conn = duckdb.connect(path, read_only=True)
    try:
        conn.execute("SET TimeZone = 'UTC'")
        select = ", ".join(DUCKDB_INTERVAL_PARTS if kind == "interval" else f'"{name}"'
                           for name, kind, _ in COLUMNS[table])
        return canonical_rows(table, conn.execute(f'select {select} from "public.{table}"').fetchall())
    finally:
        conn.close()


def as_mariadb(table: str, rows: dict) -> dict:
    """The source's canonical rows as MariaDB holds them: intervals in microseconds, composites as their text."""
    kinds = [kind for _, kind, _ in COLUMNS[table]]

    def held(kind: str, v):
        if v is None:
            return None
        if kind == "interval":
            return v[0] * MONTH_MICROS + v[1] * DAY_MICROS + v[2]
        return v[0] if kind == "composite" else v
    return {key: tuple(held(k, v) for k, v in zip(kinds, row)) for key, row in rows.items()}


def as_duckdb(table: str, rows: dict) -> dict:
    """The source's canonical rows as DuckDB holds them: composites as STRUCTs of their fields."""
    kinds = [kind for _, kind, _ in COLUMNS[table]]
    def held(kind: str, v):
        if v is None:
            return None
        return v[1:] if kind == "composite" else v
    return {key: tuple(held(k, v) for k, v in zip(kinds, row)) for key, row in rows.items()}


def assert_equal(where: str, source: dict, replica: dict, table: str) -> None:
    names = [name for name, _, _ in COLUMNS[table]]
    assert sorted(map(repr, replica)) == sorted(map(repr, source)), f"{where} {table}: keys differ"
    for key, row in source.items():
        for name, want, got in zip(names, row, replica[key]):
            assert got == want, f"{where} {table} key {key!r} column {name}: {got!r}, source {want!r}"


def duckdb_types(path: str) -> dict[str, str]:
    conn = duckdb.connect(path, read_only=True)
    try:
        return dict(conn.execute("select column_name, data_type from information_schema.columns "
                                 "where table_name = 'public.zoo'").fetchall())
    finally:
        conn.close()
