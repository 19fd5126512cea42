"""A client for the Kafka Connect REST API: connectors, their status and tasks, lifecycle calls and offsets."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from cdc.errors import ConnectError, ServiceUnavailable

# Connect answers 409 while the worker group rebalances; the call is safe to repeat a little later.
_RETRY_STATUSES = {409, 503}


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

    def __enter__(self) -> "ConnectClient":
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

    def plugins(self) -> list[dict[str, str]]:
        return self._call("GET", "/connector-plugins", params={"connectorsOnly": "false"})

    def offsets(self, name: str) -> dict[str, Any]:
        return self._call("GET", self._path(name, "/offsets"), connector=name)

    # -- changing
    def put_config(self, name: str, config: dict[str, str]) -> dict[str, Any]:
        """Create the connector, or update its configuration: PUT is idempotent in Connect."""
        return self._call("PUT", self._path(name, "/config"), connector=name, json=config)

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

    def alter_offsets(self, name: str, offsets: list[dict[str, Any]]) -> None:
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
