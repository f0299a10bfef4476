"""Hostile and malformed input to POST /v1/<type>: never a 500, never a crash, nothing produced.

Each case states the exact answer. Request-level errors must be problem+json and leave
the sink untouched; per-record errors (207/422) may only reach the dead-letter topic.
Bodies go through aiohttp's client; what its client refuses to send (bad header bytes,
header floods, a 100 MB body) goes over a raw socket to the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import Settings
from gateway.schemas import SCHEMA_BASE, schema_dir
from gateway.sink import MemorySink, Message
from tests.conftest import AiohttpClient
from tests.keys import KeyFile
from tests.rawhttp import read_answer
from tests.spec_samples import curl_bodies

LIMIT = 1024 * 1024
NAMES = ("activity", "log", "profile")
RECORD_TOPICS = tuple(f"cafe.{name}" for name in NAMES)
DEAD = "cafe.deadletter"
PROBLEM = "application/problem+json"
# A platform name at the schema's maxLength (64), which the test key may write.
LONG_PLATFORM = "P" * 64


class Gateway:
    """A gateway on a real loopback socket, its in-memory sink, and a key for it."""

    def __init__(self, client: TestClient, sink: MemorySink, key: str) -> None:  # type: ignore[type-arg]
        self.client = client
        self.sink = sink
        self.key = key

    @property
    def port(self) -> int:
        port = self.client.port
        assert port is not None
        return port

    async def post(self, path: str, body: bytes, **headers: str) -> tuple[int, str, Any]:
        """POST `body`; the status, the content type, and the body parsed as JSON."""
        sent = {"Content-Type": "application/json", "x-api-key": self.key}
        sent.update({k.replace("_", "-"): v for k, v in headers.items()})
        # A file-like body: aiohttp warns that a large bytes body blocks the event loop.
        resp = await self.client.post(path, data=io.BytesIO(body), headers=sent)
        return resp.status, resp.content_type, await resp.json(content_type=None)

    def produced(self) -> dict[str, list[Message]]:
        return {topic: messages for topic, messages in self.sink.topics.items() if messages}

    async def still_serves(self) -> None:
        """The process answers a fresh connection after whatever the test sent."""
        status, _, body = await raw_exchange(self.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (status, orjson.loads(body)) == (200, {"status": "ok"})


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, key_file: KeyFile) -> Gateway:
    # Minted before the app starts, so the store loads it at once (no reload to wait for).
    key, _ = key_file.add("analytics-portal", LONG_PLATFORM)
    sink = MemorySink()
    settings = Settings(keys_file=key_file.path, max_body_bytes=LIMIT)
    client = await aiohttp_client(create_app(settings, sink=sink))
    return Gateway(client, sink, key)


def sample(name: str) -> dict[str, Any]:
    record: dict[str, Any] = orjson.loads(curl_bodies()[name])["records"][0]
    return record


def envelope(*records: Any) -> bytes:
    # The standard library's encoder, as orjson's refuses integers past 64 bits.
    return json.dumps(
        {"records": list(records)}, ensure_ascii=False, separators=(",", ":")
    ).encode()


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]", leaf: bytes = b"") -> bytes:
    return open_ * depth + leaf + close * depth


# ---------------------------------------------------------------------------------------
# Request-level errors: the exact status and code, problem+json, and an untouched sink.
# ---------------------------------------------------------------------------------------


class Bad(NamedTuple):
    """A body (and headers) the gateway must refuse as a whole."""

    id: str
    body: bytes
    status: int
    code: str
    headers: tuple[tuple[str, str], ...] = ()


# 100 MB of spaces in 430 kB: aiohttp inflates as it reads, so the limit must hold for
# what is inflated, not what is sent. Built once: it takes a quarter of a second.
GZIP_BOMB = gzip.compress(b" " * 100_000_000, compresslevel=1)


def _bad_bodies(name: str) -> Iterator[Bad]:
    """The refusals for one route, built from its spec sample."""
    good = curl_bodies()[name]
    rec = sample(name)
    for cut in (1, 2, len(good) // 2, len(good) - 2, len(good) - 1):
        yield Bad(f"truncated-at-{cut}", good[:cut], 400, "invalid_json")
    yield Bad("empty", b"", 400, "invalid_json")
    yield Bad("whitespace-only", b" \r\n\t ", 400, "invalid_json")
    yield Bad("trailing-garbage", good + b"x", 400, "invalid_json")
    yield Bad("two-documents", good + good, 400, "invalid_json")
    yield Bad("single-quotes", good.replace(b'"', b"'"), 400, "invalid_json")
    yield Bad("trailing-comma", good[:-2] + b",]}", 400, "invalid_json")
    yield Bad("comment", b"/* hi */" + good, 400, "invalid_json")
    yield Bad("raw-control-char-in-string", b'{"records": ["a\x01b"]}', 400, "invalid_json")
    yield Bad("lone-surrogate-escape", b'{"records": ["\\ud800"]}', 400, "invalid_json")
    # orjson refuses all three literals; Python's json module would have accepted them.
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        word = literal.decode().lower()
        yield Bad(f"{word}-top-level", literal, 400, "invalid_json")
        yield Bad(f"{word}-as-a-record", b'{"records": [' + literal + b"]}", 400, "invalid_json")
        in_field = good.replace(b'"messageFormatVersion":1', b'"messageFormatVersion":' + literal)
        yield Bad(f"{word}-in-a-field", in_field, 400, "invalid_json")
    yield Bad("float-overflow-1e400", good.replace(b":1,", b":1e400,", 1), 400, "invalid_json")
    # A BOM is valid UTF-8 but not allowed before JSON (RFC 8259 section 8.1).
    yield Bad("utf8-bom", b"\xef\xbb\xbf" + good, 400, "invalid_json")
    yield Bad("utf16-le-bom", b"\xff\xfe" + good.decode().encode("utf-16-le"), 400, "invalid_utf8")
    yield Bad("utf16-no-bom", good.decode().encode("utf-16-be"), 400, "invalid_json")
    yield Bad("latin1-byte", b'{"records": ["caf\xe9"]}', 400, "invalid_utf8")
    yield Bad("lone-continuation-byte", b'{"records": ["\x80"]}', 400, "invalid_utf8")
    yield Bad("overlong-slash", b'{"records": ["\xc0\xaf"]}', 400, "invalid_utf8")
    yield Bad("utf8-encoded-surrogate", b'{"records": ["\xed\xa0\x80"]}', 400, "invalid_utf8")
    yield Bad("beyond-u10ffff", b'{"records": ["\xf4\x90\x80\x80"]}', 400, "invalid_utf8")
    yield Bad("truncated-sequence", b'{"records": ["\xe2\x82"]}', 400, "invalid_utf8")
    yield Bad("0xff-in-a-key", good.replace(b"sessionId", b"session\xffId"), 400, "invalid_utf8")
    # orjson stops at 1024 levels; these never reach a validator.
    yield Bad("array-10000-deep", nested(10_000), 400, "invalid_json")
    yield Bad("object-10000-deep", nested(10_000, b'{"a":', b"}", b"1"), 400, "invalid_json")
    yield Bad("record-10000-deep", b'{"records": [' + nested(10_000) + b"]}", 400, "invalid_json")
    # Parsed (under 1024 levels) but deeper than orjson writes (254): it cannot be kept
    # as a dead letter, so the request is refused whole rather than a record lost.
    deep_array = b'{"records": [' + nested(300) + b"]}"
    yield Bad("record-300-deep", deep_array, 400, "invalid_envelope")
    deep_field = envelope({**rec, "sessionId": 0}).replace(
        b'"sessionId":0', b'"sessionId":' + nested(1000)
    )
    yield Bad("field-1000-deep", deep_field, 400, "invalid_envelope")
    for body, what in [
        (b"null", "null"),
        (b"true", "true"),
        (b"0", "zero"),
        (b"18446744073709551616", "int-over-64-bits"),
        (b"-9223372036854775809", "int-under-64-bits"),
        (b'"records"', "string"),
        (b"[]", "empty-array"),
        (b"[" + good + b"]", "array-of-a-good-body"),
        (b"{}", "empty-object"),
        (b'{"records": null}', "records-null"),
        (b'{"records": {}}', "records-object"),
        (b'{"records": "x"}', "records-string"),
        (b'{"records": 1}', "records-int"),
        (b'{"records": []}', "records-0"),
        (b'{"Records": [' + orjson.dumps(rec) + b"]}", "records-capitalised"),
        (envelope(*[rec] * 501), "records-501"),
        (good[:-1] + b',"extra":1}', "extra-top-level-key"),
        (good[:-1] + b',"records2":[]}', "second-records-key"),
        (good[:-1] + b',"":null}', "empty-top-level-key"),
    ]:
        yield Bad(what, body, 400, "invalid_envelope")
    yield Bad("over-the-limit", b" " * (LIMIT + 1), 413, "payload_too_large")
    yield Bad(
        "gzip-bomb-100mb",
        GZIP_BOMB,
        413,
        "payload_too_large",
        (("Content-Encoding", "gzip"),),
    )
    for encoding in ("gzip", "deflate", "br", "zstd"):
        yield Bad(
            f"corrupt-{encoding}",
            b"this is not compressed " * 8,
            400,
            "invalid_encoding",
            (("Content-Encoding", encoding),),
        )
    truncated_gzip = gzip.compress(good)[:-12]
    yield Bad(
        "truncated-gzip", truncated_gzip, 400, "invalid_json", (("Content-Encoding", "gzip"),)
    )
    for content_type in (
        "text/html",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "json",
        "",
        ";;;==",
        "application/json; charset=latin-1",
        "application/json; charset=utf-16",
    ):
        yield Bad(
            f"content-type-{content_type or 'empty'}",
            good,
            415,
            "unsupported_media_type",
            (("Content-Type", content_type),),
        )


BAD_CASES = [(name, case) for name in NAMES for case in _bad_bodies(name)]


@pytest.mark.parametrize(
    ("name", "case"), BAD_CASES, ids=[f"{name}-{case.id}" for name, case in BAD_CASES]
)
async def test_a_hostile_body_is_a_problem_and_produces_nothing(
    gw: Gateway, name: str, case: Bad
) -> None:
    status, content_type, body = await gw.post(f"/v1/{name}", case.body, **dict(case.headers))
    assert (status, body["code"]) == (case.status, case.code), body
    assert content_type == PROBLEM
    assert body["status"] == case.status and body["detail"]
    assert gw.produced() == {}


# ---------------------------------------------------------------------------------------
# Per-record errors: 422 (or 207), with every rejected record on the dead-letter topic only.
# ---------------------------------------------------------------------------------------


class Rejected(NamedTuple):
    """A batch whose records the schema refuses one by one."""

    id: str
    name: str
    records: list[Any]
    # The pointer of each rejection, in batch order.
    pointers: list[str]


def _rejected_batches() -> Iterator[Rejected]:
    for name in NAMES:
        rec = sample(name)
        big = 18446744073709551617
        # Past 64 bits orjson reads an integer as a float: never an `integer` of ours.
        yield Rejected(
            f"{name}-int-over-64-bits-in-a-field",
            name,
            [{**rec, "messageFormatVersion": big}],
            ["/messageFormatVersion"],
        )
        yield Rejected(f"{name}-int-over-64-bits-as-a-record", name, [big], [""])
        yield Rejected(
            f"{name}-negative-int-over-64-bits",
            name,
            [{**rec, "messageFormatVersion": -big}],
            ["/messageFormatVersion"],
        )
        yield Rejected(
            f"{name}-u64-max",
            name,
            [{**rec, "messageFormatVersion": 2**64 - 1}],
            ["/messageFormatVersion"],
        )
        yield Rejected(
            f"{name}-200-deep",
            name,
            [_deep(200), {**rec, "sessionId": _deep(200)}],
            ["", "/sessionId"],
        )
        yield Rejected(f"{name}-extra-field", name, [{**rec, "smuggled": True}], [""])
        yield Rejected(f"{name}-empty-object", name, [{}], [""])
        yield Rejected(f"{name}-500-bad-records", name, [None] * 500, [""] * 500)
        yield Rejected(
            f"{name}-nul-in-a-pattern-field",
            name,
            [{**rec, "productEnvironment": "prod\u0000"}],
            ["/productEnvironment"],
        )
        yield Rejected(
            f"{name}-newline-after-a-pattern",
            name,
            [{**rec, "productEnvironment": "prod\n"}],
            ["/productEnvironment"],
        )
        for field in ("productPlatform", "sessionId", "messageType"):
            without = {k: v for k, v in rec.items() if k != field}
            yield Rejected(f"{name}-without-{field}", name, [without], [""])
    profile = sample("profile")
    screen = {"width": 2**63, "height": 1}
    yield Rejected(
        "profile-int-over-maximum",
        "profile",
        [{**profile, "platform": {"screenResolution": screen}}],
        ["/platform/screenResolution/width"],
    )


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


REJECTED = list(_rejected_batches())


@pytest.mark.parametrize("case", REJECTED, ids=[case.id for case in REJECTED])
async def test_records_the_schema_refuses_go_to_dead_letters_only(
    gw: Gateway, case: Rejected
) -> None:
    status, content_type, body = await gw.post(f"/v1/{case.name}", envelope(*case.records))
    assert (status, content_type) == (422, "application/json"), body
    assert (body["accepted"], body["rejected"]) == (0, len(case.records))
    assert [r["errors"][0]["pointer"] for r in body["rejections"]] == case.pointers
    assert {r["reason"] for r in body["rejections"]} == {"invalid"}
    produced = gw.produced()
    dead = produced.pop(DEAD)
    assert produced == {}
    # Kept as parsed: a dead letter is the record re-encoded, not the bytes sent.
    assert [orjson.loads(m.value) for m in dead] == orjson.loads(envelope(*case.records))["records"]


# ---------------------------------------------------------------------------------------
# Strings at and one past every maxLength, generated from the schemas.
# ---------------------------------------------------------------------------------------


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads((schema_dir() / f"{name}.json").read_bytes())
    assert schema["$id"] == SCHEMA_BASE + name
    return schema


def _properties(schema: dict[str, Any], pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property of a record schema, nested ones too, as (JSON pointer, subschema)."""
    for prop, sub in schema.get("properties", {}).items():
        yield f"{pointer}/{prop}", sub
        yield from _properties(sub, f"{pointer}/{prop}")
        if "items" in sub:
            yield f"{pointer}/{prop}/0", sub["items"]
            yield from _properties(sub["items"], f"{pointer}/{prop}/0")


