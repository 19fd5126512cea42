"""An explicit NULL in a nullable column with a DEFAULT arrives as NULL, not as the default: in Kafka (inserts, both
images of updates, deletes, the snapshot) and at a PostgreSQL replica, for columns of many types."""

from __future__ import annotations

import time

import pytest

from consumers.apply.stream import ChangeStream
from producers import capture
from producers.connect import ConnectClient
from producers.debezium import DROP_OPTIONAL_DEFAULTS
from tests.integration.pipelines import (
    applied_pipeline,
    assert_nothing_created,
    caught_up,
    connect_plugins,
    execute,
    pipeline_data,
    purge,
    require_plugins,
    table_rows,
    write_pipeline,
)

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




def last_value(bootstrap: str, topic: str) -> bytes:
    """The value bytes of the last message of a topic's partitions (any one of them)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False,
                         "log_level": 3})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                consumer.assign([TopicPartition(topic, p, high - 1)])
                message = consumer.poll(10)
                assert message is not None and message.error() is None, message
                return message.value()
    finally:
        consumer.close()
    raise AssertionError(f"{topic} is empty")


def test_explicit_nulls_in_columns_with_defaults_arrive_as_nulls(stack, decoder, source_db, destination_db,
                                                                 tmp_path):
    require_plugins(stack, DROP_OPTIONAL_DEFAULTS)
    source, destination = stack.postgres_url(source_db), stack.postgres_url(destination_db)
    execute(source, SCHEMA)
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.item"],
                                      destinations={"pg": {"kind": "replica", "url": destination}})
    try:
        caught_up(path)
        assert table_rows(destination, "public.item") == table_rows(source, "public.item")
        execute(source,
                f"insert into item values (3, {NULLS})",
                f"insert into item values (4, {NULLS})",
                f"update item set ({', '.join(COLUMNS)}) = ({VALUES}) where id = 3",  # from NULL
                f"update item set ({', '.join(COLUMNS)}) = ({NULLS}) where id = 2",  # to NULL, from the defaults
                "delete from item where id = 1",
                f"insert into item values (5, {VALUES})",
                f"update item set ({', '.join(COLUMNS)}) = ({NULLS}) where id = 5")  # to NULL, from other values
        caught_up(path)
        rows = table_rows(source, "public.item")
        assert [r[0] for r in rows] == [2, 3, 4, 5]
        assert [r[0] for r in rows if all(v is None for v in r[1:])] == [2, 4, 5]  # the source has its NULLs
        assert table_rows(destination, "public.item") == rows

        raw_value = last_value(stack.kafka_bootstrap, pipeline.topic_of("public.item"))
        stream = ChangeStream(stack.kafka_bootstrap, decoder, pipeline.data_topics, group=f"t-{pipeline.name}")
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
    # The registered value schema: the images' columns carry no default any more; the source block keeps its own.
    schema = decoder.raw_schema(decoder.schema_id(raw_value))
    fields = {f["name"]: f for f in schema["fields"]}
    # One record schema for both images, defined where first used (the before image), named in the other.
    row = next(t for t in fields["before"]["type"] if isinstance(t, dict))
    assert fields["after"]["type"][-1].split(".")[-1] == row["name"], fields["after"]
    assert {f["name"]: f.get("default") for f in row["fields"] if f["name"] in COLUMNS} == nulls, row
    source_fields = {f["name"]: f for f in fields["source"]["type"]["fields"]}
    assert source_fields["snapshot"].get("default") == "false", source_fields["snapshot"]
    assert r1.snapshot and r2.snapshot and not any(e.snapshot for e in (d1, u2, c3, u3, c4, c5, u5))
    assert image(r1, "after") == nulls and image(c3, "after") == nulls and image(c4, "after") == nulls
    assert image(u3, "before") == nulls and None not in image(u3, "after").values()
    # The defaults themselves still arrive where the row holds them.
    assert image(r2, "after")["note"] == "n/a" and image(r2, "after")["qty"] == 7 and image(r2, "after")["flag"]
    assert None not in image(u2, "before").values() and image(u2, "after") == nulls
    assert image(d1, "before") == nulls
    assert None not in image(c5, "after").values() and image(u5, "after") == nulls


def without_the_transform(pipeline, tables, **options):
    """The connector configuration an earlier release made: no DropOptionalDefaults."""
    config = ORIGINAL_CONFIG(pipeline, tables, **options)
    config["transforms"] = ",".join(t for t in config["transforms"].split(",") if t != "nulls")
    del config["transforms.nulls.type"]
    return config


ORIGINAL_CONFIG = capture.debezium.connector_config


def test_a_connector_made_without_the_transform_gets_it_on_apply_and_keeps_replicating(
        stack, source_db, destination_db, tmp_path, monkeypatch):
    require_plugins(stack, DROP_OPTIONAL_DEFAULTS)
    source, destination = stack.postgres_url(source_db), stack.postgres_url(destination_db)
    execute(source, SCHEMA.replace(f"insert into item values (1, {NULLS});", f"insert into item values (1, {VALUES});"))
    data = pipeline_data(stack, source_db, ["public.item"],
                         destinations={"pg": {"kind": "replica", "url": destination}})
    path = tmp_path / "pipeline.yaml"
    pipeline = write_pipeline(path, data)
    monkeypatch.setattr(capture.debezium, "connector_config", without_the_transform)
    capture.apply(pipeline)
    try:
        caught_up(path)
        assert table_rows(destination, "public.item") == table_rows(source, "public.item")
        monkeypatch.undo()
        report = capture.apply(pipeline)  # the configuration gains the transform; the offsets stay
        with ConnectClient(stack.urls()["connect"]) as client:
            assert client.config(pipeline.connector_name)["transforms.nulls.type"] == DROP_OPTIONAL_DEFAULTS
        assert report.action == "updated", report
        execute(source,
                f"insert into item values (3, {NULLS})",
                f"update item set ({', '.join(COLUMNS)}) = ({NULLS}) where id = 1",
                "update item set note = 'kept' where id = 2")
        caught_up(path)
        rows = table_rows(source, "public.item")
        assert [r[0] for r in rows if all(v is None for v in r[1:])] == [1, 3]
        assert table_rows(destination, "public.item") == rows
    finally:
        purge(pipeline)


def test_a_connect_without_the_transform_is_refused_before_anything_is_created(stack, connect, source_db, tmp_path):
    if DROP_OPTIONAL_DEFAULTS in connect_plugins(stack):
        pytest.skip("this Kafka Connect has the project's transforms")
    from cdc.errors import CdcError

    execute(stack.postgres_url(source_db), SCHEMA)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", pipeline_data(stack, source_db, ["public.item"]))
    with pytest.raises(CdcError) as info:
        capture.apply(pipeline)
    assert str(info.value) == (
        "the connector needs the transforms cdc.transforms.DropOptionalDefaults$Value (without them an explicit NULL "
        "in a column with a default reaches Kafka as the default), which Kafka Connect at "
        f"{stack.urls()['connect']} does not have; `cdc stack up` builds them into the plugin path, and Connect "
        "loads them when it starts. Nothing was changed.")
    assert_nothing_created(stack, connect, pipeline, source_db)


BRANCHES = """
create table branch (bid integer primary key, name text);
create table history (hid integer primary key, bid integer not null default 1 references branch, delta integer);
create table note (nid integer primary key, bid integer default 2 references branch, body text);
insert into branch values (1, 'one'), (2, 'two');
insert into history values (1, 1, 10), (2, 2, 20);
insert into note values (1, null, 'no branch'), (2, 2, 'branch two');
"""


def test_root_id_columns_with_defaults_keep_one_key_schema_and_null_root_ids(stack, decoder, source_db,
                                                                            destination_db, tmp_path):
    """Debezium gives a member's key field its root-id column's default; the root's key has none."""
    import struct
    from collections import defaultdict

    from confluent_kafka import Consumer, TopicPartition

    require_plugins(stack, DROP_OPTIONAL_DEFAULTS)
    source, destination = stack.postgres_url(source_db), stack.postgres_url(destination_db)
    execute(source, BRANCHES)
    path, pipeline = applied_pipeline(
        stack, source_db, tmp_path, ["public.branch", "public.history", "public.note"],
        hierarchies={"branch": {"root": "public.branch", "members": {"public.history": "bid", "public.note": "bid"}}},
        topics={"partitions": 3}, destinations={"pg": {"kind": "replica", "url": destination}})
    try:
        execute(source, "insert into note values (3, null, 'none either')", "update note set bid = null where nid = 2")
        caught_up(path)
        for table in ("branch", "history", "note"):
            assert table_rows(destination, f"public.{table}") == table_rows(source, f"public.{table}"), table
        topic = pipeline.topic_of("public.branch")
        consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"t-{pipeline.name}",
                             "enable.auto.commit": False, "log_level": 3})
        consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
        messages = []
        deadline = time.monotonic() + 60
        # 2 + 2 + 2 snapshot reads, 1 insert, and the update of a root id: a delete and a create (other keys)
        while len(messages) < 9 and time.monotonic() < deadline:
            messages += [m for m in consumer.consume(100, 1.0) if m.error() is None]
        consumer.close()
    finally:
        purge(pipeline)
    assert len(messages) == 9
    # One key schema: one registry id in every key, so one root id's changes share a partition.
    ids = {struct.unpack(">bI", m.key()[:5])[1] for m in messages}
    assert len(ids) == 1, [decoder.raw_schema(i) for i in ids]
    partitions = defaultdict(set)
    for m in messages:
        partitions[m.key()].add(m.partition())
    assert all(len(p) == 1 for p in partitions.values()), partitions
    # The notes whose root id is NULL are keyed by a null root id, not by the column's default (2).
    keys = defaultdict(list)
    for m in messages:
        value = decoder.decode(m.value())
        row = value["after"] or value["before"]
        keys[(value["source"]["table"], row[{"branch": "bid", "history": "hid", "note": "nid"}[
            value["source"]["table"]]], value["op"])].append(decoder.decode(m.key())["bid"])
    assert keys[("note", 1, "r")] == [None] and keys[("note", 3, "c")] == [None]
    assert keys[("note", 2, "r")] == [2] and keys[("note", 2, "d")] == [2] and keys[("note", 2, "c")] == [None]
    assert keys[("history", 1, "r")] == [1] and keys[("history", 2, "r")] == [2]
