"""Net changes per row and foreign-key order (pure)."""

from sqlalchemy import BigInteger, Text

from cdc.source_tables import ColumnShape, ForeignKeyShape, TableShape
from consumers.apply.events import ChangeEvent
from consumers.apply.plan import dependency_order, net_changes, self_referencing_order

PERSON = TableShape("public.person", (ColumnShape("id", BigInteger(), False), ColumnShape("name", Text(), True),
                                       ColumnShape("bio", Text(), True)), ("id",))
ENROLLMENT = TableShape("public.enrollment", (ColumnShape("id", BigInteger(), False),
                                              ColumnShape("person_id", BigInteger(), False)), ("id",),
                        (ForeignKeyShape(("person_id",), "public.person", ("id",)),))
SHAPES = {"public.person": PERSON, "public.enrollment": ENROLLMENT}


def ev(op, lsn, before=None, after=None, table="public.person"):
    return ChangeEvent(topic="t", partition=0, offset=lsn, table=table, op=op, key=None, before=before, after=after,
                       lsn=lsn, tx_id="1:1", tx_order=lsn, commit_ts_ms=0, snapshot=False)


def identity(event, image):
    return dict(image) if image is not None else None


def test_each_row_keeps_only_its_last_change():
    [phase] = net_changes([
        ev("c", 1, after={"id": 1, "name": "a", "bio": "x"}),
        ev("u", 2, before={"id": 1}, after={"id": 1, "name": "b", "bio": "x"}),
        ev("c", 3, after={"id": 2, "name": "c", "bio": None}),
        ev("d", 4, before={"id": 2, "name": "c", "bio": None}),
    ], SHAPES, identity)
    person = phase.changes["public.person"]
    assert person.upserts == {(1,): {"id": 1, "name": "b", "bio": "x", "_cdc_lsn": 2}}
    assert person.deletes == {(2,): {"id": 2, "_cdc_lsn": 4}}


def test_an_unchanged_toasted_value_is_taken_from_earlier_in_the_batch_or_the_before_image():
    from consumers.apply.values import UNAVAILABLE

    [phase] = net_changes([
        ev("u", 1, before={"id": 1, "name": "a", "bio": "long"}, after={"id": 1, "name": "b", "bio": UNAVAILABLE}),
        ev("u", 2, before={"id": 2, "name": "a", "bio": UNAVAILABLE}, after={"id": 2, "name": "b", "bio": UNAVAILABLE}),
    ], SHAPES, identity)
    upserts = phase.changes["public.person"].upserts
    assert upserts[(1,)]["bio"] == "long"
    assert upserts[(2,)]["bio"] is UNAVAILABLE  # left alone at the destination


def test_truncate_splits_the_batch_into_phases():
    phases = net_changes([ev("c", 1, after={"id": 1, "name": "a", "bio": None}), ev("t", 2),
                          ev("c", 3, after={"id": 2, "name": "b", "bio": None})], SHAPES, identity)
    assert [list(p.changes["public.person"].upserts) for p in phases] == [[(1,)], [(2,)]]
    assert phases[1].truncate_first == ["public.person"]


def test_parents_come_first_and_cycles_do_not_loop():
    assert dependency_order(SHAPES) == ["public.person", "public.enrollment"]
    edges = {"a": {"b"}, "b": {"c"}, "c": {"b"}, "d": {"a"}}
    shapes = {n: TableShape(n, (), ("id",)) for n in "abcd"}
    order = dependency_order(shapes, edges)
    assert order.index("b") < order.index("a") < order.index("d") and order.index("c") < order.index("a")


def test_long_reference_chains_do_not_exhaust_the_stack():
    shapes = {f"t{i:05}": TableShape(f"t{i:05}", (), ("id",)) for i in range(3000)}
    edges = {f"t{i:05}": {f"t{i + 1:05}"} for i in range(2999)}
    assert dependency_order(shapes, edges)[0] == "t02999"


def test_self_referencing_rows_follow_their_parent():
    tree = TableShape("public.node", (ColumnShape("id", BigInteger(), False),
                                      ColumnShape("parent", BigInteger(), True)), ("id",),
                      (ForeignKeyShape(("parent",), "public.node", ("id",)),))
    rows = [{"id": 3, "parent": 2}, {"id": 2, "parent": 1}, {"id": 1, "parent": None}, {"id": 4, "parent": 99}]
    assert [r["id"] for r in self_referencing_order(tree, rows)] == [1, 2, 3, 4]


def test_a_primary_key_update_sent_as_one_update_deletes_the_old_key():
    [phase] = net_changes([ev("u", 5, before={"id": 1, "name": "a", "bio": None},
                              after={"id": 9, "name": "a", "bio": None})], SHAPES, identity)
    person = phase.changes["public.person"]
    assert list(person.upserts) == [(9,)] and person.deletes == {(1,): {"id": 1, "_cdc_lsn": 5}}


def test_a_table_without_a_key_keeps_every_change_in_order_with_whole_before_images():
    from consumers.apply.plan import KeylessChange
    from consumers.apply.values import UNAVAILABLE

    log = TableShape("public.log", (ColumnShape("who", Text(), True), ColumnShape("what", Text(), True)), ())
    same = {"who": "a", "what": "x"}
    phases = net_changes([
        ev("c", 1, after=dict(same), table="public.log"),
        ev("c", 2, after=dict(same), table="public.log"),  # a duplicate: both stay
        ev("u", 3, before=dict(same), after={"who": "a", "what": UNAVAILABLE}, table="public.log"),
        ev("d", 4, before={"who": "a", "what": "x"}, table="public.log"),
        ev("t", 5, table="public.log"),
        ev("c", 6, after={"who": "b", "what": None}, table="public.log"),
    ], {"public.log": log}, identity)
    assert [p.keyless["public.log"] for p in phases if p.keyless] == [[
        KeylessChange("insert", None, {**same, "_cdc_lsn": 1}),
        KeylessChange("insert", None, {**same, "_cdc_lsn": 2}),
        # The unchanged TOASTed value comes from the old row, which names the one row the update changes.
        KeylessChange("update", same, {**same, "_cdc_lsn": 3}),
        KeylessChange("delete", same, None),
    ], [KeylessChange("insert", None, {"who": "b", "what": None, "_cdc_lsn": 6})]]
    assert phases[1].truncate_first == ["public.log"] and not phases[0].changes