def _string_of(length: int, pointer: str, sub: dict[str, Any]) -> str | None:
    """A string of `length` that breaks no rule of `sub` but maxLength; None if none exists."""
    if sub.get("format") == "date-time":
        if length <= sub["maxLength"]:
            return None  # a valid one has at most 35 characters (9 fraction digits)
        return "2019-01-21T13:09:07." + "1" * (length - 26) + "+05:30"
    if sub.get("format") == "uri":
        return "https://example.com/" + "a" * (length - 20)
    if pointer.endswith("/language"):
        # BCP 47's shape: 1-8 letters, then "-" and 1-8 alphanumerics, repeated.
        head, rest = "a" * 8, length - 8
        return head + "".join("-" + "b" * min(8, rest - i - 1) for i in range(0, rest, 9))
    if pointer.endswith("/ipAddress"):
        # The longest text form of an IPv6 address: 45 characters.
        full = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
        return full if length == len(full) else full + "5" * (length - len(full))
    if pointer.endswith("/timeZone"):
        return "America/" + "A" * (length - 8)
    if pointer == "/productPlatform":
        return LONG_PLATFORM if length == 64 else "P" * length
    return "a" * length


def _set(record: dict[str, Any], pointer: str, value: Any) -> dict[str, Any]:
    """A copy of `record` with `value` at `pointer`, making the objects on the way."""
    record = orjson.loads(orjson.dumps(record))
    *path, last = pointer.strip("/").split("/")
    here: Any = record
    for part in path:
        here = here[int(part)] if isinstance(here, list) else here.setdefault(part, {})
    if isinstance(here, list):
        here[int(last)] = value
    else:
        here[last] = value
    return record


