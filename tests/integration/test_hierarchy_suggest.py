"""`cdc hierarchy suggest` on the real PostgreSQL of the local stack: foreign keys reflected, YAML printed."""

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


def test_all_tables_of_public_give_the_person_hierarchy_and_say_what_does_not_fit(source):
    run = cdc("--url", source, "--all")
    assert run.returncode == 0, run.stderr

    assert yaml.safe_load(run.stdout) == {"hierarchies": {"person": {
        "root": "public.person",
        "members": {"public.attendance": "person_id", "public.enrollment": "person_id"}}}}
    assert "public.enrollment: person_id  # also references public.school (school_id)" in run.stdout
    assert comment_lines(run.stdout) == [
        "# standalone (no member rows belong to them): public.note, public.school",
        "#   public.note: not a member: person_id (references public.person) is nullable",
        "# cannot join a hierarchy:",
        "#   public.audit_log: no primary key, so it cannot be a root; and no ownership foreign key: "
        "person_id (references public.person) is nullable",
        "#   public.grade_detail: reaches public.person only through public.enrollment; "
        "add a column holding the person id",
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
    assert "also references" not in run.stdout


def test_another_schema_with_all(source):
    run = cdc("--url", source, "--all", "--schema", "sales")
    assert run.returncode == 0, run.stderr
    # Only sales tables are captured: refund's reference to public.person does not count.
    assert yaml.safe_load(run.stdout) == {"hierarchies": {"person": {
        "root": "sales.person", "members": {"sales.order": "person_id"}}}}
    assert comment_lines(run.stdout) == ["# standalone (no member rows belong to them): sales.refund"]


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
