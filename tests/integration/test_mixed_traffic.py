"""Mixed traffic against a `cafe-gateway serve` process: afterwards the books balance.

CLIENTS client tasks start at once, each with a fixed list of REQUESTS_PER_CLIENT
requests (the run is bounded by count, never by time), and between them send: every
record type; plain, gzip, br and zstd bodies, and sendBeacon-style text/plain bodies
keyed by `?api_key=` from a web page's Origin; batches of 1, 20 and 500; valid records
(activity records of format versions 1 and 2 side by side) mixed with invalid ones,
forbidden ones (a platform the key may not write), ones of a format version the
gateway does not know, 2 MB ones and ones whose sessionId is 200,000 characters;
requests refused whole (a foreign origin, 501 records, a body not in its
Content-Encoding, a compression bomb); and clients that hang up halfway through their
body. Then every topic is read to its end offsets, and:

- every record answered as accepted is on its own topic exactly once, as it was sent,
  with its format version in cafe-schema-version;
- every record and dead letter carries its request's trace: the traceparent a third of
  the requests send; for the others (one that is not valid, or none) one the gateway
  made, the same for every record of the request;
- every record listed as rejected is on the dead-letter topic exactly once, found by
  its request id and index, with its reason and errors, cut to 512 KiB on a character
  boundary if its JSON is longer, and keyless if its sessionId cannot be a key;
- nothing of a refused request or a vanished client is on any topic, nor is anything
  else;
- no answer was a 5xx; /metrics counts no internal_error and one client_aborted per
  vanished client; the gateway's memory stayed under RSS_LIMIT_BYTES.

Every discrepancy is collected and reported at once, and `make test` ends with a line
counting what was sent and found. The run is made three times: with Kafka up; with the
spool on and Kafka out of reach until half the requests are answered; and over SASL_SSL
(a SCRAM login, zstd compression) to a secured broker where the gateway may only write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import hashlib
import io
import itertools
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import orjson
import pytest
from aiokafka import ConsumerRecord
from backports import zstd

from devkit.net import free_port
from devkit.samples import curl_bodies
from tests.support.kafka import Broker, SecureBroker, consume, create_topics, delete_topics
from tests.support.keys import KeyFile, json_headers
from tests.support.net import TcpProxy
from tests.support.scrape import Samples, scrape
from tests.support.served import (
    GATEWAY_PARTITIONS,
    Served,
    gateway_env,
    ready_in_a_row,
    running,
    watch_rss,
)
from tests.support.summary import summarise
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

CLIENTS = 72  # each keeps one request in flight: at least 64 at once
REQUESTS_PER_CLIENT = 32
# Only these clients send 2 MB records and 200,000-character sessionIds, which bounds
# the bytes in flight (see INFLIGHT_CAP_BYTES).
HEAVY_CLIENTS = 8
MIN_IN_FLIGHT = 64
# Each client's request n with n % FAULT_EVERY == FAULT_EVERY - 1 is refused or vanishes.
FAULT_EVERY = 8

TYPES = ("activity", "log", "profile")
# "identity" is a plain JSON body; "beacon" is what navigator.sendBeacon sends.
DELIVERIES = ("identity", "gzip", "br", "zstd", "beacon")
BATCH_SIZES = (1, 20, 500)
MIXES = ("valid", "some", "all")  # which of a batch's records are rejected
REJECTED_KINDS = ("invalid", "forbidden", "unknown_version")
HEAVY_KINDS = ("oversized", "long_session")  # a heavy client's first records, unless "valid"

PLATFORM = "analytics-portal"  # what both keys may write
OTHER_PLATFORM = "web-shop"  # what neither may
ORIGIN = "https://shop.example"
FOREIGN_ORIGIN = "https://elsewhere.example"

# Log and profile records have no eventId (the schemas allow no unknown field), so
# each type carries the fresh id that identifies a record in a free-text field.
IDENTITY = {
    "activity": ("eventId",),
    "log": ("logMessage",),
    "profile": ("platform", "browserFingerprint"),
}
TIME_FIELD = {"activity": "eventTime", "log": "logTime", "profile": "eventTime"}
OVERSIZED_FIELD = "productEnvironment"  # at most 64 characters in every schema
OVERSIZED_CHARS = 2_000_000
LONG_SESSION = "s" * 200_000
MAX_KEY_CHARS = 128  # a longer (or empty) sessionId goes to the dead-letter topic keyless
DEAD_LETTER_LIMIT = 512 * 1024  # bytes of a dead letter's value; past it, truncated
BOMB_CHARS = 400_000  # of one letter: gzip shrinks the body far past the allowed ratio
MAX_COMPRESSION_RATIO = 100  # CAFE_MAX_COMPRESSION_RATIO's default

FAULTS = ("vanish", "wrong_origin", "too_many", "mislabelled", "bomb")
FAULT_DELIVERY = {
    "vanish": "identity",
    "wrong_origin": "beacon",
    "mislabelled": "gzip",
    "bomb": "gzip",
}
# The answer each fault gets: status and problem code. A vanished client hangs up
# after the interim 100 Continue, which says the gateway is reading its body.
FAULT_ANSWERS: dict[str, tuple[int, str | None]] = {
    "vanish": (100, None),
    "wrong_origin": (403, "origin_not_allowed"),
    "too_many": (400, "invalid_envelope"),
    "mislabelled": (400, "invalid_encoding"),
    "bomb": (413, "payload_too_large"),
}

# What a body decodes to, at most: a heavy client's batch of 500 with a 2 MB record
# and a long sessionId is about 2.6 MB; anything else (501 profiles, a bomb) under
# 450 KB. Each body sent is checked against its bound, so these stay true.
BODY_BOUND = 512 * 1024
HEAVY_BODY_BOUND = 3 * 2**20
# Every request reserves what its body decodes to, so the test's worst case is one
# bound per client. Twice that, because a vanished client's reservation may outlive
# its hang-up for a moment while the same client's next request arrives. The
# default cap (8 MiB) would shed part of this load with 503 `overloaded`, and this
# test allows no 5xx at all: it is about the books under mixed traffic, not shedding.
# (A gateway that reserves CAFE_MAX_BODY_BYTES, 10 MiB, per compressed body fills
# this cap with a dozen of them.)
INFLIGHT_CAP_BYTES = 2 * (HEAVY_CLIENTS * HEAVY_BODY_BOUND + (CLIENTS - HEAVY_CLIENTS) * BODY_BOUND)
# Timeouts are not what this test is about: on a busy 2-core machine a produce or a
# 2 MB body may take seconds, and a 503 or 408 would fail it.
GATEWAY_TIMEOUTS = {
    "CAFE_PRODUCE_TIMEOUT_MS": "60000",
    "CAFE_BODY_TIMEOUT_SECONDS": "60",
    "CAFE_IDLE_TIMEOUT_SECONDS": "60",
}
CLIENT_TIMEOUT_S = 120.0
# The gateway serves W500 in about 90 MB (`make bench`). Here, at worst, each heavy
# client holds about 12 MB (a 2.6 MB body, its 2 MB record parsed as a 4 MB str, the
# record's JSON for the dead letter) and each other one a parsed batch of 500 (about
# 2.5 MB): some 350 MB if every client peaks at once. Measured peaks: 233-284 MiB with
# Kafka up; with the spool on, which holds the chunks it writes besides, 354-397 MiB
# (2026-12-07, five runs).
RSS_LIMIT_BYTES = 448 * 2**20
# How long /metrics may take to count the last hang-ups (a deadline, not a timing).
ABORTS_COUNTED_WITHIN_S = 30.0
# With the spool on: once Kafka is reachable, the gateway connects (backing off up to 5 s),
# makes its topics, and replays what it spooled (a deadline, not a timing).
SPOOL_EMPTY_WITHIN_S = 60.0

# Every (type, delivery, batch size, mix), in an order fixed by a seed, dealt out to
# the requests one after another.
COMBOS = list(itertools.product(TYPES, DELIVERIES, BATCH_SIZES, MIXES))
random.Random(12).shuffle(COMBOS)


@dataclass(frozen=True)
class Spec:
    """One request as planned: its route, how it is sent, its records' kinds, its fault."""

    record_type: str
    delivery: str
    kinds: tuple[str, ...]
    fault: str | None = None


