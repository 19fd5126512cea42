"""Helpers that turn a library's optional results into the value the code relies on, or into an error that says
what was missing (instead of a TypeError on None further on)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaException, Message

from cdc.kafka import position
from producers.source_admin import one_row


class Cursor:
    def __init__(self, row):
        self.row = row

    def fetchone(self):
        return self.row


def test_one_row_gives_the_row_unchanged():
    assert one_row(Cursor((7, "x")), "select 7, 'x'") == (7, "x")
    assert one_row(Cursor({"n": 1}), "a dict row") == {"n": 1}  # a row factory's row is not turned into a tuple


def test_one_row_names_what_returned_nothing():
    with pytest.raises(RuntimeError, match="no row for the current database in pg_database"):
        one_row(Cursor(None), "the current database in pg_database")


def test_position_of_a_consumed_message():
    assert position(Message(topic="p.public.item", partition=2, offset=41)) == ("p.public.item", 2, 41)


def test_a_message_without_a_position_is_an_error_not_none():
    with pytest.raises(KafkaException, match="without a position: topic p.public.item, partition 2, offset None"):
        position(Message(topic="p.public.item", partition=2))
