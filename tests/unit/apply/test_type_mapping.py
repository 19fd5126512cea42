"""Unit tests of the type mapping's pure parts (consumers/apply/dialects/types.py, docs/types.md): what each destination
dialect makes of a source catalog type, how the values Debezium sends are turned into what each column takes, and
the refusals `cdc connectors apply` makes before anything changes."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from sqlalchemy import create_engine
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.types import NullType

from cdc.source_tables import ColumnShape, TableShape
from consumers.apply.dialects import types as t
from consumers.apply.dialects.duckdb import _duck_converter, duckdb_type
from consumers.apply.dialects.postgres import PostgresDialect, _pg_converter

INT = t.SourceType("int4", "integer")
MOOD = t.SourceType("enum", "public.mood", labels=("sad", "it's ok"), schema="public", name="mood")
ADDRESS = t.SourceType("composite", "public.address", fields=(("street", t.SourceType("text", "text")),
                                                                ("zip", INT)), schema="public", name="address")


def array(element: t.SourceType) -> t.SourceType:
    return t.SourceType("array", element.sql + "[]", element=element)


def shape(*columns: tuple[str, t.SourceType], key: tuple[str, ...] = ("id",)) -> TableShape:
    return TableShape("public.zoo", tuple(ColumnShape(n, NullType(), n not in key, s)
                                          for n, s in [("id", INT), *columns]), key)


@pytest.mark.parametrize("source, expected", [
    (t.SourceType("int4", "integer", domain="public.year"), "INTEGER"),
    (t.SourceType("numeric", "numeric(5,2)", precision=5, scale=2), "DECIMAL(5,2)"),
    (t.SourceType("numeric", "numeric(40,2)", precision=40, scale=2), "VARCHAR"),
    (t.SourceType("numeric", "numeric(5,-2)", precision=5, scale=-2), "DECIMAL(7,0)"),
    (t.SourceType("numeric", "numeric"), "VARCHAR"),
    (t.SourceType("jsonb", "jsonb"), "JSON"),
    (t.SourceType("hstore", "public.hstore"), "JSON"),
    (t.SourceType("interval", "interval"), "INTERVAL"),
    (t.SourceType("uuid", "uuid"), "UUID"),
    (t.SourceType("timetz", "time with time zone"), "TIMETZ"),
    (t.SourceType("money", "money"), "DECIMAL(19,2)"),
    (t.SourceType("bit", "bit(8)", length=8), "BIT"),
    (t.SourceType("point", "point"), "STRUCT(x DOUBLE, y DOUBLE)"),
    (t.SourceType("box", "box"), "VARCHAR"),
    (t.SourceType("range", "int4range"), "VARCHAR"),
    (MOOD, "ENUM('sad', 'it''s ok')"),
    (ADDRESS, 'STRUCT("street" VARCHAR, "zip" INTEGER)'),
    (array(t.SourceType("uuid", "uuid")), "UUID[]"),
    (array(array(INT)), "INTEGER[][]"),
    (array(MOOD), "ENUM('sad', 'it''s ok')[]"),
])
def test_duckdb_gets_its_native_types(source, expected):
    assert duckdb_type(source) == expected


def test_a_composite_with_a_field_duckdb_cannot_read_from_text_stays_text():
    nested = t.SourceType("composite", "public.c", fields=(("tags", array(INT)),))
    assert duckdb_type(nested) == "VARCHAR"


def test_postgresql_replicas_keep_the_source_type_with_domains_as_their_base():
    dialect = PostgresDialect(create_engine("postgresql+psycopg://u@127.0.0.1:1/none"))
    for source, spelled in [(t.SourceType("int4", "integer", domain="public.year"), "integer"), (MOOD, "public.mood"),
                            (t.SourceType("char", "character(5)", length=5), "character(5)"),
                            (array(t.SourceType("char", "character(3)", length=3)), "character(3)[]")]:
        assert dialect.map_type(source).compile(dialect=pg.dialect()) == spelled
    table = dialect.table(shape(("m", MOOD), ("n", t.SourceType("text", "text"))))
    assert [(c.name, c.nullable) for c in table.columns] == [("id", False), ("m", True), ("n", True),
                                                              ("_cdc_lsn", False)]


def test_values_debezium_sends_in_its_own_shapes_become_postgresql_text():
    assert _pg_converter(t.SourceType("bit", "bit(16)", length=16))(b"\x03\x80") == "1000000000000011"
    assert _pg_converter(t.SourceType("bit", "bit(1)", length=1))(False) == "0"
    assert _pg_converter(t.SourceType("point", "point"))({"x": 0.1, "y": -2.0}) == "(0.1,-2.0)"
    assert _pg_converter(t.SourceType("hstore", "public.hstore"))('{"k":"1","q\\"u":"a\\\\b","n":null}') == \
        '"k"=>"1", "q\\"u"=>"a\\\\b", "n"=>NULL'
    assert _pg_converter(ADDRESS)(b'("x",1)') == '("x",1)'
    domain_array = array(t.SourceType("int4", "integer", domain="public.year"))
    assert _pg_converter(domain_array)([b"1999", None]) == ["1999", None]
    assert _pg_converter(INT) is None and _pg_converter(array(INT)) is None


def test_values_become_what_duckdb_columns_take():
    assert _duck_converter(t.SourceType("interval", "interval"))("P1Y-2M3DT4H5M-6.5S") == \
        "1 years -2 months 3 days 4 hours 5 minutes -6.5 seconds"
    point = _duck_converter(t.SourceType("point", "point"))({"x": 1.5, "y": 2.0, "wkb": b"", "srid": None})
    assert point == {"x": 1.5, "y": 2.0}
    assert _duck_converter(ADDRESS)(b'("a ""b"" \\\\ c",)') == {"street": 'a "b" \\ c', "zip": None}
    assert _duck_converter(t.SourceType("numeric", "numeric"))(Decimal("1E+3")) == "1000"
    uuids = _duck_converter(array(t.SourceType("uuid", "uuid")))
    assert uuids([__import__("uuid").UUID(int=1), None]) == ["00000000-0000-0000-0000-000000000001", None]


@pytest.mark.parametrize("text, fields", [
    ('("street ""1"" \\\\ é",1000)', ['street "1" \\ é', "1000"]),
    ("(,7)", [None, "7"]),
    ('("",)', ["", None]),
    ('("a,b","(x)")', ["a,b", "(x)"]),
])
def test_composite_text_is_read_field_by_field(text, fields):
    assert t.composite_fields(text) == fields


def test_hstore_text_reads_back_as_the_same_pairs():
    pairs = {"k": "1", 'q"u': "a\\b", "n": None, "sp ace": ""}
    assert t.hstore_text(json.dumps(pairs)) == '"k"=>"1", "q\\"u"=>"a\\\\b", "n"=>NULL, "sp ace"=>""'


def test_refusals_name_the_table_the_column_and_the_reason():
    zoo = shape(("g", t.SourceType("int4", "integer", generated=True, expression="(id * 2)")),
                ("vb", t.SourceType("varbit", "bit varying(8)", length=8)),
                ("ivs", array(t.SourceType("interval", "interval"))),
                ("bits", array(t.SourceType("bit", "bit(3)", length=3))),
                ("box", t.SourceType("box", "box")),
                ("wide", t.SourceType("numeric", "numeric(70,40)", precision=70, scale=40)),
                ("odd", t.SourceType("other", "pg_lsn")), ("moods", array(MOOD)), ("nums", array(INT)),
                ("years", array(t.SourceType("int4", "integer", domain="public.year"))))
    keyed = TableShape("public.f", (ColumnShape("k", NullType(), False, t.SourceType("float8", "double precision")),),
                       ("k",))
    found = {(backend, column): reason for backend in ("postgresql", "mariadb", "duckdb")
             for _, column, reason in t.refusals({"public.zoo": zoo, "public.f": keyed}, backend)}
    assert "a generated column" in found["mariadb", "g"] and "a generated column" in found["duckdb", "g"]
    assert ("postgresql", "g") not in found  # a PostgreSQL replica computes it
    assert "leading zero bits are lost" in found["postgresql", "vb"]
    assert "leaves columns of this array type out" in found["duckdb", "ivs"]
    assert "as one bit string" in found["postgresql", "bits"]
    assert "DECIMAL holds 65 digits" in found["mariadb", "wide"] and ("duckdb", "wide") not in found
    assert "no mapping for this type" in found["postgresql", "odd"]
    assert "NaN" in found["mariadb", "k"] and ("postgresql", "k") not in found and ("duckdb", "k") not in found
    assert ("postgresql", "box") not in found  # sent with include.unknown.datatypes
    for column in ("moods", "years"):
        assert "holds a NULL element as NULL, whole" in found["duckdb", column]
    assert not any(c == "nums" for _, c in found)
    # A PostgreSQL analytics replica has a history the expression cannot fill: refused there too.
    assert any(c == "g" for _, c, _ in t.refusals({"public.zoo": zoo}, "postgresql", kind="analytics"))
    # Without include.unknown.datatypes, Debezium leaves box out: refused.
    assert any(c == "box" and "include.unknown.datatypes" in r
               for _, c, r in t.refusals({"public.zoo": zoo}, "duckdb", unknown_types_sent=False))


def test_shapes_built_without_the_catalog_are_described_from_sqlalchemy_types():
    assert t.from_sqlalchemy(pg.ARRAY(pg.INTEGER())).element.category == "int4"
    assert t.from_sqlalchemy(pg.CHAR(5)).length == 5
    assert t.from_sqlalchemy(pg.NUMERIC(10, 2)).scale == 2
    assert t.from_sqlalchemy(pg.ENUM("a", "b", name="e")).labels == ("a", "b")
    assert t.backend_of("mysql+pymysql://x@h/db") == "mariadb" and t.backend_of("duckdb:///f") == "duckdb"


def test_duckdb_enum_columns_follow_labels_the_source_added(tmp_path):
    from consumers.apply.dialects.duckdb import DuckDBDialect

    def zoo(labels: tuple[str, ...]) -> TableShape:
        mood = t.SourceType("enum", "public.mood", labels=labels, schema="public", name="mood")
        return shape(("m", mood), ("ms", array(mood)), ("iv", t.SourceType("interval", "interval")))

    engine = create_engine(f"duckdb:///{tmp_path / 'lake.duckdb'}")
    try:
        first = DuckDBDialect(engine)
        with engine.begin() as conn:
            first.ensure_table(conn, zoo(("a", "b")), {})
            first.upsert(conn, zoo(("a", "b")), [{"id": 1, "m": "b", "ms": ["a", None], "iv": "P0Y13M-1DT0H0M0.5S",
                                                  "_cdc_lsn": 1}], ["id", "m", "ms", "iv"])
        later = DuckDBDialect(engine)  # the applier restarted after the source added a label
        with engine.begin() as conn:
            assert later.ensure_table(conn, zoo(("a", "b", "c")), {}) == [
                "changed column public.zoo.m to ENUM('a', 'b', 'c')",
                "changed column public.zoo.ms to ENUM('a', 'b', 'c')[]"]
            later.upsert(conn, zoo(("a", "b", "c")), [{"id": 2, "m": "c", "ms": ["c"], "iv": None, "_cdc_lsn": 2}],
                         ["id", "m", "ms", "iv"])
            rows = conn.exec_driver_sql('select id, m, ms, CAST(iv AS VARCHAR) from "public.zoo" order by id').all()
        assert [tuple(r) for r in rows] == [(1, "b", ["a", None], "1 year 1 month -1 day 00:00:00.5"),
                                            (2, "c", ["c"], None)]
    finally:
        engine.dispose()
