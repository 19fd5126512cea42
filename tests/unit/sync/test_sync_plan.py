"""The sync planner on rows given in memory: what it deletes, inserts and updates, how name-matched rows take the
destination's ids and their dependants follow, and which schema objects it creates, replaces or drops."""

from __future__ import annotations

import pytest

from consumers.sync.plan import Definition, ForeignKey, PlanError, TableInput, plan_objects, plan_rows

R = 1_000_000_000


def lists(source, destination):
    return TableInput("public.dd_list", ("id",), ("id", "label"), source, destination)


def test_rows_deleted_inserted_updated_and_unchanged():
    plan = plan_rows({"public.dd_list": lists(
        [{"id": R + 1, "label": "same"}, {"id": R + 2, "label": "new text"}, {"id": R + 4, "label": "added"}],
        [{"id": R + 1, "label": "same"}, {"id": R + 2, "label": "old text"}, {"id": R + 3, "label": "deleted"}],
    )})["public.dd_list"]
    assert plan.deletes == [(R + 3,)]
    assert plan.inserts == [{"id": R + 4, "label": "added"}]
    assert plan.updates == [({"id": R + 2, "label": "new text"}, ["label"])]
    assert plan.unchanged == 1
    assert plan.counts() == {"deleted": 1, "inserted": 1, "updated": 1, "unchanged": 1, "matched": 0}


def test_nothing_to_do_when_both_sides_hold_the_same_scope():
    rows = [{"id": R + 1, "label": "a"}]
    plan = plan_rows({"public.dd_list": lists(rows, [dict(r) for r in rows])})["public.dd_list"]
    assert plan.changes == 0 and plan.unchanged == 1


def test_a_column_the_destination_lacks_is_an_update():
    plan = plan_rows({"public.dd_list": lists([{"id": 1, "label": "a"}], [{"id": 1}])})["public.dd_list"]
    assert plan.updates == [({"id": 1, "label": "a"}, ["label"])]


def workgroups(source, destination):
    return {
        "public.workgroup": TableInput("public.workgroup", ("id",), ("id", "name"), source, destination,
                                       match_by=("name",)),
        "public.workspace": TableInput(
            "public.workspace", ("id",), ("id", "workgroup_id", "title"),
            [{"id": R + 10, "workgroup_id": R + 5, "title": "Intake desk"},
             {"id": R + 11, "workgroup_id": R + 6, "title": "New team desk"}],
            [], foreign_keys=(ForeignKey(("workgroup_id",), "public.workgroup", ("id",)),)),
    }


def test_name_matched_rows_take_the_destination_id_and_their_dependants_follow():
    plans = plan_rows(workgroups(
        [{"id": R + 5, "name": "Intake"}, {"id": R + 6, "name": "New team"}],
        [{"id": 42, "name": "Intake"}],  # production made its own "Intake" long ago, outside the range
    ))
    wg = plans["public.workgroup"]
    assert wg.matched == [(("Intake",), (R + 5,), (42,))]
    assert wg.deletes == [] and wg.updates == []
    assert wg.inserts == [{"id": R + 6, "name": "New team"}]  # unmatched: keeps its source id
    assert sorted(r["workgroup_id"] for r in plans["public.workspace"].inserts) == [42, R + 6]


def test_a_foreign_key_to_the_natural_key_itself_is_left_alone():
    tables = workgroups([{"id": R + 5, "name": "Intake"}], [{"id": 42, "name": "Intake"}])
    tables["public.membership"] = TableInput(
        "public.membership", ("id",), ("id", "workgroup_name"), [{"id": R + 20, "workgroup_name": "Intake"}], [],
        foreign_keys=(ForeignKey(("workgroup_name",), "public.workgroup", ("name",)),))
    plans = plan_rows(tables)
    assert plans["public.membership"].inserts == [{"id": R + 20, "workgroup_name": "Intake"}]
    assert [r["workgroup_id"] for r in plans["public.workspace"].inserts][0] == 42


def test_two_destination_rows_with_one_name_are_refused_with_the_table_and_name():
    with pytest.raises(PlanError, match=r"public.workgroup: the destination holds two rows with name = 'Intake'"):
        plan_rows(workgroups([{"id": R + 5, "name": "Intake"}],
                             [{"id": 1, "name": "Intake"}, {"id": 2, "name": "Intake"}]))


def test_a_table_without_primary_key_is_refused():
    with pytest.raises(PlanError, match="public.t: the table has no primary key"):
        plan_rows({"public.t": TableInput("public.t", (), ("a",), [{"a": 1}], [])})


