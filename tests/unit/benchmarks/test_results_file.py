"""The benchmark harnesses' shared writers of RESULTS.md: each harness's runs land at the top of its own table,
the other harnesses' sections are left as they were, and the figures' helpers compute what their docstrings say."""

from __future__ import annotations

import math

import pytest

from benchmarks.common import (
    MARK_DETAILS,
    MARK_ROWS,
    RESULTS_PREAMBLE,
    mark,
    number,
    percentile,
    record_row,
    sustained_rate,
    write_section,
)

MARKS = ("<!-- replay runs -->", "<!-- replay details -->")
HEADER = "| date | figure |\n|---|---|\n| **target** | ≥ 1 |\n"


def test_a_section_is_added_at_the_end_then_gains_each_run_on_top(tmp_path):
    path = tmp_path / "RESULTS.md"
    apply_part = (RESULTS_PREAMBLE + "\n" + MARK_ROWS + "\n| apply row |\n\n## Details\n\n" + MARK_DETAILS
                  + "\n\napply details\n")
    path.write_text(apply_part)
    write_section(path, MARKS, "## Replay\n\n", HEADER, "### Replay: details\n\n", "| run 1 | 1 |\n", "details 1\n")
    write_section(path, MARKS, "## Replay\n\n", HEADER, "### Replay: details\n\n", "| run 2 | 2 |\n", "details 2\n")
    text = path.read_text()
    assert text.startswith(apply_part.rstrip("\n"))  # apply_bench's section untouched
    assert text.count("\n## Replay\n") == 1
    assert text.index("| run 2 | 2 |") < text.index("| run 1 | 1 |") < text.index(MARKS[1])
    assert text.index("details 2") < text.index("details 1")
    assert text.count("| **target** |") == 1


def test_a_new_file_gets_the_apply_markers_first(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section(path, MARKS, "## Replay\n\n", HEADER, "### Replay: details\n\n", "| run 1 | 1 |\n", "details 1\n")
    text = path.read_text()
    assert text.index(MARK_ROWS) < text.index(MARK_DETAILS) < text.index(MARKS[0])


def test_a_file_without_the_apply_markers_is_refused_not_rewritten(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# someone else's notes\n")
    with pytest.raises(RuntimeError, match="lacks apply_bench's markers"):
        write_section(path, MARKS, "", HEADER, "", "| run |\n", "")
    assert path.read_text() == "# someone else's notes\n"


def test_record_row_puts_the_run_under_the_header_lines(tmp_path):
    path = tmp_path / "RESULTS.md"
    section = "\n## Sync\n\n<!-- sync runs -->\n| date | s |\n|---|---|\n| **target** | < 30 s |\n"
    record_row(path, "<!-- sync runs -->", section, "| old | 2 s |", header_lines=3)
    record_row(path, "<!-- sync runs -->", section, "| new | 1 s |", header_lines=3)
    lines = path.read_text().splitlines()
    assert lines[0] == "# Benchmark results"
    table = lines[lines.index("<!-- sync runs -->") + 1:]
    assert table[:5] == ["| date | s |", "|---|---|", "| **target** | < 30 s |", "| new | 1 s |", "| old | 2 s |"]


def test_figures():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert math.isnan(percentile([], 50))
    # 100 rows: 10 seen at t=1, 90 at t=5: (90 - 10) / 4 s
    assert sustained_rate([(0.0, 0), (1.0, 10), (3.0, 50), (5.0, 90), (6.0, 100)], 100) == 20.0
    assert sustained_rate([(0.0, 0), (1.0, 50)], 100) is None  # never reached 90 %
    assert number(None) == "-" and number(math.nan) == "-" and number(12345.678, 1) == "12,345.7"
    assert mark(True) == " ✓" and mark(False) == " ✗" and mark(None) == ""
