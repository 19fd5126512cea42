"""Unit tests of the hierarchy proposal on hand-built foreign-key graphs (no database)."""

import dataclasses
import random

import yaml
from sqlalchemy import Integer

from cdc.config import parse
from cdc.source_tables import ColumnShape, ForeignKeyShape, TableShape
from producers.hierarchy import render_yaml, suggest


def table(name, pk=("id",), nullable=(), fks=(), extra=()):
    """A table whose columns (its key, its foreign keys, `extra`) are NOT NULL unless listed in `nullable`.

    fks: (column, referred table) for a single column referencing `id`, or (columns, referred table, referred columns).
    """
    fk_list = []
    for fk in fks:
        columns, referred, referred_columns = fk if len(fk) == 3 else (*fk, ("id",))
        columns = (columns,) if isinstance(columns, str) else tuple(columns)
        fk_list.append(ForeignKeyShape(columns, referred, tuple(referred_columns)))
    names = dict.fromkeys([*pk, *(c for fk in fk_list for c in fk.columns), *extra])
    return TableShape(name if "." in name else f"public.{name}", tuple(column(c, c in nullable) for c in names),
                      tuple(pk), tuple(fk_list))


def column(name, nullable):
    return ColumnShape(name, Integer(), nullable)  # the analysis reads no type


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


def test_a_nullable_root_id_does_not_make_an_owner_a_member():
    # a customer may have been referred by a partner, but it owns its orders and payments
    graph = [table("partner"), table("partner_contract", fks=[("partner_id", "public.partner")]),
             table("partner_invoice", fks=[("partner_id", "public.partner")]),
             table("customer", nullable=["partner_id"], fks=[("partner_id", "public.partner")]),
             table("order", fks=[("customer_id", "public.customer")]),
             table("payment", fks=[("customer_id", "public.customer")])]
    result = suggest(graph)
    assert {h.root: members(result, h.name) for h in result.hierarchies} == {
        "public.partner": {"public.partner_contract": "partner_id", "public.partner_invoice": "partner_id"},
        "public.customer": {"public.order": "customer_id", "public.payment": "customer_id"}}
    assert result.hierarchy("customer").why == (
        "public.customer: its id is held by 2 tables; a root rather than a member of partner through partner_id: "
        "partner_id is nullable, too weak to make an owner a member")


def test_an_owner_holding_another_roots_id_stays_a_root_when_it_owns_more():
    graph = [table("region", extra=["name", "manager", "opened_on", "budget"]),
             table("warehouse", fks=[("region_id", "public.region")]),
             table("customer", fks=[("region_id", "public.region")]),
             *(table(t, fks=[("customer_id", "public.customer")]) for t in ["order", "payment", "review"])]
    result = suggest(graph)
    assert {h.root: members(result, h.name) for h in result.hierarchies} == {
        "public.region": {"public.warehouse": "region_id"},
        "public.customer": {"public.order": "customer_id", "public.payment": "customer_id",
                            "public.review": "customer_id"}}
    assert result.hierarchy("customer").why == (
        "public.customer: its id is held by 3 tables; a root rather than a member of region through region_id: "
        "public.customer is held NOT NULL by more tables (3 against 2)")


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
             TableShape("public.enrollment",
                        (column("id", False), column("school_id", False), column("person_id", False)), ("id",),
                        (ForeignKeyShape(("school_id",), "public.school", ("id",)),
                         ForeignKeyShape(("person_id",), "public.person", ("id",), ondelete="CASCADE"))),
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
    graph = [table("person"), table("vote", fks=[("on", "public.person")]),
             table("public.line\u2028break", fks=[("tab\there", "public.person")]),
             table("public.quote\"d: #x", fks=[("person_id", "public.person")])]
    text = render_yaml(suggest(graph))
    assert '"public.line\\u2028break": "tab\\there"' in text
    parsed = yaml.safe_load(text)
    assert parsed["hierarchies"]["person"]["members"] == {
        "public.vote": "on", "public.line\u2028break": "tab\there", 'public.quote"d: #x': "person_id"}


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


# ---------------------------------------------------------------------------------------------------------------
# the DVD-rental sample: 15 tables, lookups everywhere, a store <-> staff cycle, payment referencing customer and rental

DVD_ROWS = {"actor": 200, "address": 603, "category": 16, "city": 600, "country": 109, "customer": 599,
            "film": 1000, "film_actor": 5462, "film_category": 1000, "inventory": 4581, "language": 6,
            "payment": 14596, "rental": 16044, "staff": 2, "store": 2}


