"""`cdc verify`'s summary as text (one line per table and an overall accuracy) and as a one-page HTML report."""

from __future__ import annotations

from consumers.ops.verify import Report, TableReport


def render(report: Report) -> str:
    """The verification summary as a table, one line per table and an overall accuracy."""
    width = max([28] + [len(t.table) for t in report.tables])
    lines = [f"Verification summary: destination {report.destination}",
             f"{'table':{width}} {'source':>9} {'destination':>11} {'missing':>8} {'extra':>6} {'different':>9} "
             f"{'accuracy':>9}"]
    for t in report.tables:
        if t.error:
            lines.append(f"{t.table:{width}} ERROR: {t.error}")
            continue
        lines.append(f"{t.table:{width}} {t.source_rows:9} {t.destination_rows:11} {len(t.missing):8} "
                     f"{len(t.extra):6} {len(t.different):9} {t.accuracy:9.2%}" + ("  (no key: rows)" if t.keyless
                                                                                  else ""))
    for t in report.tables:
        if t.history is not None:
            lines.append(_history_line(t, width))
    distinct = sum(t.distinct_keys for t in report.tables if not t.error)
    matching = sum(t.source_rows - len(t.missing) - len(t.different) for t in report.tables if not t.error)
    overall = 1.0 if distinct == 0 else matching / distinct
    errors = sum(1 for t in report.tables if t.error)
    shown = f"{overall:.2%}" if errors < len(report.tables) else "n/a"
    histories = sum(1 for t in report.tables if t.history is not None and not t.history.equal)
    lines.append(f"overall accuracy {shown}: {'equal' if report.equal else 'DIFFERENT'}"
                 + (f"; {errors} table(s) could not be compared" if errors else "")
                 + (f"; {histories} history table(s) with problems" if histories else ""))
    return "\n".join(lines)


def _history_line(t: TableReport, width: int) -> str:
    h = t.history
    assert h is not None  # called for tables whose history was checked
    head = f"{t.table:{width}} history {h.table}: "
    if h.error:
        return head + f"ERROR: {h.error}"
    parts = [f"{h.rows} rows", f"{h.duplicates} duplicate row(s)" + (
        f" (e.g. keys {', '.join(map(str, h.duplicate_keys[:5]))})" if h.duplicates else "")]
    if h.checked:
        parts.append(f"{h.inconsistent} key(s) not replaying to the current state" + (
            " (e.g. " + "; ".join(f"{k}: {w}" for k, w in list(zip(h.inconsistent_keys, h.why))[:5]) + ")"
            if h.inconsistent else ""))
    if h.note:
        parts.append(h.note)
    return head + ", ".join(parts) + ("" if h.equal else "  DIFFERENT")


def render_html(report: Report) -> str:
    """The verification summary as a one-page HTML report."""
    import html as _html

    rows = "".join(
        f"<tr><td>{_html.escape(t.table)}</td><td>{t.source_rows}</td><td>{t.destination_rows}</td>"
        f"<td>{len(t.missing)}</td><td>{len(t.extra)}</td><td>{len(t.different)}</td><td>{t.accuracy:.2%}</td>"
        f"<td>{_html.escape(t.error or '')}</td></tr>"
        for t in report.tables)
    rows += "".join(f"<tr><td colspan=8>{_html.escape(_history_line(t, 0))}</td></tr>"
                    for t in report.tables if t.history is not None)
    keys = "".join(
        f"<h3>{_html.escape(t.table)}</h3><p>missing: {_html.escape(str(t.missing[:200]))}<br>"
        f"extra: {_html.escape(str(t.extra[:200]))}<br>"
        f"different: {_html.escape(str(t.different[:200]))}</p>"
        for t in report.tables if not t.equal)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Verification summary</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;
padding:.2em .6em}}</style></head><body><h1>Verification summary: destination {_html.escape(report.destination)}</h1>
<table><tr><th>table</th><th>source</th><th>destination</th><th>missing</th><th>extra</th><th>different</th>
<th>accuracy</th><th>error</th></tr>{rows}</table>
<p><b>{'equal' if report.equal else 'DIFFERENT'}</b></p>{keys}</body></html>"""
