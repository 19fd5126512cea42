"""Copies of source transactions a destination already applied, told apart from new ones (pure: no I/O).

Why: Debezium delivers at least once. After a Kafka Connect worker dies, its connector starts again from the last
source position it had flushed, and re-sends, behind transactions already in Kafka, the ones committed after that
position: whole copies, END records included. Most copies are harmless (the current state keeps the newer
position of each row), but not all. A copy of a transaction that updated a row, applied after a later transaction
deleted that row, re-creates it, since nothing remembers a deleted key; when the row's parent is gone too, its
foreign key stops the applier. So copies are recognised and skipped whole.

How: a PostgreSQL commit LSN is unique per transaction and grows in commit order, and Debezium's END record carries
it (TransactionMarker.commit_lsn), the same in the copy as in the original. A destination keeps the last commit it
applied (`CommitMark`), written in the same destination transaction as the rows and the offsets. A transaction
whose commit LSN is not beyond the mark was applied: it is a copy.

Two guards keep the rule from skipping what it must not:
- The mark counts only while the stored offsets are past the END record that set it. A replay, or a restored
  backup, moves the transaction topic's offset back before it: the transactions read again are then applied again,
  and set the mark anew as they go.
- A copy committed no later than the mark (its commit time too, not only its LSN). A source whose LSNs start
  lower (a new cluster behind the same pipeline) has transactions committed after the mark: they are applied, and
  move the mark, rather than being taken for copies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar


class _Transaction(Protocol):
    """What the rule reads of a consumers.apply.transactions.SourceUnit."""

    xid: str | None
    commit_lsn: int | None
    commit_ts_ms: int | None
    marker_offset: int | None
    repeat: bool  # taken as a copy by the assembler already (TransactionAssembler._take_copy)


@dataclass(frozen=True)
class CommitMark:
    """The last source transaction a destination applied: its commit LSN and time, and its END record's offset in
    the pipeline's transaction topic."""

    lsn: int
    ts_ms: int
    end_offset: int

    def counts(self, stored_next_offset: int | None) -> bool:
        """Whether the mark holds for a destination whose stored next offset of the transaction topic is this: only
        while that offset is past the END record that set the mark (see the module's guards)."""
        return stored_next_offset is not None and stored_next_offset > self.end_offset

    def covers(self, step: _Transaction) -> bool:
        """Whether `step` is a copy of a transaction applied at or before the mark."""
        if step.xid is None or step.commit_lsn is None or step.marker_offset is None:
            return False  # snapshot rows, or an END without a commit LSN: nothing to compare
        return (step.commit_lsn <= self.lsn and (step.commit_ts_ms or 0) <= self.ts_ms
                and step.marker_offset > self.end_offset)


S = TypeVar("S", bound=_Transaction)


def is_copy_end(mark: CommitMark | None, commit_lsn: int | None, commit_ts_ms: int | None, end_offset: int) -> bool:
    """Whether an END record (of consumers.apply.events.TransactionMarker) is a copy's, per `mark`."""
    return mark is not None and mark.covers(_End(commit_lsn, commit_ts_ms, end_offset))


@dataclass
class _End:
    """An END record seen as the transaction it closes (the fields the rule reads)."""

    commit_lsn: int | None
    commit_ts_ms: int | None
    marker_offset: int | None
    xid: str | None = "end"
    repeat: bool = False


def mark_of(step: _Transaction) -> CommitMark | None:
    if step.xid is None or step.commit_lsn is None or step.marker_offset is None:
        return None
    return CommitMark(step.commit_lsn, step.commit_ts_ms or 0, step.marker_offset)


def split_copies(steps: Iterable[S], mark: CommitMark | None) -> tuple[list[S], list[S], CommitMark | None]:
    """(steps to apply, copies to skip, the mark after the steps applied). The mark moves to each transaction
    applied in turn (the last one in the transaction topic's order), so that after a copy run it is where it was."""
    kept: list[S] = []
    copies: list[S] = []
    for step in steps:
        if step.repeat or (mark is not None and mark.covers(step)):
            copies.append(step)
            continue
        kept.append(step)
        mark = mark_of(step) or mark
    return kept, copies, mark


def describe(copies: list[_Transaction]) -> str:
    """'3 re-sent copies of source transactions already applied (commit LSN 0/16B3748 to 0/16B3A10)'."""
    lsns = [s.commit_lsn for s in copies if s.commit_lsn is not None]
    if not lsns:
        span = ""
    elif min(lsns) == max(lsns):
        span = f" (commit LSN {pg_lsn(lsns[0])})"
    else:
        span = f" (commit LSN {pg_lsn(min(lsns))} to {pg_lsn(max(lsns))})"
    # One copy can come as two steps (its events, then its END record: TransactionAssembler._take_repeats): one copy.
    count = len({s.xid for s in copies})
    noun = "copy" if count == 1 else "copies"
    return f"{count} re-sent {noun} of source transactions already applied{span}"


def pg_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL writes it (pg_lsn): high and low 32 bits in hex."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
