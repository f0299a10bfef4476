"""POST /v1/<type> with an in-memory sink: statuses, bodies, and what is produced where."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from devkit.samples import curl_bodies
from gateway.config import Settings
from gateway.errors import KafkaUnavailable
from gateway.kafka.messages import (
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_MAX_ERROR_CHARS,
    Framer,
    Message,
)
from gateway.kafka.sink import MAX_MESSAGE_BYTES
from gateway.schemas import load_record_types
from gateway.sink import Context, MemorySink, Rejected
from tests.support.app import Gateway, GatewayClient, gateway_settings
from tests.support.keys import KeyFile, json_headers
from tests.support.rawhttp import connection
from tests.support.records import DEAD, sample

LIMIT = 256 * 1024
UNSUPPORTED = "unsupported_media_type"


@pytest.fixture
async def gw(gateway_client: GatewayClient, key_file: KeyFile) -> Gateway:
    sink = MemorySink()
    client = await gateway_client(
        gateway_settings(keys_file=key_file.path, max_body_bytes=LIMIT), sink=sink
    )
    return Gateway(client, key_file, sink=sink)


@pytest.mark.parametrize("name", ["activity", "log", "profile"])
async def test_a_valid_batch_is_200_and_produced_with_headers(gw: Gateway, name: str) -> None:
    status, body, resp = await gw.post(f"/v1/{name}", curl_bodies()[name])
    assert (status, body) == (200, {"accepted": 1})
    (message,) = gw.produced().get(f"cafe.{name}", [])
    sent = orjson.loads(curl_bodies()[name])["records"][0]
    assert message.key == sent["sessionId"].encode()
    assert orjson.loads(message.value) == sent
    headers = dict(message.headers or ())
    assert headers["cafe-key-id"] == gw.key_file.record.id.encode()
    assert headers["cafe-client-ip"] == b"127.0.0.1"
    assert headers["cafe-schema"] == name.encode()
    assert headers["cafe-schema-version"] == b"1"
    assert headers["cafe-request-id"] == resp.headers["X-Request-Id"].encode()
    assert headers["cafe-received-at"].endswith(b"Z")
    assert gw.key_file.key.encode() not in message.value + b"".join(headers.values())


async def test_format_versions_side_by_side_in_one_request(gw: Gateway) -> None:
    """Each record is judged by the version it names and says so in its headers; a version
    the gateway does not know is a dead letter with its own reason."""
    v2 = {"messageFormatVersion": 2, "eventValue": 12.5, "referrer": "https://a.example/"}
    batch: list[Any] = [
        sample("activity", eventId="v1"),
        sample("activity", eventId="v2", **v2),
        sample("activity", eventId="v2-as-float", messageFormatVersion=2.0),
        sample("activity", eventId="v1-with-a-v2-field", eventValue=1),
        sample("activity", eventId="v7", messageFormatVersion=7),
        sample("activity", eventId="v1-again"),
        sample("activity", eventId="v2-bad", **{**v2, "eventValue": "12.5"}),
    ]
    status, body, _ = await gw.post("/v1/activity", {"records": batch})
    assert (status, body["accepted"]) == (207, 4), body
    assert [(r["index"], r["reason"], r["errors"][0]["pointer"]) for r in body["rejections"]] == [
        (3, "invalid", ""),
        (4, "unknown_format_version", "/messageFormatVersion"),
        (6, "invalid", "/eventValue"),
    ]
    assert body["rejections"][1]["errors"][0]["message"] == (
        "record.messageFormatVersion must be a version of activity this gateway knows: 1, 2"
    )
    produced = gw.produced()
    versions = [
        (orjson.loads(m.value)["eventId"], dict(m.headers or ()).get("cafe-schema-version"))
        for m in produced["cafe.activity"]
    ]
    assert versions == [("v1", b"1"), ("v2", b"2"), ("v2-as-float", b"2"), ("v1-again", b"1")]
    dead = {orjson.loads(m.value)["eventId"]: dict(m.headers or ()) for m in produced[DEAD]}
    assert dead["v1-with-a-v2-field"]["cafe-schema-version"] == b"1"
    assert dead["v2-bad"]["cafe-schema-version"] == b"2"
    assert "cafe-schema-version" not in dead["v7"]
    assert dead["v7"]["cafe-reject-reason"] == b"unknown_format_version"
    # Every record of one request and version shares one context.
    contexts = {id(r.context) for r in gw.sink.records["activity"]}
    assert len(contexts) == 2


async def test_order_within_a_batch_is_kept(gw: Gateway) -> None:
    batch = [sample("log", logMessage=f"line {i}") for i in range(500)]
    status, body, _ = await gw.post("/v1/log", {"records": batch})
    assert (status, body) == (200, {"accepted": 500})
    assert [orjson.loads(m.value)["logMessage"] for m in gw.produced().get("cafe.log", [])] == [
        f"line {i}" for i in range(500)
    ]


async def test_a_mixed_batch_is_207_and_rejects_go_to_the_dead_letter_topic(gw: Gateway) -> None:
    batch: list[Any] = [
        sample("activity", eventId="good-1"),
        sample("activity", eventId="bad-time", eventTime="yesterday"),
        sample("activity", eventId="good-2"),
        sample("activity", eventId="other-platform", productPlatform="billing"),
        "not a record",
    ]
    status, body, _ = await gw.post("/v1/activity", {"records": batch})
    assert status == 207
    assert body == {
        "accepted": 2,
        "rejected": 3,
        "rejections": [
            {
                "index": 1,
                "eventId": "bad-time",
                "reason": "invalid",
                "errors": [
                    {"pointer": "/eventTime", "message": "record.eventTime must be date-time"}
                ],
            },
            {
                "index": 3,
                "eventId": "other-platform",
                "reason": "forbidden",
                "errors": [
                    {
                        "pointer": "/productPlatform",
                        "message": "this API key may not write platform 'billing'",
                    }
                ],
            },
            {
                "index": 4,
                "reason": "invalid",
                "errors": [{"pointer": "", "message": "record must be object"}],
            },
        ],
    }
    assert [orjson.loads(m.value)["eventId"] for m in gw.produced().get("cafe.activity", [])] == [
        "good-1",
        "good-2",
    ]
    dead = gw.produced().get("cafe.deadletter", [])
    assert [orjson.loads(m.value) for m in dead] == [batch[1], batch[3], batch[4]]
    assert [dict(m.headers or ())["cafe-reject-reason"] for m in dead] == [
        b"invalid",
        b"forbidden",
        b"invalid",
    ]
    assert (
        orjson.loads(dict(dead[0].headers or ())["cafe-errors"]) == body["rejections"][0]["errors"]
    )
    assert dead[0].key == batch[1]["sessionId"].encode()
    assert dead[2].key is None


async def test_nothing_accepted_is_422_with_the_same_body(gw: Gateway) -> None:
    status, body, _ = await gw.post("/v1/log", {"records": [sample("log", logLevel="LOUD")]})
    assert status == 422
    assert body["accepted"] == 0 and body["rejected"] == 1
    assert body["rejections"][0]["errors"][0]["pointer"] == "/logLevel"
    assert gw.produced().get("cafe.log", []) == []
    assert len(gw.produced().get("cafe.deadletter", [])) == 1


async def test_a_record_of_another_type_is_rejected(gw: Gateway) -> None:
    status, body, _ = await gw.post("/v1/log", curl_bodies()["activity"])
    assert status == 422
    assert body["rejections"][0]["reason"] == "invalid"


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b'{"records": [\xff]}', {}, 400, "invalid_utf8"),
        (b"", {}, 400, "invalid_json"),
        (b'{"records": []}', {}, 400, "invalid_envelope"),
        (orjson.dumps({"records": [{}] * 501}), {}, 400, "invalid_envelope"),
        (b'{"records": [{}], "more": 1}', {}, 400, "invalid_envelope"),
        (b'[{"records": [{}]}]', {}, 400, "invalid_envelope"),
        (b"{}", {"Content_Type": "text/html"}, 415, UNSUPPORTED),
        (b"{}", {"Content_Type": "application/x-www-form-urlencoded"}, 415, UNSUPPORTED),
        (b"{}", {"Content_Type": "application/json; charset=latin-1"}, 415, UNSUPPORTED),
        (b" " * (LIMIT + 1), {}, 413, "payload_too_large"),
    ],
)  # fmt: skip
async def test_request_errors_are_problems_and_produce_nothing(
    gw: Gateway, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    got_status, got, resp = await gw.post("/v1/activity", body, **headers)
    assert (got_status, got["code"]) == (status, code)
    assert resp.content_type == "application/problem+json"
    assert got["status"] == status and got["detail"]
    assert gw.produced() == {}


async def test_json_with_a_charset_or_json_suffix_is_accepted(gw: Gateway) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.cafe+json"):
        status, _, _ = await gw.post("/v1/log", curl_bodies()["log"], Content_Type=content_type)
        assert status == 200


async def test_a_chunked_body_over_the_limit_is_413(gw: Gateway) -> None:
    async def chunks() -> Any:
        for _ in range(LIMIT // 1024 + 1):
            yield b" " * 1024

    resp = await gw.client.post(
        "/v1/log",
        data=chunks(),
        headers=json_headers(gw.key),
    )
    assert resp.status == 413
    assert (await resp.json(content_type=None))["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("key", "code"),
    [(None, "missing_api_key"), ("", "missing_api_key"), ("cafe_wrong", "invalid_api_key")],
)
async def test_a_missing_or_unknown_key_is_401(gw: Gateway, key: str | None, code: str) -> None:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["x-api-key"] = key
    resp = await gw.client.post("/v1/log", data=curl_bodies()["log"], headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("ApiKey")
    assert (await resp.json(content_type=None))["code"] == code
    assert gw.produced() == {}


async def test_the_key_header_name_is_case_insensitive(gw: Gateway) -> None:
    resp = await gw.client.post(
        "/v1/log",
        data=curl_bodies()["log"],
        headers={"Content-Type": "application/json", "X-API-KEY": gw.key_file.key},
    )
    assert resp.status == 200


async def test_the_plaintext_key_is_in_no_error_body(gw: Gateway) -> None:
    _, body, _ = await gw.post("/v1/log", b"{oops")
    wrong = gw.key_file.key + "x"
    _, body2, _ = await gw.post("/v1/log", b"{}", key=wrong)
    assert gw.key_file.key not in orjson.dumps([body, body2]).decode()


async def test_a_sink_failure_is_503_with_retry_after(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fail(record_type: str, accepted: Any, dead_letters: Any = ()) -> None:
        raise KafkaUnavailable("Kafka did not acknowledge the records within 5s")

    monkeypatch.setattr(gw.sink, "send", fail)
    status, body, resp = await gw.post("/v1/log", curl_bodies()["log"])
    assert (status, body["code"]) == (503, "kafka_unavailable")
    assert resp.headers["Retry-After"] == "1"


async def test_unknown_record_type_is_404_for_a_keyed_caller(gw: Gateway) -> None:
    status, body, _ = await gw.post("/v1/metrics", curl_bodies()["log"])
    assert (status, body["code"]) == (404, "not_found")


async def test_the_plaintext_key_is_never_logged(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    await gw.post("/v1/log", curl_bodies()["log"])
    await gw.post("/v1/log", b"{oops")
    await gw.post("/v1/log", curl_bodies()["log"], key=gw.key_file.key + "x")
    assert caplog.records, "expected some log lines at DEBUG"
    assert gw.key_file.key not in caplog.text


async def test_a_client_leaving_mid_body_is_counted_as_an_abort_not_a_server_error(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert gw.client.port is not None
    body = curl_bodies()["log"]
    head = (
        "POST /v1/log HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"x-api-key: {gw.key_file.key}\r\nContent-Length: {len(body) + 10_000}\r\n\r\n"
    ).encode()
    for _ in range(5):
        async with connection(gw.client.port) as conn:
            conn.writer.write(head + body)  # then the socket is closed, short of the length
            await conn.writer.drain()

    # Wait (a deadline, not a timing) until all five have been answered, to no one.
    deadline = asyncio.get_running_loop().time() + 10
    while (await gw.metrics()).value("cafe_http_requests_total", route="/v1/log") < 5:
        assert asyncio.get_running_loop().time() < deadline, "the aborted requests never ended"
        await asyncio.sleep(0.05)
    samples = await gw.metrics()
    assert samples.value("cafe_http_errors_total", code="client_aborted") == 5
    assert samples.value("cafe_http_errors_total", code="internal_error") == 0
    assert samples.value("cafe_http_requests_total", route="/v1/log", status="499") == 5
    five_hundreds = [
        labels for name, labels, value in samples.samples
        if name == "cafe_http_requests_total" and labels["status"].startswith("5") and value
    ]  # fmt: skip
    assert five_hundreds == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert gw.produced() == {}


def _kafka_size(message: Message) -> int:
    """What `message` weighs as Kafka counts it against its limit (as the Kafka sink does)."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        message.key, message.value, message.headers or []
    )
    return size


