"""The lag arithmetic and the status rules over a window (pure: no services)."""

from __future__ import annotations

import pytest

from consumers.lag.status import (
    BEHIND,
    ERROR,
    OK,
    STALL,
    STOP,
    WARN,
    DestinationSample,
    History,
    PartitionLag,
    SourceState,
    applied_offset,
    judge,
    partition_lag_seconds,
    report,
    window,
    worst,
)

RUNNING = SourceState("RUNNING", ({"id": 0, "state": "RUNNING"},), slot_retained_bytes=1024, slot_active=True)
NOW = 1_700_000_000.0


def sample(t: float, offsets: dict[int, tuple[int, int]], *, last_applied: float | None = None,
           oldest_ms: int | None = None, error: str | None = None, name: str = "state") -> DestinationSample:
    """offsets: partition -> (applied, end); every lagging partition's oldest change was committed at oldest_ms."""
    parts = tuple(PartitionLag("p.person", p, a, e, oldest_ms if e > a else None) for p, (a, e) in offsets.items())
    return DestinationSample(name, NOW + t, parts, NOW + t - 1 if last_applied is None else last_applied, error)


def test_lag_in_messages_is_end_minus_applied_never_negative():
    assert PartitionLag("t", 0, 5, 12).lag_messages == 7
    assert PartitionLag("t", 0, 12, 12).lag_messages == 0
    assert PartitionLag("t", 0, 13, 12).lag_messages == 0


def test_applied_offset_falls_back_to_the_log_start():
    assert applied_offset(None, 0) == 0
    assert applied_offset(None, 40) == 40
    assert applied_offset(55, 40) == 55
    assert applied_offset(10, 40) == 40  # retention removed what was never applied: the applier starts at 40


def test_lag_seconds_is_measured_from_the_oldest_unapplied_commit():
    assert partition_lag_seconds(3, int((NOW - 12.5) * 1000), NOW) == pytest.approx(12.5)
    # caught up, or idle: zero, never undefined
    assert partition_lag_seconds(0, None, NOW) == 0.0
    assert partition_lag_seconds(0, int((NOW - 500) * 1000), NOW) == 0.0
    # a source clock ahead of ours never gives negative lag
    assert partition_lag_seconds(1, int((NOW + 5) * 1000), NOW) == 0.0


def test_a_destination_sums_messages_and_takes_the_oldest_change_for_seconds():
    parts = (PartitionLag("a", 0, 0, 4, int((NOW - 10) * 1000)), PartitionLag("a", 1, 3, 3, None),
             PartitionLag("tx", 0, 2, 5, int((NOW - 30) * 1000)))
    s = DestinationSample("state", NOW, parts)
    assert s.lag_messages == 7
    assert s.lag_seconds == pytest.approx(30)
    assert s.oldest_unapplied_ts_ms == int((NOW - 30) * 1000)


def test_an_idle_caught_up_destination_is_ok_even_when_nothing_runs():
    history = [sample(0, {0: (10, 10)}, last_applied=NOW - 3600), sample(5, {0: (10, 10)}, last_applied=NOW - 3600)]
    verdict = judge(history, RUNNING)
    assert verdict.status == OK
    assert history[-1].lag_seconds == 0.0


def test_lag_that_does_not_move_with_a_recent_apply_is_stall():
    history = [sample(0, {0: (10, 20)}, last_applied=NOW - 2, oldest_ms=int((NOW - 3) * 1000)),
               sample(5, {0: (10, 25)}, last_applied=NOW - 2, oldest_ms=int((NOW - 3) * 1000))]
    assert judge(history, RUNNING, stop_after=30).status == STALL


def test_lag_that_does_not_move_and_no_apply_for_long_is_stop():
    history = [sample(0, {0: (10, 20)}, last_applied=NOW - 100), sample(5, {0: (10, 20)}, last_applied=NOW - 100)]
    verdict = judge(history, RUNNING, stop_after=30)
    assert verdict.status == STOP
    assert "105 s" in verdict.reason


def test_lag_with_nothing_ever_applied_is_stop():
    history = [sample(0, {0: (0, 20)}), sample(5, {0: (0, 20)})]
    history = [DestinationSample(s.name, s.taken_at, s.partitions, None) for s in history]
    assert judge(history, RUNNING).status == STOP