BOUNDS = [
    (name, pointer, sub["maxLength"], over)
    for name in NAMES
    for pointer, sub in _properties(_schema(name))
    if "maxLength" in sub
    for over in (False, True)
    if _string_of(sub["maxLength"] + over, pointer, sub) is not None
]


@pytest.mark.parametrize(
    ("name", "pointer", "max_length", "over"),
    BOUNDS,
    ids=[f"{n}{p}-{'over' if o else 'at'}-{m}" for n, p, m, o in BOUNDS],
)
async def test_strings_at_their_max_length_pass_and_one_past_it_do_not(
    gw: Gateway, name: str, pointer: str, max_length: int, over: bool
) -> None:
    value = _string_of(max_length + over, pointer, dict(_properties(_schema(name)))[pointer])
    assert value is not None and len(value) == max_length + over
    status, _, body = await gw.post(f"/v1/{name}", envelope(_set(sample(name), pointer, value)))
    if over:
        assert status == 422, body
        assert body["rejections"][0]["errors"][0]["pointer"] == pointer
        assert gw.produced().keys() == {DEAD}
    else:
        assert (status, body) == (200, {"accepted": 1})
        (message,) = gw.produced()[f"cafe.{name}"]
        assert orjson.loads(message.value) == _set(sample(name), pointer, value)
        assert gw.produced().keys() == {f"cafe.{name}"}


