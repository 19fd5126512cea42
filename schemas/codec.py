"""Registry-framed Avro decoding: writer schemas fetched by id from a Confluent-compatible registry, parsed once.

What a message that cannot be decoded raises says whose fault it is, because the applier's `on_error` policy rests on
it: `Undecodable` (a ValueError) for the message itself (framing too short or not magic byte 0, a schema id the
registry answers 404 for, a writer schema that is not Avro, bytes that do not read with their writer schema): a
poison message, dead-lettered or stopped on. `ServiceUnavailable` (transient) when the registry cannot be reached,
answers 5xx, or knows no subject at all (it lost its storage: every id would be "unknown", and good data must not
be dead-lettered for that): retried. Any other refusal of the registry (401, 403...) is a RegistryError: neither.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from typing import Any

import fastavro
import httpx

from cdc.errors import RegistryError, ServiceUnavailable

MAGIC = 0
_HEADER = struct.Struct(">bI")


class Undecodable(ValueError):
    """This message cannot be decoded, whatever happens to the registry (a poison message). The message says why."""



class RegistryClient:
    """The few calls of the Confluent-compatible API (`/apis/ccompat/v7` on Apicurio) that consumers need."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str) -> Any:
        try:
            resp = self._http.get(path)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"schema registry at {self.url} did not answer GET {path}: {exc}") from exc
        if resp.is_error:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            if resp.status_code >= 500:
                raise ServiceUnavailable(f"schema registry GET {path} failed with HTTP {resp.status_code}: "
                                         f"{body.get('message', resp.text[:300])}")
            raise RegistryError(
                f"schema registry GET {path} failed with HTTP {resp.status_code}: "
                f"{body.get('message', resp.text)}",
                status=resp.status_code,
                error_code=body.get("error_code"),
            )
        return resp.json()

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        return json.loads(self._get(f"/schemas/ids/{schema_id}")["schema"])

    def subjects(self) -> list[str]:
        return self._get("/subjects")

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """Register (or find) a schema under a subject; returns its id."""
        try:
            resp = self._http.post(f"/subjects/{subject}/versions", json={"schema": json.dumps(schema)},
                                   headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"schema registry at {self.url} did not answer: {exc}") from exc
        if resp.is_error:
            raise RegistryError(f"registering a schema under {subject!r} failed with HTTP {resp.status_code}: "
                                f"{resp.text}", status=resp.status_code)
        return int(resp.json()["id"])


class AvroDecoder:
    """Decodes Confluent-framed Avro (magic byte 0, 4-byte schema id, Avro binary).

    Each writer schema is fetched and parsed once per id; the hot path only slices bytes and reads Avro.
    """

    def __init__(self, registry: RegistryClient) -> None:
        self._registry = registry
        self._schemas: dict[int, Any] = {}
        self._raw: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def writer_schema(self, schema_id: int) -> Any:
        """The parsed writer schema of an id. Raises Undecodable when the registry does not know the id (404) or
        holds something that is not an Avro schema under it, ServiceUnavailable when it cannot tell (see the
        module's docstring). Failures are not cached: the registry may answer next time."""
        parsed = self._schemas.get(schema_id)
        if parsed is None:
            with self._lock:
                parsed = self._schemas.get(schema_id)
                if parsed is None:
                    raw = self._fetch(schema_id)
                    try:
                        parsed = fastavro.parse_schema(raw)
                    except Exception as exc:  # noqa: BLE001 - fastavro's parse errors share no base class
                        raise Undecodable(f"the writer schema of id {schema_id} is not an Avro schema fastavro "
                                          f"reads: {type(exc).__name__}: {exc}") from exc
                    self._raw[schema_id] = raw
                    self._schemas[schema_id] = parsed
        return parsed

    def _fetch(self, schema_id: int) -> dict[str, Any]:
        try:
            return self._registry.schema_by_id(schema_id)
        except RegistryError as exc:
            if exc.status != 404:
                raise
            # 404 for the id: a poison message, unless the registry lost everything (then every id is "unknown").
            if not self._registry.subjects():
                raise ServiceUnavailable(
                    f"schema registry at {self._registry.url} answers 404 for schema id {schema_id} and knows no "
                    "subject at all: it seems to have lost its storage (restore it, or restart it with its "
                    "database)") from exc
            raise Undecodable(f"schema id {schema_id} is unknown to the schema registry ({exc})") from exc
        except ValueError as exc:  # the registry's answer is not the JSON of a schema
            raise Undecodable(f"the schema registry's answer for schema id {schema_id} is not a schema: "
                              f"{exc}") from exc

    def raw_schema(self, schema_id: int) -> dict[str, Any]:
        """The writer schema as the registry holds it (JSON data, named types referenced by name)."""
        self.writer_schema(schema_id)
        return self._raw[schema_id]

    @staticmethod
    def schema_id(data: bytes) -> int:
        if len(data) < _HEADER.size:
            raise Undecodable(f"{len(data)} bytes is too short for a registry-framed Avro message")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise Undecodable(f"unknown magic byte {magic} (expected {MAGIC}: Confluent-framed Avro)")
        return schema_id

    def decode(self, data: bytes | None) -> Any:
        """The decoded record, or None for a null payload (a tombstone). Raises Undecodable for a poison message,
        ServiceUnavailable when the registry cannot say (see the module's docstring)."""
        if data is None:
            return None
        schema_id = self.schema_id(data)
        schema = self.writer_schema(schema_id)
        body = io.BytesIO(memoryview(data)[_HEADER.size:])
        try:
            record = fastavro.schemaless_reader(body, schema, None)
        except Exception as exc:  # noqa: BLE001 - reading bytes in memory has no transient failure: whatever fastavro
            # raises on a truncated or garbled message (EOFError, IndexError, ValueError, MemoryError...) is its fault
            raise Undecodable(f"the bytes do not read as Avro of writer schema {schema_id}: "
                              f"{type(exc).__name__}: {exc}") from exc
        left = len(data) - _HEADER.size - body.tell()
        if left:
            raise Undecodable(f"{left} byte(s) left over after reading Avro of writer schema {schema_id}")
        return record

    @property
    def cached_ids(self) -> list[int]:
        return sorted(self._schemas)


def load_schema(name: str) -> dict[str, Any]:
    """One of the project's own schemas (schemas/<name>.avsc), as data."""
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parent / f"{name}.avsc").read_text())


class AvroEncoder:
    """Confluent-framed Avro for one of our own record types; the schema is registered once."""

    def __init__(self, registry: RegistryClient, subject: str, schema: dict[str, Any]) -> None:
        self._parsed = fastavro.parse_schema(schema)
        self._id = registry.register(subject, schema)

    def encode(self, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(_HEADER.pack(MAGIC, self._id))
        fastavro.schemaless_writer(buf, self._parsed, record)
        return buf.getvalue()
