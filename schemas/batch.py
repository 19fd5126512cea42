"""Decoding many registry-framed Avro messages of one writer schema at once, in Rust (polars' Avro reader).

Why: fastavro reads a message at a time, about 13 µs for a Debezium envelope (its 30-odd fields, most of them in
the `source` block, each become a Python object). The applier needs five or six of those fields. Here a batch of
payloads becomes one Avro object container (header with the writer schema, one data block holding the payloads
back to back, which is exactly what a container's block is), polars decodes it into columns in Rust, and only the
columns asked for become Python objects: about 3 µs a message.

polars' reader is stricter than the Avro specification in a few places, so the schema it is handed is the writer
schema rewritten without changing what the bytes mean: named types referenced again are written out in full
(under a fresh name), and field defaults, which only matter when resolving a reader schema, are dropped. A schema
with something polars would read differently from fastavro (logical types other than decimal, decimals wider than
38 digits, maps) is never given to it: `columns` returns None and the caller decodes with fastavro, as it does
when polars rejects a batch (one undecodable message, say). The fast path is an optimisation, never a second
opinion on the data. `CDC_NO_BATCH_DECODE=1` in the environment turns it off (to compare, or as an escape hatch).
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.codec import AvroDecoder

_SYNC = b"cdc-batch-block!"  # any 16 bytes: the container's block separator
_HEADER_SIZE = 5  # Confluent framing: magic byte and a 4-byte schema id
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _zigzag(n: int) -> bytes:
    """An Avro long: zig-zag, then base-128 varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _avro_bytes(data: bytes) -> bytes:
    return _zigzag(len(data)) + data


def container_header(schema_json: str) -> bytes:
    """The header of an Avro object container file with this schema, no codec."""
    metadata = _zigzag(1) + _avro_bytes(b"avro.schema") + _avro_bytes(schema_json.encode()) + _zigzag(0)
    return b"Obj\x01" + metadata + _SYNC


class Unsupported(Exception):
    """The schema uses something polars would not read exactly as fastavro does."""


def polars_schema(schema: Any) -> dict[str, Any]:
    """The writer schema as polars will read it: same bytes, same values, or Unsupported."""
    defined: dict[str, Any] = {}
    renamed = [0]

    def walk(node: Any, namespace: str | None) -> Any:
        if isinstance(node, str):
            if node in _PRIMITIVES:
                return node
            full = node if "." in node or namespace is None else f"{namespace}.{node}"
            target = defined.get(full) or defined.get(node)
            if target is None:
                raise Unsupported(f"unknown type {node!r}")
            renamed[0] += 1
            again = copy.deepcopy(target)
            again["name"] = f"{again['name'].rsplit('.', 1)[-1]}_cdc{renamed[0]}"
            again.pop("namespace", None)
            return walk_named(again, namespace, register=False)
        if isinstance(node, list):
            return [walk(branch, namespace) for branch in node]
        if not isinstance(node, dict):
            raise Unsupported(f"unexpected schema node {node!r}")
        kind = node.get("type")
        logical = node.get("logicalType")
        if logical is not None:
            if logical != "decimal" or kind != "bytes":
                raise Unsupported(f"logical type {logical!r}")
            precision = int(node.get("precision", 0))
            if not 0 < precision <= 38:
                raise Unsupported(f"decimal of precision {precision}")
        if kind in ("record", "enum", "fixed"):
            return walk_named(node, namespace, register=True)
        if kind == "array":
            return {"type": "array", "items": walk(node["items"], namespace)}
        if kind == "map":
            raise Unsupported("map")
        if isinstance(kind, (dict, list)):
            return walk(kind, namespace)
        if kind in _PRIMITIVES:
            out = {"type": kind}
            if logical is not None:
                out.update(logicalType=logical, precision=node["precision"], scale=node.get("scale", 0))
            return out
        return walk(kind, namespace)

    def walk_named(node: dict[str, Any], namespace: str | None, *, register: bool) -> dict[str, Any]:
        name = node["name"]
        ns = node.get("namespace", namespace) if "." not in name else name.rsplit(".", 1)[0]
        full = name if "." in name or not ns else f"{ns}.{name}"
        if register:
            defined[full] = node
        out = {k: v for k, v in node.items() if k in ("type", "name", "namespace", "symbols", "size")}
        if node["type"] == "record":
            out["fields"] = [{"name": f["name"], "type": walk(f["type"], ns)} for f in node["fields"]]
        return out

    result = walk(schema, None)
    if not isinstance(result, dict) or result.get("type") != "record":
        raise Unsupported("not a record")
    return result


