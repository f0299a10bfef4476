"""The tables of hostile and malformed input: the tests that send them, and test_validators."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import Any, NamedTuple

import orjson

from devkit.samples import curl_bodies
from tests.support.records import NAMES, envelope, nested, properties, sample, schema

# The body limit (CAFE_MAX_BODY_BYTES) of the gateways the bodies are sent to.
LIMIT = 1024 * 1024
# A platform name at the schema's maxLength (64), which the hostile tests' key may write.
LONG_PLATFORM = "P" * 64


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


class Rejected(NamedTuple):
    """A batch whose records the schema refuses one by one."""

    id: str
    name: str
    records: list[Any]
    # The pointer of each rejection, in batch order.
    pointers: list[str]
    # Why each is rejected.
    reason: str = "invalid"


def _rejected_batches() -> Iterator[Rejected]:
    for name in NAMES:
        rec = sample(name)
        big = 18446744073709551617
        # Past 64 bits orjson reads an integer as a float, with an integer's value: a
        # version that no gateway knows.
        unknown = "unknown_format_version"
        yield Rejected(
            f"{name}-int-over-64-bits-in-a-field",
            name,
            [{**rec, "messageFormatVersion": big}],
            ["/messageFormatVersion"],
            unknown,
        )
        yield Rejected(f"{name}-int-over-64-bits-as-a-record", name, [big], [""])
        yield Rejected(
            f"{name}-negative-int-over-64-bits",
            name,
            [{**rec, "messageFormatVersion": -big}],
            ["/messageFormatVersion"],
            unknown,
        )
        yield Rejected(
            f"{name}-u64-max",
            name,
            [{**rec, "messageFormatVersion": 2**64 - 1}],
            ["/messageFormatVersion"],
            unknown,
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


def string_of(length: int, pointer: str, sub: dict[str, Any]) -> str | None:
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


BOUNDS = [
    (name, pointer, sub["maxLength"], over)
    for name in NAMES
    for pointer, sub in properties(schema(name))
    if "maxLength" in sub
    for over in (False, True)
    if string_of(sub["maxLength"] + over, pointer, sub) is not None
]


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
    for pointer, sub in properties(schema(name))
    if "type" in sub
]


def with_duplicate(record: dict[str, Any], field: str, first: str) -> bytes:
    """A body of one record with `field` written twice: `first`, then the record's own."""
    duplicate = b'{"' + field.encode() + b'":' + orjson.dumps(first) + b","
    return b'{"records":[' + duplicate + orjson.dumps(record)[1:] + b"]}"


REQUIRED = {
    "activity": [
        "messageFormatVersion", "messageType", "eventTime", "productEnvironment",
        "productPlatform", "sessionId", "eventId", "eventCategory", "eventAction",
    ],
    "log": [
        "messageFormatVersion", "messageType", "logTime", "productEnvironment",
        "productPlatform", "sessionId", "logLevel", "logMessage",
    ],
    "profile": [
        "messageFormatVersion", "messageType", "productEnvironment", "productPlatform",
        "sessionId", "eventTime", "platform",
    ],
}  # fmt: skip


OPTIONAL = [
    ("activity", "userSSOGUID"), ("activity", "eventUri"), ("activity", "tags"),
    ("log", "eventUri"), ("profile", "location"),
]  # fmt: skip


# (record type, where to put a bad value, the value, where the error must point)
BAD_FIELDS = [
    ("activity", "/messageType", "ClientEventingLog", "/messageType"),
    ("activity", "/messageFormatVersion", 99, "/messageFormatVersion"),
    ("log", "/messageFormatVersion", 2, "/messageFormatVersion"),
    ("activity", "/messageFormatVersion", True, "/messageFormatVersion"),
    ("activity", "/messageFormatVersion", "1", "/messageFormatVersion"),
    ("activity", "/extra", "field", ""),
    ("activity", "/eventTime", "2019-01-21 13:09:07", "/eventTime"),
    ("activity", "/eventTime", "2019-02-30T13:09:07Z", "/eventTime"),
    ("activity", "/eventTime", "2019-01-21T13:09:07+0530", "/eventTime"),
    ("activity", "/sessionId", "", "/sessionId"),
    ("activity", "/sessionId", "s" * 129, "/sessionId"),
    ("activity", "/eventId", 42, "/eventId"),
    ("activity", "/productPlatform", "has space", "/productPlatform"),
    ("activity", "/eventUri", "not a uri", "/eventUri"),
    ("activity", "/tags/0/extra", 1, "/tags/0"),
    ("activity", "/tags/0/value", "v" * 1025, "/tags/0/value"),
    ("activity", "/tags", [{"key": "k", "value": "v"}] * 51, "/tags"),
    ("log", "/logLevel", "LOUD", "/logLevel"),
    ("log", "/logMessage", "m" * 32769, "/logMessage"),
    ("log", "/logTime", "yesterday", "/logTime"),
    ("profile", "/platform", {}, "/platform"),
    ("profile", "/platform/screenResolution/width", 0, "/platform/screenResolution/width"),
    ("profile", "/platform/language", "en_US", "/platform/language"),
    ("profile", "/location/ipAddress", "300.1.1.1", "/location/ipAddress"),
    ("profile", "/location/timeZone", "../etc", "/location/timeZone"),
]


NOT_OBJECTS: list[Any] = [None, 1, "text", [], [{}]]


DATE_TIMES = [
    ("2019-01-21T13:09:07.049+05:30", True),
    ("2019-01-21T13:09:07Z", True),
    ("2019-01-21t13:09:07z", True),
    ("2016-12-31T23:59:60Z", True),
    ("2019-01-21T13:09:07.123456789-08:00", True),
    ("2019-01-21T11: 54: 37.805-08: 00", False),
    ("2019-01-21T13:09:07", False),
    ("2019-01-21T13:09Z", False),
    ("2019-13-01T00:00:00Z", False),
    ("2019-02-29T00:00:00Z", False),
    ("2019-01-21T24:00:00Z", False),
    ("2019-01-21T13:09:07+24:00", False),
    ("2019-01-21T13:09:07+05:60", False),  # an offset's minutes are 00 to 59
    ("2019-01-21T13:09:07-00:99", False),
    ("2019-01-21T13:09:07.Z", False),
    ("\uff12\uff10\uff11\uff19-01-21T13:09:07Z", False),  # full-width digits
]
