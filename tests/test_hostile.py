"""Hostile and malformed input to POST /v1/<type>: never a 500, never a crash, nothing produced.

Each case states the exact answer. Request-level errors must be problem+json and leave
the sink untouched; per-record errors (207/422) may only reach the dead-letter topic.
Bodies go through aiohttp's client; what its client refuses to send (bad header bytes,
header floods, a 100 MB body) goes over a raw socket to the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import orjson
import pytest

from devkit.samples import curl_bodies
from gateway.sink import MemorySink
from tests.support.app import Gateway, GatewayClient, gateway_settings
from tests.support.corpora import (
    BAD_CASES,
    BOUNDS,
    JSON_TYPES,
    LIMIT,
    LONG_PLATFORM,
    REJECTED,
    WRONG_TYPES,
    Bad,
    Rejected,
    string_of,
    with_duplicate,
)
from tests.support.keys import KeyFile
from tests.support.rawhttp import read_answer
from tests.support.records import (
    DEAD,
    NAMES,
    envelope,
    properties,
    sample,
    schema,
    set_at,
)

PROBLEM = "application/problem+json"


@pytest.fixture
async def gw(gateway_client: GatewayClient, key_file: KeyFile) -> Gateway:
    # Minted before the app starts, so the store loads it at once (no reload to wait for).
    key, _ = key_file.add("analytics-portal", LONG_PLATFORM)
    sink = MemorySink()
    client = await gateway_client(
        gateway_settings(keys_file=key_file.path, max_body_bytes=LIMIT), sink=sink
    )
    return Gateway(client, key_file, key=key, sink=sink)


# ---------------------------------------------------------------------------------------
# Request-level errors: the exact status and code, problem+json, and an untouched sink.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "case"), BAD_CASES, ids=[f"{name}-{case.id}" for name, case in BAD_CASES]
)
async def test_a_hostile_body_is_a_problem_and_produces_nothing(
    gw: Gateway, name: str, case: Bad
) -> None:
    status, body, resp = await gw.post(f"/v1/{name}", case.body, **dict(case.headers))
    assert (status, body["code"]) == (case.status, case.code), body
    assert resp.content_type == PROBLEM
    assert body["status"] == case.status and body["detail"]
    assert gw.produced() == {}


# ---------------------------------------------------------------------------------------
# Per-record errors: 422 (or 207), with every rejected record on the dead-letter topic only.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REJECTED, ids=[case.id for case in REJECTED])
async def test_records_the_schema_refuses_go_to_dead_letters_only(
    gw: Gateway, case: Rejected
) -> None:
    status, body, resp = await gw.post(f"/v1/{case.name}", envelope(*case.records))
    assert (status, resp.content_type) == (422, "application/json"), body
    assert (body["accepted"], body["rejected"]) == (0, len(case.records))
    assert [r["errors"][0]["pointer"] for r in body["rejections"]] == case.pointers
    assert {r["reason"] for r in body["rejections"]} == {case.reason}
    produced = gw.produced()
    dead = produced.pop(DEAD)
    assert produced == {}
    # Kept as parsed: a dead letter is the record re-encoded, not the bytes sent.
    assert [orjson.loads(m.value) for m in dead] == orjson.loads(envelope(*case.records))["records"]


# ---------------------------------------------------------------------------------------
# Strings at and one past every maxLength, generated from the schemas.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pointer", "max_length", "over"),
    BOUNDS,
    ids=[f"{n}{p}-{'over' if o else 'at'}-{m}" for n, p, m, o in BOUNDS],
)
async def test_strings_at_their_max_length_pass_and_one_past_it_do_not(
    gw: Gateway, name: str, pointer: str, max_length: int, over: bool
) -> None:
    value = string_of(max_length + over, pointer, dict(properties(schema(name)))[pointer])
    assert value is not None and len(value) == max_length + over
    status, body, _ = await gw.post(f"/v1/{name}", envelope(set_at(sample(name), pointer, value)))
    if over:
        assert status == 422, body
        assert body["rejections"][0]["errors"][0]["pointer"] == pointer
        assert gw.produced().keys() == {DEAD}
    else:
        assert (status, body) == (200, {"accepted": 1})
        (message,) = gw.produced()[f"cafe.{name}"]
        assert orjson.loads(message.value) == set_at(sample(name), pointer, value)
        assert gw.produced().keys() == {f"cafe.{name}"}


# ---------------------------------------------------------------------------------------
# A value of every other JSON type in every field, generated from the schemas.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pointer", "types"), WRONG_TYPES, ids=[f"{n}{p}" for n, p, _ in WRONG_TYPES]
)
async def test_a_value_of_the_wrong_type_in_any_field_is_rejected(
    gw: Gateway, name: str, pointer: str, types: list[str]
) -> None:
    batch = [set_at(sample(name), pointer, JSON_TYPES[t]) for t in types]
    status, body, _ = await gw.post(f"/v1/{name}", envelope(*batch))
    assert status == 422, body
    assert (body["accepted"], body["rejected"]) == (0, len(types))
    assert {r["errors"][0]["pointer"] for r in body["rejections"]} == {pointer}, types
    produced = gw.produced()
    assert len(produced.pop(DEAD)) == len(types)
    assert produced == {}


# ---------------------------------------------------------------------------------------
# Record counts at the edge, and duplicate keys.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
async def test_500_records_are_all_accepted_and_produced_once(gw: Gateway, name: str) -> None:
    batch = [{**sample(name), "sessionId": f"s-{i}"} for i in range(500)]
    status, body, _ = await gw.post(f"/v1/{name}", envelope(*batch))
    assert (status, body) == (200, {"accepted": 500})
    assert [m.key for m in gw.produced()[f"cafe.{name}"]] == [f"s-{i}".encode() for i in range(500)]
    assert gw.produced().keys() == {f"cafe.{name}"}


# Duplicate keys: orjson keeps the last value, and the gateway checks that parsed dict and
# produces it re-encoded (never the bytes sent). So the value that passed the schema and
# the key's platform check is the only one any consumer sees: a duplicate cannot smuggle
# a platform or a session past the checks, and refusing duplicates would cost a second
# parse of every body for no gain.


@pytest.mark.parametrize("name", NAMES)
async def test_a_duplicate_platform_cannot_smuggle_a_forbidden_one(gw: Gateway, name: str) -> None:
    body = with_duplicate(sample(name), "productPlatform", "billing")
    assert body.count(b'"productPlatform"') == 2 and b"billing" in body
    status, answer, _ = await gw.post(f"/v1/{name}", body)
    assert (status, answer) == (200, {"accepted": 1})
    (message,) = gw.produced()[f"cafe.{name}"]
    assert message.value.count(b'"productPlatform"') == 1
    assert b"billing" not in message.value
    assert orjson.loads(message.value)["productPlatform"] == "analytics-portal"


@pytest.mark.parametrize("name", NAMES)
async def test_a_forbidden_platform_written_last_is_what_is_checked(gw: Gateway, name: str) -> None:
    record = {**sample(name), "productPlatform": "billing"}
    body = with_duplicate(record, "productPlatform", "analytics-portal")
    status, answer, _ = await gw.post(f"/v1/{name}", body)
    assert status == 422
    assert answer["rejections"][0]["reason"] == "forbidden"
    produced = gw.produced()
    (dead,) = produced.pop(DEAD)
    assert orjson.loads(dead.value)["productPlatform"] == "billing"
    assert produced == {}


@pytest.mark.parametrize("name", NAMES)
async def test_a_duplicate_session_id_keys_the_message_by_the_value_it_carries(
    gw: Gateway, name: str
) -> None:
    body = with_duplicate(sample(name), "sessionId", "other-session")
    status, _, _ = await gw.post(f"/v1/{name}", body)
    assert status == 200
    (message,) = gw.produced()[f"cafe.{name}"]
    assert message.key == orjson.loads(message.value)["sessionId"].encode()
    assert message.key == sample(name)["sessionId"].encode()
    assert b"other-session" not in message.value


async def test_a_duplicate_records_key_keeps_the_last_list(gw: Gateway) -> None:
    good = orjson.dumps(sample("log"))
    status, body, _ = await gw.post("/v1/log", b'{"records": [1, 2], "records": [' + good + b"]}")
    assert (status, body) == (200, {"accepted": 1})
    assert gw.produced().keys() == {"cafe.log"}


# ---------------------------------------------------------------------------------------
# What aiohttp's client will not send: raw HTTP over a socket to the same server.
# ---------------------------------------------------------------------------------------


async def still_serves(port: int) -> None:
    """The server answers a fresh connection after whatever the test sent."""
    status, _, body = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (status, orjson.loads(body)) == (200, {"status": "ok"})


async def raw_exchange(port: int, request: bytes) -> tuple[int, str, bytes]:
    """Send `request` on a new connection; the status, content type and body answered.

    The answer is read while sending: a server that refuses a request half-way answers
    and closes, and a client still writing would get a reset instead of the answer.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(_read_response(reader))
    try:
        for start in range(0, len(request), 65536):
            if answer.done():
                break
            writer.write(request[start : start + 65536])
            await writer.drain()
        return await asyncio.wait_for(answer, timeout=10)
    except (ConnectionResetError, BrokenPipeError):
        return await asyncio.wait_for(answer, timeout=10)
    finally:
        answer.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
    answer = await read_answer(reader)
    return answer.status, answer.headers.get("content-type", ""), answer.body


