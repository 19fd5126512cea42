"""Registry-framed Avro decoding: writer schemas fetched by id from a Confluent-compatible registry, parsed once, cached."""

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
        parsed = self._schemas.get(schema_id)
        if parsed is None:
            with self._lock:
                parsed = self._schemas.get(schema_id)
                if parsed is None:
                    raw = self._registry.schema_by_id(schema_id)
                    parsed = fastavro.parse_schema(raw)
                    self._raw[schema_id] = raw
                    self._schemas[schema_id] = parsed
        return parsed

    def raw_schema(self, schema_id: int) -> dict[str, Any]:
        """The writer schema as the registry holds it (JSON data, named types referenced by name)."""
        self.writer_schema(schema_id)
        return self._raw[schema_id]

    @staticmethod
    def schema_id(data: bytes) -> int:
        if len(data) < _HEADER.size:
            raise ValueError(f"{len(data)} bytes is too short for a registry-framed Avro message")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"unknown magic byte {magic} (expected {MAGIC}: Confluent-framed Avro)")
        return schema_id

    def decode(self, data: bytes | None) -> Any:
        """The decoded record, or None for a null payload (a tombstone)."""
        if data is None:
            return None
        schema = self.writer_schema(self.schema_id(data))
        return fastavro.schemaless_reader(io.BytesIO(memoryview(data)[_HEADER.size:]), schema, None)

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
