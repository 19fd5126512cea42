"""The write plan of a batch, without services: source transactions (steps) in, per-table upserts, deletes and
history rows out, as the writer (consumers/apply/writer.py) takes them; and what a replay's scope keeps or skips."""

from sqlalchemy import BigInteger, Text

from cdc.source_tables import ColumnShape, ForeignKeyShape, TableShape
from consumers.apply import plan
from consumers.apply.errors import ApplyError, located, where
from consumers.apply.events import ChangeEvent
from consumers.apply.plan import ReplayScope, net_changes
from consumers.apply.transactions import SourceUnit

PERSON = TableShape("public.person", (ColumnShape("id", BigInteger(), False), ColumnShape("name", Text(), True)),
                    ("id",))
ENROLLMENT = TableShape("public.enrollment", (ColumnShape("id", BigInteger(), False),
                                              ColumnShape("person_id", BigInteger(), False)), ("id",),
                        (ForeignKeyShape(("person_id",), "public.person", ("id",)),))
SHAPES = {"public.person": PERSON, "public.enrollment": ENROLLMENT}
TX_TOPIC = "d.transaction"


def ev(op, offset, before=None, after=None, *, table="public.person", xid="7", topic="d.person", partition=0,
       order=None, commit_ms=1_000):
    return ChangeEvent(topic=topic, partition=partition, offset=offset, table=table, op=op, key=None, before=before,
                       after=after, lsn=100 + offset, tx_id=f"{xid}:1" if xid else None,
                       tx_order=order if order is not None else offset, commit_ts_ms=commit_ms, snapshot=xid is None)


def identity(event, image):
    return dict(image) if image is not None else None


def planned(steps, scope=plan.NO_SCOPE):
    """What the writer computes before touching the database: the changes in apply order, their net changes per
    table, and the history rows."""
    events = plan.ordered_events(plan.scoped_entries(steps, scope), steps)
    return events, net_changes(events, SHAPES, identity), plan.history_rows(events, SHAPES, identity)


def two_transactions():
    first = SourceUnit([ev("c", 1, after={"id": 1, "name": "ann"}),
                  ev("c", 1, after={"id": 10, "person_id": 1}, table="public.enrollment", topic="d.enrollment")],
                 xid="7", commit_ts_ms=1_000, marker_offset=3)
    second = SourceUnit([ev("u", 2, before={"id": 1, "name": "ann"}, after={"id": 1, "name": "bob"}, xid="8"),
                   ev("d", 2, before={"id": 10, "person_id": 1}, table="public.enrollment", topic="d.enrollment",
                      xid="8")], xid="8", commit_ts_ms=2_000, marker_offset=4)
    return [first, second]


def test_a_batch_of_transactions_becomes_each_rows_last_change_per_table():
    events, [phase], history = planned(two_transactions())
    assert [(e.table, e.op) for e in events] == [("public.person", "c"), ("public.enrollment", "c"),
                                                  ("public.person", "u"), ("public.enrollment", "d")]
    assert phase.changes["public.person"].upserts == {(1,): {"id": 1, "name": "bob", "_cdc_lsn": 102}}
    assert not phase.changes["public.person"].deletes
    # Created and deleted within the batch: the delete is what is written (the row may exist from before).
    assert phase.changes["public.enrollment"].deletes == {(10,): {"id": 10, "_cdc_lsn": 102}}
    assert not phase.changes["public.enrollment"].upserts
    # The history keeps every change, a delete with its old row.
    assert [(e.op, row) for e, row in history["public.person"]] == [
        ("c", {"id": 1, "name": "ann"}), ("u", {"id": 1, "name": "bob"})]
    assert [(e.op, row) for e, row in history["public.enrollment"]] == [
        ("c", {"id": 10, "person_id": 1}), ("d", {"id": 10, "person_id": 1})]


def test_a_primary_key_update_ends_the_old_key_in_the_history():
    step = SourceUnit([ev("u", 5, before={"id": 1, "name": "a"}, after={"id": 2, "name": "a"})], xid="7",
                      marker_offset=9)
    _, _, history = planned([step])
    assert [(e.op, row["id"]) for e, row in history["public.person"]] == [("d", 1), ("u", 2)]


