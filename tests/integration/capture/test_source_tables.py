"""The one reflection of a source table (cdc/source_tables.py) on the real PostgreSQL of the local stack: what capture,
hierarchy suggestions and the applier each read of it, and a missing table named with the field that listed it."""

from __future__ import annotations

import psycopg
import pytest

from cdc.source_tables import MissingTables, reflect_tables

pytestmark = pytest.mark.integration

SCHEMA = """
create domain qty as integer check (value >= 0);
create table school (id int primary key, name text not null);
create table person (id bigint primary key, name text not null, school_id int references school (id),
                     _cdc_lsn bigint, check (length(name) > 0));
create table enrollment (person_id bigint not null references person (id) on delete cascade,
                         school_id int not null references school (id), n qty, primary key (person_id, school_id));
create table visit (id bigint, at date not null, primary key (id, at)) partition by range (at);
create table visit_2024 partition of visit for values from ('2024-01-01') to ('2025-01-01');
insert into school select g, 's' || g from generate_series(1, 50) g;
analyze school;
"""


@pytest.fixture
def source(stack, source_db):
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
    return stack.postgres_url(source_db)


def test_the_applier_reads_everything_capture_and_suggestions_less(source):
    full = reflect_tables(source, ["public.person", "public.enrollment", "public.school"])
    assert list(full) == ["public.person", "public.enrollment", "public.school"]  # the order they were named
    person, enrollment = full["public.person"], full["public.enrollment"]
    # A source table that is itself a replica keeps its own applier's _cdc_lsn: bookkeeping, not a column.
    assert person.column_names == ("id", "name", "school_id")
    assert person.primary_key == ("id",) and enrollment.primary_key == ("person_id", "school_id")
    assert [(c.name, c.nullable, c.type_name) for c in person.columns] == [
        ("id", False, "bigint"), ("name", False, "text"), ("school_id", True, "integer")]
    assert person.checks == (("person_name_check", "CHECK ((length(name) > 0))"),)
    n = enrollment.column("n").source
    # the catalog's type, the domain resolved to its base type
    assert n is not None and n.category == "int4" and n.domain == "public.qty"
    assert [(f.columns, f.referred_table, f.referred_columns, f.ondelete) for f in enrollment.foreign_keys] == [
        (("person_id",), "public.person", ("id",), "CASCADE"), (("school_id",), "public.school", ("id",), None)]

    cheap = reflect_tables(source, ["public.person", "public.visit_2024"], catalog=False, estimates=True)
    assert cheap["public.person"].checks == () and cheap["public.person"].column("id").source is None
    assert cheap["public.visit_2024"].partition_of == ("public.visit",)
    assert cheap["public.person"].rows is None  # never analysed: unknown, not 0
    assert reflect_tables(source, ["public.school"], catalog=False, estimates=True)["public.school"].rows == 50


def test_every_table_of_a_schema_leaves_partitions_out(source):
    names = set(reflect_tables(source, schemas=["public"], catalog=False))
    assert names == {"public.school", "public.person", "public.enrollment", "public.visit"}


def test_a_missing_table_is_named_with_the_field_that_listed_it(source):
    with pytest.raises(MissingTables) as raised:
        reflect_tables(source, ["public.person", "public.nope", "sales.gone"], field_name="source.tables")
    assert str(raised.value).startswith("source.tables: 'public.nope', 'sales.gone' do not exist at the source (")
    assert raised.value.exit_code == 2