def kinds_of(mix: str, size: int, heavy: bool) -> tuple[str, ...]:
    """The kind of each record of a batch."""
    if mix == "valid":
        return ("valid",) * size
    if mix == "all":
        kinds = [REJECTED_KINDS[i % len(REJECTED_KINDS)] for i in range(size)]
    else:  # every fourth record rejected, for each reason in turn
        kinds = [
            REJECTED_KINDS[i // 4 % len(REJECTED_KINDS)] if i % 4 == 3 else "valid"
            for i in range(size)
        ]
    if heavy:
        kinds[: len(HEAVY_KINDS)] = HEAVY_KINDS[:size]
    return tuple(kinds)


def plan(client: int, n: int) -> Spec:
    """Request `n` of client `client`."""
    record_type, delivery, size, mix = COMBOS[(client * REQUESTS_PER_CLIENT + n) % len(COMBOS)]
    if n % FAULT_EVERY != FAULT_EVERY - 1:
        return Spec(record_type, delivery, kinds_of(mix, size, client < HEAVY_CLIENTS))
    fault = FAULTS[(client + n // FAULT_EVERY) % len(FAULTS)]
    kinds = {"too_many": ("valid",) * 501, "bomb": ("bomb",)}.get(fault, ("valid",) * 20)
    return Spec(record_type, FAULT_DELIVERY.get(fault, delivery), kinds, fault)


def all_specs() -> list[Spec]:
    """Every request of the run, as planned."""
    return [plan(c, n) for c in range(CLIENTS) for n in range(REQUESTS_PER_CLIENT)]


def test_the_plan_covers_every_combination() -> None:
    """What the module docstring promises is in the plan (it is fixed, so this is too)."""
    specs = all_specs()
    assert {(s.delivery, k) for s in specs if not s.fault for k in s.kinds} == {
        (d, k) for d in DELIVERIES for k in ("valid", *REJECTED_KINDS, *HEAVY_KINDS)
    }
    assert {(s.record_type, len(s.kinds)) for s in specs if not s.fault} == set(
        itertools.product(TYPES, BATCH_SIZES)
    )
    assert {s.fault for s in specs} == {None, *FAULTS}
    _, bomb = build(Spec("log", "gzip", ("bomb",), "bomb"), str(uuid.uuid4()))
    assert len(bomb) > MAX_COMPRESSION_RATIO * len(COMPRESSORS["gzip"](bomb))


@functools.cache
def base_json(record_type: str) -> bytes:
    """The spec's sample record of a type, as compact JSON."""
    return orjson.dumps(orjson.loads(curl_bodies()[record_type])["records"][0])


def stamp(record_type: str, record: dict[str, Any], ident: str) -> None:
    """Write `ident` where a record of this type carries its id."""
    *parents, leaf = IDENTITY[record_type]
    for name in parents:
        record = record[name]
    record[leaf] = ident


def identity(record_type: str, record: Any) -> Any:
    """The id a record carries (None if it has none)."""
    for name in IDENTITY[record_type]:
        record = record.get(name) if isinstance(record, dict) else None
    return record


@functools.cache
def oversized_text(record_type: str) -> str:
    """OVERSIZED_CHARS random characters, some of two and three UTF-8 bytes, laid out
    so that a three-byte character straddles byte DEAD_LETTER_LIMIT of the record's
    compact JSON: its truncated dead letter must stop short of that character."""
    probe = orjson.loads(base_json(record_type))
    probe[OVERSIZED_FIELD] = ""
    marker = f'"{OVERSIZED_FIELD}":"'.encode()
    start = orjson.dumps(probe).index(marker) + len(marker)
    rng = random.Random(record_type)
    ascii_letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    head = "".join(rng.choices(ascii_letters, k=DEAD_LETTER_LIMIT - 1 - start))
    tail = "".join(rng.choices(ascii_letters + "é☕", k=OVERSIZED_CHARS - len(head) - 1))
    return head + "☕" + tail


# The format versions the gateway knows of each type; activity's version 2 adds two
# optional fields.
VERSIONS = {"activity": (1, 2), "log": (1,), "profile": (1,)}
UNKNOWN_VERSION = 99


def build_record(record_type: str, kind: str, ident: str, session: str) -> dict[str, Any]:
    """A spec sample with a fresh id and the client's session, made `kind`; of the
    newest format version for every other id."""
    record: dict[str, Any] = orjson.loads(base_json(record_type))
    stamp(record_type, record, ident)
    record["sessionId"] = session
    if int(ident[-1], 16) % 2 and record_type == "activity":
        record.update(messageFormatVersion=2, eventValue=int(ident[:6], 16) / 100,
                      referrer=f"https://shop.example/p/{ident[:8]}")  # fmt: skip
    if kind == "unknown_version":
        record["messageFormatVersion"] = UNKNOWN_VERSION
    if kind == "invalid":
        record[TIME_FIELD[record_type]] = "yesterday"
    elif kind == "forbidden":
        record["productPlatform"] = OTHER_PLATFORM
    elif kind == "oversized":
        record[OVERSIZED_FIELD] = oversized_text(record_type)
    elif kind == "long_session":
        record["sessionId"] = LONG_SESSION
    elif kind == "bomb":
        record[OVERSIZED_FIELD] = "a" * BOMB_CHARS
    return record


def truncated(value: bytes) -> bytes:
    """The longest prefix of at most DEAD_LETTER_LIMIT bytes that ends on a character
    boundary (a UTF-8 continuation byte, 0b10xxxxxx, cannot start one)."""
    cut = DEAD_LETTER_LIMIT
    while value[cut] & 0xC0 == 0x80:
        cut -= 1
    return value[:cut]


@dataclass(frozen=True, slots=True)
class Expected:
    """A record as sent, and what any message made of it must hold."""

    kind: str
    ident: str
    key: bytes | None
    version: bytes | None  # its cafe-schema-version header; None: a version not known
    length: int  # of its compact JSON
    sha256: bytes  # of its compact JSON
    stored: bytes | None  # the truncated dead letter, for JSON over DEAD_LETTER_LIMIT


@functools.cache  # one per session: a few hundred thousand records share a few dozen
def kafka_key(session: str) -> bytes | None:
    """A record's Kafka key: its sessionId, if that can be one."""
    return session.encode() if 1 <= len(session) <= MAX_KEY_CHARS else None


def expect(
    record_type: str, kind: str, ident: str, value: bytes, session: str, version: int
) -> Expected:
    """What a record whose compact JSON is `value` must become."""
    stored = truncated(value) if len(value) > DEAD_LETTER_LIMIT else None
    known = str(version).encode() if version in VERSIONS[record_type] else None
    return Expected(
        kind, ident, kafka_key(session), known, len(value), hashlib.sha256(value).digest(), stored
    )


def build(spec: Spec, session: str) -> tuple[list[Expected], bytes]:
    """A request's records as expected, and its uncompressed body."""
    records: list[Expected] = []
    values: list[bytes] = []
    for kind in spec.kinds:
        ident = uuid.uuid4().hex
        record = build_record(spec.record_type, kind, ident, session)
        values.append(orjson.dumps(record))
        version = record["messageFormatVersion"]
        records.append(
            expect(spec.record_type, kind, ident, values[-1], record["sessionId"], version)
        )
    return records, b'{"records":[' + b",".join(values) + b"]}"


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "identity": lambda body: body,
    "beacon": lambda body: body,
    # Fast settings: the client's time is not what is measured.
    "gzip": lambda body: gzip.compress(body, compresslevel=1),
    "br": lambda body: brotli.compress(body, quality=4),
    "zstd": zstd.compress,
}


@dataclass(frozen=True)
class Keys:
    """The two API keys the clients use, in plaintext."""

    server: str  # sent in x-api-key
    beacon: str  # a browser key, sent as ?api_key=


def sent_trace(request_id: str) -> str | None:
    """The traceparent a request sends (a real beacon cannot, but the gateway reads it all
    the same): a valid one, one whose parent id is not valid, or none, a third each."""
    digest = hashlib.sha256(request_id.encode()).hexdigest()
    which = int(digest[0], 16) % 3
    if which == 2:
        return None
    parent = digest[33:49] if which == 0 else "0" * 16
    return f"00-{digest[1:33]}-{parent}-01"


NEW_TRACE = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-00")


def trace_wrong(headers: dict[str, bytes], ledger: Ledger) -> str | None:
    """What is wrong with the traceparent of a message of the request that its
    cafe-request-id names, if anything."""
    request_id = headers.get("cafe-request-id", b"").decode()
    got = headers.get("traceparent", b"")
    sent = sent_trace(request_id)
    if sent is not None and not sent.endswith("0" * 16 + "-01"):
        return None if got == sent.encode() else f"not the {sent} it sent"
    if not NEW_TRACE.fullmatch(got):
        return "not a trace of the gateway's own"
    if ledger.traces.setdefault(request_id, got) != got:
        return "another than its other records'"
    return None


def addressed(spec: Spec, request_id: str, keys: Keys) -> tuple[str, dict[str, str]]:
    """Where a request goes, and its headers. Every request sends its own X-Request-Id
    (a real beacon cannot), which the gateway adopts: it finds the dead letters."""
    path = f"/v1/{spec.record_type}"
    headers = {"X-Request-Id": request_id}
    trace = sent_trace(request_id)
    if trace is not None:
        headers["traceparent"] = trace
    if spec.delivery == "beacon":
        origin = FOREIGN_ORIGIN if spec.fault == "wrong_origin" else ORIGIN
        headers |= {"Content-Type": "text/plain;charset=UTF-8", "Origin": origin}
        return f"{path}?api_key={keys.beacon}", headers
    headers |= json_headers(keys.server)
    if spec.delivery != "identity":
        headers["Content-Encoding"] = "br" if spec.fault == "mislabelled" else spec.delivery
    return path, headers


@dataclass
class Sent:
    """A request as sent, and what came back (status None: no answer at all)."""

    request_id: str
    spec: Spec
    records: list[Expected]
    status: int | None = None
    answer: Any = None
    errors: dict[int, Any] = field(default_factory=dict)  # by index, from a 207 or 422
    spooled: bool = False  # answered with X-Cafe-Spooled: true


@dataclass
class Traffic:
    """The clients' shared state: where to send, and what was sent and answered."""

    port: int
    keys: Keys
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    sent: list[Sent] = field(default_factory=list)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    peak_in_flight: int = 0
    largest_body: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})

    def vanished(self) -> int:
        """How many clients hung up halfway through their body."""
        return sum(1 for sent in self.sent if sent.spec.fault == "vanish")

    async def client(self, http: aiohttp.ClientSession, number: int) -> None:
        """One client: its planned requests one after another, on one session id."""
        session = str(uuid.uuid4())
        heavy = number < HEAVY_CLIENTS
        await self.go.wait()
        for n in range(REQUESTS_PER_CLIENT):
            spec = plan(number, n)
            records, body = build(spec, session)
            self.largest_body[heavy] = max(self.largest_body[heavy], len(body))
            sent = Sent(f"mixed-{self.run}-{number}-{n}", spec, records)
            path, headers = addressed(spec, sent.request_id, self.keys)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                if spec.fault == "vanish":
                    sent.status = await vanish(self.port, path, headers, body)
                else:
                    # A file-like body: aiohttp warns that bytes past 1 MB block the loop.
                    payload = io.BytesIO(COMPRESSORS[spec.delivery](body))
                    async with http.post(path, data=payload, headers=headers) as resp:
                        sent.status, sent.answer = resp.status, parsed(await resp.read())
                        sent.spooled = resp.headers.get("X-Cafe-Spooled") == "true"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                sent.answer = repr(exc)
            finally:
                self.in_flight -= 1
            self.sent.append(sent)


