"""Columns whose type changes at the source (issue 13): followed on every destination where it can be done without
loss, refused with a named error where not; a dropped column still stops the applier, naming it."""

from __future__ import annotations

import re
from decimal import Decimal

import psycopg
import pytest

from tests.integration.pipelines import applied_pipeline, destination_rows, execute, purge


@pytest.fixture
def destinations(stack, destination_db, mariadb_database, tmp_path):
    """A PostgreSQL replica, a MariaDB replica and a DuckDB analytics replica (with its history table)."""
    return {"pg": {"kind": "replica", "url": stack.postgres_url(destination_db)},
            "maria": {"kind": "replica", "url": mariadb_database},
            "lake": {"kind": "analytics", "url": f"duckdb:///{tmp_path / 'lake.duckdb'}"}}


def run_all(appliers) -> None:
    for each in appliers:
        each.run(until_caught_up=True, timeout=240)
        each.writer.release()  # a DuckDB file is read by the test between runs


@pytest.mark.parametrize("applier", ["running", "restarted"])
def test_widened_columns_are_followed_on_every_destination(stack, source_db, destinations, tmp_path, applier):
    """`running`: an applier that applied the earlier changes meets the new types in the changes' writer schemas (and
    compares them with the shape it knows); `restarted`: the types change while no applier runs, and a new one
    finds its destination's columns of other types than the source's (its catalog against the source's)."""
    from consumers.apply.applier import ApplyError, ReplicaApplier

    source = stack.postgres_url(source_db)
    execute(source,
            "create table acct (id integer primary key, n integer, label varchar(10), amount numeric(8,2), "
            "code integer)",
            "insert into acct select g, g * 1000, 'l' || g, g + 0.25, g from generate_series(1, 50) g",
            "create table keyed (id integer primary key, what text)",
            "insert into keyed values (1, 'one')")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.acct", "public.keyed"],
                                      destinations=destinations)
    appliers = [ReplicaApplier(pipeline, name) for name in destinations]
    echoed: list[str] = []
    for each in appliers:
        each.echo = echoed.append
    columns = ["id", "n", "label", "amount", "code"]
    try:
        run_all(appliers)
        if applier == "restarted":
            for each in appliers:
                each.close()
            appliers = []
        execute(source,
                "alter table acct alter column n type bigint",
                "alter table acct alter column label type text",  # a string in Avro either way: found with n's
                "alter table acct alter column amount type numeric(12,4)",
                "alter table acct alter column code type text",
                # Values the old types could not hold, written after the change.
                "insert into acct values (51, 3000000000, 'a label much longer than ten', 12345678.1234, 'C-51')",
                "update acct set n = 5000000000, label = repeat('x', 300), amount = 0.0001, code = 'x' "
                "where id = 7")
        if applier == "restarted":
            appliers = [ReplicaApplier(pipeline, name) for name in destinations]
            for each in appliers:
                each.echo = echoed.append
        run_all(appliers)
        expected = destination_rows(source, "acct", columns)
        assert (51, 3000000000, "a label much longer than ten", Decimal("12345678.1234"), "C-51") in expected
        for name, destination in destinations.items():
            got = destination_rows(destination["url"], "acct", columns)
            assert got == expected, name
        for name in destinations:
            # (A restarted applier names the old type as the destination's catalog spells it: int(11), INTEGER.)
            told = "from integer to bigint" if applier == "running" else " to bigint)"
            assert any(line.startswith(f"{name}: changed column") and ".n " in line and told in line
                       for line in echoed), (name, echoed)
        if applier == "restarted":
            return
        # The DuckDB history holds the new types too: the change of row 7 is there with its wide values.
        import duckdb

        with duckdb.connect(destinations["lake"]["url"].removeprefix("duckdb:///"), read_only=True) as lake:
            assert lake.execute('select n, amount from "public.acct__history" where id = 7 and n > 2147483647')\
                .fetchall() == [(5000000000, Decimal("0.0001"))]

        # A key column's type change would need the key (and foreign keys to it) changed too: refused, by name.
        execute(source, "alter table keyed alter column id type bigint",
                "insert into keyed values (4000000000, 'four billion')")
        for each in appliers:
            with pytest.raises(ApplyError, match=re.escape(
                    f"destination {each.name}: public.keyed.id changed type at the source from integer to bigint, "
                    "which is not followed automatically: it is a key column (a primary or foreign key, or referred "
                    "to by one): its constraints would have to change with it. Rebuild the table from the topics "
                    f"with `cdc replay {each.name} --tables public.keyed`")):
                each.run(until_caught_up=True, timeout=240)
    finally:
        for each in appliers:
            each.close()
        purge(pipeline)


