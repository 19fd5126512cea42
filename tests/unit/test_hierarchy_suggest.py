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


def test_a_table_below_a_member_owning_rows_of_its_own_becomes_a_root_and_says_where_it_hangs():
    # grade_detail cannot join person (it holds no person id), but grade_note's rows belong to it.
    graph = district() + [table("grade_detail", fks=[("enrollment_id", "public.enrollment")]),
                          table("grade_note", fks=[("grade_detail_id", "public.grade_detail")])]
    result = suggest(graph)
    assert members(result, "grade_detail") == {"public.grade_note": "grade_detail_id"}
    assert result.hierarchy("grade_detail").why == (
        "public.grade_detail: its id is held by 1 table; it references public.enrollment (enrollment_id), "
        "itself a member of person (a member is keyed by its root's id)")
    assert result.unjoinable == ()


def test_a_nullable_root_id_column_makes_a_member_and_says_it_is_weaker_evidence():
    graph = [
        table("person"),
        table("attendance", fks=[("person_id", "public.person")]),
        # a note may exist without a person; when it has one, it belongs to that person
        table("note", fks=[("person_id", "public.person")], nullable=["person_id"]),
        table("audit_log", pk=(), fks=[("person_id", "public.person")], nullable=["person_id"]),
    ]
    result = suggest(graph)
    assert members(result, "person") == {"public.attendance": "person_id", "public.audit_log": "person_id",
                                         "public.note": "person_id"}
    nullable = {m.table: m.nullable for m in result.hierarchy("person").members}
    assert nullable == {"public.attendance": False, "public.audit_log": True, "public.note": True}
    assert ("public.note: person_id  # person_id is nullable: weaker evidence, a row may belong to no person"
            in render_yaml(result))


def test_a_not_null_root_id_column_wins_over_a_nullable_one():
    graph = [table("person"), table("school"),
             table("enrollment", nullable=["person_id"],
                   fks=[("person_id", "public.person"), ("school_id", "public.school")]),
             table("attendance", nullable=["school_id"],
                   fks=[("person_id", "public.person"), ("school_id", "public.school")])]
    result = suggest(graph)
    assert members(result, "school") == {"public.enrollment": "school_id"}
    assert members(result, "person") == {"public.attendance": "person_id"}
    (member,) = result.hierarchy("school").members
    assert member.why == ("also references public.person (person_id), a root too: "
                          "school_id is NOT NULL and person_id is not")


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
    # A junction belongs to the side it is named after (film_actor to film), not to the first name.
    assert members(result, "person") == {"public.person_course": "person_id"}
    (member,) = result.hierarchy("person").members
    assert member.why == ("also references public.course (course_id), a root too: "
                          "person_course is named after person")
    assert {s.table: s.note for s in result.standalone} == {"public.course": (
        "every table holding its id went elsewhere: public.person_course joined person "
        "(person_course is named after person)")}


def test_on_delete_cascade_and_a_key_column_are_ownership_evidence():
    graph = [table("person"), table("school"),
             # deleting a person deletes the enrollment: it is the person's
             SourceTable("public.enrollment", ("id",),
                         (Column("id", False), Column("school_id", False), Column("person_id", False)),
                         (ForeignKey(("school_id",), "public.school", ("id",)),
                          ForeignKey(("person_id",), "public.person", ("id",), ondelete="CASCADE"))),
             # the person id is part of the badge's key
             table("badge", pk=("person_id", "label"), fks=[("school_id", "public.school"),
                                                            ("person_id", "public.person")])]
    result = suggest(graph)
    assert members(result, "person") == {"public.badge": "person_id", "public.enrollment": "person_id"}
    why = {m.table: m.why for m in result.hierarchy("person").members}
    assert why == {
        "public.badge": "also references public.school (school_id), a root too: person_id is part of its primary key",
        "public.enrollment": "also references public.school (school_id), a root too: person_id is ON DELETE CASCADE",
    }


def test_a_self_reference_neither_stops_a_root_nor_makes_a_member():
    graph = [table("person", fks=[("mentor_id", "public.person")]),
             table("attendance", fks=[("person_id", "public.person")])]
    result = suggest(graph)
    assert [h.root for h in result.hierarchies] == ["public.person"]
    assert members(result, "person") == {"public.attendance": "person_id"}
    assert result.unjoinable == ()


def test_two_tables_referencing_each_other_own_neither_and_a_longer_cycle_is_cut_at_the_strongest_root():
    # store.manager_staff_id and staff.store_id: an association; the cycle used to make everything unjoinable.
    graph = [table("a", fks=[("b_id", "public.b")]), table("b", fks=[("a_id", "public.a")]),
             table("c", fks=[("a_id", "public.a")])]
    result = suggest(graph)
    assert {h.root: members(result, h.name) for h in result.hierarchies} == {"public.a": {"public.c": "a_id"}}
    assert result.hierarchy("a").why == ("public.a: its id is held by 1 table; it and public.b reference each "
                                         "other (b_id; a_id): neither owns the other")
    assert {s.table: s.note for s in result.standalone} == {"public.b": (
        "no captured table holds its id; it and public.a reference each other (a_id; b_id): neither owns the other")}

    ring = [table("x", fks=[("z_id", "public.z")]), table("y", fks=[("x_id", "public.x")]),
            table("z", fks=[("y_id", "public.y")]), table("w", fks=[("x_id", "public.x")])]
    result = suggest(ring)
    assert {h.root: members(result, h.name) for h in result.hierarchies} == {
        "public.x": {"public.w": "x_id", "public.y": "x_id"}}
    assert reasons(result) == {"public.z": "reaches public.x only through public.y; add a column holding the x id"}


def test_a_nullable_pointer_back_does_not_hide_the_ownership():
    # person.current_enrollment_id points back at one of the person's own enrollments.
    graph = [table("person", nullable=["current_enrollment_id"], fks=[("current_enrollment_id", "public.enrollment")]),
             table("enrollment", fks=[("person_id", "public.person")])]
    result = suggest(graph)
    assert members(result, "person") == {"public.enrollment": "person_id"}
    assert "its nullable current_enrollment_id only points back at public.enrollment" in result.hierarchy("person").why


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
        "no captured table holds its id; not a member: person_email references public.person (email), "
        "not its primary key")


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
                          table("b", fks=[("a_id", "public.a")]), table("c", fks=[("a_id", "public.a")])]
    orders = [graph, graph[::-1]] + [random.Random(seed).sample(graph, len(graph)) for seed in range(20)]
    outputs = {render_yaml(suggest(order)) for order in orders}
    assert len(outputs) == 1
    text = outputs.pop()
    assert text.index("public.attendance") < text.index("public.enrollment")
    assert "# standalone (no member rows belong to them): public.b, public.district_office, public.school" in text
    lines = text.splitlines()
    standalone = lines[lines.index("# cannot join a hierarchy:") - 3:lines.index("# cannot join a hierarchy:")]
    assert [line.split(":")[0] for line in standalone] == ["#   public.b", "#   public.district_office",
                                                         "#   public.school"]
