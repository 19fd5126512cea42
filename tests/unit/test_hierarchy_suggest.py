"""Unit tests of the hierarchy proposal on hand-built foreign-key graphs (no database)."""

import random

import yaml

from producers.hierarchy import Column, ForeignKey, SourceTable, render_yaml, suggest


def table(name, pk=("id",), nullable=(), fks=()):
    """A table whose columns are NOT NULL unless listed in `nullable`.

    fks: (column, referred table) for a single column referencing `id`, or (columns, referred table, referred columns).
    """
    fk_list = []
    for fk in fks:
        columns, referred, referred_columns = fk if len(fk) == 3 else (*fk, ("id",))
        columns = (columns,) if isinstance(columns, str) else tuple(columns)
        fk_list.append(ForeignKey(columns, referred, tuple(referred_columns)))
    names = dict.fromkeys([*pk, *(c for fk in fk_list for c in fk.columns)])
    return SourceTable(name if "." in name else f"public.{name}", tuple(pk),
                       tuple(Column(c, c in nullable) for c in names), tuple(fk_list))


def district():
    return [
        table("school"),
        table("person"),
        table("enrollment", fks=[("person_id", "public.person"), ("school_id", "public.school")]),
        table("attendance", fks=[("person_id", "public.person"), ("enrollment_id", "public.enrollment")]),
    ]


def members(result, name):
    return {m.table: m.column for m in result.hierarchy(name).members}


def reasons(result):
    return {u.table: u.reason for u in result.unjoinable}


def test_district_sample_gives_person_with_enrollment_and_attendance_and_school_standalone():
    result = suggest(district())
    assert [(h.name, h.root) for h in result.hierarchies] == [("person", "public.person")]
    assert members(result, "person") == {"public.enrollment": "person_id", "public.attendance": "person_id"}
    assert [s.table for s in result.standalone] == ["public.school"]
    assert result.unjoinable == ()

    text = render_yaml(result)
    assert yaml.safe_load(text) == {"hierarchies": {"person": {
        "root": "public.person",
        "members": {"public.attendance": "person_id", "public.enrollment": "person_id"}}}}
    # The member that could have gone elsewhere says so on its own line.
    assert "public.enrollment: person_id  # also references public.school (school_id)" in text
    assert "# standalone (no member rows belong to them): public.school" in text


def test_a_table_reaching_the_root_only_through_another_table_cannot_join():
    graph = district() + [table("grade_detail", fks=[("enrollment_id", "public.enrollment")])]
    result = suggest(graph)
    assert "public.grade_detail" not in members(result, "person")
    assert reasons(result) == {"public.grade_detail": "reaches public.person only through public.enrollment; "
                                                      "add a column holding the person id"}
    assert ("#   public.grade_detail: reaches public.person only through public.enrollment; "
            "add a column holding the person id") in render_yaml(result)


def test_a_longer_indirect_path_names_every_hop_first_hop_first():
    graph = district() + [table("grade_detail", fks=[("enrollment_id", "public.enrollment")]),
                          table("grade_note", fks=[("grade_detail_id", "public.grade_detail")])]
    assert reasons(suggest(graph))["public.grade_note"] == (
        "reaches public.person only through public.grade_detail -> public.enrollment; "
        "add a column holding the person id")


def test_a_nullable_foreign_key_does_not_make_a_member_and_says_which_column():
    graph = [
        table("person"),
        table("attendance", fks=[("person_id", "public.person")]),
        # a note may exist without a person: it has its own primary key, so it is a root of its own
        table("note", fks=[("person_id", "public.person")], nullable=["person_id"]),
        # a log line may exist without a person and has no key of its own: it fits nowhere
        table("audit_log", pk=(), fks=[("person_id", "public.person")], nullable=["person_id"]),
    ]
    result = suggest(graph)
    assert members(result, "person") == {"public.attendance": "person_id"}
    note = {s.table: s.note for s in result.standalone}
    assert note == {"public.note": "not a member: person_id (references public.person) is nullable"}
    assert reasons(result) == {"public.audit_log": "no primary key, so it cannot be a root; and no ownership "
                                                   "foreign key: person_id (references public.person) is nullable"}
    text = render_yaml(result)
    assert "#   public.note: not a member: person_id (references public.person) is nullable" in text


def test_a_composite_key_table_without_ownership_cannot_be_a_root():
    graph = [table("person"), table("tag", pk=("person_ref", "label"), nullable=["person_ref"],
                                    fks=[(("person_ref", "label"), "public.person", ("id", "name"))])]
    assert reasons(suggest(graph)) == {"public.tag": (
        "no single-column primary key (person_ref, label), so it cannot be a root; and no ownership foreign key: "
        "(person_ref, label) references public.person with several columns")}


def test_a_composite_key_member_still_joins_through_its_root_id_column():
    graph = [table("person"), table("course"),
             table("person_course", pk=("person_id", "course_id"),
                   fks=[("person_id", "public.person"), ("course_id", "public.course")])]
    result = suggest(graph)
    assert members(result, "course") == {"public.person_course": "course_id"}  # tie: course < person by name


