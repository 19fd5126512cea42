"""Debezium row images converted by consumers/apply/values.py equal what psycopg reads from the source (real stack)."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import struct
import time
import uuid
from datetime import UTC, timedelta

import psycopg
from confluent_kafka import Consumer
from psycopg import sql
from psycopg.rows import dict_row

from consumers.apply.values import INFINITY, NEG_INFINITY, UNAVAILABLE, RowConverter, converters_for_envelope
from producers import capture
from tests.integration.pipelines import pipeline_data, purge, write_pipeline

SCHEMA = """
create type mood as enum ('sad', 'ok', 'happy');
create table sample (
    id int primary key,
    i2 smallint, i4 integer, i8 bigint, n12 numeric(12, 2), nv numeric, r real, d double precision, b boolean,
    t text, vc varchar(20), c3 char(3), dt date, tm time, ts timestamp, tstz timestamptz, iv interval,
    js json, jb jsonb, u uuid, by bytea, ia int[], ta text[], m mood
);
insert into sample values
    (1, -32768, 2147483647, -9223372036854775808, -1234567890.12,
     -12345678901234567890123456789012345678.123456789, 1.5, -2.25e100, true,
     'héllo ✓ 日本 🚀 "quoted" \\ back', 'vingt caractères max', 'ab', '1969-07-20', '23:59:59.999999',
     '1900-01-01 12:34:56.123456', '2024-02-29 23:59:59.654321+05:30', '3 days 04:05:06.789',
     '{"b": 1,   "a": [1, 2.5, null], "b": 2}', '{"k": {"nested": ["é", 1e3, false]}}',
     'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff10', '{1,NULL,-3}', '{"x","y z",NULL,"é,\\"q\\""}', 'happy'),
    (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL),
    (3, 32767, -2147483648, 9223372036854775807, 0.00, -0.000000000000000000000000000001, 0.1, 0, false,
     '', '', '   ', '0001-01-01', '00:00:00', '1969-12-31 23:59:59.999999', '1970-01-01 00:00:00+00',
     '-1 days +00:00:01', 'null', '[]', '00000000-0000-0000-0000-000000000000', '', '{}', '{}', 'sad');
-- What Python's datetime cannot hold, and an interval with months (Debezium approximates those).
insert into sample (id, dt, ts, tstz, iv)
    values (4, 'infinity', '-infinity', 'infinity', '1 year 2 mons 3 days 04:05:06.789');
"""
COMPARED = [1, 2, 3]
SPECIAL = 4
TOASTED = 10
TOASTED_COLUMNS = ["t", "js", "jb", "by", "ia", "ta"]  # in table order


def insert_toasted_row(conn: psycopg.Connection) -> None:
    """Row 10: every varlena column far past the TOAST threshold with incompressible content, so PostgreSQL
    stores them out of line and an UPDATE that leaves them alone does not send them."""
    rnd = random.Random(20240229)
    noise = base64.b64encode(os.urandom(24_000)).decode()  # 32 kB of text that pglz cannot shrink
    conn.execute(
        "insert into sample (id, i4, t, by, js, jb, ia, ta, m) values (%s, 1, %s, %s, %s, %s, %s, %s, 'ok')",
        [TOASTED, noise, os.urandom(24_000), json.dumps({"k": noise}), json.dumps({"k": noise[::-1]}),
         [rnd.randint(-2**31, 2**31 - 1) for _ in range(6000)], [uuid.uuid4().hex * 2 for _ in range(400)]])


def float32(x: float | None) -> float | None:
    return None if x is None else struct.unpack("f", struct.pack("f", x))[0]


def source_rows(conn: psycopg.Connection, ids: list[int]) -> dict[int, dict]:
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute("select *, js::text as js_text, jb::text as jb_text from sample where id = any(%s)",
                       [ids]).fetchall()
    return {row["id"]: row for row in rows}


def assert_same_as_source(converted: dict, source: dict, columns: list[str], where: str) -> None:
    for column in columns:
        got, want = converted[column], source[column]
        context = f"{where}, column {column}: converted {got!r}, psycopg read {want!r}"
        if column == "iv":
            # Debezium's ISO-8601 text (interval.handling.mode=string) is the interval itself: PostgreSQL reads it
            # back as the source's value (write_back below); here, the same duration as psycopg's (a month = 30 days).
            assert (got is None) == (want is None), context
            if got is not None:
                assert iso_timedelta(got) == want, context
        elif column in ("js", "jb"):
            # The JSON text as PostgreSQL prints it (json keeps the input text verbatim), and the same document.
            assert got == source[f"{column}_text"], context
            assert (None if got is None else json.loads(got)) == want, context
        elif column == "r":
            # An Avro float is the float32 itself; psycopg reads PostgreSQL's shortest text for it.
            assert float32(got) == float32(want), context
        else:
            assert got == want, context
            assert type(got) is type(want), context
            if column == "ts" and got is not None:
                assert got.tzinfo is None, context
            if column == "tstz" and got is not None:
                assert got.tzinfo is UTC, context  # the same instant as psycopg's, expressed in UTC


def iso_timedelta(text: str) -> timedelta:
    """Debezium's 'P1Y2M3DT4H5M6.789S' as psycopg reads an interval (a year is 12 months, a month 30 days)."""
    y, mo, d, h, mi, sec = re.fullmatch(r"P(-?\d+)Y(-?\d+)M(-?\d+)DT(-?\d+)H(-?\d+)M(-?[\d.]+)S", text).groups()
    return timedelta(days=(int(y) * 12 + int(mo)) * 30 + int(d), hours=int(h), minutes=int(mi), seconds=float(sec))