# ---------------------------------------------------------------------------------------
# A value of every other JSON type in every field, generated from the schemas.
# ---------------------------------------------------------------------------------------

# One value per JSON type; 1.5 stands for "number", since 1.0 counts as an integer.
JSON_TYPES: dict[str, Any] = {
    "null": None,
    "boolean": True,
    "integer": 7,
    "number": 1.5,
    "string": "s",
    "array": [],
    "object": {},
}

WRONG_TYPES = [
    (
        name,
        pointer,
        [t for t in JSON_TYPES if t != sub["type"] and {t, sub["type"]} != {"integer", "number"}],
    )
    for name in NAMES
    for pointer, sub in _properties(_schema(name))
    if "type" in sub
]


@pytest.mark.parametrize(
    ("name", "pointer", "types"), WRONG_TYPES, ids=[f"{n}{p}" for n, p, _ in WRONG_TYPES]
)
async def test_a_value_of_the_wrong_type_in_any_field_is_rejected(
    gw: Gateway, name: str, pointer: str, types: list[str]
) -> None:
    batch = [_set(sample(name), pointer, JSON_TYPES[t]) for t in types]
    status, _, body = await gw.post(f"/v1/{name}", envelope(*batch))
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
    status, _, body = await gw.post(f"/v1/{name}", envelope(*batch))
    assert (status, body) == (200, {"accepted": 500})
    assert [m.key for m in gw.produced()[f"cafe.{name}"]] == [f"s-{i}".encode() for i in range(500)]
    assert gw.produced().keys() == {f"cafe.{name}"}


