"""Where a destination keeps the last source commit it applied (consumers/apply/copies.py says why): one row per
pipeline in `_cdc_last_commit` (declared with the applier's other tables, dialects/bookkeeping.py), written in the
same destination transaction as the rows and the offsets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select

from consumers.apply.copies import CommitMark
from consumers.apply.dialects.bookkeeping import LAST_COMMIT


def ensure(conn: Any) -> None:
    LAST_COMMIT.create(conn, checkfirst=True)


def load(conn: Any, pipeline: str) -> CommitMark | None:
    t = LAST_COMMIT
    row = conn.execute(select(t.c.commit_lsn, t.c.commit_ts_ms, t.c.end_offset)
                       .where(t.c.pipeline == pipeline)).first()
    return CommitMark(int(row[0]), int(row[1]), int(row[2])) if row else None


def store(conn: Any, pipeline: str, mark: CommitMark) -> None:
    # Delete and insert, not an upsert: one statement pair every dialect writes alike, once per batch.
    t = LAST_COMMIT
    conn.execute(delete(t).where(t.c.pipeline == pipeline))
    conn.execute(insert(t).values(pipeline=pipeline, commit_lsn=mark.lsn, commit_ts_ms=mark.ts_ms,
                                  end_offset=mark.end_offset, updated_at=datetime.now(UTC)))
