"""How long `cdc verify` takes on a large table with a handful of differences (PostgreSQL to PostgreSQL).

The destination is filled by copying the source table inside PostgreSQL (no capture is needed to measure the
comparison), then 10 rows are corrupted; the figure is the wall time of `verify` over that table.
Run: .venv/bin/python -m benchmarks.verify_bench [--rows 1000000]
"""

from __future__ import annotations

import argparse
import time
import uuid

import psycopg

from cdc import config
from consumers import verify
from infra import stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    layout = stack.up(echo=lambda line: None)
    src, dst = f"vb_src_{uuid.uuid4().hex[:8]}", f"vb_dst_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
        conn.execute(f'create database "{src}"')
        conn.execute(f'create database "{dst}"')
    try:
        ddl = ("create table item (id bigint primary key, name text not null, qty integer, price numeric(12, 2), "
               "seen timestamptz)")
        fill = ("insert into item select g, 'item ' || g, g % 97, g / 7.0, "
                "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second' from generate_series(1, {n}) g")
        for db, extra in ((src, ""), (dst, ", add column _cdc_lsn bigint not null default 0")):
            with psycopg.connect(layout.postgres_url(db), autocommit=True) as conn:
                conn.execute(ddl)
                conn.execute(fill.format(n=args.rows))
                if extra:
                    conn.execute(f"alter table item {extra.lstrip(', ')}")
                conn.execute("vacuum analyze item")
        with psycopg.connect(layout.postgres_url(dst), autocommit=True) as conn:
            step = args.rows // 10
            conn.execute("update item set name = 'corrupted' where id in (%s, %s, %s, %s)",
                         (step, 2 * step, 3 * step, 4 * step))
            conn.execute("delete from item where id in (%s, %s, %s)", (5 * step, 6 * step, 7 * step))
            conn.execute("insert into item (id, name) values (%s, 'extra'), (%s, 'extra'), (%s, 'extra')",
                         (args.rows + 1, args.rows + 2, args.rows + 3))
        pipeline = config.parse({
            "pipeline": "verifybench",
            "kafka": {"bootstrap_servers": layout.kafka_bootstrap, "schema_registry_url": layout.urls()["schema_registry"],
                      "connect_url": layout.urls()["connect"]},
            "source": {"url": layout.postgres_url(src), "tables": ["public.item"]},
            "destinations": {"copy": {"kind": "replica", "url": layout.postgres_url(dst)}},
        }, env={})
        started = time.monotonic()
        report = verify.verify(pipeline, "copy", settle=0)
        elapsed = time.monotonic() - started
        [table] = report.tables
        print(f"verify of {args.rows:,} rows with 10 differences: {elapsed:.2f} s, {table.queries} queries; "
              f"missing {len(table.missing)}, extra {len(table.extra)}, different {len(table.different)}, "
              f"accuracy {table.accuracy:.6f} (target: under 10 s)")
    finally:
        with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{src}" with (force)')
            conn.execute(f'drop database if exists "{dst}" with (force)')


if __name__ == "__main__":
    main()
