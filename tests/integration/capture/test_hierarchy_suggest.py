"""`cdc hierarchy suggest` on the real PostgreSQL of the local stack: foreign keys and row estimates reflected from
every schema in one pass, hierarchies rooted at the tables that own rows, YAML printed that loads as a pipeline file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml

CDC = Path(sys.executable).parent / "cdc"

SCHEMA = """
create table school (id int primary key, name text not null);
create table person (id bigint primary key, name text not null, mentor_id bigint references person (id));
create table enrollment (id bigint primary key, person_id bigint not null references person (id),
                         school_id int not null references school (id));
create table attendance (id bigint primary key, person_id bigint not null references person (id),
                         enrollment_id bigint not null references enrollment (id), day date not null);
create table grade_detail (id bigint primary key, enrollment_id bigint not null references enrollment (id));
create table note (id bigint primary key, person_id bigint references person (id), body text);
create table audit_log (person_id bigint references person (id), at timestamptz not null default now());
create schema sales;
create table sales.person (id bigint primary key, name text not null);
create table sales."order" (id bigint primary key, person_id bigint not null references sales.person (id));
create table sales.refund (id bigint primary key, buyer_id bigint not null references public.person (id));
"""

pytestmark = pytest.mark.integration


@pytest.fixture
def source(stack, source_db):
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(SCHEMA)
    return stack.postgres_url(source_db, driver="psycopg")


def cdc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CDC), "hierarchy", "suggest", *args], capture_output=True, text=True, timeout=120)


def comment_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#")]


def test_all_reads_every_schema_and_says_what_does_not_fit(source):
    # --all used to read public only; now every schema, so sales.refund's reference to public.person counts.
    run = cdc("--url", source, "--all")
    assert run.returncode == 0, run.stderr

    assert yaml.safe_load(run.stdout) == {"hierarchies": {
        "public_person": {"root": "public.person", "members": {
            "public.attendance": "person_id", "public.enrollment": "person_id", "sales.refund": "buyer_id",
            # nullable root-id columns: weaker evidence, still members
            "public.note": "person_id", "public.audit_log": "person_id"}},
        "sales_person": {"root": "sales.person", "members": {"sales.order": "person_id"}},
    }}
    assert "public.enrollment: person_id  # also references public.school (school_id): reference data" in run.stdout
    assert "public.note: person_id  # person_id is nullable: weaker evidence, a row may belong to no person" \
        in run.stdout
    assert comment_lines(run.stdout) == [
        "# standalone (no member rows belong to them): public.school",
        "#   public.school: reference data: every table referencing it (public.enrollment) has dependants of its "
        "own: it describes their rows rather than owning them",
        "# cannot join a hierarchy:",
        "#   public.grade_detail: reaches public.person only through public.enrollment; "
        "add a column holding the person id",
        "# no row estimate for 10 table(s) (never analysed: run ANALYZE for better evidence); their reference data "
        "was told from the foreign keys alone",
    ]


def test_chosen_tables_across_schemas_get_schema_prefixed_names_when_they_clash(source):
    run = cdc("--url", source, "--tables",
              "public.person, public.attendance,public.enrollment,sales.person,sales.order,sales.refund")
    assert run.returncode == 0, run.stderr
    # public.school is not captured, so enrollment's school_id no longer competes for it.
    assert yaml.safe_load(run.stdout) == {"hierarchies": {
        "public_person": {"root": "public.person", "members": {
            "public.attendance": "person_id", "public.enrollment": "person_id", "sales.refund": "buyer_id"}},
        "sales_person": {"root": "sales.person", "members": {"sales.order": "person_id"}},
    }}
    assert "      public.enrollment: person_id\n" in run.stdout  # no comment: nothing else it references


def test_schema_narrows_all_to_the_named_schemas(source):
    run = cdc("--url", source, "--all", "--schema", "sales")
    assert run.returncode == 0, run.stderr
    # Only sales tables are captured: refund's reference to public.person does not count.
    assert yaml.safe_load(run.stdout) == {"hierarchies": {"person": {
        "root": "sales.person", "members": {"sales.order": "person_id"}}}}
    assert comment_lines(run.stdout)[:2] == ["# standalone (no member rows belong to them): sales.refund",
                                             "#   sales.refund: no captured table holds its id"]
    # --schema alone means --all over those schemas; both schemas by name is everything
    assert cdc("--url", source, "--schema", "sales").stdout == run.stdout
    both = cdc("--url", source, "--schema", "sales,public")
    assert both.returncode == 0 and both.stdout == cdc("--url", source, "--all").stdout


def test_an_unknown_schema_is_named_and_exits_2(source):
    run = cdc("--url", source, "--schema", "sales", "--schema", "nowhere")
    assert run.returncode == 2 and run.stdout == ""
    assert "--schema: no such schema at the source: nowhere" in run.stderr


def test_tables_missing_at_the_source_are_named_and_exit_2(source):
    run = cdc("--url", source, "--tables", "public.person,public.nope,sales.gone")
    assert run.returncode == 2
    assert run.stdout == ""
    assert "public.nope" in run.stderr and "sales.gone" in run.stderr and "public.person" not in run.stderr


def test_without_url_and_tables_the_pipeline_file_names_them(stack, source, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "pipeline": "p",
        "kafka": {"bootstrap_servers": "127.0.0.1:9092", "schema_registry_url": "http://127.0.0.1:8081",
                  "connect_url": "http://127.0.0.1:8083"},
        "source": {"url": source, "tables": ["public.person", "public.enrollment", "public.school"]},
    }))
    run = subprocess.run([str(CDC), "-c", str(pipeline), "hierarchy", "suggest"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout) == {"hierarchies": {"person": {
        "root": "public.person", "members": {"public.enrollment": "person_id"}}}}


def test_without_a_pipeline_file_the_missing_file_is_named(source, tmp_path):
    run = subprocess.run([str(CDC), "-c", str(tmp_path / "none.yaml"), "hierarchy", "suggest"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "none.yaml: file not found" in run.stderr


# ---------------------------------------------------------------------------------------------------------------
# The DVD-rental sample (15 tables, written for this test after the well-known PostgreSQL sample: lookups,
# junctions, a store <-> staff cycle, a payment partitioned by month), with its usual row counts and real planner
# estimates, beside a second schema of quoted mixed-case names whose tables reference public ones.

DVD_RENTAL = """
create type mpaa_rating as enum ('G', 'PG', 'PG-13', 'R', 'NC-17');
create table country (country_id serial primary key, country text not null,
                      last_update timestamptz not null default now());
