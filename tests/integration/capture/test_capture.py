"""The first capture path on the real stack: source rows changed, change events read back from Kafka and decoded."""

from __future__ import annotations

import psycopg

from consumers.apply.stream import ChangeStream
from producers import capture
from tests.integration.pipelines import pipeline_data, purge, write_pipeline

SCHEMA = """
create table person (id bigint primary key, name text not null, balance numeric(10, 2) not null);
create table enrollment (id bigint primary key, person_id bigint not null references person (id), grade int);
alter table enrollment replica identity full;
insert into person values (1, 'Ada', 10.50), (2, 'Grace', 20.00);
insert into enrollment values (10, 1, 9);
"""


def test_inserts_updates_and_deletes_arrive_in_kafka_as_avro(stack, decoder, source_db, tmp_path):
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml",
                              pipeline_data(stack, source_db, ["public.person", "public.enrollment"]))
    capture.apply(pipeline)
    try:
        assert pipeline.data_topics == [f"{pipeline.name}.public.person", f"{pipeline.name}.public.enrollment"]
        stream = ChangeStream(stack.kafka_bootstrap, decoder, pipeline.data_topics, group=f"test-{pipeline.name}")
        try:
            snapshot = stream.collect(lambda seen: len(seen) >= 3, timeout=120)
            assert sorted((e.table, e.op, e.key["id"]) for e in snapshot) == [
                ("public.enrollment", "r", 10), ("public.person", "r", 1), ("public.person", "r", 2)]
            with psycopg.connect(stack.postgres_url(source_db)) as conn:
                with conn.transaction():
                    conn.execute("insert into person values (3, 'Edsger', 0)")
                    conn.execute("insert into enrollment values (11, 3, 10)")
                with conn.transaction():
                    conn.execute("update person set name = 'Ada L.' where id = 1")
                with conn.transaction():
                    conn.execute("delete from enrollment where id = 10")
            changes = stream.collect(lambda seen: len(seen) >= 4, timeout=120)
        finally:
            stream.close()
    finally:
        purge(pipeline)

    by_op = {(e.table, e.op): e for e in changes}
    assert len(changes) == 4, [(e.table, e.op) for e in changes]
    created = by_op[("public.person", "c")]
    assert created.before is None and created.after["name"] == "Edsger"
    child = by_op[("public.enrollment", "c")]
    # One source transaction: same transaction id, consecutive order, commit-ordered LSNs.
    assert child.tx_id is not None and child.tx_id.split(":")[0] == created.tx_id.split(":")[0]
    assert (created.tx_order, child.tx_order) == (1, 2) and created.lsn < child.lsn
    updated = by_op[("public.person", "u")]
    assert updated.after["name"] == "Ada L." and updated.key == {"id": 1}
    deleted = by_op[("public.enrollment", "d")]
    # REPLICA IDENTITY FULL: the delete's before image still names the root (person_id).
    assert deleted.after is None and deleted.before == {"id": 10, "person_id": 1, "grade": 9}
    assert created.lsn < updated.lsn < deleted.lsn
    assert all(e.commit_time is not None for e in changes)


def test_connect_errors_name_the_connector_the_endpoint_and_connects_message(connect):
    import pytest

    from cdc.errors import ConnectError

    assert connect.status("no-such-connector") is None
    with pytest.raises(ConnectError) as info:
        connect.put_config("broken-connector", {"connector.class": "com.example.NoSuchConnector", "tasks.max": "1"})
    message = str(info.value)
    assert "connector 'broken-connector'" in message and "/connectors/broken-connector/config" in message
    assert "NoSuchConnector" in message and info.value.status == 400