def _request(key: bytes, *extra: bytes, body: bytes = b"{}") -> bytes:
    lines = [
        b"POST /v1/log HTTP/1.1",
        b"Host: test",
        b"Content-Type: application/json",
        b"x-api-key: " + key,
        *extra,
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class RawCase(NamedTuple):
    """A request only a raw socket sends, and the answer expected."""

    id: str
    # Called with the valid key, so a case can spoil it.
    request: Callable[[bytes], bytes]
    status: int
    # The problem's code (None for a 200).
    code: str | None


def _get(target: bytes, *lines: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"\r\n".join([b"GET " + target + b" " + version, *lines]) + b"\r\n\r\n"


MALFORMED = "malformed_request"
RAW_CASES = [
    # aiohttp's parser refuses these before any middleware runs; gateway/http/listener.py
    # answers them.
    RawCase(
        "one-1mb-header",
        lambda k: _request(k, b"X-Big: " + b"a" * 1_000_000),
        431,
        "header_too_large",
    ),
    RawCase(
        "100k-headers-1mb",
        lambda k: _request(k, *(b"X-%d: v" % i for i in range(100_000))),
        431,
        "too_many_headers",
    ),
    # _request sends 5 headers of its own: 128 in all are read, 129 are too many.
    RawCase(
        "128-headers",
        lambda k: _request(k, *(b"X-%d: v" % i for i in range(123))),
        400,
        "invalid_envelope",
    ),
    RawCase(
        "129-headers",
        lambda k: _request(k, *(b"X-%d: v" % i for i in range(124))),
        431,
        "too_many_headers",
    ),
    RawCase(
        "uri-5000-bytes",
        lambda k: _get(b"/v1/ip?x=" + b"a" * 5000, b"Host: t"),
        414,
        "uri_too_long",
    ),
    RawCase("key-with-nul", lambda k: _request(k + b"\x00"), 400, MALFORMED),
    RawCase("key-with-ctrl-a", lambda k: _request(b"\x01" + k), 400, MALFORMED),
    RawCase("key-with-del", lambda k: _request(k + b"\x7f"), 400, MALFORMED),
    RawCase("key-with-escape", lambda k: _request(b"\x1b[31m" + k), 400, MALFORMED),
    RawCase("key-with-bare-cr", lambda k: _request(k + b"\rx"), 400, MALFORMED),
    RawCase(
        "content-length-negative",
        lambda k: _request(k).replace(b"Content-Length: 2", b"Content-Length: -2"),
        400,
        MALFORMED,
    ),
    RawCase(
        "content-length-overflow",
        lambda k: _request(k).replace(
            b"Content-Length: 2", b"Content-Length: 99999999999999999999999"
        ),
        400,
        MALFORMED,
    ),
    RawCase("content-length-twice", lambda k: _request(k, b"Content-Length: 3"), 400, MALFORMED),
    RawCase(
        "content-length-and-chunked",
        lambda k: _request(k, b"Transfer-Encoding: chunked"),
        400,
        MALFORMED,
    ),
    RawCase(
        "chunk-size-not-hex",
        lambda k: (
            _request(k, b"Transfer-Encoding: chunked").replace(b"Content-Length: 2\r\n", b"")[:-2]
            + b"zz\r\n{}\r\n0\r\n\r\n"
        ),
        400,
        MALFORMED,
    ),
    RawCase("unknown-method", lambda k: b"BREW /v1/ip HTTP/1.1\r\nHost: t\r\n\r\n", 400, MALFORMED),
    RawCase("not-http", lambda k: b"hello\r\n\r\n", 400, MALFORMED),
    RawCase(
        "tls-hello",
        lambda k: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100),
        400,
        MALFORMED,
    ),
    RawCase("http2-preface", lambda k: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, MALFORMED),
    RawCase(
        "http-9.9", lambda k: _get(b"/healthz", b"Host: t", version=b"HTTP/9.9"), 400, MALFORMED
    ),
    RawCase("no-host", lambda k: _get(b"/v1/ip", b"x-api-key: " + k), 400, MALFORMED),
    RawCase(
        "header-without-colon", lambda k: _get(b"/healthz", b"Host: t", b"NoColon"), 400, MALFORMED
    ),
    RawCase("space-before-colon", lambda k: _get(b"/healthz", b"Host : t"), 400, MALFORMED),
    RawCase(
        "folded-header", lambda k: _get(b"/healthz", b"Host: t", b"X-A: a", b"  b"), 400, MALFORMED
    ),
    RawCase("nul-in-path", lambda k: _get(b"/heal\x00thz", b"Host: t"), 400, MALFORMED),
    # A tab is allowed inside a header value; the key is then simply unknown.
    RawCase("key-with-tab", lambda k: _request(k[:5] + b"\t" + k[5:]), 401, "invalid_api_key"),
    RawCase("key-8000-bytes", lambda k: _request(b"k" * 8000), 401, "invalid_api_key"),
    RawCase("key-only-spaces", lambda k: _request(b"   "), 401, "missing_api_key"),
    RawCase(
        "key-twice-first-wrong",
        lambda k: _request(b"wrong", b"x-api-key: " + k),
        401,
        "invalid_api_key",
    ),
    # Whitespace around a header value is not part of it (RFC 9110 section 5.5).
    RawCase(
        "key-padded-with-spaces",
        lambda k: _request(b"  " + k + b"  ", body=curl_bodies()["log"]),
        200,
        None,
    ),
    RawCase(
        "key-with-obs-text-0xff",
        lambda k: _request(k + b"\xff"),
        401,
        "invalid_api_key",
    ),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in RAW_CASES])
