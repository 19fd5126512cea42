"""How long `cdc verify` takes on a large table with few or many differences, on each destination dialect.

The source is a PostgreSQL table filled by generate_series; each destination table is created by the destination's
dialect (the types the applier would create) and filled inside that database (PostgreSQL generate_series, MariaDB's
sequence engine, DuckDB's range), so no capture is needed to measure the comparison. Then differences are planted:
4/10 changed rows, 3/10 deleted, 3/10 extra. The figure is the wall time of `verify` over that table, and the run
fails unless verify names exactly the planted keys.

Run: .venv/bin/python -m benchmarks.verify_bench [--rows 1000000] [--differences 10,10000[,all]]
     [--dialects postgresql,mariadb,duckdb]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import uuid

import duckdb
import psycopg
from sqlalchemy import create_engine

from benchmarks.common import Session, session
from cdc import config
from cdc.source_tables import reflect_tables
from consumers.apply.dialects import dialect_for
from consumers.ops import verify

DDL = ("create table item (id bigint primary key, name text not null, qty integer, price numeric(12, 2), "
       "seen timestamptz)")
# Values exact in every engine (two-decimal prices, whole seconds), so that equal rows are equal everywhere.
FILL = {
    "postgresql": ("insert into item select g, 'item ' || g, mod(g, 97), mod(g, 100000) / 100.0, "
                   "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second', 0 "
                   "from generate_series(1, {n}) g"),
    "mariadb": ("insert into item select seq, concat('item ', seq), mod(seq, 97), mod(seq, 100000) / 100, "
                "timestamp '2026-01-01 00:00:00' + interval seq second, 0 from seq_1_to_{n}"),
    "duckdb": ("insert into \"public.item\" select g, 'item ' || g, g % 97, (g % 100000) / 100, "
               "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second', 0 from range(1, {n} + 1) t(g)"),
}


def plant(kind: str, table: str, rows: int, differences: int) -> dict[str, list[list[int]]]:
    """Which keys to change, delete and add: spread evenly over the table."""
    changed, deleted = differences * 4 // 10, differences * 3 // 10
    extra = differences - changed - deleted
    step = rows // (changed + deleted + 1)
    keys = list(range(step, step * (changed + deleted + 1), step))[:changed + deleted]
    return {"different": [[k] for k in keys[:changed]], "missing": [[k] for k in keys[changed:]],
            "extra": [[rows + 1 + i] for i in range(extra)]}


def statements(kind: str, table: str, planted: dict[str, list[list[int]]]) -> list[str]:
    out = []
    for chunk in range(0, max(len(planted["different"]), len(planted["missing"]), len(planted["extra"])), 1000):
        changed = [k[0] for k in planted["different"][chunk:chunk + 1000]]
        deleted = [k[0] for k in planted["missing"][chunk:chunk + 1000]]
        extra = [k[0] for k in planted["extra"][chunk:chunk + 1000]]
        if changed:
            out.append(f"update {table} set name = 'corrupted' where id in ({', '.join(map(str, changed))})")
        if deleted:
            out.append(f"delete from {table} where id in ({', '.join(map(str, deleted))})")
        if extra:
            out.append(f"insert into {table} (id, name, _cdc_lsn) values "
                       + ", ".join(f"({k}, 'extra', 0)" for k in extra))
    return out


def run(kind: str, bench: Session, source_db: str, rows: int, differences: list[int]) -> list[str]:
    layout = bench.layout
    name = f"vb_dst_{uuid.uuid4().hex[:8]}"
    if kind == "postgresql":
        url = bench.dbs.create(name)
    elif kind == "mariadb":
        url = bench.dbs.create_mariadb(name)
    else:
        url = f"duckdb:///{bench.work / (name + '.duckdb')}"
    pipeline = config.parse({
        "pipeline": "verifybench",
        "kafka": {"bootstrap_servers": layout.kafka_bootstrap, "schema_registry_url": layout.urls()["schema_registry"],
                  "connect_url": layout.urls()["connect"]},
        "source": {"url": layout.postgres_url(source_db), "tables": ["public.item"]},
        "destinations": {"copy": {"kind": "replica", "url": url}},
    }, env={})
    lines = []
    try:
        shapes = reflect_tables(pipeline.source.sqlalchemy_url, ["public.item"])
        engine = create_engine(pipeline.destinations["copy"].driver_url)
        dialect = dialect_for(engine)
        table = dialect.table(shapes["public.item"])
        with engine.begin() as conn:
            table.create(conn)
            quoted = conn.dialect.identifier_preparer.format_table(table)
        engine.dispose()
        started = time.monotonic()
        if kind == "duckdb":
            with duckdb.connect(str(url).removeprefix("duckdb:///")) as conn:
                conn.execute(FILL[kind].format(n=rows))
        else:
            engine = create_engine(pipeline.destinations["copy"].driver_url)
            with engine.begin() as conn:
                conn.exec_driver_sql(FILL[kind].format(n=rows))
            engine.dispose()
        lines.append(f"  filled {rows:,} rows in {time.monotonic() - started:.1f} s")
        total: dict[str, list[list[int]]] = {"different": [], "missing": [], "extra": []}
        for count in differences:
            # Each round adds to what earlier rounds planted, on keys no earlier round touched; "all" (-1) changes
            # every row (the whole table differs).
            touched = {k[0] for v in total.values() for k in v}
            if count < 0:
                gone = {k[0] for k in total["missing"]}
                different = [[k] for k in range(1, rows + 1) if k not in gone and [k] not in total["different"]]
                new = {"different": different, "missing": [], "extra": []}
                todo = [f"update {quoted} set name = concat(name, '!')"]
            else:
                new = {k: [x for x in v if x[0] not in touched] for k, v in plant(kind, quoted, rows, count).items()}
                todo = statements(kind, quoted, new)
            if kind == "duckdb":
                with duckdb.connect(str(url).removeprefix("duckdb:///")) as conn:
                    for s in todo:
                        conn.execute(s)
            else:
                engine = create_engine(pipeline.destinations["copy"].driver_url)
                with engine.begin() as conn:
                    for s in todo:
                        conn.exec_driver_sql(s)
                engine.dispose()
            planted = {k: sorted(total[k] + new[k]) for k in total}
            total = planted
            count = sum(len(v) for v in planted.values())
            started = time.monotonic()
            report = verify.verify(pipeline, "copy", settle=0)
            elapsed = time.monotonic() - started
            [t] = report.tables
            exact = (t.missing == planted["missing"] and t.extra == planted["extra"]
                     and t.different == planted["different"])
            target = 10 if count <= 10 else 30 if count <= 20_000 else None
            lines.append(f"  {kind}: {rows:,} rows, {count:,} differences: {elapsed:.2f} s ({t.queries} queries); "
                         f"missing {len(t.missing)}, extra {len(t.extra)}, different {len(t.different)}, "
                         f"{'exactly the planted keys' if exact else 'NOT THE PLANTED KEYS'}"
                         + (f"; target under {target} s: {'met' if elapsed < target and exact else 'MISSED'}"
                            if target else ""))
            print(lines[-1], flush=True)
    finally:
        if kind != "duckdb":
            bench.dbs.drop(name)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--differences", default="10,10000", help="Comma-separated counts, run in this order; "
                        "`all` changes every row.")
    parser.add_argument("--dialects", default="postgresql,mariadb,duckdb")
    args = parser.parse_args()
    differences = [-1 if x.strip() == "all" else int(x) for x in args.differences.split(",")]
    with session("verify", quiet=True) as bench:
        src = f"vb_src_{bench.run_id}"
        bench.dbs.create(src)
        print(f"verify_bench on {platform.node()} ({os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()})", flush=True)
        with psycopg.connect(bench.layout.postgres_url(src), autocommit=True) as conn:
            conn.execute(DDL)
            conn.execute(FILL["postgresql"].format(n=args.rows).replace(", 0 from", " from"))
            conn.execute("vacuum analyze item")
        for kind in args.dialects.split(","):
            run(kind.strip(), bench, src, args.rows, differences)


if __name__ == "__main__":
    main()
