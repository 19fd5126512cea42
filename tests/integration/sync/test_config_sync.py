"""Configuration sync between two real PostgreSQL databases of the shared stack (issue 17's "Must show"): a test
environment's configuration (forms with fields and rules, workflows with steps, drop-down lists with items,
workgroups matched by name with dependants, dashboards with personal ones excluded, objects by prefix) promoted to a
production database holding differences of its own; checked with plain SQL, independently of the sync's code."""

from __future__ import annotations

import json

import psycopg
import pytest
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from cdc import config
from cdc.cli import main as cli
from consumers.sync import log as sync_log
from producers import capture
from schemas.codec import AvroEncoder, RegistryClient
from tests.integration.pipelines import caught_up, fresh_database, pipeline_data, purge, table_rows, write_pipeline

R = 1_000_000_000
RANGE = f"id between {R} and {2 * R - 1}"
runner = CliRunner()

SCHEMA = """
create table workgroup (id bigint primary key, name text not null unique);
create table workspace (id bigint primary key, workgroup_id bigint not null references workgroup(id), title text);
create table form (id bigint primary key, name text not null, workgroup_id bigint references workgroup(id));
create table form_field (id bigint primary key, form_id bigint not null references form(id), label text not null,
                         position int not null);
create table form_rule (id bigint primary key, form_id bigint not null references form(id),
                        field_id bigint references form_field(id), expression text not null);
create table workflow (id bigint primary key, name text not null);
create table workflow_step (id bigint primary key, workflow_id bigint not null references workflow(id),
                            step_no int not null, form_id bigint references form(id));
create table dd_list (id bigint primary key, name text not null);
create table dd_item (id bigint primary key, list_id bigint not null references dd_list(id), label text not null,
                      sort int);
create table dashboard (id bigint primary key, title text not null, owner_user text,
                        workgroup_id bigint references workgroup(id));
-- the users' own data, never in a sync, referencing a workgroup matched by name
create table client_case (id bigint primary key, workgroup_id bigint not null references workgroup(id), note text);
create view custom_forms as select id, name from form;
create function c_age(born date) returns int language sql as $$ select extract(year from age(born))::int $$;
"""

SOURCE = f"""
alter table form add column custom_flag boolean default false;
create table ct_extra (id int primary key, value text not null);
create or replace view custom_forms as select id, name, custom_flag from form where id >= {R};
create view qview_1000000123 as select l.name, i.label from dd_list l join dd_item i on i.list_id = l.id;
create or replace function c_age(born date) returns int language sql as
  $$ select extract(year from age(current_date, born))::int $$;
create function c_double(x int) returns int language sql as $$ select 2 * x $$;
create procedure c_autorun_cleanup() language sql as $$ delete from dd_item where label = '' $$;
insert into workgroup values ({R + 1}, 'Intake'), ({R + 2}, 'Housing'), ({R + 3}, 'New team'), (7, 'Test local');
insert into workspace values ({R + 10}, {R + 1}, 'Intake desk'), ({R + 11}, {R + 3}, 'New team desk');
insert into form values ({R + 100}, 'Intake form', {R + 1}, true), ({R + 101}, 'Housing form', {R + 2}, false);
insert into form_field values ({R + 200}, {R + 100}, 'Name', 1), ({R + 201}, {R + 100}, 'Date of birth', 2),
  ({R + 202}, {R + 101}, 'Address', 1), ({R + 203}, {R + 101}, 'Rent', 2);
insert into form_rule values ({R + 300}, {R + 100}, {R + 201}, 'age >= 18');
insert into workflow values ({R + 400}, 'Intake flow');
insert into workflow_step values ({R + 410}, {R + 400}, 1, {R + 100}), ({R + 411}, {R + 400}, 2, {R + 101});
insert into dd_list values ({R + 500}, 'Yes/No');
insert into dd_item values ({R + 510}, {R + 500}, 'Yes', 1), ({R + 511}, {R + 500}, 'No', 2),
  ({R + 512}, {R + 500}, 'Unknown', 3);
insert into dashboard values ({R + 600}, 'Team board', null, {R + 1}), ({R + 601}, 'My test board', 'alice', {R + 1});
"""