create table city (city_id serial primary key, city text not null, country_id int not null references country,
                   last_update timestamptz not null default now());
create table address (address_id serial primary key, address text not null, address2 text, district text not null,
                      city_id int not null references city, postal_code text, phone text not null,
                      last_update timestamptz not null default now());
create table language (language_id serial primary key, name char(20) not null,
                       last_update timestamptz not null default now());
create table category (category_id serial primary key, name text not null,
                       last_update timestamptz not null default now());
create table actor (actor_id serial primary key, first_name text not null, last_name text not null,
                    last_update timestamptz not null default now());
create table film (film_id serial primary key, title text not null, description text, release_year int,
                   language_id int not null references language,
                   original_language_id int references language,
                   rental_duration smallint not null default 3, rental_rate numeric(4, 2) not null default 4.99,
                   length smallint, replacement_cost numeric(5, 2) not null default 19.99,
                   rating mpaa_rating default 'G', last_update timestamptz not null default now(),
                   special_features text[], fulltext tsvector not null);
create table film_actor (actor_id int not null references actor, film_id int not null references film,
                         last_update timestamptz not null default now(), primary key (actor_id, film_id));
create table film_category (film_id int not null references film, category_id int not null references category,
                            last_update timestamptz not null default now(), primary key (film_id, category_id));
create table store (store_id serial primary key, manager_staff_id int not null unique,
                    address_id int not null references address, last_update timestamptz not null default now());
create table staff (staff_id serial primary key, first_name text not null, last_name text not null,
                    address_id int not null references address, email text, store_id int not null references store,
                    active boolean not null default true, username text not null, password text,
                    last_update timestamptz not null default now(), picture bytea);
alter table store add foreign key (manager_staff_id) references staff deferrable initially deferred;
create table customer (customer_id serial primary key, store_id int not null references store,
                       first_name text not null, last_name text not null, email text,
                       address_id int not null references address, activebool boolean not null default true,
                       create_date date not null default current_date, last_update timestamptz default now(),
                       active int);
create table inventory (inventory_id serial primary key, film_id int not null references film,
                        store_id int not null references store, last_update timestamptz not null default now());
create table rental (rental_id serial primary key, rental_date timestamptz not null,
                     inventory_id int not null references inventory, customer_id int not null references customer,
                     return_date timestamptz, staff_id int not null references staff,
                     last_update timestamptz not null default now(), unique (rental_date, inventory_id, customer_id));