def parsed(body: bytes) -> Any:
    """An answer's JSON body; what is not JSON is kept as it came, for the report."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200]


async def vanish(port: int, path: str, headers: dict[str, str], body: bytes) -> int:
    """Send the head, wait for 100 Continue (the gateway is reading the body by then),
    send half the body, and hang up. Returns the interim status."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode())
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(body[: len(body) // 2])
        await writer.drain()
        return int(interim.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class Discrepancies:
    """What is wrong with the books, by what it is, with the first few examples of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: defaultdict[str, list[str]] = defaultdict(list)

    def wrong(self, what: str, example: object = "") -> None:
        self.counts[what] += 1
        if len(self.examples[what]) < 3:
            self.examples[what].append(repr(example)[:300])

    def __bool__(self) -> bool:
        return bool(self.counts)

    def report(self) -> str:
        return "\n".join(
            f"{count} x {what}: e.g. {'; '.join(self.examples[what])}"
            for what, count in self.counts.most_common()
        )


def expected_answer(spec: Spec) -> tuple[int, str | None]:
    """The status a request must get, and for a refusal its problem code."""
    if spec.fault is not None:
        return FAULT_ANSWERS[spec.fault]
    valid = spec.kinds.count("valid")
    return (200 if valid == len(spec.kinds) else 207 if valid else 422), None


def reason_for(kind: str) -> str | None:
    """The rejection reason a record of this kind must get (None: accepted)."""
    return {
        "valid": None,
        "forbidden": "forbidden",
        "unknown_version": "unknown_format_version",
    }.get(kind, "invalid")


def check_answer(sent: Sent, books: Discrepancies) -> None:
    """The status, and for a 2xx the counts and rejections, are what the plan implies."""
    status, code = expected_answer(sent.spec)
    if sent.status != status:
        books.wrong(f"answered {sent.status}, not {status}", (sent.request_id, sent.answer))
        return
    if code is not None:
        if not isinstance(sent.answer, dict) or sent.answer.get("code") != code:
            books.wrong(f"a {status} whose code is not {code}", sent.answer)
        return
    if status == 100:
        return
    rejected = [(i, r) for i, r in enumerate(sent.records) if r.kind != "valid"]
    activity = sent.spec.record_type == "activity"
    want = {
        "accepted": len(sent.records) - len(rejected),
        **({"rejected": len(rejected)} if rejected else {}),
    }
    rejections = sent.answer.get("rejections", [])
    counts = {name: n for name, n in sent.answer.items() if name != "rejections"}
    if counts != want:
        books.wrong("an answer with the wrong counts", (counts, want))
    listed = [(r["index"], r["reason"], r.get("eventId")) for r in rejections]
    wanted = [(i, reason_for(r.kind), r.ident if activity else None) for i, r in rejected]
    if listed != wanted:
        books.wrong("an answer listing the wrong rejections", (sent.request_id, listed[:3]))
    sent.errors = {r["index"]: r["errors"] for r in rejections}


@dataclass
class Ledger:
    """What each topic must hold, and what it must not, from the answers."""

    on_topic: dict[str, dict[str, Expected]] = field(default_factory=lambda: {t: {} for t in TYPES})
    dead: dict[tuple[str, str], tuple[Sent, int]] = field(default_factory=dict)
    refused_ids: set[str] = field(default_factory=set)
    refused_requests: set[str] = field(default_factory=set)
    doubtful_ids: set[str] = field(default_factory=set)
    doubtful_requests: set[str] = field(default_factory=set)
    # The trace the gateway made for each request that sent none (or not a valid one).
    traces: dict[str, bytes] = field(default_factory=dict)


def ledger_of(traffic: Traffic, books: Discrepancies) -> Ledger:
    """A 2xx puts its valid records on their topic and its rejected ones on the
    dead-letter topic; a 4xx or a hang-up puts nothing anywhere; of a 5xx or no
    answer nothing is known (and the test fails)."""
    ledger = Ledger()
    for sent in traffic.sent:
        check_answer(sent, books)
        ids = {r.ident for r in sent.records}
        if sent.status in (200, 207, 422) and sent.spec.fault is None:
            for index, record in enumerate(sent.records):
                if record.kind == "valid":
                    ledger.on_topic[sent.spec.record_type][record.ident] = record
                else:
                    ledger.dead[(sent.request_id, str(index))] = (sent, index)
        elif sent.status is not None and 100 <= sent.status < 500:
            ledger.refused_ids |= ids
            ledger.refused_requests.add(sent.request_id)
        else:
            ledger.doubtful_ids |= ids
            ledger.doubtful_requests.add(sent.request_id)
    return ledger


async def check_record_topic(
    record_type: str, messages: AsyncIterator[ConsumerRecord], ledger: Ledger, books: Discrepancies
) -> int:
    """Every accepted record of this type is here once, as sent, and nothing else is.
    Returns how many accepted records were found exactly once."""
    wanted = ledger.on_topic[record_type]
    others = [ledger.on_topic[t] for t in TYPES if t != record_type]
    seen: Counter[str] = Counter()
    async for message in messages:
        ident = identity(record_type, orjson.loads(message.value))
        record = wanted.get(ident)
        if record is not None:
            seen[ident] += 1
            if message.key != record.key:
                books.wrong(f"a {record_type} record with the wrong key", message.key)
            headers = dict(message.headers)
            version = headers.get("cafe-schema-version")
            if version != record.version:
                books.wrong(f"a {record_type} record of version {record.version!r} as", version)
            wrong = trace_wrong(headers, ledger)
            if wrong is not None:
                books.wrong(f"a {record_type} record whose traceparent is {wrong}", ident)
            if hashlib.sha256(message.value).digest() != record.sha256:
                books.wrong(f"a {record_type} record not as sent", message.value[:200])
        elif ident in ledger.doubtful_ids:
            continue
        elif any(ident in other for other in others):
            books.wrong(f"a record on {record_type}, not its own topic", ident)
        elif ident in ledger.refused_ids:
            books.wrong(f"a record of a refused or vanished request on {record_type}", ident)
        else:
            books.wrong(f"a message on {record_type} nobody sent", message.value[:200])
    for ident in wanted:
        if seen[ident] != 1:
            books.wrong(f"an accepted {record_type} record on its topic {seen[ident]} times", ident)
    return sum(1 for n in seen.values() if n == 1)


def check_dead_letter(
    message: ConsumerRecord, sent: Sent, index: int, books: Discrepancies
) -> None:
    """Headers, key and value of the dead letter of record `index` of `sent`."""
    record = sent.records[index]
    place = (sent.request_id, index)
    headers = dict(message.headers)
    wanted_headers = {
        "cafe-schema": sent.spec.record_type.encode(),
        "cafe-reject-reason": str(reason_for(record.kind)).encode(),
        "cafe-schema-version": record.version,
    }
    for name, value in wanted_headers.items():
        if headers.get(name) != value:
            books.wrong(f"a dead letter whose {name} is wrong", (place, headers.get(name)))
    errors = orjson.loads(headers.get("cafe-errors", b"null"))
    if errors != sent.errors.get(index):
        books.wrong("a dead letter whose cafe-errors differ from the answer", (place, errors))
    if message.key != record.key:
        books.wrong(f"a dead letter of a {record.kind} record keyed wrong", (place, message.key))
    if (record.key is None) != ("cafe-key-omitted" in headers):
        books.wrong(f"a dead letter of a {record.kind} record with cafe-key-omitted wrong", place)
    if record.stored is None:
        if hashlib.sha256(message.value).digest() != record.sha256:
            books.wrong(f"a dead letter of a {record.kind} record not as sent", place)
        if "cafe-truncated" in headers:
            books.wrong("a dead letter marked truncated that need not be", place)
        return
    truncation = {
        "cafe-truncated": b"true",
        "cafe-original-bytes": str(record.length).encode(),
        "cafe-original-sha256": record.sha256.hex().encode(),
    }
    if {name: headers.get(name) for name in truncation} != truncation:
        books.wrong("a truncated dead letter without its truncation headers", (place, headers))
    if message.value != record.stored:
        books.wrong(
            f"a dead letter of {record.length} bytes not cut to {len(record.stored)}",
            (place, len(message.value)),
        )


async def check_dead_letters(
    messages: AsyncIterator[ConsumerRecord], ledger: Ledger, books: Discrepancies
) -> int:
    """Every rejected record is here once, and nothing else is. Returns how many
    rejected records were found exactly once."""
    seen: Counter[tuple[str, str]] = Counter()
    async for message in messages:
        headers = dict(message.headers)
        request_id = headers.get("cafe-request-id", b"").decode()
        place = (request_id, headers.get("cafe-record-index", b"").decode())
        if place in ledger.dead:
            seen[place] += 1
            check_dead_letter(message, *ledger.dead[place], books)
            wrong = trace_wrong(headers, ledger)
            if wrong is not None:
                books.wrong(f"a dead letter whose traceparent is {wrong}", place)
        elif request_id in ledger.doubtful_requests:
            continue
        elif request_id in ledger.refused_requests:
            books.wrong("a dead letter of a refused or vanished request", request_id)
        elif "cafe-record-index" not in headers:
            books.wrong("a dead letter without cafe-record-index", request_id)
        else:
            books.wrong("a dead letter nobody sent", place)
    for place in ledger.dead:
        if seen[place] != 1:
            books.wrong(f"a rejected record on the dead-letter topic {seen[place]} times", place)
    return sum(1 for n in seen.values() if n == 1)


async def scrape_once_aborts_counted(http: aiohttp.ClientSession, vanished: int) -> Samples:
    """/metrics, once it counts `vanished` client_aborted (or the deadline passes)."""
    deadline = time.monotonic() + ABORTS_COUNTED_WITHIN_S
    while True:
        samples = await scrape(http)
        counted = samples.value("cafe_http_errors_total", code="client_aborted")
        if counted >= vanished or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def rss_watched(gateway: Served) -> AsyncIterator[list[int]]:
    """The peak RSS of `gateway` and its workers while in the block, in `[0]`."""
    peak = [0]
    stop = asyncio.Event()
    watching = asyncio.create_task(watch_rss([gateway], peak, stop))
    try:
        yield peak
    finally:
        stop.set()
        # A gateway that died under the watch must not hide why the test failed.
        await asyncio.gather(watching, return_exceptions=True)


@dataclass(frozen=True)
class Run:
    """What the gateway showed of the run: its metrics after, its peak RSS, how long."""

    samples: Samples
    rss_peak: int
    seconds: float


async def drive(traffic: Traffic, gateway: Served, kafka_back: TcpProxy | None = None) -> Run:
    """Every client's requests, all started at once and all waited for; then /metrics.

    With `kafka_back`, the gateway's only way to Kafka, the way is opened once half the
    requests are answered, and /metrics is read once the spool has emptied.
    """
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{traffic.port}",
        timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S),
        connector=aiohttp.TCPConnector(limit=CLIENTS + 1),
    ) as http:
        await ready_in_a_row(http, 1)
        started = time.monotonic()
        async with rss_watched(gateway) as rss_peak:
            async with asyncio.TaskGroup() as clients:
                for number in range(CLIENTS):
                    clients.create_task(traffic.client(http, number))
                if kafka_back is not None:
                    clients.create_task(open_halfway(traffic, kafka_back))
                traffic.go.set()  # all first requests leave in the same turn of the loop
            if kafka_back is not None:
                await eventually(lambda: spool_emptied(http), within=SPOOL_EMPTY_WITHIN_S)
            seconds = time.monotonic() - started
            samples = await scrape_once_aborts_counted(http, traffic.vanished())
    return Run(samples, rss_peak[0], seconds)


async def open_halfway(traffic: Traffic, proxy: TcpProxy) -> None:
    """Let the gateway reach Kafka once half the requests are answered."""

    async def half_answered() -> bool:
        return len(traffic.sent) >= CLIENTS * REQUESTS_PER_CLIENT // 2

    await eventually(half_answered, within=CLIENT_TIMEOUT_S)
    await proxy.open()


async def spool_emptied(http: aiohttp.ClientSession) -> bool:
    """The spool has held records, and holds none now."""
    samples = await scrape(http)
    return (
        samples.value("cafe_spool_records_spooled_total") > 0
        and samples.value("cafe_spool_records") == 0
    )


def check_gateway(traffic: Traffic, run: Run, books: Discrepancies) -> None:
    """The load was what this test claims, and the gateway stayed healthy under it."""
    if traffic.peak_in_flight < MIN_IN_FLIGHT:
        books.wrong(f"fewer than {MIN_IN_FLIGHT} requests in flight", traffic.peak_in_flight)
    for heavy, bound in ((False, BODY_BOUND), (True, HEAVY_BODY_BOUND)):
        if traffic.largest_body[heavy] > bound:
            books.wrong("a body past the bound INFLIGHT_CAP_BYTES assumes", heavy)
    internal_errors = run.samples.value("cafe_http_errors_total", code="internal_error")
    if internal_errors:
        books.wrong(f"internal_error counted {internal_errors:g} times")
    aborted = run.samples.value("cafe_http_errors_total", code="client_aborted")
    if aborted != traffic.vanished():
        books.wrong(f"client_aborted counted {aborted:g} times, not {traffic.vanished()}")
    if not 0 < run.rss_peak < RSS_LIMIT_BYTES:
        books.wrong(f"peak RSS past {RSS_LIMIT_BYTES >> 20} MiB", run.rss_peak >> 20)


def summary(traffic: Traffic, ledger: Ledger, found: list[int], run: Run, case: str) -> str:
    """One line of what was sent, answered and found."""
    statuses = Counter(sent.status for sent in traffic.sent)
    refused = sum(n for s, n in statuses.items() if s and 400 <= s < 500 and s != 422)
    failed = Counter(
        sent.answer.get("code") if isinstance(sent.answer, dict) else "no answer"
        for sent in traffic.sent
        if sent.status is None or sent.status >= 500
    )
    dead = [sent.records[index] for sent, index in ledger.dead.values()]
    versions_2 = sum(r.version == b"2" for t in ledger.on_topic.values() for r in t.values())
    *accepted, dead_once = found
    return (
        f"mixed traffic, Kafka {case}: {len(traffic.sent)} requests from {CLIENTS} clients, "
        f"{traffic.peak_in_flight} in flight at once, {run.seconds:.0f} s "
        f"({statuses[200]} 200, {statuses[207]} 207, {statuses[422]} 422, {refused} other 4xx, "
        f"{traffic.vanished()} vanished mid-body, {failed.total()} 5xx or unanswered, "
        f"{sum(sent.spooled for sent in traffic.sent)} answered from the spool, "
        f"{sum(sent_trace(sent.request_id) is not None for sent in traffic.sent)} "
        "sent a traceparent"
        f"{' ' + str(dict(failed)) if failed else ''}); "
        f"{sum(accepted):,} of {sum(map(len, ledger.on_topic.values())):,} accepted records "
        f"on their topics once ({versions_2:,} of format version 2); {dead_once:,} of "
        f"{len(dead):,} dead letters ({sum(r.stored is not None for r in dead)} truncated, "
        f"{sum(r.key is None for r in dead)} keyless, "
        f"{sum(r.kind == 'unknown_version' for r in dead):,} of an unknown version); "
        f"client_aborted {run.samples.value('cafe_http_errors_total', code='client_aborted'):g}; "
        f"peak RSS {run.rss_peak / 2**20:.0f} MiB"
    )


@pytest.fixture
async def topic_prefix(kafka: Broker) -> AsyncIterator[str]:
    """A prefix for the gateway's topics; they are deleted afterwards."""
    prefix = f"mixed.{uuid.uuid4().hex[:8]}"
    yield prefix
    await delete_topics(kafka.bootstrap, lambda t: t.startswith(prefix + "."))


async def secured(broker: SecureBroker, prefix: str, directory: Path) -> dict[str, str]:
    """The gateway's topics made on the secure broker, with only the rights it needs, and
    the settings of a SCRAM login over SASL_SSL with zstd compression."""
    names = [f"{prefix}.{name}" for name in (*TYPES, "deadletter")]
    await create_topics(broker.plaintext, names, GATEWAY_PARTITIONS)
    topics = [arg for name in names for arg in ("--topic", name)]
    broker.acls(
        "--add", "--allow-principal", "User:gateway",
        "--operation", "Write", "--operation", "Describe", *topics,
    )  # fmt: skip
    password = directory / "kafka-password"
    password.write_text(broker.gateway_password)
    return {
        "CAFE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CAFE_KAFKA_SSL_CA_FILE": str(broker.ca_file),
        "CAFE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "CAFE_KAFKA_SASL_USERNAME": "gateway",
        "CAFE_KAFKA_SASL_PASSWORD_FILE": str(password),
        "CAFE_KAFKA_COMPRESSION": "zstd",
    }


@pytest.mark.parametrize(
    "kafka_at_start", ["up", "away, with the spool on", "up, over SASL_SSL with zstd"]
)
async def test_mixed_traffic_balances_the_books(
    kafka: Broker,
    key_file: KeyFile,
    topic_prefix: str,
    pytestconfig: pytest.Config,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    kafka_at_start: str,
) -> None:
    """With the spool on, the gateway's way to Kafka opens halfway through: the first
    half of the traffic is spooled, and the books must balance all the same. Over
    SASL_SSL, a secured broker of the module's own, where the gateway may only write."""
    beacon_key, _ = key_file.add(PLATFORM, origins=(ORIGIN,), browser=True)
    traffic = Traffic(free_port(), Keys(key_file.key, beacon_key))
    spool = kafka_at_start.startswith("away")
    proxy = TcpProxy(kafka.bootstrap) if spool else None
    target, security, read_at = kafka, {}, kafka.bootstrap
    if "SASL_SSL" in kafka_at_start:
        broker: SecureBroker = request.getfixturevalue("secure_broker")
        security = await secured(broker, topic_prefix, tmp_path)
        target, read_at = Broker(broker.sasl_ssl, "the secure broker"), broker.plaintext
    env = gateway_env(
        traffic.port,
        Broker(f"127.0.0.1:{proxy.port}", "a proxy, closed") if proxy else target,
        key_file,
        topic_prefix,
        CAFE_WORKERS="1",
        CAFE_MAX_INFLIGHT_BYTES=str(INFLIGHT_CAP_BYTES),
        **GATEWAY_TIMEOUTS,
        **({"CAFE_SPOOL_DIR": str(tmp_path / "spool")} if spool else {}),
        **security,
    )

    def topic(name: str) -> AsyncIterator[ConsumerRecord]:
        return consume(read_at, f"{topic_prefix}.{name}", GATEWAY_PARTITIONS)

    async with contextlib.AsyncExitStack() as stack:
        if proxy is not None:
            stack.push_async_callback(proxy.close)
        gateway = await stack.enter_async_context(running(env))
        run = await drive(traffic, gateway, proxy)
        if spool and not any(sent.spooled for sent in traffic.sent):
            pytest.fail("nothing was spooled: Kafka was not away")
        books = Discrepancies()
        ledger = ledger_of(traffic, books)
        found = await asyncio.gather(
            *(check_record_topic(t, topic(t), ledger, books) for t in TYPES),
            check_dead_letters(topic("deadletter"), ledger, books),
        )
        check_gateway(traffic, run, books)
        summarise(pytestconfig, summary(traffic, ledger, found, run, kafka_at_start))
        log = await gateway.stop()
    errors = [line for line in log.splitlines() if '"level":"ERROR"' in line][:5]
    assert not books, books.report() + "\ngateway errors:\n" + "\n".join(errors)
