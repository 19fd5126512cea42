"""Consumer lag, pure: the lag arithmetic per partition and destination, and the status rules over a sliding window.

No I/O here: `consumers/lag/probe.py` measures, this module computes and judges.

Arithmetic
----------
- A partition's applied offset is the `next_offset` the applier stored in the destination's `_cdc_offsets` (in the
  same transaction as the rows: the truth), or the log-start offset when none is stored yet (the applier starts
  there). Lag in messages = log-end offset - applied offset, never below 0.
- Lag in seconds is measured, never interpolated: now minus the source commit time (`source.ts_ms`; the END
  record's `ts_ms` on the transaction topic) of the message AT the applied offset, i.e. the oldest change not yet
  applied. It is 0 when the partition is caught up, so it is defined on an idle topic too.
- A destination's lag in messages is the sum over its partitions (the transaction topic included); its lag in
  seconds is the largest of its partitions' (the oldest change waiting anywhere).

Status rules (per destination, over the samples of the window, oldest first; the first rule that holds wins)
-----------------------------------------------------------------------------------------------------------
1. BLOCKED: the applier runs but waits for a service that does not answer (Kafka, the schema registry): it says
   so in the destination's `_cdc_status` (ReplicaApplier), or Kafka does not answer `cdc lag` either. The lag is
   unknown then, never "0".
   ERROR: the connector or one of its tasks is FAILED, the connector does not exist, Kafka Connect does not
   answer, or the destination's offsets cannot be read. Nothing reaches the destination then, whatever its lag.
2. OK: the latest lag is 0. A caught-up consumer is fine whether it runs or not: liveness does not matter then.
   OK is said only then: a destination with unapplied messages is never OK (rules 3-6, or BEHIND).
3. STOP: lag > 0, no applied offset moved across the window, and the applier has not applied anything for
   `stop_after` seconds (the newest `_cdc_offsets.updated_at`), or never has.
4. STALL: lag > 0 and no applied offset moved across the window (but the applier applied something recently).
5. WARN: the applied offsets move, yet the lag in messages never shrank between two samples and grew across
   the window: the consumer keeps up less fast than the source writes.
6. BEHIND otherwise: messages wait, but the applied offsets move and the lag is not growing (catching up or
   keeping pace). With a single sample (`--window 0`) nothing can be said about movement: lag > 0 is BEHIND.

Why STOP is derived this way: the applier assigns its partitions itself (no group membership), so Kafka's group
state is always "Empty" and the group's committed offsets only repeat what the applier stored; neither says
whether a process runs. What does exist is `_cdc_offsets.updated_at`, which moves with every applied batch. A
running applier applies a waiting change within a poll and a batch (well under a second), so lag that does not
move is a stuck consumer (STALL) while the last apply is recent, and a consumer that is gone (STOP) once nothing
has been applied for `stop_after` seconds. A stuck-but-alive process therefore turns STOP after `stop_after`
seconds as well; both are alerts. Telling them apart for sure needs a heartbeat from the applier itself.

Statuses need history: a single sample can only say OK or ERROR; `cdc lag` takes two samples `--window` seconds
apart, `cdc lag --watch` and `cdc lag serve` keep a sliding window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

OK, BEHIND, WARN, STALL, STOP, BLOCKED, ERROR = "OK", "BEHIND", "WARN", "STALL", "STOP", "BLOCKED", "ERROR"
STATUSES = (OK, BEHIND, WARN, STALL, STOP, BLOCKED, ERROR)
# What a running applier writes in its destination's `_cdc_status` while an outage blocks it (ReplicaApplier), and
# the start of a DestinationSample's error that says so.
BLOCKED_RECORD = "blocked: "
BLOCKED_PREFIX = "applier blocked: "
# Connector and task states of Kafka Connect that mean the capture side failed.
FAILED_STATES = {"FAILED"}


@dataclass(frozen=True)
class PartitionLag:
    """One partition as seen by one destination at one moment."""

    topic: str
    partition: int
    applied_offset: int
    end_offset: int
    # Source commit time (ms) of the message at the applied offset; None when caught up (or not decodable).
    oldest_unapplied_ts_ms: int | None = None
    group_offset: int | None = None  # what the consumer group committed (Kafka's own view), for comparison

    @property
    def lag_messages(self) -> int:
        return max(0, self.end_offset - self.applied_offset)

    def lag_seconds(self, now: float) -> float:
        return partition_lag_seconds(self.lag_messages, self.oldest_unapplied_ts_ms, now)


def applied_offset(stored: int | None, log_start: int) -> int:
    """The offset a destination has applied up to: what it stored, else where its applier would start."""
    return log_start if stored is None else max(stored, log_start)


def partition_lag_seconds(lag_messages: int, oldest_unapplied_ts_ms: int | None, now: float) -> float:
    """Now minus the commit time of the oldest unapplied change; 0 when caught up; never negative (clock skew)."""
    if lag_messages <= 0 or oldest_unapplied_ts_ms is None:
        return 0.0
    return max(0.0, now - oldest_unapplied_ts_ms / 1000.0)


@dataclass(frozen=True)
class SourceState:
    """The capture side at one moment."""

    connector_state: str  # RUNNING, PAUSED, STOPPED, FAILED, UNASSIGNED, RESTARTING, MISSING or UNKNOWN
    tasks: tuple[dict[str, Any], ...] = ()
    slot_retained_bytes: int | None = None
    slot_active: bool | None = None
    error: str | None = None

    @property
    def failure(self) -> str | None:
        """Why the capture side is broken, or None."""
        if self.connector_state == "MISSING":
            return "connector not found"
        if self.connector_state == "UNKNOWN":
            return f"Kafka Connect did not answer: {self.error}" if self.error else "Kafka Connect did not answer"
        if self.connector_state in FAILED_STATES:
            return "connector FAILED"
        failed = [t for t in self.tasks if t.get("state") in FAILED_STATES]
        if failed:
            trace = (failed[0].get("trace") or "").strip().splitlines()
            return f"task {failed[0].get('id')} FAILED" + (f": {trace[0]}" if trace else "")
        return None


@dataclass(frozen=True)
class DestinationSample:
    """One destination at one moment: its partitions, and when its applier last applied a batch."""

    name: str
    taken_at: float  # epoch seconds
    partitions: tuple[PartitionLag, ...]
    last_applied_at: float | None = None  # newest `_cdc_offsets.updated_at` of the pipeline, epoch seconds
    error: str | None = None  # the destination's offsets could not be read

    @property
    def lag_messages(self) -> int:
        return sum(p.lag_messages for p in self.partitions)

    @property
    def lag_seconds(self) -> float:
        return max((p.lag_seconds(self.taken_at) for p in self.partitions), default=0.0)

    @property
    def oldest_unapplied_ts_ms(self) -> int | None:
        times = [p.oldest_unapplied_ts_ms for p in self.partitions
                 if p.lag_messages > 0 and p.oldest_unapplied_ts_ms is not None]
        return min(times) if times else None

    @property
    def applied(self) -> dict[tuple[str, int], int]:
        return {(p.topic, p.partition): p.applied_offset for p in self.partitions}


@dataclass(frozen=True)
class Verdict:
    status: str
    reason: str


def judge(history: Sequence[DestinationSample], source: SourceState | None, *, stop_after: float = 30.0) -> Verdict:
    """The status of one destination from its samples over the window (oldest first); see the module docstring."""
    if not history:
        raise ValueError("judge needs at least one sample")
    latest = history[-1]
    if source is not None and source.failure:
        return Verdict(ERROR, source.failure)
    if latest.error and latest.error.startswith(BLOCKED_PREFIX):
        return Verdict(BLOCKED, latest.error[len(BLOCKED_PREFIX):])
    if latest.error:
        return Verdict(ERROR, latest.error)
    if latest.lag_messages == 0:
        return Verdict(OK, "caught up")
    usable = [s for s in history if s.error is None]
    if len(usable) < 2:
        # Unapplied messages are never OK; one sample cannot tell a moving consumer from a stuck one.
        return Verdict(BEHIND, f"lag {latest.lag_messages} messages; one sample, no window to tell whether it moves")
    first = usable[0]
    moved = _moved(first.applied, latest.applied)
    span = latest.taken_at - first.taken_at
    if not moved:
        idle = None if latest.last_applied_at is None else latest.taken_at - latest.last_applied_at
        if idle is None:
            return Verdict(STOP, f"lag {latest.lag_messages} messages and nothing ever applied")
        if idle >= stop_after:
            return Verdict(STOP, f"lag {latest.lag_messages} messages and nothing applied for {idle:.0f} s")
        return Verdict(STALL, f"lag {latest.lag_messages} messages and the applied offsets did not move "
                              f"in {span:.0f} s")
    lags = [s.lag_messages for s in usable]
    if all(b >= a for a, b in zip(lags, lags[1:])) and lags[-1] > lags[0]:
        return Verdict(WARN, f"lag grew from {lags[0]} to {lags[-1]} messages in {span:.0f} s")
    return Verdict(BEHIND, f"applying; lag {latest.lag_messages} messages")


def _moved(before: dict[tuple[str, int], int], after: dict[tuple[str, int], int]) -> bool:
    return any(after.get(tp, 0) > offset for tp, offset in before.items()) or \
        any(tp not in before and offset > 0 for tp, offset in after.items())


def window(history: Iterable[DestinationSample], seconds: float) -> list[DestinationSample]:
    """The samples within the last `seconds` of the newest one (always at least the newest two)."""
    samples = list(history)
    if not samples:
        return samples
    newest = samples[-1].taken_at
    inside = [s for s in samples if newest - s.taken_at <= seconds + 1e-6]
    return samples[-2:] if len(inside) < 2 else inside


def report(samples: Mapping[str, Sequence[DestinationSample]], source: SourceState, *, pipeline: str,
           stop_after: float = 30.0) -> dict[str, Any]:
    """The `cdc lag --json` document (field names are a contract: see DESIGN.md, "JSON outputs")."""
    destinations = []
    for name, history in samples.items():
        latest = history[-1]
        verdict = judge(history, source, stop_after=stop_after)
        oldest = latest.oldest_unapplied_ts_ms
        destinations.append({
            "name": name,
            "status": verdict.status,
            "reason": verdict.reason,
            "lag_messages": latest.lag_messages,
            "lag_seconds": round(latest.lag_seconds, 3),
            "oldest_unapplied_commit_ts_ms": oldest,
            "last_applied_at": latest.last_applied_at,
            "sampled_at": latest.taken_at,
            "partitions": [{
                "topic": p.topic,
                "partition": p.partition,
                "applied_offset": p.applied_offset,
                "end_offset": p.end_offset,
                "lag_messages": p.lag_messages,
                "lag_seconds": round(p.lag_seconds(latest.taken_at), 3),
                "group_offset": p.group_offset,
                "oldest_unapplied_commit_ts_ms": p.oldest_unapplied_ts_ms if p.lag_messages else None,
            } for p in latest.partitions],
        })
    return {
        "pipeline": pipeline,
        "destinations": destinations,
        "source": {
            "slot_retained_bytes": source.slot_retained_bytes,
            "slot_active": source.slot_active,
            "connector_state": source.connector_state,
            "tasks": [{"id": t.get("id"), "state": t.get("state")} for t in source.tasks],
            "error": source.failure,
        },
    }


def worst(statuses: Iterable[str]) -> str:
    """The most severe status (for a one-word summary); OK when there are none."""
    order = {OK: 0, BEHIND: 1, WARN: 2, STALL: 3, STOP: 4, BLOCKED: 5, ERROR: 6}
    return max(statuses, key=lambda s: order.get(s, 0), default=OK)


@dataclass
class History:
    """A sliding window of samples per destination, kept by `--watch` and `serve` (and a longer one for charts)."""

    window_seconds: float
    keep_seconds: float = 900.0
    samples: dict[str, list[DestinationSample]] = field(default_factory=dict)

    def add(self, sample: DestinationSample) -> None:
        series = self.samples.setdefault(sample.name, [])
        series.append(sample)
        cutoff = sample.taken_at - max(self.keep_seconds, self.window_seconds)
        while len(series) > 2 and series[0].taken_at < cutoff:
            series.pop(0)

    def windows(self) -> dict[str, list[DestinationSample]]:
        return {name: window(series, self.window_seconds) for name, series in self.samples.items() if series}