create table payment (payment_id serial, customer_id int not null references customer,
                      staff_id int not null references staff, rental_id int not null references rental,
                      amount numeric(5, 2) not null, payment_date timestamptz not null,
                      primary key (payment_date, payment_id)) partition by range (payment_date);
create table payment_p2022_05 partition of payment for values from ('2022-05-01') to ('2022-06-01');
create table payment_p2022_06 partition of payment for values from ('2022-06-01') to ('2022-07-01');
create table payment_p2022_07 partition of payment for values from ('2022-07-01') to ('2022-08-01');

create schema "Sales";
create table "Sales"."Campaign" ("CampaignId" int primary key, "Title" text not null, "Starts On" date not null,
                                 "Budget" numeric(10, 2), "Channel" text, "Last Update" timestamptz default now());
create table "Sales"."Campaign Contact" (
    "Id" bigint generated always as identity primary key,
    "CampaignId" int not null references "Sales"."Campaign" on delete cascade,
    customer_id int not null references public.customer, "Sent At" timestamptz not null);
create table "Sales"."Ärger" ("Id" int primary key, "null" int not null references "Sales"."Campaign", "Note" text);
"""

DVD_ROWS = """
insert into country (country) select 'country ' || i from generate_series(1, 109) i;
insert into city (city, country_id) select 'city ' || i, 1 + i % 109 from generate_series(1, 600) i;
insert into address (address, district, city_id, phone)
    select i || ' Main Street', 'district', 1 + i % 600, '555-' || i from generate_series(1, 603) i;
insert into language (name) values ('English'), ('Italian'), ('Japanese'), ('Mandarin'), ('French'), ('German');
insert into category (name) select 'category ' || i from generate_series(1, 16) i;
insert into actor (first_name, last_name) select 'first ' || i, 'last ' || i from generate_series(1, 200) i;
insert into film (title, language_id, fulltext, special_features)
    select 'film ' || i, 1 + i % 6, to_tsvector('film ' || i), array['Trailers'] from generate_series(1, 1000) i;
-- six actors per film (a few films get five): 5,462 distinct pairs
insert into film_actor (actor_id, film_id) select 1 + (i % 1000 + 37 * (i / 1000)) % 200, 1 + i % 1000
    from generate_series(0, 5461) i;
insert into film_category (film_id, category_id) select i, 1 + i % 16 from generate_series(1, 1000) i;
begin;
insert into store (manager_staff_id, address_id) values (1, 602), (2, 603);
insert into staff (first_name, last_name, address_id, store_id, username)
    values ('Mike', 'Hillyer', 600, 1, 'Mike'), ('Jon', 'Stephens', 601, 2, 'Jon');
commit;
insert into customer (store_id, first_name, last_name, address_id)
    select 1 + i % 2, 'first ' || i, 'last ' || i, i from generate_series(1, 599) i;
insert into inventory (film_id, store_id) select 1 + i % 1000, 1 + i % 2 from generate_series(0, 4580) i;
insert into rental (rental_date, inventory_id, customer_id, staff_id)
    select timestamptz '2022-05-01' + i * interval '5 minutes', 1 + i % 4581, 1 + i % 599, 1 + i % 2
    from generate_series(0, 16043) i;
insert into payment (customer_id, staff_id, rental_id, amount, payment_date)
    select customer_id, staff_id, rental_id, 2.99, rental_date from rental where rental_id <= 14596;
insert into "Sales"."Campaign" ("CampaignId", "Title", "Starts On")
    select i, 'campaign ' || i, date '2022-05-01' + i from generate_series(1, 200) i;
insert into "Sales"."Campaign Contact" ("CampaignId", customer_id, "Sent At")
    select 1 + i % 200, 1 + i % 599, now() from generate_series(0, 2999) i;
