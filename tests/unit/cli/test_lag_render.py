"""`cdc lag`'s table: whole topic names at 80 columns (folded, never cut) and on one line with --wide."""

from __future__ import annotations

from rich.console import Console

from cdc.cli.lag import _needed_width, render

TOPIC = "district_pipeline_with_a_long_name.public.enrollment_attendance_history"


def doc(status: str = "BEHIND") -> dict:
    part = {"topic": TOPIC, "partition": 0, "applied_offset": 10, "end_offset": 1353, "lag_messages": 1343,
            "lag_seconds": 12.5}
    return {"pipeline": "district", "destinations": [
        {"name": "state", "status": status, "reason": "lag 1343 messages", "lag_messages": 1343, "lag_seconds": 12.5,
         "partitions": [part]}],
        "source": {"slot_retained_bytes": 100, "connector_state": "RUNNING", "tasks": []}}


def printed(width: int, wide: bool = False) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(render(doc(), wide=wide), crop=not wide)
    return console.export_text()


def test_a_long_topic_name_is_folded_whole_at_80_columns():
    text = printed(80)
    assert "…" not in text
    # The name's pieces, read in order across the lines of its cell, make the whole name.
    cells = "".join(line.split("│")[3].strip() for line in text.splitlines() if line.count("│") > 4)
    assert TOPIC in cells
    assert "BEHIND" in text and "1343" in text


def test_wide_keeps_each_name_on_one_line():
    text = printed(_needed_width(doc()), wide=True)
    assert TOPIC in text and "…" not in text
