"""Sample inputs shared by unit tests of several packages: a pipeline file (as YAML text and as a dict), a topology,
the source tables a connector configuration is built from, transaction events. One definition each, imported by
every test that needs it, so that no test module imports another."""

from __future__ import annotations

from cdc.source_tables import ColumnShape, TableShape
from consumers.apply.dialects.types import RawType
from consumers.apply.events import ChangeEvent, TransactionMarker

# -- a pipeline file -------------------------------------------------------------------------------------------------

PIPELINE_YAML = """\
pipeline: district
kafka:
  bootstrap_servers: localhost:9092
  schema_registry_url: http://localhost:8081/apis/ccompat/v7
  connect_url: http://localhost:8083
source:
  url: postgresql://cdc:${DB_PASSWORD}@localhost:5432/district
  tables: [public.school, public.person, public.enrollment, public.attendance]
hierarchies:
  person:
    root: public.person
    members:
      public.enrollment: person_id
      public.attendance: person_id
destinations:
  state:
    kind: replica
    url: postgresql://cdc@localhost:5432/state
  analytics:
    kind: analytics
    url: duckdb:///analytics.duckdb
"""
PIPELINE_ENV = {"DB_PASSWORD": "s3cret"}

# The same pipeline as a dict, without destinations (each test adds those it needs).
PIPELINE = {
    "pipeline": "district",
    "kafka": {"bootstrap_servers": "k:9092", "schema_registry_url": "http://r:8081/apis/ccompat/v7",
              "connect_url": "http://c:8083"},
    "source": {"url": "postgresql://u:secret@db.local:5433/district",
               "tables": ["public.school", "public.person", "public.enrollment", "public.attendance"]},
    "hierarchies": {"person": {"root": "public.person",
                               "members": {"public.enrollment": "person_id", "public.attendance": "person_id"}}},
}


def source_table(qualified: str, pk: tuple[str, ...] = ("id",), **cols: str) -> TableShape:
    """A reflected source table: a bigint `id` and the columns given as name=type (`type?`: nullable); each type is
    the text the source names it by (RawType prints it back as it is)."""
    columns = [ColumnShape("id", RawType("bigint"), False)]
    columns += [ColumnShape(c, RawType(t.rstrip("?")), t.endswith("?")) for c, t in cols.items()]
    return TableShape(qualified, tuple(columns), pk)


# The pipeline's source tables, as the connector configuration reads them.
SOURCE_TABLES = {
    "public.school": source_table("public.school", name="text"),
    "public.person": source_table("public.person", name="text"),
    "public.enrollment": source_table("public.enrollment", person_id="bigint", school_id="bigint"),
    "public.attendance": source_table("public.attendance", person_id="bigint"),
}

# -- a topology file -------------------------------------------------------------------------------------------------

TOPOLOGY = {
    "topology": "shop",
    "kafka": {"bootstrap_servers": "localhost:9092", "schema_registry_url": "http://localhost:8081",
              "connect_url": "http://localhost:8083"},
    "sites": {
        "hq": {"sync_id": 1, "url": "postgresql://cdc:${HQ_PASSWORD}@localhost:5432/hq"},
        "north": {"sync_id": 2, "url": "postgresql://cdc@localhost:5432/north", "sync": "every 15 minutes"},
        "south": {"sync_id": 3, "url": "postgresql://cdc@localhost:5432/south", "sync": "on_demand"},
    },
    "master_tables": ["public.item", "public.category"],
    "site_tables": {"public.sale": "site_id"},
    "subsets": {"north": {"public.item": {"where": "region = 'north'", "columns": ["id", "name"]}}},
}
TOPOLOGY_ENV = {"HQ_PASSWORD": "s3cret"}

# -- transaction events ----------------------------------------------------------------------------------------------

# The tables whose events the transaction samples hold.
TRANSACTION_TABLES = frozenset({"public.person", "public.enrollment"})


def event(partition: int, offset: int, xid: object = None, order: int | None = None, table: str = "public.person",
          op: str = "c", key: int = 1) -> ChangeEvent:
    """A change event at (partition, offset) of transaction `xid` (None: a snapshot read)."""
    return ChangeEvent(topic="p.person", partition=partition, offset=offset, table=table, op=op, key={"id": key},
                       before=None, after={"id": key}, lsn=offset, tx_id=f"{xid}:{offset}" if xid else None,
                       tx_order=order, commit_ts_ms=1000, snapshot=xid is None)


def end_marker(xid: object, offset: int, person: int = 0, enrollment: int = 0, signal: int = 0) -> TransactionMarker:
    """The END record of transaction `xid` at `offset` of the transaction topic, with its per-table counts."""
    counts = {"public.person": person, "public.enrollment": enrollment, "public.cdc_signal": signal}
    return TransactionMarker("END", str(xid), {k: v for k, v in counts.items() if v}, 1000, offset)