def rows_as_text(conn: psycopg.Connection, table: str, ids: list[int], columns: list[str]) -> list[tuple]:
    """PostgreSQL's own text of each row (json verbatim, timestamptz in the session's zone), by id."""
    query = sql.SQL("select id, row({})::text from {} where id = any(%s) order by id").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table))
    return conn.execute(query, [ids]).fetchall()


def write_back(conn: psycopg.Connection, columns: list[str], by_copy: list[dict], by_insert: list[dict]) -> None:
    """Converted rows into two copies of the table: through COPY, as the PostgreSQL applier writes, and through
    a parameterised INSERT."""
    conn.execute("create table by_copy (like sample); create table by_insert (like sample)")
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    with conn.cursor().copy(sql.SQL("copy by_copy ({}) from stdin").format(names)) as copy:
        for row in by_copy:
            copy.write_row([row[c] for c in columns])
    insert = sql.SQL("insert into by_insert ({}) values ({})").format(
        names, sql.SQL(", ").join(sql.Placeholder() * len(columns)))
    conn.cursor().executemany(insert, [[row[c] for c in columns] for row in by_insert])


class RawReader:
    """A small consumer that keeps what ChangeStream drops: the schema id, to build one converter per schema."""

    def __init__(self, bootstrap: str, topic: str, decoder) -> None:
        self.decoder = decoder
        self.converters: dict[int, RowConverter] = {}
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-values-{uuid.uuid4().hex}",
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 3})
        self.consumer.subscribe([topic])

    def read(self, wanted: set[tuple[str, int]], timeout: float = 120) -> dict[tuple[str, int], dict]:
        """Events by (op, id) until every wanted one arrived: {"before", "after", "raw_after", "schema_id"}."""
        seen: dict[tuple[str, int], dict] = {}
        deadline = time.monotonic() + timeout
        while not wanted <= set(seen) and time.monotonic() < deadline:
            msg = self.consumer.poll(1.0)
            if msg is None or msg.error() is not None or msg.value() is None:
                continue
            schema_id = self.decoder.schema_id(msg.value())
            converter = self.converters.get(schema_id)
            if converter is None:
                converter = self.converters[schema_id] = converters_for_envelope(self.decoder.writer_schema(schema_id))
            envelope = self.decoder.decode(msg.value())
            image = envelope["after"] or envelope["before"]
            seen[envelope["op"], image["id"]] = {
                "before": converter.convert(envelope["before"]), "after": converter.convert(envelope["after"]),
                "raw_after": envelope["after"], "schema_id": schema_id}
        assert wanted <= set(seen), f"missing events {sorted(wanted - set(seen))}"
        return seen

    def close(self) -> None:
        self.consumer.close()