insert into "Sales"."Ärger" ("Id", "null") select i, 1 + i % 200 from generate_series(1, 40) i;
analyze;
"""

DVD_LOOKUPS = ["public.address", "public.category", "public.city", "public.country", "public.language",
               "public.staff", "public.store"]


@pytest.fixture
def dvd_rental(stack, source_db):
    with psycopg.connect(stack.postgres_url(source_db), autocommit=True) as conn:
        conn.execute(DVD_RENTAL)
        conn.execute(DVD_ROWS)
    return stack.postgres_url(source_db, driver="psycopg")


def test_dvd_rental_roots_at_film_and_customer_across_schemas_and_loads_back_as_a_pipeline_file(
        dvd_rental, tmp_path):
    run = cdc("--url", dvd_rental, "--all")
    assert run.returncode == 0, run.stderr
    proposal = yaml.safe_load(run.stdout)
    assert proposal == {"hierarchies": {
        "film": {"root": "public.film", "members": {
            "public.film_actor": "film_id", "public.film_category": "film_id", "public.inventory": "film_id"}},
        # payment is partitioned: captured as its parent, its partitions are not proposed
        "customer": {"root": "public.customer", "members": {
            "public.rental": "customer_id", "public.payment": "customer_id"}},
        # the second schema, read in the same pass: a contact references both its campaign (ON DELETE CASCADE)
        # and a public.customer
        "Campaign": {"root": "Sales.Campaign", "members": {
            "Sales.Campaign Contact": "CampaignId", "Sales.Ärger": "null"}},
    }}
    text = run.stdout
    assert "payment_p2022" not in text

    # every choice says why
    assert ("      public.payment: customer_id  # also references public.rental (rental_id): itself a member of "
            "customer; payment holds the customer id itself, so it goes under the same key as its rental; "
            "public.staff (staff_id): reference data\n") in text
    assert ('      "Sales.Campaign Contact": CampaignId  # also references public.customer (customer_id), a root '
            "too: CampaignId is ON DELETE CASCADE\n") in text
    assert ("      public.film_actor: film_id  # also references public.actor (actor_id), a root too: film_actor "
            "is named after film\n") in text
    assert ("    # root public.customer: its id is held by 3 tables, ~599 rows; its own references "
            "public.address (address_id), public.store (store_id) are reference data\n") in text
    lines = comment_lines(text)
    assert lines[0] == ("# standalone (no member rows belong to them): " + ", ".join(sorted(
        ["public.actor", *DVD_LOOKUPS])))
    notes = dict(line[4:].split(": ", 1) for line in lines[1:])
    assert notes["public.language"] == ("reference data: ~6 rows against ~1,000 rows in public.film, "
                                        "which references it")
    assert notes["public.category"] == ("reference data: ~16 rows against ~1,000 rows in public.film_category, "
                                        "which references it")
    # payment's estimate is the sum of its partitions'
    assert notes["public.staff"].startswith("reference data: ~2 rows against ~16,044 rows in public.rental")
    assert notes["public.country"].startswith("reference data: every table referencing it (public.city) has "
                                              "dependants of its own")
    assert notes["public.actor"] == ("every table holding its id went elsewhere: public.film_actor joined film "
                                     "(film_actor is named after film)")
    assert set(notes) == {"public.actor", *DVD_LOOKUPS}  # nothing unjoinable, every table estimated

    # The printed text, pasted under a pipeline file that captures every table, is a valid pipeline file.
    tables = sorted({*(t for h in proposal["hierarchies"].values() for t in [h["root"], *h["members"]]),
                     "public.actor", *DVD_LOOKUPS})
    assert len(tables) == 18
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(yaml.safe_dump({
        "pipeline": "dvd",
        "kafka": {"bootstrap_servers": "127.0.0.1:9092", "schema_registry_url": "http://127.0.0.1:8081",
                  "connect_url": "http://127.0.0.1:8083"},
        "source": {"url": dvd_rental, "tables": tables},
    }, allow_unicode=False) + text)
    from cdc.config import load

    pipeline = load(pipeline_file, env={})
    assert {name: (h.root, dict(h.members)) for name, h in pipeline.hierarchies.items()} == {
        name: (h["root"], h["members"]) for name, h in proposal["hierarchies"].items()}
    assert pipeline.hierarchy_of("Sales.Ärger") == "Campaign"


def test_all_reflects_every_schema_in_a_fixed_number_of_statements(dvd_rental):
    """One query per kind of object and schema, however many tables: not one schema, nor one table, at a time."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from producers import hierarchy

    statements = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        graph = hierarchy.reflect_all(dvd_rental)
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    assert sorted(t.name for t in graph) == sorted([
        "Sales.Campaign", "Sales.Campaign Contact", "Sales.Ärger", "public.actor", "public.address",
        "public.category", "public.city", "public.country", "public.customer", "public.film", "public.film_actor",
        "public.film_category", "public.inventory", "public.language", "public.payment", "public.rental",
        "public.staff", "public.store"])
    assert {t.name: t.rows for t in graph}["public.payment"] == 14596
    assert len(statements) < len(graph), statements
