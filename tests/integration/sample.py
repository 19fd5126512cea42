"""The sample source shared by integration tests: a school database (schema, tables, hierarchy), reading its tables
with plain SQL, and THE workload generator that changes it."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
from psycopg import sql

SCHEMA = """
create table school (id integer primary key, name text not null);
create table person (id bigint primary key, name text not null, balance numeric(14, 2) not null,
                     mentor_id bigint references person (id), updated_at timestamptz not null default now());
create table enrollment (id bigint primary key, person_id bigint not null references person (id),
                         school_id integer not null references school (id) on update cascade,
                         grade integer not null, started date not null);
create table attendance (id bigint primary key, person_id bigint not null references person (id),
                         enrollment_id bigint not null references enrollment (id), day date not null,
                         status text not null);
insert into school select g, 'school ' || g from generate_series(1, 5) g;
insert into person (id, name, balance) select g, 'person ' || g, 1000 from generate_series(1, 50) g;
update person set mentor_id = id - 1 where id > 1 and id % 3 = 0;
insert into enrollment select g, g, 1 + g % 5, 1 + g % 12, date '2025-09-01' from generate_series(1, 50) g;
insert into attendance select g, 1 + g % 50, 1 + g % 50, date '2025-09-01' + g % 30, 'present'
from generate_series(1, 200) g;
"""
TABLES = ["public.school", "public.person", "public.enrollment", "public.attendance"]
NAMES = ("school", "person", "enrollment", "attendance")  # TABLES without their schema, parents first
HIERARCHIES = {"person": {"root": "public.person",
                          "members": {"public.enrollment": "person_id", "public.attendance": "person_id"}}}
TOTAL = Decimal("50000.00")  # the sum of the balances, which every committed source transaction keeps


def rows(url: str, table: str, order: str = "id") -> list[tuple]:
    """Every row of a table of schema `public` read with plain SQL, without our code; `_cdc_lsn` left out, columns
    in name order."""
    with psycopg.connect(url) as conn:
        columns = [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = 'public' and table_name = %s "
            "and column_name <> '_cdc_lsn' order by column_name", (table,))]
        query = sql.SQL("select {} from {} order by {}").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table), sql.SQL(order))
        return conn.execute(query).fetchall()


def assert_equal(source: str, destination: str) -> None:
    """The sample's four tables hold the same rows at the source and at a PostgreSQL destination."""
    for table in NAMES:
        assert rows(source, table) == rows(destination, table), f"{table} differs"


def workload(url: str, transactions: int, seed: int, stop: threading.Event | None = None) -> int:
    """Multi-table source transactions on the sample schema that keep the sum of balances (TOTAL) constant at every
    commit: transfers, a person created with their rows, a person deleted with theirs (their balance to an heir),
    member updates, primary-key updates of a member row and of a referenced row (cascaded by the source); it never
    renames a person and never deletes person 1 (tests script their history). The same
    `seed` makes the same choices (which rows they hit is the database's `random()`); the child rows of different
    seeds take their ids from separate ranges, so one source can take several workloads in a row. Stops early when
    `stop` is set; returns the number of transactions committed."""
    rng = random.Random(seed)
    done = 0
    with psycopg.connect(url, autocommit=True) as conn:  # each `transaction()` block is a source transaction
        next_person = conn.execute("select max(id) + 1 from person").fetchone()[0]
        next_child = 100_000 + seed * 1_000_000
        for _ in range(transactions):
            if stop is not None and stop.is_set():
                break
            with conn.transaction():
                people = [r[0] for r in conn.execute("select id from person order by random() limit 2")]
                kind = rng.choice(["transfer", "transfer", "create", "delete", "grade", "move", "school"])
                if kind == "transfer" and len(people) == 2:
                    amount = rng.randint(1, 100)
                    conn.execute("update person set balance = balance - %s, updated_at = now() where id = %s",
                                 (amount, people[0]))
                    conn.execute("update person set balance = balance + %s, updated_at = now() where id = %s",
                                 (amount, people[1]))
                elif kind == "create":
                    pid, next_person = next_person, next_person + 1
                    conn.execute("insert into person (id, name, balance, mentor_id) values (%s, %s, 0, %s)",
                                 (pid, f"new {pid}", people[0] if people else None))
                    next_child += 1
                    conn.execute("insert into enrollment values (%s, %s, (select id from school order by random() "
                                 "limit 1), 1, current_date)", (next_child, pid))
                    conn.execute("insert into attendance values (%s, %s, %s, current_date, 'present')",
                                 (next_child, pid, next_child))
                elif kind == "delete" and len(people) == 2 and people[0] != 1:
                    victim, heir = people[0], people[1] if people[1] != people[0] else 1
                    conn.execute("update person set mentor_id = null where mentor_id = %s", (victim,))
                    conn.execute("update person set balance = balance + (select balance from person where id = %s) "
                                 "where id = %s", (victim, heir))
                    conn.execute("delete from attendance where person_id = %s or enrollment_id in "
                                 "(select id from enrollment where person_id = %s)", (victim, victim))
                    conn.execute("delete from enrollment where person_id = %s", (victim,))
                    conn.execute("delete from person where id = %s", (victim,))
                elif kind == "grade":
                    conn.execute("update enrollment set grade = grade %% 12 + 1 where person_id = %s", (people[0],))
                elif kind == "move":
                    # a primary-key update of a member row
                    next_child += 1
                    conn.execute("update attendance set id = %s where id = (select min(id) from attendance "
                                 "where person_id = %s)", (next_child, people[0]))
                else:
                    # a primary-key update of a referenced row: the source cascades it to enrollments
                    sid = conn.execute("select id from school order by random() limit 1").fetchone()[0]
                    conn.execute("update school set id = %s where id = %s",
                                 (sid + 100 if sid < 1000 else sid - 100, sid))
            done += 1
    return done


def changes_around_a_time(source: str, seed: int) -> tuple[int, datetime, int]:
    """A workload, then a time, then one more attendance row: (the last attendance id written before the time, the
    time, the id written after it)."""
    workload(source, 50, seed=seed)
    with psycopg.connect(source, autocommit=True) as conn:
        early = conn.execute("select max(id) from attendance").fetchone()[0]
    time.sleep(1.5)
    since = datetime.now(UTC)
    time.sleep(1.5)
    with psycopg.connect(source, autocommit=True) as conn:
        late = 9_000_001
        person, enrollment = conn.execute("select person_id, id from enrollment order by id limit 1").fetchone()
        conn.execute("insert into attendance values (%s, %s, %s, current_date, 'late')", (late, person, enrollment))
    return early, since, late