def view(name, body):
    return Definition("view", name, f"create or replace view {name} as {body}", f"drop view {name}", body)


def test_objects_created_replaced_dropped_and_tables_never_dropped():
    source = [view("public.custom_a", "select 1"), view("public.qview_b", "select 2"),
              Definition("table", "public.ct_new", "create table public.ct_new (id int)", "drop table public.ct_new")]
    destination = [view("public.custom_a", "select 1"), view("public.qview_b", "select 1"),
                   view("public.qview_gone", "select 3"),
                   Definition("table", "public.ct_old", "create table public.ct_old (id int)", "drop table x")]
    actions = plan_objects(source, destination)
    assert [(a.kind, a.name, a.action) for a in actions] == [
        ("view", "public.qview_gone", "drop"), ("table", "public.ct_new", "create"),
        ("view", "public.qview_b", "replace")]
    replace = actions[2]
    # A view is made anew (create or replace cannot drop its columns), and so is the old one on restore.
    assert replace.ddl == "drop view public.qview_b;\ncreate or replace view public.qview_b as select 2"
    assert replace.undo == "drop view public.qview_b;\ncreate or replace view public.qview_b as select 1"
    assert actions[0].undo == "create or replace view public.qview_gone as select 3"
    assert actions[1].undo == "drop table public.ct_new"


# -- the definition in the pipeline file ---------------------------------------------------------------------------

def pipeline_with(sync: dict) -> dict:
    return {"pipeline": "p", "kafka": {"bootstrap_servers": "localhost:9092", "schema_registry_url": "http://r",
                                       "connect_url": "http://c"},
            "source": {"url": "postgresql://u@h/src", "tables": ["public.t"]}, "syncs": {"config": sync}}


BASE = {"source": "postgresql://u@test/db", "destination": "postgresql://u@prod/db"}


def test_a_sync_definition_loads_with_its_defaults():
    from cdc import config

    sync = config.parse(pipeline_with({**BASE, "tables": {
        "public.workgroup": {"where": "id > 1", "match_by": "name"}, "public.dd_item": None},
        "objects": {"views": ["qview_*"]}})).sync("config")
    assert sync.retention_days == 30
    assert sync.tables["public.workgroup"].match_by == ("name",)
    assert sync.tables["public.dd_item"].where is None
    assert sync.objects.views == ("qview_*",)


@pytest.mark.parametrize(("change", "message"), [
    ({"tables": {"workgroup": {}}}, "syncs.config.tables: 'workgroup' is not schema-qualified"),
    ({"tables": {"public.t": {"wher": "id > 1"}}}, "syncs.config.tables['public.t'].wher: is not a known setting"),
    ({"tables": {"public.t": {"where": "id > 1; drop table x"}}}, "syncs.config.tables['public.t'].where: "),
    ({"destination": "mysql://u@h/db"}, "syncs.config.destination: a sync reads and writes PostgreSQL"),
    ({"retention_days": 0}, "syncs.config.retention_days: "),
])
def test_mistakes_in_a_sync_definition_name_the_field(change, message):
    from cdc import config
    from cdc.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        config.parse(pipeline_with({**BASE, **change}), "p.yaml")
    assert f"p.yaml: {message}" in str(caught.value)


def test_an_unknown_sync_is_refused_with_the_known_ones():
    from cdc import config
    from cdc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"syncs: no sync named 'other' \(known: config\)"):
        config.parse(pipeline_with(BASE)).sync("other")


@pytest.mark.parametrize("command", [["sync", "plan", "config"], ["sync", "history"], ["sync", "restore", "1"]])
def test_config_option_after_a_sync_command(tmp_path, monkeypatch, command):
    from typer.testing import CliRunner

    from cdc.cli import main as cli

    monkeypatch.delenv("CDC_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.yaml"
    path.write_text("pipeline: p\nsyncs: {config: {source: 'mysql://u@h/db'}}\n")
    result = CliRunner().invoke(cli.app, [*command, "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}: syncs.config.source: a sync reads and writes PostgreSQL" in result.stderr


def test_the_progress_of_a_sync_on_a_terminal_and_off_it(capsys):
    from cdc.cli import main as cli

    bar = cli._SyncProgress()
    bar.terminal = True  # a rich progress bar
    for done in (1, 5, 10):
        bar("public.form: insert", done, 10)
    bar.close()
    lines = cli._SyncProgress()
    lines.terminal = False  # one plain line per table and action
    for what in ("public.form: insert", "public.form: insert", "public.form_field: delete"):
        lines(what, 1, 2)
    assert capsys.readouterr().err.splitlines()[-2:] == ["sync: public.form: insert", "sync: public.form_field: delete"]
