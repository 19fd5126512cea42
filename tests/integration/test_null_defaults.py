"""An explicit NULL in a nullable column with a DEFAULT arrives as NULL, not as the default: in Kafka (inserts, both
images of updates, deletes, the snapshot) and at a PostgreSQL replica, for columns of many types."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from consumers.stream import ChangeStream
from producers import capture
from producers.connect import ConnectClient
from producers.debezium import DROP_OPTIONAL_DEFAULTS
from tests.integration.pipelines import execute, pipeline_data, purge, write_pipeline

CDC = str(Path(sys.executable).parent / "cdc")

# Each nullable column has a default that Debezium can put into the field's schema (a constant).
COLUMNS = {
    "note": "text default 'n/a'",
    "label": "varchar(20) default 'unlabelled'",
    "qty": "integer default 7",
    "small": "smallint default 3",
    "big": "bigint default 9000000000",
    "price": "numeric(10,2) default 1.50",
    "ratio": "double precision default 0.5",
    "flag": "boolean default true",
    "at": "timestamp default '2020-01-02 03:04:05'",
    "atz": "timestamptz default '2020-01-02 03:04:05+00'",
    "day": "date default '2020-01-02'",
    "clock": "time default '12:34:56'",
    "mood": "mood default 'happy'",
    "uid": "uuid default '00000000-0000-0000-0000-000000000001'",
    "doc": "jsonb default '{\"a\": 1}'",
    "tags": "text[] default '{x,y}'",
}
NULLS = ", ".join(["null"] * len(COLUMNS))
VALUES = ("'a note', 'lbl', 1, 2, 3, 4.25, 0.125, false, '2021-05-06 07:08:09', '2021-05-06 07:08:09+00', "
          "'2021-05-06', '01:02:03', 'sad', '00000000-0000-0000-0000-000000000002', '{\"b\": 2}', '{z}'")
SCHEMA = f"""
create type mood as enum ('happy', 'sad');
create table item (id integer primary key, {", ".join(f"{c} {d}" for c, d in COLUMNS.items())});
-- The whole old row in update and delete events: their before images must hold NULLs as NULLs too.
alter table item replica identity full;
insert into item values (1, {NULLS});   -- reaches Kafka by the snapshot
insert into item (id) values (2);       -- the defaults themselves
"""


def cdc(path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CDC, "-c", str(path), *args], capture_output=True, text=True, timeout=timeout)


def table_rows(url: str, table: str) -> list[tuple]:
    """Every row of a table with plain SQL (`_cdc_lsn` left out), in primary-key order."""
    with psycopg.connect(url) as conn:
        columns = [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = 'public' and table_name = %s "
            "and column_name <> '_cdc_lsn' order by ordinal_position", (table,))]
        assert columns, f"{table} does not exist at {url}"
        return conn.execute(sql.SQL("select {} from {} order by 1").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table))).fetchall()


def connect_url(stack) -> str:
    # CDC_TEST_CONNECT_URL: a second worker with the project's transforms on its plugin path, for a stack whose
    # Connect was started before they were built.
    return os.environ.get("CDC_TEST_CONNECT_URL", stack.urls()["connect"])


def test_explicit_nulls_in_columns_with_defaults_arrive_as_nulls(stack, decoder, source_db, destination_db,
                                                                 tmp_path):
    url = connect_url(stack)
    with ConnectClient(url) as client:
        if DROP_OPTIONAL_DEFAULTS not in {p.get("class") for p in client.plugins()}:
            pytest.skip(f"Kafka Connect at {url} lacks the project's transforms (restart Connect after `cdc stack up`)")
    source, destination = stack.postgres_url(source_db), stack.postgres_url(destination_db)
    execute(source, SCHEMA)
    data = pipeline_data(stack, source_db, ["public.item"],
                         destinations={"pg": {"kind": "replica", "url": destination}})
    data["kafka"]["connect_url"] = url
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)
    capture.apply(pipeline)
    try:
        first = cdc(path, "run", "--until-caught-up", "--timeout", "180")
        assert first.returncode == 0, first.stdout + first.stderr
        assert table_rows(destination, "item") == table_rows(source, "item")
        execute(source,
                f"insert into item values (3, {NULLS})",
                f"insert into item values (4, {NULLS})",
                f"update item set ({', '.join(COLUMNS)}) = ({VALUES}) where id = 3",  # from NULL
                f"update item set ({', '.join(COLUMNS)}) = ({NULLS}) where id = 2",  # to NULL, from the defaults
                "delete from item where id = 1",
                f"insert into item values (5, {VALUES})",
                f"update item set ({', '.join(COLUMNS)}) = ({NULLS}) where id = 5")  # to NULL, from other values
        second = cdc(path, "run", "--until-caught-up", "--timeout", "180")
        assert second.returncode == 0, second.stdout + second.stderr
        rows = table_rows(source, "item")
        assert [r[0] for r in rows] == [2, 3, 4, 5]
        assert [r[0] for r in rows if all(v is None for v in r[1:])] == [2, 4, 5]  # the source has its NULLs
        assert table_rows(destination, "item") == rows

        stream = ChangeStream(stack.kafka_bootstrap, decoder, pipeline.data_topics, group=f"t-{pipeline.pipeline}")
        try:
            events = stream.collect(lambda seen: len(seen) >= 9, timeout=60)
        finally:
            stream.close()
    finally:
        purge(pipeline)

    def image(e, which):
        row = getattr(e, which)
        assert row is not None, (e.op, which, e.key)
        return {c: row[c] for c in COLUMNS}

    nulls = dict.fromkeys(COLUMNS)
    # One key's events are in order (its partition's); the topic's partitions interleave them.
    by_id: dict[int, list] = {}
    for e in events:
        by_id.setdefault(e.key["id"], []).append(e)
    assert {i: [e.op for e in es] for i, es in by_id.items()} == {
        1: ["r", "d"], 2: ["r", "u"], 3: ["c", "u"], 4: ["c"], 5: ["c", "u"]}, events
    (r1, d1), (r2, u2), (c3, u3), (c4,), (c5, u5) = (by_id[i] for i in range(1, 6))
    assert image(r1, "after") == nulls and image(c3, "after") == nulls and image(c4, "after") == nulls
    assert image(u3, "before") == nulls and None not in image(u3, "after").values()
    # The defaults themselves still arrive where the row holds them.
    assert image(r2, "after")["note"] == "n/a" and image(r2, "after")["qty"] == 7 and image(r2, "after")["flag"]
    assert None not in image(u2, "before").values() and image(u2, "after") == nulls
    assert image(d1, "before") == nulls
    assert None not in image(c5, "after").values() and image(u5, "after") == nulls
