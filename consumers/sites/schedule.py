"""When a scheduled link (`every N minutes`, `after_start`, `after_change`, back online) starts a sync round: the pure
rule (`due`), and the book of links whose last sync ended in an error (a small JSON file beside the topology file),
which blocks their automatic start until a sync is asked for by hand.

Pure apart from `ErrorBook`: `due` takes the time and the facts as arguments, so it is tested with a made-up clock.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdc.topology import SyncMode


@dataclass
class LinkState:
    """What the scheduler knows of one link (times in epoch seconds, the clock the sources' commit times use)."""

    started_at: float  # when `cdc sites run` started following the link
    last_round_at: float | None = None  # when the last sync round started
    error: str | None = None  # the last round ended in this error: no automatic start until asked by hand
    online: bool = True  # the satellite's database answered the last check
    back_online: bool = False  # it was unreachable, and answers again: sync now


def due(sync: SyncMode, state: LinkState, now: float, oldest_waiting_at: float | None) -> str | None:
    """Why a round should start now, or None. `oldest_waiting_at`: the commit time of the oldest change waiting in the
    link's topics (the lag probe's), None when nothing waits.

    Never while the last round's error stands, nor while the satellite is unreachable. Then, in this order: the
    satellite is back online; `after_start` seconds after the start (once); `every` N minutes after the last round
    started (the first round at once unless `after_start` delays it); a change waiting for `after_change` seconds.
    """
    if state.error is not None or not state.online:
        return None
    if state.back_online:
        return "back online"
    if sync.after_start is not None and state.last_round_at is None:
        return "after start" if now >= state.started_at + sync.after_start else None
    if sync.mode == "every" and sync.minutes is not None \
            and (state.last_round_at is None or now >= state.last_round_at + sync.minutes * 60):
        return f"every {sync.minutes:g} min"
    if sync.after_change is not None and oldest_waiting_at is not None \
            and now >= oldest_waiting_at + sync.after_change:
        return f"a change waiting {sync.after_change:g}s"
    return None


def error_book_path(topology_file: str | os.PathLike[str], topology: str) -> Path:
    """Where a topology's link errors are kept: `.cdc/sites-<topology>.json` beside its file."""
    return Path(topology_file).resolve().parent / ".cdc" / f"sites-{topology}.json"


class ErrorBook:
    """The links whose last sync round ended in an error: pipeline -> {error, at}. Kept in a file so that a new
    `cdc sites run` does not start them again by itself, and `cdc sites status` can say so."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise OSError(f"{self.path}: the sites' error book cannot be read: {exc}") from None
        return data if isinstance(data, dict) else {}

    def error(self, pipeline: str) -> str | None:
        entry = self.read().get(pipeline)
        return entry.get("error") if entry else None

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)  # atomic: a reader sees the old book or the new one

    def record(self, pipeline: str, error: str, at: float | None = None) -> None:
        with self._lock:
            data = self.read()
            data[pipeline] = {"error": error, "at": time.time() if at is None else at}
            self._write(data)

    def clear(self, pipeline: str) -> bool:
        with self._lock:
            data = self.read()
            if pipeline not in data:
                return False
            del data[pipeline]
            self._write(data)
            return True
