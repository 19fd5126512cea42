"""Unit tests of ChangeEvent construction from Debezium envelopes."""

import pytest

from consumers.apply.events import from_envelope


def envelope(op, before=None, after=None, snapshot="false", tx=None):
    return {
        "op": op, "before": before, "after": after, "ts_ms": 2,
        "source": {"schema": "public", "table": "person", "lsn": 1234, "txId": 77, "ts_ms": 1700000000000,
                   "snapshot": snapshot},
        "transaction": tx,
    }


def test_update_carries_images_position_and_transaction():
    e = from_envelope(envelope("u", {"id": 1, "n": "a"}, {"id": 1, "n": "b"},
                               tx={"id": "77:1234", "total_order": 3, "data_collection_order": 1}),
                      {"id": 1}, topic="p.person", partition=2, offset=9)
    assert (e.table, e.op, e.lsn, e.tx_id, e.tx_order) == ("public.person", "u", 1234, "77:1234", 3)
    assert e.row == {"id": 1, "n": "b"} and not e.snapshot
    assert e.commit_time.year == 2023


def test_delete_row_is_the_before_image_and_snapshot_reads_are_flagged():
    assert from_envelope(envelope("d", before={"id": 5}), None, topic="t", partition=0, offset=0).row == {"id": 5}
    assert from_envelope(envelope("r", after={"id": 5}, snapshot="first"), None, topic="t", partition=0,
                         offset=0).snapshot


@pytest.mark.parametrize("value, message", [({"op": "c"}, "missing 'source'"), (envelope("x"), "unknown Debezium op")])
def test_malformed_envelopes_name_the_problem(value, message):
    with pytest.raises(ValueError, match=message):
        from_envelope(value, None, topic="t", partition=0, offset=0)
