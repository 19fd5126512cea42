"""A client for the Kafka Connect REST API (connectors, their status and tasks, lifecycle calls and offsets), and the
secrets files a worker reads through its config provider instead of holding passwords in connector configurations."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from cdc.errors import ConnectError, ServiceUnavailable

# Connect answers 409 while the worker group rebalances; the call is safe to repeat a little later.
_RETRY_STATUSES = {409, 503}
# Spelled out here: inside ConnectClient, whose method `list` shadows the builtin, `list[...]` is not a type.
_Plugins = list[dict[str, str]]
_Offsets = list[dict[str, Any]]


@dataclass(frozen=True)
class ConnectorStatus:
    name: str
    state: str
    tasks: list[dict[str, Any]]

    @property
    def running(self) -> bool:
        return self.state == "RUNNING" and bool(self.tasks) and all(t["state"] == "RUNNING" for t in self.tasks)

    @property
    def failed_traces(self) -> list[str]:
        return [t.get("trace", "") for t in self.tasks if t.get("state") == "FAILED"]


class ConnectClient:
    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 8, backoff: float = 0.5) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)
        self._retries = retries
        self._backoff = backoff

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ConnectClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, *, connector: str | None = None, ok_missing: bool = False,
              **kwargs: Any) -> Any:
        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                if attempt == self._retries:
                    raise ServiceUnavailable(
                        f"Kafka Connect at {self.url} did not answer {method} {path}: {exc}"
                    ) from exc
            else:
                if resp.status_code in _RETRY_STATUSES and attempt < self._retries:
                    pass
                elif resp.status_code == 404 and ok_missing:
                    return None
                elif resp.is_error:
                    try:
                        message = resp.json().get("message", resp.text)
                    except ValueError:
                        message = resp.text
                    who = f"connector {connector!r}: " if connector else ""
                    raise ConnectError(
                        f"{who}{method} {path} failed with HTTP {resp.status_code}: {message}",
                        connector=connector, endpoint=path, status=resp.status_code,
                    )
                else:
                    return resp.json() if resp.content else None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    @staticmethod
    def _path(name: str, suffix: str = "") -> str:
        return f"/connectors/{quote(name, safe='')}{suffix}"

    # -- reading
    def list(self) -> list[str]:
        return self._call("GET", "/connectors")

    def config(self, name: str) -> dict[str, str] | None:
        return self._call("GET", self._path(name, "/config"), connector=name, ok_missing=True)

    def status(self, name: str) -> ConnectorStatus | None:
        data = self._call("GET", self._path(name, "/status"), connector=name, ok_missing=True)
        if data is None:
            return None
        return ConnectorStatus(name=name, state=data["connector"]["state"], tasks=data.get("tasks", []))

    def plugins(self) -> _Plugins:
        return self._call("GET", "/connector-plugins", params={"connectorsOnly": "false"})

    def offsets(self, name: str) -> dict[str, Any]:
        return self._call("GET", self._path(name, "/offsets"), connector=name)

    # -- changing
    def put_config(self, name: str, config: dict[str, str]) -> dict[str, Any]:
        """Create the connector, or update its configuration: PUT is idempotent in Connect."""
        return self._call("PUT", self._path(name, "/config"), connector=name, json=config)

    def create_stopped(self, name: str, config: dict[str, str]) -> None:
        """Create the connector in the STOPPED state: it runs no task, and its stored offsets can be reset."""
        self._call("POST", "/connectors", connector=name,
                   json={"name": name, "config": config, "initial_state": "STOPPED"})

    def pause(self, name: str) -> None:
        self._call("PUT", self._path(name, "/pause"), connector=name)

    def resume(self, name: str) -> None:
        self._call("PUT", self._path(name, "/resume"), connector=name)

    def stop(self, name: str) -> None:
        self._call("PUT", self._path(name, "/stop"), connector=name)

    def restart(self, name: str, *, include_tasks: bool = True, only_failed: bool = False) -> None:
        self._call("POST", self._path(name, "/restart"), connector=name,
                   params={"includeTasks": str(include_tasks).lower(), "onlyFailed": str(only_failed).lower()})

    def delete(self, name: str) -> bool:
        """Delete the connector; False when there was none."""
        if self.status(name) is None:
            return False
        self._call("DELETE", self._path(name), connector=name, ok_missing=True)
        return True

    def reset_offsets(self, name: str) -> None:
        """Forget a stopped connector's source offsets (Connect requires the connector to be STOPPED)."""
        self._call("DELETE", self._path(name, "/offsets"), connector=name)

    def alter_offsets(self, name: str, offsets: _Offsets) -> None:
        self._call("PATCH", self._path(name, "/offsets"), connector=name, json={"offsets": offsets})

    # -- waiting
    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.status(name)
            if current is not None and current.state == state:
                return
            time.sleep(0.3)
        raise ConnectError(f"connector {name!r} did not reach {state} within {timeout:.0f} s",
                           connector=name, endpoint=self._path(name, "/status"), status=None)

    def wait_running(self, name: str, timeout: float = 60.0) -> ConnectorStatus:
        deadline = time.monotonic() + timeout
        last: ConnectorStatus | None = None
        while time.monotonic() < deadline:
            last = self.status(name)
            if last is not None:
                if last.running:
                    return last
                if last.state == "FAILED" or last.failed_traces:
                    trace = (last.failed_traces or [""])[0]
                    raise ConnectError(
                        f"connector {name!r} failed: {trace.splitlines()[0] if trace else last.state}",
                        connector=name, endpoint=self._path(name, "/status"), status=None,
                    )
            time.sleep(0.5)
        state = f"{last.state}, tasks {[t['state'] for t in last.tasks]}" if last else "absent"
        raise ConnectError(f"connector {name!r} not running after {timeout:.0f} s ({state})",
                           connector=name, endpoint=self._path(name, "/status"), status=None)


# ---------------------------------------------------------------------------------------------------------------
# secrets files (Kafka's DirectoryConfigProvider reads `<directory>/<key>`)


def _stored(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")  # bytes: no newline translation
    except FileNotFoundError:
        return None


def changed_secrets(directory: Path, values: dict[str, str]) -> list[str]:
    """The keys whose file under `directory` is missing or holds another value (nothing is written)."""
    return [key for key, value in values.items() if _stored(directory / key) != value]


def write_secrets(directory: Path, values: dict[str, str]) -> list[str]:
    """Store each value in `<directory>/<key>`, readable by its owner only; returns the keys whose value changed.

    The directory is made 0700 and each file 0600 from its creation (never briefly readable by others), replaced
    atomically so that a Connect worker reading it meanwhile sees the old value or the new one."""
    if not values:
        return []
    changed = changed_secrets(directory, values)
    # The directory and its parent (the root of every connector's secrets) are the owner's only.
    for level in (directory.parent, directory):
        level.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(level, 0o700)
    for key in values:
        target = directory / key
        if key in changed or (target.stat().st_mode & 0o077):
            temporary = directory / f".{key}.tmp-{os.getpid()}"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(values[key].encode("utf-8"))
            os.replace(temporary, target)
    return changed


def remove_secrets(directory: Path) -> bool:
    """Forget a connector's secrets (its directory); False when there were none."""
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    return True