class BatchDecoder:
    """Columns of a batch of messages that share a writer schema; None where fastavro must do it instead."""

    def __init__(self, decoder: AvroDecoder) -> None:
        self._decoder = decoder
        self._headers: dict[int, bytes | None] = {}  # schema id -> container header, None when unsupported

    def _header(self, schema_id: int) -> bytes | None:
        if schema_id not in self._headers:
            try:
                schema = polars_schema(self._decoder.raw_schema(schema_id))
                self._headers[schema_id] = container_header(json.dumps(schema))
            except (Unsupported, KeyError, TypeError, ValueError):
                self._headers[schema_id] = None
        return self._headers[schema_id]

    def frame(self, schema_id: int, payloads: Sequence[bytes] | pa.BinaryArray) -> Any:
        """The payloads (bytes, or an Arrow binary array without nulls) decoded as one polars DataFrame (a column per
        top-level field, records as structs), or None when the batch cannot be decoded here; the caller then decodes
        message by message, which also finds the message at fault."""
        header = self._header(schema_id)
        if header is None or not len(payloads) or os.environ.get("CDC_NO_BATCH_DECODE"):
            return None
        import polars as pl  # imported on first use: a process that never applies a batch does not pay for it

        column = payloads if isinstance(payloads, pa.Array) else pa.array(payloads, pa.binary())
        body = _bodies(column)
        container = b"".join([header, _zigzag(len(payloads)), _zigzag(len(body)), body, _SYNC])
        try:
            frame = pl.read_avro(io.BytesIO(container))
        except (Exception, pl.exceptions.PanicException):  # noqa: BLE001 - any failure of the fast path falls back
            # to the exact one; a message cut short can make polars' reader panic, and a panic is a BaseException
            return None
        return frame if frame.height == len(payloads) else None

    def columns(self, schema_id: int, payloads: Sequence[bytes], paths: Sequence[tuple[str, ...]],
                arrow: Sequence[str] = ()) -> tuple[list[list[Any]], Any] | None:
        """For each path (a top-level field, or a field of a record field), its values in payload order; and the
        top-level fields named in `arrow` as an Arrow table (None when `arrow` is empty or a field is missing).
        None when the batch cannot be decoded here (see `frame`)."""
        frame = self.frame(schema_id, payloads)
        return None if frame is None else extract(frame, paths, arrow)


def _bodies(column: pa.BinaryArray) -> pa.Buffer:
    """The values of a binary array without their framing, back to back: the Arrow data buffer of the values
    sliced past their first _HEADER_SIZE bytes (no Python object per message)."""
    stripped = pc.binary_slice(column, _HEADER_SIZE, 2**31 - 1)  # an explicit end: pyarrow 26 fails without one
    offsets = np.frombuffer(stripped.buffers()[1], np.int32)
    start, end = int(offsets[stripped.offset]), int(offsets[stripped.offset + len(stripped)])
    return stripped.buffers()[2].slice(start, end - start)


def extract(frame: Any, paths: Sequence[tuple[str, ...]],
            arrow: Sequence[str] = ()) -> tuple[list[list[Any]], Any] | None:
    """`BatchDecoder.columns` of a decoded frame. A path naming a field the schema lacks gives a column of None."""
    try:
        out = []
        for path in paths:
            if path[0] not in frame.columns:
                out.append([None] * frame.height)
                continue
            series = frame.get_column(path[0])
            for name in path[1:]:
                if name not in {f.name for f in series.dtype.fields}:
                    series = None
                    break
                series = series.struct.field(name)
            out.append(series.to_list() if series is not None else [None] * frame.height)
        table = frame.select(list(arrow)).to_arrow() if arrow and set(arrow) <= set(frame.columns) else None
        return out, table
    except Exception:  # noqa: BLE001 - any failure of the fast path falls back to the exact one
        return None
