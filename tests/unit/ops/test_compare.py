"""The comparison rules (consumers/ops/compare.py), table names as users type them, and Debezium's name parser."""

from __future__ import annotations

import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.types import CHAR, BigInteger, Integer, Text

from cdc.errors import ConfigError
from cdc.source_tables import ColumnShape, TableShape
from consumers.ops.compare import MONTH_MICROS, Kind, equal, kind_of
from consumers.ops.resync import debezium_parts, parse_ids
from consumers.ops.verify import _digits, resolve_table


def test_float4_by_its_float32_value():
    kind = kind_of(pg.REAL())
    # What PostgreSQL prints, what MariaDB's FLOAT gave as text, and the exact float32 upcast to a Python float.
    assert equal(kind, 6.314, 6.313999652862549) and equal(kind, "6.3139997", 6.314)
    assert not equal(kind, 6.314, 6.3141)
    assert equal(kind, float("nan"), "NaN")


def test_float8_exactly():
    kind = kind_of(pg.DOUBLE_PRECISION())
    assert equal(kind, 0.1 + 0.2, "0.30000000000000004")
    assert not equal(kind, 1 / 3, 1 / 3 + 1e-16 * 3)
    assert equal(kind, float("inf"), "inf") and equal(kind, "Infinity", float("inf"))


def test_numerics_by_scale_and_float_destinations_at_their_precision():
    kind = kind_of(pg.NUMERIC(6, 2))
    assert equal(kind, Decimal("1.50"), Decimal("1.5")) and equal(kind, Decimal("10.00"), "10")
    assert not equal(kind, Decimal("1.50"), Decimal("1.51"))
    assert equal(kind_of(pg.NUMERIC()), Decimal("0.142857142857142857"), 0.14285714285714285)


def test_char_padding_is_not_data_but_text_spaces_are():
    assert equal(kind_of(CHAR(5)), "AB   ", "AB")
    assert not equal(kind_of(Text()), "AB ", "AB")


def test_booleans_uuids_bytes():
    assert equal(kind_of(pg.BOOLEAN()), True, 1) and not equal(kind_of(pg.BOOLEAN()), True, 0)
    u = uuid.uuid4()
    assert equal(kind_of(pg.UUID()), u, str(u).upper())
    assert equal(kind_of(pg.BYTEA()), b"\x01\xab", "01ab") and equal(kind_of(pg.BYTEA()), b"\x01", memoryview(b"\x01"))


def test_time_zones_and_naive_utc():
    kind = kind_of(pg.TIMESTAMP(timezone=True))
    aware = datetime(2026, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))
    assert equal(kind, aware, datetime(2026, 1, 1, 0, 0))  # MariaDB's DATETIME holds UTC
    assert equal(kind, aware, "2026-01-01T00:00:00+00:00")
    assert not equal(kind, aware, datetime(2026, 1, 1, 2, 0))
    assert equal(kind_of(pg.DATE()), date(2026, 1, 2), "2026-01-02")
    assert equal(kind_of(pg.TIME()), time(12, 0, 1, 500000), timedelta(hours=12, seconds=1.5))


def test_intervals_in_debeziums_months():
    kind = kind_of(pg.INTERVAL())
    micros = MONTH_MICROS + 2 * 86_400_000_000  # '1 mon 2 days' as Debezium's MicroDuration carries it
    assert equal(kind, micros, timedelta(microseconds=micros)) and equal(kind, micros, str(micros))
    assert equal(kind, timedelta(days=1, hours=2, seconds=3.5), "1 day 02:00:03.5")
    assert not equal(kind, timedelta(seconds=1), timedelta(seconds=2))
    # Where both sides hold real intervals, the fields are compared: a month is not 30 days.
    assert equal(kind, "14/3/90306789000", "14/3/90306789000") and not equal(kind, "1/0/0", "0/30/0")


def test_json_canonical_form():
    kind = kind_of(pg.JSONB())
    assert equal(kind, '{"b": [1, 2.50], "a": {"x": "y"}}', '{"a":{"x":"y"},"b":[1,2.5]}')
    assert equal(kind, {"a": 1}, '{"a": 1}')
    assert not equal(kind, '{"a": 1}', '{"a": "1"}')


def test_arrays_element_by_element():
    kind = kind_of(pg.ARRAY(Text()))
    assert kind == Kind("array", element=Kind("text"))
    assert equal(kind, ["a", "b c"], '["a", "b c"]') and not equal(kind, ["a"], '["a", "b"]')
    reals = kind_of(pg.ARRAY(pg.REAL()))
    assert equal(reals, [6.314, None], "[6.313999652862549, null]")
    dates = kind_of(pg.ARRAY(pg.DATE()))
    assert equal(dates, [date(2026, 1, 1)], '["2026-01-01"]')