def test_a_table_the_history_does_not_know_is_left_out():
    step = SourceUnit([ev("c", 5, after={"id": 1}, table="public.other")], xid="7", marker_offset=9)
    events, phases, history = planned([step])
    assert [e.table for e in events] == ["public.other"]
    assert phases == [] and history == {}  # nothing to write for a table the destination does not replicate


def test_a_shadow_replay_of_some_tables_writes_only_theirs():
    scope = ReplayScope(only_tables=frozenset({"public.enrollment"}))
    events, [phase], history = planned(two_transactions(), scope)
    assert {e.table for e in events} == {"public.enrollment"}
    assert "public.person" not in phase.changes and "public.person" not in history


def test_a_partial_replay_gives_the_other_tables_only_what_they_had_not_applied():
    # person (out of scope) had applied d.person up to offset 2 (exclusive): its change at offset 1 is not applied
    # again; enrollment (replayed) takes everything.
    scope = ReplayScope(tables=frozenset({"public.enrollment"}), applied_before={("d.person", 0): 2})
    events, [phase], _ = planned(two_transactions(), scope)
    assert [(e.table, e.offset) for e in events] == [("public.enrollment", 1), ("public.person", 2),
                                                     ("public.enrollment", 2)]
    assert phase.changes["public.person"].upserts == {(1,): {"id": 1, "name": "bob", "_cdc_lsn": 102}}


def test_replay_from_a_time_skips_only_what_was_committed_before_it_and_applied():
    scope = ReplayScope(skip_before_ms=1_500, skip_applied={("d.person", 0): 5, (TX_TOPIC, 0): 8})
    assert scope.skipped("d.person", 0, 4, 1_000)  # before the time, and applied: read past
    assert not scope.skipped("d.person", 0, 5, 1_000)  # before the time, but the destination had not applied it
    assert not scope.skipped("d.person", 0, 4, 2_000)  # committed after the time
    assert not plan.NO_SCOPE.skipped("d.person", 0, 4, 1_000)
    # Keyless records: the table holds its changes up to the offsets applied before the replay.
    assert scope.applied_position("public.person", TX_TOPIC, 3) == 8
    assert plan.NO_SCOPE.applied_position("public.person", TX_TOPIC, 3) == 3
    partial = ReplayScope(tables=frozenset({"public.person"}), applied_before={(TX_TOPIC, 0): 6})
    assert partial.applied_position("public.person", TX_TOPIC, 3) == 3  # replayed: emptied, applied afresh
    assert partial.applied_position("public.enrollment", TX_TOPIC, 3) == 6  # left as it was


def test_events_keep_the_order_of_their_steps_and_a_transaction_re_sent_keeps_its_first_end_record():
    steps = two_transactions()
    steps.append(SourceUnit([ev("c", 9, after={"id": 3, "name": "c"}, xid="7")], xid="7", marker_offset=12))
    events = plan.ordered_events(plan.scoped_entries(steps, plan.NO_SCOPE), steps)
    assert [e.offset for e in events] == [1, 1, 2, 2, 9]
    assert plan.end_record_offsets(steps) == {"7": 3, "8": 4}


def test_an_apply_error_names_the_table_and_where_in_kafka():
    step = SourceUnit([ev("c", 4, after={"id": 1}), ev("c", 6, after={"id": 2})], xid="7", marker_offset=9)
    error = ApplyError(f"destination d: applying {where([step])} failed: boom", **located([step]))
    assert (error.table, error.topic, error.partition, error.offsets) == ("public.person", "d.person", 0, (4, 6))
    assert "2 changes of public.person (d.person[0]@4-6)" in str(error)
    # Two tables, two partitions: what is not one is not claimed.
    mixed = located(two_transactions())
    assert mixed == {"table": None}


# -- collapsing, and the order of writes ------------------------------------------------------------------------------

def test_changes_of_one_row_across_transactions_collapse_to_its_last_state():
    events = [ev("c", 1, after={"id": 1, "name": "a"}),
              ev("d", 2, before={"id": 1, "name": "a"}, xid="8"),
              ev("c", 3, after={"id": 1, "name": "z"}, xid="9"),  # deleted, then created again: its last state
              ev("u", 4, before={"id": 2, "name": "x"}, after={"id": 2, "name": "y"}, xid="9"),
              ev("u", 5, before={"id": 2, "name": "y"}, after={"id": 2, "name": "w"}, xid="10"),
              ev("c", 6, after={"id": 3, "name": "q"}, xid="10"),
              ev("d", 7, before={"id": 3, "name": "q"}, xid="11")]
    [phase] = net_changes(events, SHAPES, identity)
    person = phase.changes["public.person"]
    # One write per row, with the position of its last change (what an older change is compared against).
    assert person.upserts == {(1,): {"id": 1, "name": "z", "_cdc_lsn": 103},
                              (2,): {"id": 2, "name": "w", "_cdc_lsn": 105}}
    assert person.deletes == {(3,): {"id": 3, "_cdc_lsn": 107}}


