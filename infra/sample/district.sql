-- The built-in sample source: a small school district. Persons own their enrollments and attendance rows
-- (the `person` hierarchy); schools stand alone. Member tables use REPLICA IDENTITY FULL so that a delete's
-- before-image still carries the root id (person_id).
create table school (
    id          integer primary key,
    name        text not null,
    district    text not null
);

create table person (
    id          bigint primary key,
    first_name  text not null,
    last_name   text not null,
    birth_date  date,
    email       text,
    balance     numeric(12, 2) not null default 0,
    updated_at  timestamptz not null default now()
);

create table enrollment (
    id          bigint primary key,
    person_id   bigint not null references person (id),
    school_id   integer not null references school (id),
    grade       smallint not null,
    start_date  date not null,
    end_date    date
);

create table attendance (
    id             bigint primary key,
    person_id      bigint not null references person (id),
    enrollment_id  bigint not null references enrollment (id),
    day            date not null,
    status         text not null check (status in ('present', 'absent', 'late', 'excused'))
);

alter table enrollment replica identity full;
alter table attendance replica identity full;

insert into school (id, name, district) values
    (1, 'Jefferson Elementary', 'Jefferson County'),
    (2, 'Kennebec Valley High', 'Kennebec Valley'),
    (3, 'Westbrook Middle', 'Westbrook');

insert into person (id, first_name, last_name, birth_date, email, balance)
select g, 'First' || g, 'Last' || g, date '2010-01-01' + g, 'person' || g || '@example.org', g * 10
from generate_series(1, 20) as g;

insert into enrollment (id, person_id, school_id, grade, start_date)
select g, g, 1 + g % 3, 1 + g % 12, date '2025-09-01'
from generate_series(1, 20) as g;

insert into attendance (id, person_id, enrollment_id, day, status)
select g, 1 + (g - 1) % 20, 1 + (g - 1) % 20, date '2025-09-01' + (g - 1) / 20, 'present'
from generate_series(1, 60) as g;