def test_a_dropped_column_still_stops_the_applier_naming_it(stack, source_db, destinations, tmp_path):
    from consumers.apply.applier import ReplicaApplier

    source = stack.postgres_url(source_db)
    execute(source, "create table thing (id integer primary key, keep text, gone integer)",
            "insert into thing values (1, 'a', 1)")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.thing"], destinations=destinations)
    appliers = [ReplicaApplier(pipeline, name) for name in destinations]
    try:
        run_all(appliers)
        execute(source, "alter table thing drop column gone", "insert into thing values (2, 'b')")
        for each in appliers:
            with pytest.raises(Exception, match=r"column\(s\) gone that the source table public.thing no longer has"):
                each.run(until_caught_up=True, timeout=240)
    finally:
        for each in appliers:
            each.close()
        purge(pipeline)


def test_a_length_only_change_is_followed_by_a_running_applier_and_never_truncates(stack, source_db, destinations,
                                                                                   tmp_path):
    """varchar(10) -> varchar(50) is a string in Avro either way: no new writer schema tells a running applier. The
    first value longer than the old length fails its batch (PostgreSQL, MariaDB; DuckDB's VARCHAR has no length);
    the applier then reflects the source again, widens the column and applies the batch whole. A value that does not
    fit the source's own type either is never truncated."""
    from consumers.apply.applier import ReplicaApplier

    source = stack.postgres_url(source_db)
    execute(source, "create table word (id integer primary key, w varchar(10))", "insert into word values (1, 'short')")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.word"], destinations=destinations)
    appliers = [ReplicaApplier(pipeline, name) for name in destinations]
    try:
        run_all(appliers)
        execute(source, "alter table word alter column w type varchar(50)",
                "insert into word values (2, 'forty characters, four times the old ten')",
                "update word set w = 'also longer than ten' where id = 1")
        run_all(appliers)
        expected = destination_rows(source, "word", ["id", "w"])
        assert expected == [(1, "also longer than ten"), (2, "forty characters, four times the old ten")]
        for name, destination in destinations.items():
            assert destination_rows(destination["url"], "word", ["id", "w"]) == expected, name
        widened = [a for a in appliers if a.name != "lake"]
        assert all(a.shapes["public.word"].column("w").source.sql == "character varying(50)" for a in widened)
    finally:
        for each in appliers:
            each.close()
        purge(pipeline)


def test_an_enum_label_added_while_the_applier_runs_is_followed_on_every_destination(stack, source_db, destinations,
                                                                                      tmp_path):
    """`ALTER TYPE ... ADD VALUE` changes no table and no Avro: the first row with the new label fails its batch on
    PostgreSQL (not a label of the replica's enum) and DuckDB (not in its ENUM); the applier adds the label (on
    PostgreSQL in a transaction of its own: a label is usable only once that has committed) and applies the batch."""
    from consumers.apply.applier import ReplicaApplier

    source = stack.postgres_url(source_db)
    execute(source, "create type mood as enum ('sad', 'ok')",
            "create table feeling (id integer primary key, m mood not null)",
            "insert into feeling values (1, 'sad')")
    path, pipeline = applied_pipeline(stack, source_db, tmp_path, ["public.feeling"], destinations=destinations)
    appliers = [ReplicaApplier(pipeline, name) for name in destinations]
    try:
        run_all(appliers)
        execute(source, "alter type mood add value 'happy'", "alter type mood add value 'meh' before 'ok'")
        execute(source, "insert into feeling values (2, 'happy')", "update feeling set m = 'meh' where id = 1")
        run_all(appliers)
        expected = [(1, "meh"), (2, "happy")]
        assert destination_rows(source, "feeling", ["id", "m"]) == expected
        for name, destination in destinations.items():
            assert [(i, str(m)) for i, m in destination_rows(destination["url"], "feeling", ["id", "m"])] == \
                expected, name
        import duckdb

        with duckdb.connect(str(tmp_path / "lake.duckdb"), read_only=True) as lake:
            kind = lake.execute("select data_type from information_schema.columns where table_name = "
                                "'public.feeling' and column_name = 'm'").fetchone()[0]
            assert kind == "ENUM('sad', 'meh', 'ok', 'happy')", kind
        with psycopg.connect(destinations["pg"]["url"]) as conn:
            assert [r[0] for r in conn.execute("select unnest(enum_range(null::mood))::text")] == \
                ["sad", "meh", "ok", "happy"]
    finally:
        for each in appliers:
            each.close()
        purge(pipeline)