SCHOOL = TableShape("public.school", (ColumnShape("id", BigInteger(), False),), ("id",))
ATTENDANCE = TableShape("public.attendance", (ColumnShape("id", BigInteger(), False),
                                              ColumnShape("enrollment_id", BigInteger(), False)), ("id",),
                        (ForeignKeyShape(("enrollment_id",), "public.enrollment", ("id",)),))
GRADED = TableShape("public.enrollment", (ColumnShape("id", BigInteger(), False),
                                          ColumnShape("person_id", BigInteger(), False),
                                          ColumnShape("school_id", BigInteger(), False)), ("id",),
                    (ForeignKeyShape(("person_id",), "public.person", ("id",)),
                     ForeignKeyShape(("school_id",), "public.school", ("id",))))


def test_upserts_go_parents_first_and_deletes_children_first():
    shapes = {"public.attendance": ATTENDANCE, "public.enrollment": GRADED, "public.person": PERSON,
              "public.school": SCHOOL}
    order = plan.dependency_order(shapes)  # the writer's upsert order; its deletes take it reversed
    assert sorted(order) == sorted(shapes)
    for child, parents in (("public.enrollment", ("public.person", "public.school")),
                           ("public.attendance", ("public.enrollment",))):
        for parent in parents:
            assert order.index(parent) < order.index(child), order  # a parent's row exists before its child's
            deletes = list(reversed(order))
            assert deletes.index(child) < deletes.index(parent), deletes  # a child's row goes before its parent's


def test_rows_of_a_self_referencing_table_are_written_parents_first_and_deleted_leaves_first():
    from consumers.apply.dialects.mariadb import children_first, parents_first, self_references

    tree = TableShape("public.node", (ColumnShape("id", BigInteger(), False),
                                      ColumnShape("parent", BigInteger(), True)), ("id",),
                      (ForeignKeyShape(("parent",), "public.node", ("id",)),))
    rows = [{"id": 3, "parent": 2}, {"id": 2, "parent": 1}, {"id": 1, "parent": None}, {"id": 4, "parent": 1}]
    # The planner's order (foreign keys checked at commit need none; row by row, MariaDB's, they do).
    assert [r["id"] for r in plan.self_referencing_order(tree, rows)] == [1, 2, 3, 4]
    order, cyclic = parents_first(rows, self_references(tree))
    written = [rows[i]["id"] for i in order]
    assert sorted(written) == [1, 2, 3, 4] and cyclic == []
    assert all(written.index(r["parent"]) < written.index(r["id"]) for r in rows if r["parent"] is not None), written
    # Deletes: in layers, no row deleted while a row still referencing it is left.
    keys = [{"id": r["id"]} for r in rows]
    stored = {(r["id"],): r for r in rows}
    layers, cyclic = children_first(keys, stored, ["id"], self_references(tree))
    assert [sorted(keys[i]["id"] for i in layer) for layer in layers] == [[3, 4], [2], [1]] and cyclic == []


def test_rows_referencing_each_other_are_set_apart_not_looped_over():
    from consumers.apply.dialects.mariadb import children_first, parents_first, self_references

    pair = TableShape("public.node", (ColumnShape("id", BigInteger(), False),
                                      ColumnShape("parent", BigInteger(), True)), ("id",),
                      (ForeignKeyShape(("parent",), "public.node", ("id",)),))
    rows = [{"id": 1, "parent": 2}, {"id": 2, "parent": 1}, {"id": 3, "parent": None}]
    order, cyclic = parents_first(rows, self_references(pair))
    assert [rows[i]["id"] for i in order] == [3] and sorted(rows[i]["id"] for i in cyclic) == [1, 2]
    layers, cyclic = children_first([{"id": r["id"]} for r in rows], {(r["id"],): r for r in rows}, ["id"],
                                    self_references(pair))
    assert layers == [[2]] and sorted(cyclic) == [0, 1]
