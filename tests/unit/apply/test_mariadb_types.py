"""Unit tests of the MariaDB dialect's pure parts: type mapping (as DDL), names, value conversion and row order."""

from __future__ import annotations

import json
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import pytest
import sqlalchemy as sa
from sqlalchemy import create_engine
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.schema import CreateTable

from cdc.errors import ConfigError
from cdc.source_tables import ColumnShape, ForeignKeyShape, TableShape
from consumers.apply.dialects.mariadb import (
    MariaDBDialect,
    adapt_mariadb_type,
    children_first,
    parents_first,
    value_converter,
)

MYSQL = mysql.dialect()


def ddl(type_: sa.types.TypeEngine, *, key: bool = False) -> str:
    return adapt_mariadb_type(type_, key=key).compile(dialect=MYSQL)


@pytest.fixture(scope="module")
def dialect():
    # No connection is made: the engine only carries the dialect and the driver's name.
    return MariaDBDialect(create_engine("mysql+pymysql://cdc:cdc@127.0.0.1:1/none"))


@pytest.mark.parametrize("source, expected", [
    (pg.JSON(), "JSON"),
    (pg.JSONB(), "JSON"),
    (pg.HSTORE(), "JSON"),
    (pg.ARRAY(sa.Integer), "JSON"),
    (pg.UUID(), "CHAR(36)"),
    (pg.BYTEA(), "LONGBLOB"),
    (sa.LargeBinary(), "LONGBLOB"),
    (pg.TEXT(), "LONGTEXT"),
    (pg.CITEXT(), "LONGTEXT"),
    (pg.TIMESTAMP(timezone=True), "DATETIME(6)"),
    (pg.TIMESTAMP(), "DATETIME(6)"),
    (pg.TIME(), "TIME(6)"),
    (pg.TIME(timezone=True), "TIME(6)"),
    (pg.INTERVAL(), "BIGINT"),
    (pg.NUMERIC(), "DECIMAL(65, 30)"),
    (pg.NUMERIC(12, 2), "DECIMAL(12, 2)"),
    (pg.NUMERIC(100, 40), "DECIMAL(65, 30)"),
    (pg.NUMERIC(2, -3), "DECIMAL(5, 0)"),
    (pg.ENUM("a", "b", name="grade"), "VARCHAR(255)"),
    (pg.DOUBLE_PRECISION(), "DOUBLE"),
    (pg.REAL(), "FLOAT"),
    (sa.Float(precision=53), "DOUBLE"),
    (pg.VARCHAR(40), "VARCHAR(40)"),
    (pg.VARCHAR(2000), "LONGTEXT"),
    (pg.VARCHAR(), "LONGTEXT"),
    (pg.CHAR(2), "CHAR(2)"),
    (pg.INTEGER(), "INTEGER"),
    (pg.BIGINT(), "BIGINT"),
    (pg.SMALLINT(), "SMALLINT"),
    (pg.BOOLEAN(), "BOOL"),
    (pg.DATE(), "DATE"),
    (pg.OID(), "BIGINT"),
    (pg.MONEY(), "DECIMAL(19, 2)"),
    (pg.INET(), "LONGTEXT"),
    (pg.TSVECTOR(), "LONGTEXT"),
    (sa.types.NullType(), "LONGTEXT"),
])
def test_postgres_types_map_to_mariadb_ddl(dialect, source, expected):
    assert dialect.adapt_type(source).compile(dialect=MYSQL) == expected


@pytest.mark.parametrize("source, expected", [
    (pg.VARCHAR(2000), "VARCHAR(2000)"),  # a key keeps the source's length
    (pg.VARCHAR(40), "VARCHAR(40)"),
    (pg.VARCHAR(), "VARCHAR(255)"),
    (pg.TEXT(), "VARCHAR(255)"),
    (pg.BYTEA(), "VARBINARY(255)"),
    (pg.UUID(), "CHAR(36)"),
    (pg.INTEGER(), "INTEGER"),
])
def test_key_columns_get_bounded_types(source, expected):
    assert ddl(source, key=True) == expected


def test_table_ddl_has_bounded_keys_no_auto_increment_and_innodb(dialect):
    shape = TableShape(
        "hr.person",
        (ColumnShape("id", pg.INTEGER(), False), ColumnShape("code", pg.TEXT(), False),
         ColumnShape("manager_code", pg.TEXT(), True), ColumnShape("bio", pg.TEXT(), True)),
        ("id",),
        (ForeignKeyShape(("manager_code",), "hr.other", ("code",)),),
    )
    text = str(CreateTable(dialect.table(shape)).compile(dialect=MYSQL))
    assert text.split("(")[0].strip() == "CREATE TABLE hr__person"
    assert "id INTEGER NOT NULL," in text and "AUTO_INCREMENT" not in text
    assert "manager_code VARCHAR(255)" in text and "bio LONGTEXT" in text and "code LONGTEXT" in text
    assert "_cdc_lsn BIGINT NOT NULL" in text
    assert "ENGINE=InnoDB" in text and "COLLATE utf8mb4_nopad_bin" in text