async def test_raw_requests_get_a_4xx_and_the_server_keeps_serving(
    gw: Gateway, case: RawCase
) -> None:
    status, content_type, body = await raw_exchange(gw.port, case.request(gw.key.encode()))
    assert status == case.status, body[:300]
    if status == 200:
        assert orjson.loads(body) == {"accepted": 1}
    else:
        assert content_type == PROBLEM
        assert orjson.loads(body)["code"] == case.code
        # The detail names what was wrong, never the bytes (which may hold the key).
        assert gw.key.encode() not in body
        assert gw.produced() == {}
    await still_serves(gw.port)


async def _send_until_answered(
    port: int, head: bytes, chunks: Iterator[bytes]
) -> tuple[int, dict[str, Any], int]:
    """Send `head`, then `chunks` until the server answers; (status, body, bytes sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(_read_response(reader))
    sent = 0
    try:
        writer.write(head)
        for chunk in chunks:
            if answer.done():
                break
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
        status, _, body = await asyncio.wait_for(answer, timeout=10)
        return status, orjson.loads(body), sent
    finally:
        answer.cancel()
        writer.close()
        await writer.wait_closed()


HUNDRED_MB = 100 * 1024 * 1024
BLOCK = b" " * 65536


async def test_a_declared_100mb_body_is_413_before_it_is_sent(gw: Gateway) -> None:
    head = (
        b"POST /v1/log HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"x-api-key: " + gw.key.encode() + b"\r\nContent-Length: %d\r\n\r\n" % HUNDRED_MB
    )
    blocks = (BLOCK for _ in range(HUNDRED_MB // len(BLOCK)))
    status, body, sent = await _send_until_answered(gw.port, head, blocks)
    assert (status, body["code"]) == (413, "payload_too_large")
    # Answered from the header alone; what got out before is what socket buffers held.
    assert sent < HUNDRED_MB // 4
    assert gw.produced() == {}
    await still_serves(gw.port)


async def test_a_chunked_100mb_body_is_413_once_past_the_limit(gw: Gateway) -> None:
    head = (
        b"POST /v1/log HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"x-api-key: " + gw.key.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    framed = b"%x\r\n" % len(BLOCK) + BLOCK + b"\r\n"
    blocks = (framed for _ in range(HUNDRED_MB // len(BLOCK)))
    status, body, sent = await _send_until_answered(gw.port, head, blocks)
    assert (status, body["code"]) == (413, "payload_too_large")
    assert LIMIT < sent < HUNDRED_MB // 4
    assert gw.produced() == {}
    await still_serves(gw.port)


def test_the_hostile_tables_hold_every_case() -> None:
    """The case count (shown here so a shrinking table is noticed)."""
    counts = {
        "bodies": len(BAD_CASES),
        "rejected batches": len(REJECTED),
        "length bounds": len(BOUNDS),
        "wrong types": len(WRONG_TYPES),
        "raw requests": len(RAW_CASES),
    }
    print(f"hostile cases: {sum(counts.values())} {counts}")
    assert sum(counts.values()) >= 380, counts
