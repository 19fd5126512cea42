"""The MariaDB columnar path's SQL literals, computed by Arrow: what each value becomes in the VALUES list."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pyarrow as pa
import pytest
from sqlalchemy import create_engine
from sqlalchemy.dialects import postgresql as pg

from cdc.source_tables import ColumnShape, TableShape
from consumers.apply import columnar
from consumers.apply.dialects.mariadb import MariaDBDialect, _row_literals
from consumers.apply.values import ValueConversionError

SHAPE = TableShape("public.t", (
    ColumnShape("id", pg.INTEGER(), False), ColumnShape("code", pg.CHAR(6), True), ColumnShape("note", pg.TEXT(), True),
    ColumnShape("at", pg.TIMESTAMP(timezone=True), True), ColumnShape("local_at", pg.TIMESTAMP(), True),
    ColumnShape("flag", pg.BOOLEAN(), True), ColumnShape("r", pg.REAL(), True),
    ColumnShape("price", pg.NUMERIC(8, 2), True)), ("id",))


def flat(**columns: pa.Array) -> pa.Table:
    n = len(next(iter(columns.values())))
    head = {columnar.SEQ: pa.array(range(n), pa.int64()), columnar.OP: pa.array(columns.pop("op")),
            columnar.CHANGE_LSN: pa.array([100 + i for i in range(n)], pa.int64())}
    return pa.table({**head, **columns})


@pytest.fixture(scope="module")
def table():
    return MariaDBDialect(create_engine("mysql+pymysql://u@localhost/db")).table(SHAPE)


def test_each_value_is_written_as_the_general_path_binds_it(table):
    rows = flat(op=["c", "u"], id=pa.array([1, 2], pa.int32()), code=["W05  ", None],
                note=["it's a \\ path", None], at=["2024-02-29T18:29:59.654321Z", "2024-02-29T18:29:59+02:00"],
                local_at=pa.array([datetime(2001, 2, 3, 4, 5, 6, 789000), None], pa.timestamp("us")),
                flag=[True, None], r=pa.array([1.1, None], pa.float32()),
                price=pa.array([Decimal("12.30"), Decimal("-0.05")], pa.decimal128(8, 2)))
    got = _row_literals(rows, table, SHAPE, backslashes=True).to_pylist()
    assert got == [
        "0,'c',100,1,'W05','it\\'s a \\\\ path','2024-02-29 18:29:59.654321','2001-02-03 04:05:06.789000',1,"
        "1.100000023841858,12.30",
        "1,'u',101,2,NULL,NULL,'2024-02-29 16:29:59.000000',NULL,NULL,NULL,-0.05"]
    # Under NO_BACKSLASH_ESCAPES only the quote is doubled.
    assert "'it''s a \\ path'" in _row_literals(rows, table, SHAPE, backslashes=False).to_pylist()[0]


def test_a_deletes_columns_other_than_its_key_are_null(table):
    rows = flat(op=["d"], id=pa.array([7], pa.int32()), code=[""], note=[""], at=[""],
                local_at=pa.array([None], pa.timestamp("us")), flag=[False], r=pa.array([0.0], pa.float32()),
                price=pa.array([Decimal("0")], pa.decimal128(8, 2)))
    assert _row_literals(rows, table, SHAPE, backslashes=True).to_pylist() == [
        "0,'d',100,7,NULL,NULL,NULL,NULL,NULL,NULL,NULL"]


def test_a_float_mariadb_cannot_hold_is_refused_naming_the_column(table):
    rows = flat(op=["c"], id=pa.array([1], pa.int32()), code=[None], note=[None], at=[None],
                local_at=pa.array([None], pa.timestamp("us")), flag=[None], r=pa.array([float("nan")], pa.float32()),
                price=pa.array([None], pa.decimal128(8, 2)))
    with pytest.raises(ValueConversionError, match="'r'.*NaN or infinity"):
        _row_literals(rows, table, SHAPE, backslashes=True)