DESTINATION = f"""
create view qview_1000000999 as select 1 as one;
insert into workgroup values (42, 'Intake'), ({R + 2}, 'Housing'), ({R + 9}, 'Old team'), (43, 'Production team');
insert into workspace values ({R + 10}, 42, 'Intake desk (old title)'), ({R + 19}, {R + 9}, 'Old desk'),
  (60, 43, 'Production desk');
insert into form values ({R + 100}, 'Intake form', 42), ({R + 101}, 'Housing form', {R + 2}),
  ({R + 102}, 'Retired form', null), (55, 'Production form', 43);
insert into form_field values ({R + 200}, {R + 100}, 'Name', 1), ({R + 201}, {R + 100}, 'Birth date', 2),
  ({R + 202}, {R + 101}, 'Address', 1), ({R + 205}, {R + 102}, 'Old field', 1), (56, 55, 'Local field', 1);
insert into form_rule values ({R + 300}, {R + 100}, {R + 201}, 'age > 17');
insert into workflow values ({R + 400}, 'Intake flow');
insert into workflow_step values ({R + 410}, {R + 400}, 1, {R + 100}), ({R + 411}, {R + 400}, 2, {R + 102});
insert into dd_list values ({R + 500}, 'Yes/No');
insert into dd_item values ({R + 510}, {R + 500}, 'Yes', 1), ({R + 511}, {R + 500}, 'No', 2),
  ({R + 513}, {R + 500}, 'Maybe', 3), (77, {R + 500}, 'Production item', 9);
insert into dashboard values ({R + 600}, 'Team board (old)', null, 42), ({R + 602}, 'My production board', 'bob', 42);
insert into client_case values (1, 42, 'a case of the Intake team'), (2, 43, 'another case');
"""

TABLES = ["workgroup", "workspace", "form", "form_field", "form_rule", "workflow", "workflow_step", "dd_list",
          "dd_item", "dashboard"]