def test_the_largest_dead_letter_a_client_can_make_fits_in_a_kafka_message() -> None:
    # The key: the longest sessionId a key may be, in 4-byte characters. The value: past
    # its cut. The error: texts as long as a body, of characters JSON writes as 6-byte
    # escapes. The request's context at its longest.
    (activity,) = load_record_types({"activity": "cafe.activity"}, "fastjsonschema").values()
    session = "\U0010ffff" * activity.max_key_length
    rec = sample("activity", sessionId=session, eventId="\x01" * (DEAD_LETTER_MAX_BYTES // 3))
    context = Context(
        "k_0123456789ab",
        "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        "r" * 128,
        "2026-12-01T00:00:00.000000Z",
    )
    text = "\x01" * Settings().max_body_bytes
    errors = [{"pointer": text, "message": text}]
    rejected = Rejected(orjson.dumps(rec), 499, "forbidden", errors, session, context)
    message = Framer("activity").dead_letter(rejected)

    assert _kafka_size(message) <= MAX_MESSAGE_BYTES
    # It is the worst: key kept, value cut, errors cut, each saying so.
    assert message.key == session.encode()
    sent = dict(message.headers or ())
    assert len(message.value) > DEAD_LETTER_MAX_BYTES - 4 and sent["cafe-truncated"] == b"true"
    cut = "\x01" * DEAD_LETTER_MAX_ERROR_CHARS + f"... (cut from {len(text)} characters)"
    assert orjson.loads(sent["cafe-errors"]) == [{"pointer": cut, "message": cut}]


async def test_a_dead_letter_fits_in_a_kafka_message_whatever_property_names_it_has(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    # The schema's error quotes an unknown property's name: 900 KB, once in the value and
    # once in the errors header, made a 1,424,691-byte message, which Kafka refused.
    sink = MemorySink()
    gw = Gateway(
        await gateway_client(gateway_settings(keys_file=key_file.path), sink=sink),
        key_file,
        sink=sink,
    )
    batch = [sample("activity", eventId="good"), {**sample("activity"), "p" * 900_000: 1}]
    status, body, _ = await gw.post("/v1/activity", {"records": batch})

    assert (status, body["accepted"], body["rejected"]) == (207, 1, 1)
    (rejection,) = body["rejections"]
    assert (rejection["index"], rejection["reason"]) == (1, "invalid")
    assert len(gw.produced().get("cafe.activity", [])) == 1
    (dead,) = gw.produced().get("cafe.deadletter", [])
    assert _kafka_size(dead) <= MAX_MESSAGE_BYTES
    (error,) = orjson.loads(dict(dead.headers or ())["cafe-errors"])
    whole = rejection["errors"][0]["message"]  # the answer keeps it whole: the client's own
    assert error["message"] == (
        whole[:DEAD_LETTER_MAX_ERROR_CHARS] + f"... (cut from {len(whole)} characters)"
    )


async def test_records_larger_as_stored_than_the_body_limit_are_413(gw: Gateway) -> None:
    # Re-encoded, 1e15 is 1000000000000000.0: a body under the limit could queue more than
    # it, past what the queue is held to take (Settings), and be refused on every try.
    numbers = b",".join([b"1e15"] * 50_000)
    body = b'{"records": [{"n": [' + numbers + b"]}]}"
    assert len(body) < LIMIT
    status, got, _ = await gw.post("/v1/log", body)
    assert (status, got.get("code")) == (413, "payload_too_large")
    stored = len(orjson.dumps({"n": [1e15] * 50_000}))
    assert stored > 3 * LIMIT
    assert got["detail"] == f"the records come to {stored} bytes as stored; the limit is {LIMIT}"
    assert gw.produced() == {}