def dvd_rental(rows=True):
    def t(name, pk, fks=(), nullable=()):
        # every foreign key here names its referred column: DVD rental's keys are <table>_id, not id
        made = table(name, pk=pk, nullable=nullable, fks=[(c, f"public.{r}", (f"{r}_id",)) for c, r in fks])
        return dataclasses.replace(made, rows=float(DVD_ROWS[name]) if rows else None)

    return [
        t("actor", ("actor_id",)),
        t("country", ("country_id",)),
        t("city", ("city_id",), [("country_id", "country")]),
        t("address", ("address_id",), [("city_id", "city")]),
        t("category", ("category_id",)),
        t("language", ("language_id",)),
        t("film", ("film_id",), [("language_id", "language"), ("original_language_id", "language")],
          nullable=["original_language_id"]),
        t("film_actor", ("actor_id", "film_id"), [("actor_id", "actor"), ("film_id", "film")]),
        t("film_category", ("film_id", "category_id"), [("film_id", "film"), ("category_id", "category")]),
        t("staff", ("staff_id",), [("address_id", "address"), ("store_id", "store")]),
        # store.manager_staff_id -> staff and staff.store_id -> store: each references the other
        TableShape("public.store", (column("store_id", False), column("manager_staff_id", False),
                                    column("address_id", False)), ("store_id",),
                   (ForeignKeyShape(("manager_staff_id",), "public.staff", ("staff_id",)),
                    ForeignKeyShape(("address_id",), "public.address", ("address_id",))),
                   rows=float(DVD_ROWS["store"]) if rows else None),
        t("customer", ("customer_id",), [("store_id", "store"), ("address_id", "address")]),
        t("inventory", ("inventory_id",), [("film_id", "film"), ("store_id", "store")]),
        t("rental", ("rental_id",), [("inventory_id", "inventory"), ("customer_id", "customer"),
                                     ("staff_id", "staff")]),
        t("payment", ("payment_id",), [("customer_id", "customer"), ("staff_id", "staff"),
                                       ("rental_id", "rental")]),
    ]


DVD_LOOKUPS = ["public.address", "public.category", "public.city", "public.country", "public.language",
               "public.staff", "public.store"]


def test_dvd_rental_gives_film_and_customer_and_leaves_the_lookup_tables_standalone():
    result = suggest(dvd_rental())
    assert {h.root: members(result, h.name) for h in result.hierarchies} == {
        "public.film": {"public.film_actor": "film_id", "public.film_category": "film_id",
                        "public.inventory": "film_id"},
        "public.customer": {"public.rental": "customer_id", "public.payment": "customer_id"},
    }
    assert [s.table for s in result.standalone] == sorted(["public.actor", *DVD_LOOKUPS])
    assert [s.table for s in result.standalone if s.reference] == DVD_LOOKUPS
    assert result.unjoinable == () and result.unestimated == ()

    notes = {s.table: s.note for s in result.standalone}
    # small against its referencers, by the row estimates
    assert notes["public.language"] == "reference data: ~6 rows against ~1,000 rows in public.film, which references it"
    # referenced only by tables that own rows themselves
    assert notes["public.address"] == (
        "reference data: every table referencing it (public.customer, public.staff, public.store) has dependants "
        "of its own: it describes their rows rather than owning them")
    assert notes["public.store"].endswith("it and public.staff reference each other (manager_staff_id; store_id): "
                                          "neither owns the other")
    # a junction belongs to the side it is named after
    assert notes["public.actor"] == ("every table holding its id went elsewhere: public.film_actor joined film "
                                     "(film_actor is named after film)")

    why = {m.table: m.why for h in result.hierarchies for m in h.members}
    # payment references both customer and rental; rental is a member itself, so payment joins its rental's root
    assert why["public.payment"] == (
        "also references public.rental (rental_id): itself a member of customer; payment holds the customer id "
        "itself, so it goes under the same key as its rental; public.staff (staff_id): reference data")
    assert why["public.rental"] == (
        "also references public.inventory (inventory_id): itself a member of film (a member is keyed by its root's "
        "id); public.staff (staff_id): reference data")
    assert result.hierarchy("film").why == (
        "public.film: its id is held by 3 tables, ~1,000 rows; its own references public.language (language_id), "
        "public.language (original_language_id) are reference data")


def test_dvd_rental_is_the_same_whatever_the_input_order():
    graph = dvd_rental()
    outputs = {render_yaml(suggest(random.Random(seed).sample(graph, len(graph)))) for seed in range(20)}
    assert len(outputs) == 1