def _with_duplicate(record: dict[str, Any], field: str, first: str) -> bytes:
    """A body of one record with `field` written twice: `first`, then the record's own."""
    duplicate = b'{"' + field.encode() + b'":' + orjson.dumps(first) + b","
    return b'{"records":[' + duplicate + orjson.dumps(record)[1:] + b"]}"


# Duplicate keys: orjson keeps the last value, and the gateway checks that parsed dict and
# produces it re-encoded (never the bytes sent). So the value that passed the schema and
# the key's platform check is the only one any consumer sees: a duplicate cannot smuggle
# a platform or a session past the checks, and refusing duplicates would cost a second
# parse of every body for no gain.


@pytest.mark.parametrize("name", NAMES)
async def test_a_duplicate_platform_cannot_smuggle_a_forbidden_one(gw: Gateway, name: str) -> None:
    body = _with_duplicate(sample(name), "productPlatform", "billing")
    assert body.count(b'"productPlatform"') == 2 and b"billing" in body
    status, _, answer = await gw.post(f"/v1/{name}", body)
    assert (status, answer) == (200, {"accepted": 1})
    (message,) = gw.produced()[f"cafe.{name}"]
    assert message.value.count(b'"productPlatform"') == 1
    assert b"billing" not in message.value
    assert orjson.loads(message.value)["productPlatform"] == "analytics-portal"


@pytest.mark.parametrize("name", NAMES)
async def test_a_forbidden_platform_written_last_is_what_is_checked(gw: Gateway, name: str) -> None:
    record = {**sample(name), "productPlatform": "billing"}
    body = _with_duplicate(record, "productPlatform", "analytics-portal")
    status, _, answer = await gw.post(f"/v1/{name}", body)
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
    body = _with_duplicate(sample(name), "sessionId", "other-session")
    status, _, _ = await gw.post(f"/v1/{name}", body)
    assert status == 200
    (message,) = gw.produced()[f"cafe.{name}"]
    assert message.key == orjson.loads(message.value)["sessionId"].encode()
    assert message.key == sample(name)["sessionId"].encode()
    assert b"other-session" not in message.value


async def test_a_duplicate_records_key_keeps_the_last_list(gw: Gateway) -> None:
    good = orjson.dumps(sample("log"))
    status, _, body = await gw.post("/v1/log", b'{"records": [1, 2], "records": [' + good + b"]}")
    assert (status, body) == (200, {"accepted": 1})
    assert gw.produced().keys() == {"cafe.log"}


# ---------------------------------------------------------------------------------------
# What aiohttp's client will not send: raw HTTP over a socket to the same server.
# ---------------------------------------------------------------------------------------


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
    await gw.still_serves()


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
    await gw.still_serves()


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
    await gw.still_serves()


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