@pytest.fixture
def environments(stack, tmp_path):
    source_gen, dest_gen = fresh_database(stack, "syncsrc"), fresh_database(stack, "syncdst")
    source, destination = next(source_gen), next(dest_gen)
    with psycopg.connect(stack.postgres_url(source), autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(SOURCE)
    with psycopg.connect(stack.postgres_url(destination), autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(DESTINATION)
    tables = {f"public.{t}": {"where": RANGE} for t in TABLES}
    tables["public.workgroup"]["match_by"] = ["name"]
    tables["public.dashboard"]["exclude"] = "owner_user is not null"
    data = pipeline_data(stack, source, ["public.workgroup"], syncs={"config": {
        "source": stack.postgres_url(source), "destination": stack.postgres_url(destination), "tables": tables,
        "objects": {"tables": ["CT_*", "CUSTOM_*"], "views": ["CUSTOM_*", "qview_*"], "functions": ["C_*"],
                    "procedures": ["C_*"]}}})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    yield str(path), stack.postgres_url(source), stack.postgres_url(destination)
    for gen in (source_gen, dest_gen):
        next(gen, None)
    # The sync's topic is this test's own.
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    admin.delete_topics([f"{data['pipeline']}.sync.config"], operation_timeout=30)


def cdc(path: str, *args: str):
    return runner.invoke(cli.app, ["-c", path, *args])


def state(url: str) -> dict:
    """Everything a user could look at in the database: every row of every table, every object's definition."""
    with psycopg.connect(url) as conn:
        found: dict = {}
        for (table,) in conn.execute("select tablename from pg_tables where schemaname = 'public' and tablename not "
                                     "like '\\_cdc%' order by 1"):
            found[table] = conn.execute(f'select * from "{table}" order by 1').fetchall()
            found[f"{table} columns"] = conn.execute(
                "select column_name, data_type from information_schema.columns where table_schema = 'public' and "
                "table_name = %s order by ordinal_position", (table,)).fetchall()
        found["views"] = conn.execute("select viewname, definition from pg_views where schemaname = 'public' "
                                      "order by 1").fetchall()
        found["routines"] = conn.execute(
            "select p.proname, pg_get_functiondef(p.oid) from pg_proc p join pg_namespace n on n.oid = "
            "p.pronamespace where n.nspname = 'public' order by 1").fetchall()
        return found


def scope(url: str, table: str) -> list[tuple]:
    extra = " and owner_user is null" if table == "dashboard" else ""
    with psycopg.connect(url) as conn:
        return conn.execute(f"select * from {table} where {RANGE}{extra} order by id").fetchall()


def test_config_sync_end_to_end(environments):
    path, source, destination = environments
    before = state(destination)

    # A failure in the middle (a production-only rule that one new item breaks): nothing at all changed.
    with psycopg.connect(destination, autocommit=True) as conn:
        conn.execute("alter table dd_item add constraint no_unknown check (label <> 'Unknown')")
    failed = cdc(path, "sync", "apply", "config")
    assert failed.exit_code == 1, failed.output
    assert "public.dd_item" in failed.stderr and "no_unknown" in failed.stderr
    with psycopg.connect(destination, autocommit=True) as conn:
        conn.execute("alter table dd_item drop constraint no_unknown")
    assert state(destination) == before
    with psycopg.connect(destination) as conn:  # not even a backup or a history entry
        assert conn.execute("select count(*) from pg_namespace where nspname like '\\_cdc%'").fetchone()[0] == 0
        assert conn.execute("select count(*) from pg_tables where tablename like '\\_cdc%'").fetchone()[0] == 0

    # The plan: what would change, with the name-matched workgroup and the DDL.
    planned = cdc(path, "sync", "plan", "config", "--json")
    assert planned.exit_code == 1, planned.output
    plan = json.loads(planned.stdout)
    tables = {t["table"]: t for t in plan["tables"]}
    assert tables["public.workgroup"]["matched"] == [
        {"key": ["Housing"], "source_id": [R + 2], "destination_id": [R + 2]},
        {"key": ["Intake"], "source_id": [R + 1], "destination_id": [42]}]
    assert tables["public.workgroup"]["delete"] == [[R + 9]]
    assert tables["public.dd_item"]["delete"] == [[R + 513]] and tables["public.dd_item"]["insert"] == [[R + 512]]
    assert tables["public.form_field"]["update"] == [{"key": [R + 201], "columns": ["label"]}]
    assert [t["table"] for t in plan["tables"]].index("public.form") < \
        [t["table"] for t in plan["tables"]].index("public.form_field")
    objects = {(o["kind"], o["name"]): o for o in plan["objects"]}
    assert objects["table", "public.ct_extra"]["action"] == "create"
    assert "create table public.ct_extra" in objects["table", "public.ct_extra"]["ddl"]
    assert objects["column", "public.form.custom_flag"]["action"] == "create"
    assert objects["view", "public.custom_forms"]["action"] == "replace"
    assert objects["view", "public.qview_1000000123"]["action"] == "create"
    assert objects["view", "public.qview_1000000999"]["action"] == "drop"
    assert objects["function", "public.c_age(born date)"]["action"] == "replace"
    assert objects["function", "public.c_double(x integer)"]["action"] == "create"
    assert objects["procedure", "public.c_autorun_cleanup()"]["action"] == "create"
    text_plan = cdc(path, "sync", "plan", "config")
    assert text_plan.exit_code == 1, text_plan.output
    for line in ("public.workgroup: 1 to delete, 1 to insert, 0 to update, 2 unchanged, 2 matched by name",
                 f"  matched Intake: source id {R + 1} -> destination id 42",
                 "view public.qview_1000000999: drop", "view public.custom_forms: replace",
                 "    create table public.ct_extra ("):
        assert line in text_plan.stdout.splitlines(), (line, text_plan.stdout)
    assert state(destination) == before  # a plan changes nothing

    applied = cdc(path, "sync", "apply", "config")
    assert applied.exit_code == 0, applied.output
    assert "sync: public.dd_item: insert" in applied.stderr  # progress, as plain lines when not on a terminal
    after = state(destination)

    # The scope equals the source's, workgroup ids remapped (Intake is production's 42), by plain SQL.
    def remap(rows, column):
        return [tuple(42 if i == column and v == R + 1 else v for i, v in enumerate(r)) for r in rows]

    expected = {t: scope(source, t) for t in TABLES}
    expected["workgroup"] = [r for r in expected["workgroup"] if r[1] != "Intake"]
    expected["workspace"] = remap(expected["workspace"], 1)
    expected["form"] = remap(expected["form"], 2)
    expected["dashboard"] = remap(expected["dashboard"], 3)
    for table in TABLES:
        assert scope(destination, table) == expected[table], table
    # Out-of-range and excluded rows untouched, the users' cases still pointing at their workgroup.
    with psycopg.connect(destination) as conn:
        assert conn.execute(f"select * from workgroup where not ({RANGE}) order by id").fetchall() == [
            (42, "Intake"), (43, "Production team")]
        assert conn.execute("select * from dd_item where id = 77").fetchall() == [(77, R + 500, "Production item", 9)]
        assert conn.execute("select * from form where id = 55").fetchall() == [(55, "Production form", 43, False)]
        assert conn.execute("select id, owner_user from dashboard where owner_user is not null").fetchall() == [
            (R + 602, "bob")]
        assert conn.execute("select * from client_case order by id").fetchall() == before["client_case"]
        # Deletions propagated, children first.
        assert conn.execute(f"select count(*) from form where id = {R + 102}").fetchone()[0] == 0
        assert conn.execute(f"select count(*) from workgroup where id = {R + 9}").fetchone()[0] == 0
        # Schema objects created and replaced as at the source.
        assert conn.execute("select c_double(21)").fetchone()[0] == 42
    source_state = state(source)
    for view in ("custom_forms", "qview_1000000123"):
        assert dict(after["views"])[view] == dict(source_state["views"])[view]
    assert "qview_1000000999" not in dict(after["views"])
    assert dict(after["routines"])["c_age"] == dict(source_state["routines"])["c_age"]
    assert after["ct_extra columns"] == source_state["ct_extra columns"]
    assert ("custom_flag", "boolean") in after["form columns"]

    # Nothing left to do; the history holds the sync with its per-table counts.
    again = cdc(path, "sync", "plan", "config")
    assert again.exit_code == 0 and "nothing to change" in again.stdout, again.output
    listed = cdc(path, "sync", "history", "--json")
    assert listed.exit_code == 0, listed.output
    [entry] = json.loads(listed.stdout)
    assert entry["sync"] == "config" and entry["kind"] == "apply" and entry["backup_schema"]
    assert entry["tables"]["public.dd_item"] == {"deleted": 1, "inserted": 1, "updated": 0, "unchanged": 2,
                                                 "matched": 0}
    assert entry["tables"]["public.workgroup"]["matched"] == 2
    # The sync is an event in the log: its topic holds the scope as it was read from the source.
    assert entry["topic"].endswith(".sync.config") and entry["sync_id"]
    logged = sync_log.read(config.load(path), "config", entry["sync_id"])
    assert {t: len(r) for t, r in logged.rows.items()} == {f"public.{t}": len(scope(source, t)) for t in TABLES}
    shown = cdc(path, "sync", "show", str(entry["id"]))
    assert shown.exit_code == 0 and "public.form_field: 1 deleted, 1 inserted, 1 updated" in shown.stdout, shown.output

    # Restore: the exact pre-sync state, objects included.
    restored = cdc(path, "sync", "restore", str(entry["id"]))
    assert restored.exit_code == 0, restored.output
    assert state(destination) == before

    # Drift: production changed the scope after the last sync (here: the restore); refused, shown, then forced.
    with psycopg.connect(destination, autocommit=True) as conn:
        conn.execute(f"update dd_item set label = 'Yes!' where id = {R + 510}")
    refused = cdc(path, "sync", "apply", "config")
    assert refused.exit_code == 1, refused.output
    assert "public.dd_item: changed at the destination since restore" in refused.stderr
    with psycopg.connect(destination) as conn:
        assert conn.execute(f"select label from dd_item where id = {R + 510}").fetchone()[0] == "Yes!"
    # A backup older than the retention (30 days) is dropped by the next sync; its sync cannot be restored then.
    with psycopg.connect(destination, autocommit=True) as conn:
        conn.execute("update _cdc_backups set created_at = now() - interval '31 days' where id = %s",
                     (entry["backup_id"],))
    forced = cdc(path, "sync", "apply", "config", "--force")
    assert forced.exit_code == 0, forced.output
    assert all(scope(destination, t) == expected[t] for t in TABLES)
    history = json.loads(cdc(path, "sync", "history", "config", "--json").stdout)
    assert [(e["kind"], e["forced"]) for e in history] == [("apply", True), ("restore", False), ("apply", False)]
    assert history[0]["drift"] and history[2]["restored_by"] == history[1]["id"]
    listed = cdc(path, "sync", "backups", "config")
    assert listed.exit_code == 0 and entry["backup_schema"] not in listed.stdout, listed.output
    assert history[0]["backup_schema"] in listed.stdout
    gone = cdc(path, "sync", "restore", str(entry["id"]))
    assert gone.exit_code == 1 and "its backup is gone (kept 30 days)" in gone.stderr, gone.output

    # A past sync re-applied from the log: the source deletes an item, a sync propagates it, and the first sync,
    # read again from its topic, brings the item back.
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f"delete from dd_item where id = {R + 511}")
    assert cdc(path, "sync", "apply", "config").exit_code == 0
    assert [r[0] for r in scope(destination, "dd_item")] == [R + 510, R + 512]
    compared = cdc(path, "sync", "plan", "config", "--from-log", entry["sync_id"], "--json")
    assert compared.exit_code == 1, compared.output
    assert {t["table"]: t["insert"] for t in json.loads(compared.stdout)["tables"]}["public.dd_item"] == [[R + 511]]
    again = cdc(path, "sync", "apply", "config", "--from-log", entry["sync_id"])
    assert again.exit_code == 0, again.output
    assert [r[0] for r in scope(destination, "dd_item")] == [R + 510, R + 511, R + 512]
    assert all(scope(destination, t) == expected[t] for t in TABLES)


def test_a_sync_cut_short_in_its_topic_is_never_applied(environments):
    """A writer that died after some of a sync's records (no manifest): `--from-log` refuses it, nothing changes."""
    path, _, destination = environments
    pipeline = config.load(path)
    topic = sync_log.topic_of(pipeline, "config")
    sync_log._ensure_topic(pipeline, topic)
    registry = RegistryClient(pipeline.kafka.schema_registry_url)
    encoder = AvroEncoder(registry, f"{topic}-value", sync_log.SCHEMA)
    registry.close()
    producer = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers})
    table = {"name": "public.dd_list", "columns": ["id", "name"], "primary_key": ["id"], "foreign_keys": []}
    for kind, body in (("TABLE", table), ("ROWS", [{"id": R + 500, "name": "Changed by a half sync"}])):
        producer.produce(topic, key=b"cut-short", value=encoder.encode(
            {"sync_id": "cut-short", "kind": kind, "table": "public.dd_list", "body": json.dumps(body)}))
    assert producer.flush(30) == 0
    before = state(destination)
    refused = cdc(path, "sync", "apply", "config", "--from-log", "cut-short")
    assert refused.exit_code == 1, refused.output
    assert f"topic {topic} holds no complete sync cut-short (no manifest: it was cut short)" in refused.stderr
    assert state(destination) == before