def test_bucket_digits_grow_with_the_table():
    assert _digits(10) == 1 and _digits(1_000_000) == 4 and 16 ** _digits(50_000) >= 50_000 / 16


TABLES = ("public.film", "Ops.Item", "ops.item2", "public.film_actor", "sales.film")


@pytest.mark.parametrize("typed, meant", [
    ("public.film", "public.film"), ('"Ops"."Item"', "Ops.Item"), ("Ops.Item", "Ops.Item"), ("ops.item", "Ops.Item"),
    ('"public".film_actor', "public.film_actor"), ("film_actor", "public.film_actor"), ("OPS.ITEM2", "ops.item2"),
])
def test_table_names_in_every_spelling(typed, meant):
    assert resolve_table(typed, TABLES) == meant


def test_ambiguous_and_unknown_names_are_refused_with_the_candidates():
    with pytest.raises(ConfigError, match="public.film, sales.film"):
        resolve_table("film", TABLES)
    with pytest.raises(ConfigError, match="not a captured table"):
        resolve_table('"ops"."Item"', TABLES)


def test_debeziums_table_id_parser():
    assert debezium_parts("public.film") == ["public", "film"]
    assert debezium_parts('"public"."my table"') == ["public", "my table"]
    assert debezium_parts('"a""b".c') == ['a"b', "c"]
    with pytest.raises(ValueError):
        debezium_parts("public.my table")
    with pytest.raises(ValueError):
        debezium_parts("public.")


def shape(*key: str) -> TableShape:
    columns = {"id": BigInteger(), "code": CHAR(3), "n": Integer(), "ref": pg.UUID()}
    return TableShape("public.t", tuple(ColumnShape(c, t, False) for c, t in columns.items()), key)


def test_keys_as_users_give_them():
    assert parse_ids("1, 2,2", shape("id")) == [[1], [2]]
    assert parse_ids("1:AB,2:CD", shape("n", "code")) == [[1, "AB"], [2, "CD"]]
    assert parse_ids('[[1, "A,B"]]', shape("n", "code")) == [[1, "A,B"]]
    u = str(uuid.uuid4())
    assert parse_ids(u.upper(), shape("ref")) == [[u.upper()]]
    with pytest.raises(ConfigError, match="not a valid key"):
        parse_ids("x", shape("id"))
    with pytest.raises(ConfigError, match=r"\(n, code\), 2 value"):
        parse_ids("1", shape("n", "code"))


def test_types_carried_as_text_composites_money_bits_and_json_arrays():
    other = kind_of(pg.INT4RANGE())
    assert equal(other, "(0.25,-1)", "(0.25,-1.0)") and not equal(other, "[1,11)", "[1,12)")
    assert equal(other, '("street ""1"" \\\\ é",1000)', {"street": 'street "1" \\ é', "zip": 1000})
    assert equal(other, "(0.25,-1)", {"x": 0.25, "y": -1.0})
    assert equal(kind_of(pg.MONEY()), "-$987.66", Decimal("-987.66"))
    assert equal(kind_of(pg.BIT(16)), "0000011111101011", b"\x07\xeb")
    assert equal(kind_of(pg.HSTORE()), {"k": "1", "n": None}, '{"n": null, "k": "1"}')
    jsons = kind_of(pg.ARRAY(pg.JSONB()))
    assert equal(jsons, [{"a": 1}, None], ['{"a": 1}', "null"])
    ints = kind_of(pg.ARRAY(Integer()))
    assert equal(ints, "{1904,2000}", [1904, 2000]) and equal(ints, "{{1,2},{3,NULL}}", [[1, 2], [3, None]])
    assert equal(kind_of(pg.ARRAY(pg.NUMERIC())), [Decimal("1.3333333333333333")], "[1.3333333333333333]")


def test_a_name_debezium_cannot_parse_is_refused_before_any_signal():
    from consumers.ops.resync import check_debezium_name

    check_debezium_name("Ops.Item")
    check_debezium_name("public.film_actor")
    for name in ("public.my table", "public.a;b", "public.'quoted", "public.a.b"):
        with pytest.raises(ConfigError, match="Unable to parse table identifier") as caught:
            check_debezium_name(name)
        assert name.split(".", 1)[1] in str(caught.value) and "cdc replay" in str(caught.value)


def test_arrays_of_types_carried_as_text_are_read_as_postgresqls_text():
    from consumers.apply.dialects.canon import PostgresCanon

    ranges, inets = kind_of(pg.ARRAY(pg.INT4RANGE())), kind_of(pg.ARRAY(pg.INET()))
    assert PostgresCanon().fetch(ranges, '"ra"') == '("ra")::text[]'
    assert PostgresCanon().fetch(inets, '"ipa"') == '"ipa"'  # inet's text would add /32 to a host
    assert equal(ranges, ["[1,)", "empty"], '["[1,)","empty"]')