def test_moving_offsets_with_lag_growing_at_every_sample_is_warn():
    history = [sample(0, {0: (10, 20)}), sample(2, {0: (15, 30)}), sample(4, {0: (20, 40)})]
    assert judge(history, RUNNING).status == WARN


def test_moving_offsets_with_lag_shrinking_somewhere_is_behind_never_ok():
    history = [sample(0, {0: (10, 20)}), sample(2, {0: (18, 22)}), sample(4, {0: (20, 40)})]
    assert judge(history, RUNNING).status == BEHIND
    steady = [sample(0, {0: (10, 20)}), sample(2, {0: (20, 30)})]
    verdict = judge(steady, RUNNING)
    assert verdict.status == BEHIND and "10 messages" in verdict.reason


def test_a_failed_task_or_connector_is_error_whatever_the_lag():
    history = [sample(0, {0: (10, 10)}), sample(5, {0: (10, 10)})]
    failed_task = SourceState("RUNNING", ({"id": 0, "state": "FAILED", "trace": "org.postgresql.util.PSQLException: "
                                           "Connection refused\n\tat ..."},))
    verdict = judge(history, failed_task)
    assert verdict.status == ERROR and "Connection refused" in verdict.reason
    assert judge(history, SourceState("FAILED")).status == ERROR
    assert judge(history, SourceState("MISSING")).status == ERROR
    assert judge(history, SourceState("UNKNOWN", error="timed out")).status == ERROR
    assert judge(history, SourceState("PAUSED")).status == OK


def test_an_unreadable_destination_is_error():
    history = [sample(0, {}, error="destination state cannot be read: connection refused")]
    assert judge(history, RUNNING).status == ERROR


def test_one_sample_cannot_say_stall_or_stop_but_is_never_ok_while_behind():
    # `cdc lag --window 0` said OK while 1,343 messages behind.
    verdict = judge([sample(0, {0: (10, 1353)}, last_applied=NOW - 1000)], RUNNING)
    assert verdict.status == BEHIND and "1343 messages" in verdict.reason
    assert judge([sample(0, {0: (10, 10)}, last_applied=NOW - 1000)], RUNNING).status == OK


def test_the_window_keeps_recent_samples_and_at_least_two():
    samples = [sample(t, {0: (10, 10)}) for t in (0, 10, 20, 21, 22)]
    assert [s.taken_at - NOW for s in window(samples, 5)] == [20, 21, 22]
    assert [s.taken_at - NOW for s in window(samples[:2], 5)] == [0, 10]


def test_history_slides():
    h = History(window_seconds=5, keep_seconds=10)
    for t in range(0, 30, 2):
        h.add(sample(t, {0: (t, t)}))
    assert h.samples["state"][0].taken_at >= NOW + 28 - 10
    assert [s.taken_at - NOW for s in h.windows()["state"]] == [24, 26, 28]


def test_the_json_report_has_the_contract_field_names():
    history = [sample(0, {0: (10, 20), 1: (5, 5)}, last_applied=NOW - 100, oldest_ms=int((NOW - 40) * 1000)),
               sample(5, {0: (10, 20), 1: (5, 5)}, last_applied=NOW - 100, oldest_ms=int((NOW - 40) * 1000))]
    doc = report({"state": history}, RUNNING, pipeline="district")
    assert set(doc) >= {"destinations", "source"}
    assert set(doc["source"]) >= {"slot_retained_bytes", "connector_state"}
    dest = doc["destinations"][0]
    assert set(dest) >= {"name", "status", "lag_messages", "lag_seconds", "partitions"}
    assert dest["status"] == STOP and dest["lag_messages"] == 10 and dest["lag_seconds"] == pytest.approx(45)
    part = dest["partitions"][0]
    assert set(part) >= {"topic", "partition", "applied_offset", "end_offset", "lag_messages", "lag_seconds"}
    assert [p["lag_seconds"] for p in dest["partitions"]] == [pytest.approx(45), 0.0]
    assert doc["source"]["slot_retained_bytes"] == 1024 and doc["source"]["connector_state"] == "RUNNING"


def test_worst():
    assert worst([OK, STALL, WARN]) == STALL
    assert worst([OK, BEHIND]) == BEHIND and worst([BEHIND, WARN]) == WARN
    assert worst([]) == OK
