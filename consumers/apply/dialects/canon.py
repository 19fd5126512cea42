"""The canonical text of a value in each backend's SQL: what `cdc verify` (consumers.ops.verify, compare.py) hashes on
both sides to compare a destination with its source without moving every row. One class per backend; a dialect
gives its own (`Dialect.canon`), the source's is PostgreSQL's.

The texts follow the comparison rules of consumers.ops.compare (`normal`): an integer as its digits, a time as
microseconds since midnight, a timestamp as microseconds since the epoch, a numeric without trailing zeros... `kind`
is compare.Kind (its `name`, and for arrays `element`). `stored` is the destination column's own type name
(information_schema's data_type, lower case), so that a type stored as text (JSON kept as VARCHAR, an interval kept as
text) is read as text rather than cast, which could fail the whole query; any doubt makes the text differ, never the
query fail."""

from __future__ import annotations

from typing import Any

_TEXTUAL = ("char", "text", "string")
# The Canon method that spells each of these kinds (the others: `column` itself).
_BY_KIND = {"bool": "boolean", "float4": "float4", "float8": "float8", "char": "char", "bytes": "binary",
            "timestamp": "timestamp", "date": "days"}


class Canon:
    """SQL expressions of the canonical text of each column kind on one backend (the shared spellings here)."""

    int_div = "/"  # integer division of integers (verify's key ranges)

    def text(self, expr: str) -> str:
        raise NotImplementedError

    def concat(self, parts: list[str]) -> str:
        return "(" + " || ".join(parts) + ")"

    def literal(self, text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    def sep(self) -> str:
        return "chr(31)"

    def md5(self, expr: str) -> str:
        return f"md5({expr})"

    def hash60(self, md5_expr: str, start: int = 1) -> str:
        """60 bits of an md5's hex text (15 digits from `start`) as an integer: summed per range, order-free."""
        raise NotImplementedError

    def row_text(self, exprs: list[str]) -> str:
        """The canonical text of a row: each column's text behind 'v' (or 'N' for NULL), separated."""
        parts: list[str] = []
        for i, expr in enumerate(exprs):
            if i:
                parts.append(self.sep())
            marked = self.concat(["'v'", expr])
            parts.append(f"COALESCE({marked}, 'N')")
        return self.concat(parts) if len(parts) > 1 else parts[0]

    # -- one column ------------------------------------------------------------------------------------------------
    def column(self, kind: Any, col: str, stored: str | None = None) -> str:
        """The canonical text of column `col` (quoted) of this kind, NULL for NULL."""
        stored = (stored or "").lower()
        kept = self._kept_as_text(kind, col, stored)
        if kept is not None:
            return kept
        k = kind.name
        if k in ("int", "text"):
            return self.text(col)
        if k == "money":
            return self.numeric(self._money(col))
        if k == "numeric":
            return self.numeric(col)
        if k == "uuid":
            return f"lower({self.text(col)})"
        if k == "interval":
            return self.interval(col, stored)
        if k == "time":
            return self.time_of_day(col, stored)
        method = _BY_KIND.get(k)
        if method is not None:
            return getattr(self, method)(col)
        return self.text(col)  # json, arrays, others: text (differences are settled in Python)

    def _kept_as_text(self, kind: Any, col: str, stored: str) -> str | None:
        """The column's text where the destination keeps this kind as text (DuckDB files of older versions)."""
        return None

    def _money(self, col: str) -> str:
        return col

    def numeric(self, col: str) -> str:
        t = self.text(col)
        return f"(CASE WHEN strpos({t}, '.') > 0 THEN rtrim(rtrim({t}, '0'), '.') ELSE {t} END)"

    def char(self, col: str) -> str:
        return f"rtrim({self.text(col)})"

    # Each backend spells these its own way.
    def boolean(self, col: str) -> str:
        raise NotImplementedError

    def float4(self, col: str) -> str:
        raise NotImplementedError

    def float8(self, col: str) -> str:
        raise NotImplementedError

    def binary(self, col: str) -> str:
        raise NotImplementedError

    def timestamp(self, col: str) -> str:
        raise NotImplementedError

    def days(self, col: str) -> str:
        raise NotImplementedError

    def time_of_day(self, col: str, stored: str) -> str:
        raise NotImplementedError

    def interval(self, col: str, stored: str) -> str:
        return self.text(col)  # MariaDB's BIGINT microseconds; text kept by an older DuckDB file

    # -- how far the SQL text can be trusted ---------------------------------------------------------------------
    def exact(self, kind: Any, stored: str | None = None) -> bool:
        """Whether this backend's canonical text of the kind, from this stored type, differs only for values the
        Python rule calls different too: a differing row hash is then a difference, without reading the values.
        Not for JSON, arrays and others (spacing, element text), nor binary floats off PostgreSQL (exponent
        spellings), nor anything a DuckDB column keeps as text."""
        stored = (stored or "").lower()
        k = kind.name
        if k in ("json", "array", "other"):
            return False
        return self._exact("numeric" if k == "money" else k, stored)

    def _exact(self, k: str, stored: str) -> bool:
        if k in ("bits", "float8"):
            return False
        if k == "numeric":
            return "dec" in stored or "numeric" in stored
        if k == "interval":
            return stored == "interval"
        return True

    def fetch(self, kind: Any, col: str, stored: str | None = None) -> str:
        """How to select a column for the Python rule: as it is, except where the driver would lose what the rule
        needs (an exact interval's months, which drivers turn into 30 days)."""
        if kind.name == "interval" and stored == "interval":
            return self.column(kind, col, stored)  # drivers turn a month into 30 days
        return col


class PostgresCanon(Canon):
    """PostgreSQL's: the source's, and a PostgreSQL replica's (columns of the source's own types)."""

    def text(self, expr: str) -> str:
        return f"({expr})::text"

    def hash60(self, md5_expr: str, start: int = 1) -> str:
        return f"('x' || substr({md5_expr}, {start}, 15))::bit(60)::bigint"

    def _money(self, col: str) -> str:
        return f"({col})::numeric"

    def boolean(self, col: str) -> str:
        return f"({col})::int::text"

    def float4(self, col: str) -> str:
        # 6 significant digits (see compare._float4): PostgreSQL's real-to-numeric rounds to them.
        return self.numeric(f"({col})::real::numeric")

    def float8(self, col: str) -> str:
        return f"({col})::float8::text"

    def binary(self, col: str) -> str:
        return f"encode({col}, 'hex')"

    def timestamp(self, col: str) -> str:
        return (f"(CASE WHEN isfinite({col}) THEN (extract(epoch from {col}) * 1000000)::bigint::text "
                f"ELSE ({col})::text END)")

    def days(self, col: str) -> str:
        return f"(CASE WHEN isfinite({col}) THEN ({col} - date '1970-01-01')::text ELSE ({col})::text END)"

    def time_of_day(self, col: str, stored: str) -> str:
        return f"(extract(epoch from {col}) * 1000000)::bigint::text"

    def interval(self, col: str, stored: str) -> str:
        if stored == "interval":
            # Both sides hold an exact interval: 'months/days/microseconds', compared field by field.
            return (f"concat_ws('/', (extract(year from {col}) * 12 + extract(month from {col}))::bigint, "
                    f"extract(day from {col})::bigint, (extract(hour from {col}) * 3600000000 + "
                    f"extract(minute from {col}) * 60000000 + extract(microseconds from {col}))::bigint)")
        # The other side holds microseconds (MariaDB's BIGINT), a month counted as Debezium counts it:
        # 30.4375 days. PostgreSQL's epoch counts the months left over after whole years as 30 days.
        return f"(extract(epoch from {col}) * 1000000 + extract(month from {col}) * 37800000000)::bigint::text"

    def _exact(self, k: str, stored: str) -> bool:
        return True  # the applier creates PostgreSQL columns with the source's types

    def fetch(self, kind: Any, col: str, stored: str | None = None) -> str:
        if kind.name == "interval":
            return self.column(kind, col, stored)  # psycopg turns a month into 30 days
        if kind.name in ("other", "bits"):
            return f"({col})::text"  # PostgreSQL's text, which the destinations without the type hold
        element = kind.element if kind.name == "array" else None
        if element is not None and element.name in ("other", "bits", "money") \
                and element.sql_type not in ("inet", "cidr"):  # their text would add /32 to a host
            return f"({col})::text[]"  # each element as PostgreSQL's text (psycopg would make Range objects...)
        if kind.name == "money":
            return f"({col})::numeric"
        if element is not None and element.name == "interval":
            return f"to_json({col})::text"
        return col


class MariaDBCanon(Canon):
    int_div = "DIV"

    def text(self, expr: str) -> str:
        return f"CAST({expr} AS CHAR)"

    def concat(self, parts: list[str]) -> str:
        return "CONCAT(" + ", ".join(parts) + ")"

    def literal(self, text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"

    def sep(self) -> str:
        return "CHAR(31 USING utf8mb4)"

    def md5(self, expr: str) -> str:
        return f"MD5({expr})"

    def hash60(self, md5_expr: str, start: int = 1) -> str:
        return f"CAST(CONV(substr({md5_expr}, {start}, 15), 16, 10) AS UNSIGNED)"

    def boolean(self, col: str) -> str:
        return f"CAST(({col}) <> 0 AS CHAR)"

    def float4(self, col: str) -> str:
        return f"CAST(CAST({col} AS FLOAT) AS CHAR)"  # MariaDB prints 6 significant digits

    def float8(self, col: str) -> str:
        return f"CAST(CAST({col} AS DOUBLE) AS CHAR)"

    def numeric(self, col: str) -> str:
        t = self.text(col)
        return f"IF(LOCATE('.', {t}) > 0, TRIM(TRAILING '.' FROM TRIM(TRAILING '0' FROM {t})), {t})"

    def char(self, col: str) -> str:
        return f"RTRIM({col})"

    def binary(self, col: str) -> str:
        return f"LOWER(HEX({col}))"

    def timestamp(self, col: str) -> str:
        return f"CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {col}) AS CHAR)"

    def days(self, col: str) -> str:
        return f"CAST(DATEDIFF({col}, '1970-01-01') AS CHAR)"

    def time_of_day(self, col: str, stored: str) -> str:
        return f"CAST(CAST(TIME_TO_SEC({col}) * 1000000 AS SIGNED) AS CHAR)"

    def _exact(self, k: str, stored: str) -> bool:
        if k == "interval":
            return "int" in stored or stored == "interval"  # BIGINT microseconds
        return super()._exact(k, stored)


class DuckDBCanon(Canon):
    int_div = "//"

    def text(self, expr: str) -> str:
        return f"CAST({expr} AS VARCHAR)"

    def hash60(self, md5_expr: str, start: int = 1) -> str:
        return f"CAST('0x' || substr({md5_expr}, {start}, 15) AS BIGINT)"

    def _kept_as_text(self, kind: Any, col: str, stored: str) -> str | None:
        textual = any(t in stored for t in _TEXTUAL) and kind.name not in ("char", "text")
        if (textual or stored == "json") and kind.name not in ("json", "array", "other"):
            return self.text(col)  # kept as text: read, never cast (a failed cast fails the query)
        return None

    def boolean(self, col: str) -> str:
        return f"CAST(CAST({col} AS INTEGER) AS VARCHAR)"

    def float4(self, col: str) -> str:
        return f"printf('%.6g', TRY_CAST({col} AS FLOAT))"

    def float8(self, col: str) -> str:
        return f"CAST(TRY_CAST({col} AS DOUBLE) AS VARCHAR)"

    def binary(self, col: str) -> str:
        return f"lower(hex({col}))"

    def timestamp(self, col: str) -> str:
        return f"CAST(epoch_us({col}) AS VARCHAR)"

    def days(self, col: str) -> str:
        return f"CAST({col} - DATE '1970-01-01' AS VARCHAR)"

    def time_of_day(self, col: str, stored: str) -> str:
        return f"CAST(epoch_us({col}) AS VARCHAR)" if "tz" not in stored and "zone" not in stored else self.text(col)

    def interval(self, col: str, stored: str) -> str:
        if stored == "interval":
            return (f"concat_ws('/', datepart('year', {col}) * 12 + datepart('month', {col}), "
                    f"datepart('day', {col}), datepart('hour', {col}) * 3600000000 + "
                    f"datepart('minute', {col}) * 60000000 + datepart('microseconds', {col}))")
        return self.text(col)

    def _exact(self, k: str, stored: str) -> bool:
        if any(t in stored for t in (*_TEXTUAL, "json")) and k not in ("text", "char"):
            return False
        if k == "float4":
            return False
        return super()._exact(k, stored)


__all__ = ["Canon", "DuckDBCanon", "MariaDBCanon", "PostgresCanon"]
