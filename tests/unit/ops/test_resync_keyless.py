"""How `cdc resync` reads a keyless table's source rows as the applier's values (consumers.ops.resync._keyless_values):
Debezium's interval text, dates outside Python's range as text, and a refusal naming a column it cannot copy."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.types import Date, Integer, Text

from cdc.errors import ConfigError
from cdc.source_tables import LSN_COLUMN, ColumnShape, TableShape
from consumers.apply.dialects.types import interval_words
from consumers.apply.shapes import SNAPSHOT_LSN
from consumers.ops.resync import _keyless_values


def shape(*columns: tuple[str, object]) -> TableShape:
    return TableShape("public.log", tuple(ColumnShape(n, t, True) for n, t in columns), ())


def test_values_come_as_the_applier_has_them():
    values = _keyless_values(shape(("n", Integer()), ("spent", pg.INTERVAL()), ("day", Date()), ("meta", pg.JSONB()),
                                   ("msg", Text())), "pg")
    assert values.exprs[0] == '"n"'
    assert values.exprs[-2:] == ['"meta"::text', '"msg"']
    # n, six interval parts, date (native, text), meta, msg
    row = values.build((7, Decimal(1), Decimal(-2), Decimal(3), Decimal(4), Decimal(5), Decimal("6.789000"),
                        None, "infinity", '{"a": 1}', "x"))
    assert row == {"n": 7, "spent": "P1Y-2M3DT4H5M6.789000S", "day": "infinity", "meta": '{"a": 1}', "msg": "x",
                   LSN_COLUMN: SNAPSHOT_LSN}
    # The interval text is what the dialects read from Debezium.
    assert interval_words(row["spent"]).startswith("1 years -2 months 3 days")
    assert values.build((1, None, None, None, None, None, None, date(2026, 1, 1), None, None, None))["day"] == \
        date(2026, 1, 1)
    assert values.build((1, None, None, None, None, None, None, None, None, None, None))["spent"] is None


def test_a_column_it_cannot_copy_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"public.log has no primary key.*column where \(MONEY\).*cdc replay pg"):
        _keyless_values(shape(("n", Integer()), ("where", pg.MONEY())), "pg")


class FakeSide:
    """One side of a keyless table as verify's _Side gives it: rows of (row md5, row hash, values...)."""

    def __init__(self, rows: list[tuple], kinds: list) -> None:
        self._rows, self.kinds = rows, kinds

    def count(self):
        return len(self._rows), None, None

    def rows(self, bucketing, buckets):
        assert buckets is None  # small tables: fetched whole
        return list(self._rows)


def test_the_delta_counts_copies_by_normal_form():
    from consumers.ops.compare import Kind
    from consumers.ops.resync import _keyless_delta

    kinds = [Kind("int"), Kind("float4")]
    a, b, c = (1, 6.314), (2, 0.5), (3, 1.0)
    # The destination spells a float4 value otherwise (another md5): still the same row by its normal form.
    src = FakeSide([("ha", 0, *a)] * 3 + [("hb", 0, *b)] * 2 + [("hc", 0, *c)], kinds)
    dst = FakeSide([("ha", 0, *a), ("ha2", 0, 1, 6.3139997)] + [("hb", 0, *b)] * 3 + [("hx", 0, 9, 9.0)], kinds)
    delta = _keyless_delta(src, dst)
    assert sorted((row, n) for row, _, n in delta.insert) == [([1, 6.314], 1), ([3, 1.0], 1)]
    assert sorted((row, handle, n) for row, handle, n in delta.delete) == [([2, 0.5], "hb", 1), ([9, 9.0], "hx", 1)]
    assert _keyless_delta(src, src).insert == [] and not _keyless_delta(src, src)