def test_a_replica_fed_from_the_destination_follows_the_sync(stack, tmp_path):
    """The sync's changes at production are committed row changes like any others: a pipeline whose source is
    production carries them to its replica, which ends equal to production (the issue's "Safety")."""
    gens = [fresh_database(stack, prefix) for prefix in ("syncsrc", "syncdst", "syncrep")]
    test_db, prod_db, replica_db = (next(g) for g in gens)
    pipeline = None
    try:
        with psycopg.connect(stack.postgres_url(test_db), autocommit=True) as conn:
            conn.execute(SCHEMA)
            conn.execute(SOURCE)
        with psycopg.connect(stack.postgres_url(prod_db), autocommit=True) as conn:
            conn.execute(SCHEMA)
            conn.execute("alter table form add column custom_flag boolean default false")  # rows only, here
            conn.execute(DESTINATION)
        tables = {f"public.{t}": {"where": RANGE} for t in TABLES}
        tables["public.workgroup"]["match_by"] = ["name"]
        tables["public.dashboard"]["exclude"] = "owner_user is not null"
        captured = [f"public.{t}" for t in [*TABLES, "client_case"]]
        path = tmp_path / "production.yaml"
        pipeline = write_pipeline(path, pipeline_data(
            stack, prod_db, captured, destinations={"copy": {"kind": "replica", "url": stack.postgres_url(replica_db)}},
            syncs={"config": {"source": stack.postgres_url(test_db), "destination": stack.postgres_url(prod_db),
                              "tables": tables}}))
        capture.apply(pipeline)
        caught_up(path)
        applied = cdc(str(path), "sync", "apply", "config")
        assert applied.exit_code == 0, applied.output
        caught_up(path)
        for table in captured:
            assert table_rows(stack.postgres_url(replica_db), table) == table_rows(stack.postgres_url(prod_db),
                                                                                   table), table
        assert [r[0] for r in scope(stack.postgres_url(replica_db), "dd_item")] == [R + 510, R + 511, R + 512]
    finally:
        if pipeline is not None:
            purge(pipeline)
            AdminClient({"bootstrap.servers": stack.kafka_bootstrap}).delete_topics(
                [f"{pipeline.name}.sync.config"], operation_timeout=30)
        for g in gens:
            next(g, None)
