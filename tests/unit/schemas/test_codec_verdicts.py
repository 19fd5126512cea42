"""Whose fault a decode failure is (schemas.codec): the message's (Undecodable: a poison message, for `on_error`) or
the registry's (ServiceUnavailable: waited for, never dead-lettered). The registry is httpx's MockTransport
answering as a Confluent-compatible registry would: this is pure classification logic."""

import io
import json
import struct

import fastavro
import httpx
import pytest

from cdc.errors import RegistryError, ServiceUnavailable
from schemas.codec import AvroDecoder, RegistryClient, Undecodable

SCHEMA = {"type": "record", "name": "V", "fields": [{"name": "name", "type": "string"}, {"name": "n", "type": "long"}]}


def framed(schema_id: int, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(SCHEMA), record)
    return struct.pack(">bI", 0, schema_id) + buf.getvalue()


def registry(answer) -> RegistryClient:
    client = RegistryClient("http://registry.invalid/apis/ccompat/v7")
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(answer))
    return client


def known(subjects=("t.item-value",), ids=(1,)):
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/subjects"):
            return httpx.Response(200, json=list(subjects))
        schema_id = int(path.rsplit("/", 1)[1])
        if schema_id in ids:
            return httpx.Response(200, json={"schema": json.dumps(SCHEMA)})
        return httpx.Response(404, json={"error_code": 40403, "message": f"No content with id {schema_id}"})
    return answer


def test_a_good_message_decodes():
    assert AvroDecoder(registry(known())).decode(framed(1, {"name": "a", "n": 2})) == {"name": "a", "n": 2}


@pytest.mark.parametrize("data, reason", [
    (framed(987654, {"name": "a", "n": 1}), "schema id 987654 is unknown to the schema registry"),
    (b"\x00\x00\x00", "too short"),
    (b"\x01\x00\x00\x00\x01abc", "unknown magic byte 1"),
    (framed(1, {"name": "abcdef", "n": 1})[:-4], "do not read as Avro"),
    (framed(1, {"name": "a", "n": 1}) + b"\x00", "left over"),
])
def test_poison_messages_are_undecodable_and_say_why(data, reason):
    with pytest.raises(Undecodable, match=reason):
        AvroDecoder(registry(known())).decode(data)


def test_an_unknown_id_is_http_404_in_the_reason():
    with pytest.raises(Undecodable, match="HTTP 404"):
        AvroDecoder(registry(known())).decode(framed(987654, {"name": "a", "n": 1}))


def test_a_writer_schema_that_is_not_avro_is_undecodable():
    def answer(request):
        return httpx.Response(200, json={"schema": json.dumps({"type": "record", "name": "x", "fields": "nope"})})
    with pytest.raises(Undecodable, match="not an Avro schema"):
        AvroDecoder(registry(answer)).decode(framed(1, {"name": "a", "n": 1}))


def test_a_registry_answering_5xx_is_transient():
    with pytest.raises(ServiceUnavailable, match="HTTP 503"):
        AvroDecoder(registry(lambda r: httpx.Response(503, text="restarting"))).decode(framed(1, {"name": "a", "n": 1}))


def test_an_unreachable_registry_is_transient():
    def answer(request):
        raise httpx.ConnectError("connection refused", request=request)
    with pytest.raises(ServiceUnavailable, match="did not answer"):
        AvroDecoder(registry(answer)).decode(framed(1, {"name": "a", "n": 1}))


def test_a_registry_that_lost_its_storage_is_transient_not_a_verdict():
    # Every id is "unknown" to a registry that knows no subject at all: good data must not be dead-lettered for it.
    with pytest.raises(ServiceUnavailable, match="knows no subject at all"):
        AvroDecoder(registry(known(subjects=(), ids=()))).decode(framed(1, {"name": "a", "n": 1}))


def test_other_refusals_are_neither_poison_nor_transient():
    with pytest.raises(RegistryError) as caught:
        AvroDecoder(registry(lambda r: httpx.Response(401, json={"message": "unauthorized"}))).decode(
            framed(1, {"name": "a", "n": 1}))
    assert not isinstance(caught.value, ServiceUnavailable) and not isinstance(caught.value, ValueError)


def test_a_failure_is_not_cached_the_registry_may_answer_next_time():
    answers = iter([httpx.Response(503), httpx.Response(200, json={"schema": json.dumps(SCHEMA)})])
    decoder = AvroDecoder(registry(lambda r: next(answers)))
    with pytest.raises(ServiceUnavailable):
        decoder.decode(framed(1, {"name": "a", "n": 1}))
    assert decoder.decode(framed(1, {"name": "b", "n": 2})) == {"name": "b", "n": 2}