def test_a_self_reference_neither_stops_a_root_nor_makes_a_member():
    graph = [table("person", fks=[("mentor_id", "public.person")]),
             table("attendance", fks=[("person_id", "public.person")])]
    result = suggest(graph)
    assert [h.root for h in result.hierarchies] == ["public.person"]
    assert members(result, "person") == {"public.attendance": "person_id"}
    assert result.unjoinable == ()


def test_an_ownership_cycle_terminates_and_no_table_of_it_becomes_a_root():
    graph = [table("a", fks=[("b_id", "public.b")]), table("b", fks=[("a_id", "public.a")]),
             table("c", fks=[("a_id", "public.a")])]
    result = suggest(graph)
    assert result.hierarchies == () and result.standalone == ()
    assert reasons(result) == {
        "public.a": "ownership cycle: public.a -> public.b -> public.a",
        "public.b": "ownership cycle: public.b -> public.a -> public.b",
        "public.c": "its owners form an ownership cycle: public.a -> public.b -> public.a",
    }
    assert yaml.safe_load(render_yaml(result)) == {"hierarchies": {}}


def test_a_cycle_member_with_the_root_id_still_joins():
    # enrollment and attendance point at each other, but both hold the person id themselves.
    graph = [table("person"),
             table("enrollment", fks=[("person_id", "public.person"), ("last_attendance_id", "public.attendance")]),
             table("attendance", fks=[("person_id", "public.person"), ("enrollment_id", "public.enrollment")])]
    result = suggest(graph)
    assert members(result, "person") == {"public.attendance": "person_id", "public.enrollment": "person_id"}


def test_two_roots_tie_goes_to_the_first_by_name_and_the_other_is_mentioned():
    graph = [table("school"), table("person"),
             table("enrollment", fks=[("school_id", "public.school"), ("person_id", "public.person")])]
    result = suggest(graph)
    assert members(result, "person") == {"public.enrollment": "person_id"}
    (member,) = result.hierarchy("person").members
    assert member.alternatives == (("public.school", "school_id"),)
    assert [s.table for s in result.standalone] == ["public.school"]


def test_the_root_owned_by_more_tables_wins_over_the_name_order():
    graph = [table("school"), table("person"),
             table("enrollment", fks=[("school_id", "public.school"), ("person_id", "public.person")]),
             table("classroom", fks=[("school_id", "public.school")])]
    result = suggest(graph)
    assert [h.name for h in result.hierarchies] == ["school"]
    assert members(result, "school") == {"public.classroom": "school_id", "public.enrollment": "school_id"}
    assert [s.table for s in result.standalone] == ["public.person"]


def test_only_foreign_keys_between_captured_tables_count():
    # public.person is not captured: attendance is then a root of its own, not a member of anything.
    result = suggest([table("attendance", fks=[("person_id", "public.person")])])
    assert result.hierarchies == ()
    assert [s.table for s in result.standalone] == ["public.attendance"]


def test_a_reference_to_a_unique_column_rather_than_the_primary_key_is_not_ownership():
    graph = [table("person"), table("badge", fks=[("person_email", "public.person", ("email",))])]
    result = suggest(graph)
    assert result.hierarchies == ()
    assert {s.table: s.note for s in result.standalone}["public.badge"] == (
        "not a member: person_email references public.person (email), not its primary key")


def test_hierarchy_names_drop_the_schema_unless_two_schemas_clash():
    graph = [table("public.person"), table("sales.person"), table("public.school"),
             table("public.attendance", fks=[("person_id", "public.person")]),
             table("sales.order", fks=[("person_id", "sales.person")]),
             table("public.visit", fks=[("school_id", "public.school")])]
    result = suggest(graph)
    assert {h.name: h.root for h in result.hierarchies} == {
        "public_person": "public.person", "sales_person": "sales.person", "school": "public.school"}


def test_yaml_quotes_names_that_yaml_would_otherwise_misread():
    graph = [table("person"), table("vote", fks=[("on", "public.person")])]
    parsed = yaml.safe_load(render_yaml(suggest(graph)))
    assert parsed["hierarchies"]["person"]["members"] == {"public.vote": "on"}


def test_output_is_the_same_whatever_the_input_order():
    graph = district() + [table("grade_detail", fks=[("enrollment_id", "public.enrollment")]),
                          table("district_office"), table("a", fks=[("b_id", "public.b")]),
                          table("b", fks=[("a_id", "public.a")])]
    orders = [graph, graph[::-1]] + [random.Random(seed).sample(graph, len(graph)) for seed in range(20)]
    outputs = {render_yaml(suggest(order)) for order in orders}
    assert len(outputs) == 1
    text = outputs.pop()
    assert text.index("public.attendance") < text.index("public.enrollment")
    assert "# standalone (no member rows belong to them): public.district_office, public.school" in text
    unjoinable = [line for line in text.splitlines() if line.startswith("#   ")]
    assert unjoinable == sorted(unjoinable)