def test_converted_row_images_equal_the_source_rows_and_unchanged_toast_is_unavailable(
        stack, decoder, source_db, tmp_path):
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
        insert_toasted_row(conn)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", pipeline_data(stack, source_db, ["public.sample"]))
    capture.apply(pipeline)
    try:
        reader = RawReader(stack.kafka_bootstrap, pipeline.data_topics[0], decoder)
        try:
            snapshot = reader.read({("r", i) for i in [*COMPARED, SPECIAL, TOASTED]})
            with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
                # The same values again through the streaming path (pgoutput), which Debezium converts separately.
                conn.execute("insert into sample select id + 100, i2, i4, i8, n12, nv, r, d, b, t, vc, c3, dt, tm, "
                             "ts, tstz, iv, js, jb, u, by, ia, ta, m from sample where id <= %s", [SPECIAL])
                conn.execute("update sample set i4 = i4 + 1 where id = %s", [TOASTED])
            streamed = reader.read({("c", i + 100) for i in [*COMPARED, SPECIAL]} | {("u", TOASTED)})
        finally:
            reader.close()
        with psycopg.connect(stack.postgres_url(source_db)) as conn:
            source = source_rows(conn, [*COMPARED, TOASTED])
            columns = [c.name for c in conn.execute("select * from sample limit 0").description]
            special = conn.execute("select dt::text, ts::text, tstz::text from sample where id = %s",
                                   [SPECIAL]).fetchone()
    finally:
        purge(pipeline)

    converter = next(iter(reader.converters.values()))
    assert converter.columns == columns
    assert len({e["schema_id"] for e in [*snapshot.values(), *streamed.values()]}) == 1

    for i in COMPARED:
        assert_same_as_source(snapshot["r", i]["after"], source[i], columns, f"snapshot row {i}")
        assert_same_as_source(streamed["c", i + 100]["after"], {**source[i], "id": i + 100}, columns,
                              f"streamed row {i + 100}")
    assert_same_as_source(snapshot["r", TOASTED]["after"], {**source[TOASTED], "i4": 1}, columns,
                          "snapshot of the TOASTed row (before its update)")

    # Values Python's datetime cannot hold come out as PostgreSQL's own literals.
    assert special == (INFINITY, NEG_INFINITY, INFINITY)
    for event in (snapshot["r", SPECIAL], streamed["c", SPECIAL + 100]):
        after = event["after"]
        assert (after["dt"], after["ts"], after["tstz"]) == special
        # Exact, months and years included (interval.handling.mode=string).
        assert after["iv"] == "P1Y2M3DT4H5M6.789S"

    # REPLICA IDENTITY DEFAULT: an UPDATE that leaves the TOASTed columns alone does not send them.
    update = streamed["u", TOASTED]
    assert update["before"] is None
    after = update["after"]
    assert [c for c in columns if after[c] is UNAVAILABLE] == TOASTED_COLUMNS
    assert update["raw_after"]["t"] == "__debezium_unavailable_value"  # what the converter turned into UNAVAILABLE
    assert after["i4"] == 2 and after["m"] == "ok" and after["id"] == TOASTED
    rest = [c for c in columns if c not in TOASTED_COLUMNS]  # the source was read after the update
    assert_same_as_source(after, source[TOASTED], rest, "update of the TOASTed row")

    # Ready to bind: written back through COPY and through INSERT, the converted images give the source rows again.
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        write_back(conn, columns, [snapshot["r", i]["after"] for i in [*COMPARED, SPECIAL, TOASTED]],
                   [{**streamed["c", i + 100]["after"], "id": i} for i in [*COMPARED, SPECIAL]])
        conn.execute("update by_copy set i4 = i4 + 1 where id = %s", [TOASTED])  # as the source was updated
        for table, ids in (("by_copy", [*COMPARED, TOASTED]), ("by_insert", COMPARED)):
            assert rows_as_text(conn, table, ids, columns) == rows_as_text(conn, "sample", ids, columns), table
            # The infinities round-trip, and the interval with months and a year.
            assert rows_as_text(conn, table, [SPECIAL], columns) == rows_as_text(conn, "sample", [SPECIAL], columns)