def test_public_tables_keep_their_name_other_schemas_are_prefixed(dialect):
    def shape(name):
        return TableShape(name, (ColumnShape("id", pg.INTEGER(), False),), ("id",))

    assert dialect.destination_name(shape("public.person")) == (None, "person")
    assert dialect.destination_name(shape("hr.person")) == (None, "hr__person")


def test_only_pymysql_is_accepted():
    import pymysql

    # PyMySQL stands in for mysql-connector's module, which is not installed; only the driver's name matters here.
    engine = create_engine("mysql+mysqlconnector://cdc:cdc@127.0.0.1:1/none", module=pymysql)
    with pytest.raises(ConfigError, match="PyMySQL"):
        MariaDBDialect(engine)


def test_values_are_converted_to_what_pymysql_binds():
    aware = datetime(2024, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert value_converter(pg.TIMESTAMP(timezone=True))(aware) == datetime(2024, 3, 1, 10, 0)
    assert value_converter(pg.TIMESTAMP())(datetime(2024, 3, 1, 12, 0)) == datetime(2024, 3, 1, 12, 0)
    assert value_converter(pg.TIME(timezone=True))(time(1, 30, tzinfo=timezone(timedelta(hours=2)))) == time(23, 30)
    assert value_converter(pg.INTERVAL())(timedelta(days=1, microseconds=5)) == 86_400_000_005
    assert value_converter(pg.INTERVAL())("PT1.5S") == 1_500_000
    assert value_converter(pg.UUID())(UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert json.loads(value_converter(pg.ARRAY(sa.Numeric))([Decimal("1.5"), Decimal("2"), None])) == [1.5, 2, None]
    assert value_converter(pg.ARRAY(sa.Text))(["a", "b"]) == '["a","b"]'
    assert value_converter(pg.JSONB())('{"a": 1}') == '{"a": 1}'  # JSON arrives as text and stays as it is
    assert value_converter(pg.JSONB())({"a": [1, 2]}) == '{"a":[1,2]}'
    assert value_converter(pg.BYTEA())(memoryview(b"\x00\x01")) == b"\x00\x01"
    assert value_converter(pg.DATE())(date(2024, 1, 2)) == date(2024, 1, 2)
    assert value_converter(pg.NUMERIC())(None) is None


SELF = [ForeignKeyShape(("parent_id",), "public.node", ("id",))]


def test_rows_of_a_self_referencing_table_go_parent_first():
    rows = [{"id": 3, "parent_id": 2}, {"id": 2, "parent_id": 1}, {"id": 4, "parent_id": None},
            {"id": 1, "parent_id": 99}]
    order, cyclic = parents_first(rows, SELF)
    assert [rows[i]["id"] for i in order] == [4, 1, 2, 3] and cyclic == []


def test_a_reference_cycle_is_set_apart_with_its_descendants():
    rows = [{"id": 1, "parent_id": 2}, {"id": 2, "parent_id": 1}, {"id": 3, "parent_id": 1},
            {"id": 4, "parent_id": 4}]
    order, cyclic = parents_first(rows, SELF)
    assert [rows[i]["id"] for i in order] == [4] and sorted(rows[i]["id"] for i in cyclic) == [1, 2, 3]


def test_deletes_go_children_first_in_layers():
    keys = [{"id": 1}, {"id": 2}, {"id": 3}, {"id": 5}]
    stored = {(1,): {"id": 1, "parent_id": None}, (2,): {"id": 2, "parent_id": 1},
              (3,): {"id": 3, "parent_id": 2}}  # 5 is not at the destination
    layers, cyclic = children_first(keys, stored, ["id"], SELF)
    assert [[keys[i]["id"] for i in layer] for layer in layers] == [[3, 5], [2], [1]] and cyclic == []


def test_a_row_referencing_itself_is_deleted_with_the_cycles_and_its_ancestors():
    keys = [{"id": 1}, {"id": 2}, {"id": 3}]
    stored = {(1,): {"id": 1, "parent_id": None}, (2,): {"id": 2, "parent_id": 2}, (3,): {"id": 3, "parent_id": 1}}
    layers, cyclic = children_first(keys, stored, ["id"], SELF)
    assert [[keys[i]["id"] for i in layer] for layer in layers] == [[3], [1]] and cyclic == [1]


# --- the catalog mapping (docs/types.md, "MariaDB replica") ---------------------------------------------------

from consumers.apply.dialects import types as t  # noqa: E402
from consumers.apply.dialects.mariadb import mariadb_converter, mariadb_type  # noqa: E402
from consumers.apply.values import ValueConversionError  # noqa: E402

INT = t.SourceType("int4", "integer")
CHAR5 = t.SourceType("char", "character(5)", length=5)


@pytest.mark.parametrize("source, key, expected", [
    (t.SourceType("int4", "integer", domain="public.year"), False, "INTEGER"),
    (t.SourceType("float4", "real"), False, "DOUBLE"),
    (t.SourceType("money", "money"), False, "DECIMAL(19, 2)"),
    (t.SourceType("bit", "bit(16)", length=16), False, "BIT(16)"),
    (t.SourceType("bit", "bit(100)", length=100), False, "LONGTEXT"),
    (CHAR5, True, "CHAR(5)"),
    (t.SourceType("enum", "public.mood", labels=("a",)), False, "VARCHAR(255)"),
    (t.SourceType("composite", "public.address"), False, "LONGTEXT"),
    (t.SourceType("point", "point"), True, "VARCHAR(255)"),
    (t.SourceType("hstore", "public.hstore"), False, "JSON"),
    (t.SourceType("array", "integer[]", element=INT), False, "JSON"),
    (t.SourceType("interval", "interval"), False, "BIGINT"),
    (t.SourceType("timetz", "time with time zone"), False, "TIME(6)"),
    (t.SourceType("numeric", "numeric"), False, "DECIMAL(65, 30)"),
])
def test_catalog_types_map_to_one_mariadb_type(source, key, expected):
    assert mariadb_type(source, key=key).compile(dialect=MYSQL) == expected


def test_char_keys_lose_the_trailing_spaces_postgresql_ignores():
    # Debezium sends 'W05  '; MariaDB's CHAR drops trailing spaces on storage, and a NO PAD collation would not
    # match the padded key in a DELETE: the value is written as PostgreSQL compares it.
    convert = mariadb_converter(CHAR5)
    assert convert("W05  ") == "W05" and convert(" B   ") == " B" and convert(None) is None
    array = mariadb_converter(t.SourceType("array", "character(3)[]", element=t.SourceType("char", "character(3)")))
    assert json.loads(array(["ab ", None])) == ["ab ", None]  # not a key: the array keeps the source's text


def test_mariadb_values_of_types_debezium_sends_in_its_own_shapes():
    bits = mariadb_converter(t.SourceType("bit", "bit(16)", length=16))
    assert bits(b"\x03\x80") == 0b1000000000000011  # Debezium's Bits: little-endian
    assert mariadb_converter(t.SourceType("bit", "bit(1)", length=1))(True) == 1
    assert mariadb_converter(t.SourceType("point", "point"))({"x": 1.5, "y": -2.0, "wkb": b"", "srid": None}) == \
        "(1.5,-2.0)"
    assert mariadb_converter(t.SourceType("composite", "public.address"))(b'("a b",1)') == '("a b",1)'
    domain_array = t.SourceType("array", "integer[]", element=t.SourceType("int4", "integer", domain="public.year"))
    assert json.loads(mariadb_converter(domain_array)([b"1999", None])) == ["1999", None]
    assert mariadb_converter(t.SourceType("interval", "interval"))("P1Y0M-3DT0H0M-0.000001S") == \
        round((365.25 - 3) * 86_400_000_000) - 1


def test_a_number_wider_than_decimal_65_30_stops_naming_the_column(dialect):
    shape = TableShape("public.n", (ColumnShape("id", pg.INTEGER(), False, INT),
                                    ColumnShape("v", pg.NUMERIC(), True, t.SourceType("numeric", "numeric"))), ("id",))
    convert = dialect._converters(shape, ["v"])["v"]
    assert convert(Decimal("-0.000000000000000000000000000001")) == Decimal("-1E-30")
    with pytest.raises(ValueConversionError, match="column 'v'.*DECIMAL"):
        convert(Decimal("1E-31"))
    with pytest.raises(ValueConversionError):
        convert(Decimal("1E+35"))


def test_not_null_is_kept_as_at_the_source(dialect):
    shape = TableShape("public.nn", (ColumnShape("id", pg.INTEGER(), False, INT),
                                     ColumnShape("a", pg.TEXT(), False, t.SourceType("text", "text")),
                                     ColumnShape("b", pg.TEXT(), True, t.SourceType("text", "text"))), ("id",))
    table = dialect.table(shape)
    assert [(c.name, c.nullable) for c in table.columns] == [("id", False), ("a", False), ("b", True),
                                                              ("_cdc_lsn", False)]