def test_dvd_rental_without_row_estimates_still_roots_at_film_and_customer_and_says_what_it_lacked():
    result = suggest(dvd_rental(rows=False))
    assert members(result, "film") == {"public.film_actor": "film_id", "public.film_category": "film_id",
                                       "public.inventory": "film_id"}
    assert members(result, "customer") == {"public.rental": "customer_id", "public.payment": "customer_id"}
    # language is still reference data: film, the only table referencing it, owns rows of its own
    assert {s.table for s in result.standalone if s.reference} == {
        "public.address", "public.city", "public.country", "public.language", "public.store"}
    assert len(result.unestimated) == 15
    assert render_yaml(result).endswith(
        "# no row estimate for 15 table(s) (never analysed: run ANALYZE for better evidence); their reference data "
        "was told from the foreign keys alone\n")


def test_a_small_table_that_references_an_owner_is_not_reference_data():
    # tiny, and referenced by a large table, but it belongs to a film itself
    graph = [dataclasses.replace(table("film"), rows=1000.0),
             dataclasses.replace(table("review", fks=[("film_id", "public.film")]), rows=5000.0),
             dataclasses.replace(table("trailer", fks=[("film_id", "public.film")]), rows=3.0),
             dataclasses.replace(table("trailer_view", fks=[("trailer_id", "public.trailer")]), rows=90000.0)]
    result = suggest(graph)
    assert members(result, "film") == {"public.review": "film_id", "public.trailer": "film_id"}
    assert result.standalone == ()
    assert reasons(result) == {"public.trailer_view": "reaches public.film only through public.trailer; "
                                                      "add a column holding the film id"}


def test_a_wide_table_referenced_by_one_table_with_dependants_is_an_owner_not_a_lookup():
    # customer <- order <- order_line (without a customer id): customer owns its orders; a narrow status table
    # referenced the same way is a lookup.
    graph = [table("customer", extra=["name", "email", "phone", "address", "created_at"]),
             table("status", extra=["label"]),
             table("order", fks=[("customer_id", "public.customer"), ("status_id", "public.status")]),
             table("order_line", fks=[("order_id", "public.order")])]
    result = suggest(graph)
    assert members(result, "customer") == {"public.order": "customer_id"}
    assert [(s.table, s.reference) for s in result.standalone] == [("public.status", True)]
    assert reasons(result) == {"public.order_line": "reaches public.customer only through public.order; "
                                                    "add a column holding the customer id"}


def test_names_beginning_with_the_root_name_count_only_at_a_word_boundary():
    graph = [table("film"), table("actor"),
             table("FilmActor", pk=("film", "actor"), fks=[("actor", "public.actor"), ("film", "public.film")]),
             table("Film Note", pk=("film", "actor"), fks=[("actor", "public.actor"), ("film", "public.film")]),
             table("filmography", pk=("film", "actor"), fks=[("actor", "public.actor"), ("film", "public.film")])]
    result = suggest(graph)
    assert members(result, "film") == {"public.FilmActor": "film", "public.Film Note": "film"}
    assert members(result, "actor") == {"public.filmography": "actor"}  # no name evidence: first by name


def test_yaml_of_quoted_mixed_case_names_loads_back_as_a_pipeline_file():
    graph = [table("Sales.Customer", pk=("CustomerId",)),
             table("Sales.Order Line", pk=("Id",), fks=[("CustomerId", "Sales.Customer", ("CustomerId",))]),
             table("Sales.Ärger", pk=("Id",), fks=[("null", "Sales.Customer", ("CustomerId",))]),
             table("public.on", pk=("id",))]
    result = suggest(graph)
    text = render_yaml(result)
    assert '"Sales.Order Line": CustomerId' in text and '"Sales.Ärger": "null"' in text
    pipeline = parse({"pipeline": "p", "kafka": {"bootstrap_servers": "localhost:9092",
                                                  "schema_registry_url": "http://localhost:8081",
                                                  "connect_url": "http://localhost:8083"},
                      "source": {"url": "postgresql://u@localhost/db", "tables": sorted(t.name for t in graph)},
                      **yaml.safe_load(text)}, env={})
    assert {name: (h.root, dict(h.members)) for name, h in pipeline.hierarchies.items()} == {
        "Customer": ("Sales.Customer", {"Sales.Order Line": "CustomerId", "Sales.Ärger": "null"})}
