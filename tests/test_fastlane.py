"""The fast lane and the general path are one behaviour.

One corpus of requests goes to two gateways built alike, one with CAFE_FAST_LANE on and
one with it off, over raw sockets. For each request the status, the headers (order
aside; Date aside) and the body must be the same; after the corpus, every metric series,
every access-log line (its latency aside) and what each gateway handed its sink.

The corpus covers what reaches the ingest routes: valid, invalid, mixed, forbidden,
oversized (declared and decoded), compressed, malformed, beacons, CORS-preflighted and
cross-origin posts, rate-limited requests and records, a sink that is down or spools,
draining, a connection past the cap, HTTP/1.0, `Connection: close`, chunked bodies,
`Expect: 100-continue`, and the wrong method or key.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.http.fastlane import FastLane
from gateway.http.state import DRAINING
from gateway.keys.file import update_keys_file
from gateway.keys.model import mint_key
from gateway.sink import Context, MemorySink
from tests.support.app import GatewayClient, access_lines, gateway_settings
from tests.support.keys import KeyFile, make_key_file
from tests.support.rawhttp import Answer, read_answer
from tests.support.records import envelope, sample
from tests.support.scrape import Samples, scrape

ORIGIN = "https://shop.example"
MAX_BODY = 256 * 1024
MAX_CONNECTIONS = 8


@dataclass
class Keys:
    file: KeyFile
    browser: str
    limited_requests: str
    limited_records: str


def _keys(directory: Path) -> Keys:
    file = make_key_file(directory)
    browser, browser_record = mint_key(("analytics-portal",), origins=(ORIGIN,), browser=True)
    requests, requests_record = mint_key(("analytics-portal",), requests_per_second=0.01)
    records, records_record = mint_key(("analytics-portal",), records_per_second=0.01)
    update_keys_file(
        file.path, lambda keys: [*keys, browser_record, requests_record, records_record]
    )
    return Keys(file, browser, requests, records)


# A client's trace (the W3C standard's example).
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Step:
    """One request of the corpus, and what the gateway is put through before it."""

    name: str
    request: bytes
    before: str = ""  # "sink down", "spooling", "draining" or "past the cap"
    extra: dict[str, Any] = field(default_factory=dict)


def _post(
    path: str,
    body: bytes,
    *,
    key: str | None,
    headers: dict[str, str] | None = None,
    version: str = "1.1",
    request_id: str,
    request_id_sent: str | None = None,
    length: bool = True,
) -> bytes:
    """A POST as sent; `request_id` names it in the corpus, and is its X-Request-Id unless
    `request_id_sent` says what to send instead."""
    sent_id = request_id if request_id_sent is None else request_id_sent
    lines = [f"POST {path} HTTP/{version}", "Host: 127.0.0.1", f"X-Request-Id: {sent_id}"]
    if key is not None:
        lines.append(f"x-api-key: {key}")
    sent = {"Content-Type": "application/json", **(headers or {})}
    if length:
        sent["Content-Length"] = str(len(body))
    lines += [f"{name}: {value}" for name, value in sent.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def corpus(keys: Keys) -> list[Step]:
    key = keys.file.key
    valid = envelope(sample("activity"))
    batch = envelope(*(sample("activity", sessionId=f"s-{n}") for n in range(20)))
    invalid = envelope(sample("activity", sessionId=7))
    mixed = envelope(sample("activity"), sample("activity", sessionId=7))
    forbidden = envelope(sample("activity", productPlatform="other-portal"))
    # Past the limit once decoded, a few hundred bytes as sent.
    big = b"[" + b" " * MAX_BODY + b"]"
    # A records limit always lets a full batch (500) through: the third of these is over.
    half = envelope(*(sample("activity", sessionId=f"h-{n}") for n in range(250)))
    gz = {"Content-Encoding": "gzip"}
    page = {"Origin": ORIGIN}
    steps: list[Step] = []

    def add(name: str, body: bytes = valid, before: str = "", **post: Any) -> None:
        """A POST of `body` to /v1/activity with the main key, as `post` changes it."""
        post = {"path": "/v1/activity", "key": key, **post}
        steps.append(
            Step(name, _post(body=body, request_id=f"diff-{len(steps):03d}", **post), before)
        )

    def add_raw(name: str, head: str) -> None:
        """A request with no body: `head` is its request line and headers."""
        rid = f"diff-{len(steps):03d}"
        steps.append(Step(name, f"{head}Host: 127.0.0.1\r\nX-Request-Id: {rid}\r\n\r\n".encode()))

    add("valid")
    add("traced", headers={"traceparent": TRACEPARENT, "tracestate": "vendor=x"})
    add("a trace not valid", headers={"traceparent": TRACEPARENT.replace("-01", "-1")})
    add("valid batch", batch)
    add("log", envelope(sample("log")), path="/v1/log")
    add("profile", envelope(sample("profile")), path="/v1/profile")
    add("invalid", invalid)
    add("mixed", mixed)
    add("forbidden", forbidden)
    add("no key", key=None)
    add("unknown key", key="cafe_nope")
    add("declared too large", b"x" * (MAX_BODY + 1))
    add("decoded too large", gzip.compress(big), headers=gz)
    add("gzip", gzip.compress(batch), headers=gz)
    add("not gzip", b"not gzip", headers=gz)
    add("not JSON", b"{")
    add("no records", b"{}")
    add("wrong media type", headers={"Content-Type": "text/xml"})
    beacon = {"Content-Type": "text/plain;charset=UTF-8", **page}
    add("beacon", path=f"/v1/activity?api_key={keys.browser}", key=None, headers=beacon)
    add_raw(
        "preflight",
        f"OPTIONS /v1/activity HTTP/1.1\r\nOrigin: {ORIGIN}\r\n"
        "Access-Control-Request-Method: POST\r\n"
        "Access-Control-Request-Headers: content-type, x-api-key\r\n",
    )
    add("cross-origin post", key=keys.browser, headers=page)
    add(
        "cross-origin post, origin not listed",
        key=keys.browser,
        headers={"Origin": "https://elsewhere.example"},
    )
    add("server key from a page", headers=page)
    for n in range(2):
        add(f"request limit {n}", key=keys.limited_requests)
    for n in range(3):
        add(f"records limit {n}", half, key=keys.limited_records)
    add("HTTP/1.0", version="1.0")
    add("HTTP/1.0 keep-alive", version="1.0", headers={"Connection": "keep-alive"})
    add("Connection: close", headers={"Connection": "close"})
    add("chunked", _chunked(batch), headers={"Transfer-Encoding": "chunked"}, length=False)
    add("Expect: 100-continue", headers={"Expect": "100-continue"})
    add_raw("wrong method", f"GET /v1/activity HTTP/1.1\r\nx-api-key: {key}\r\n")
    add("trailing slash", path="/v1/activity/")
    add("no request id", request_id_sent="a b")
    add("sink down", before="sink down")
    add("spooled", mixed, before="spooling")
    add("spooled, all valid", before="spooling")
    add("past the cap", before="past the cap")
    add("draining", before="draining")
    return steps


_TAKE = FastLane._take


@dataclass
class Seen:
    """What one gateway showed for the corpus."""

    answers: list[tuple[int, dict[str, str], bytes, bool]]
    metrics: Samples
    log: list[dict[str, Any]]
    sink: MemorySink
    # The request ids of the requests the fast lane took.
    taken: list[str]


async def _run(
    gateway_client: GatewayClient,
    keys: Keys,
    steps: list[Step],
    *,
    fast_lane: bool,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> Seen:
    sink = MemorySink()
    taken: list[str] = []

    async def counted(lane: FastLane, request: web.Request, record_type: Any) -> Any:
        taken.append(request.headers.get("X-Request-Id", ""))
        return await _TAKE(lane, request, record_type)

    monkeypatch.setattr(FastLane, "_take", counted)
    settings = gateway_settings(
        keys_file=keys.file.path,
        fast_lane=fast_lane,
        max_body_bytes=MAX_BODY,
        max_connections=MAX_CONNECTIONS,
    )
    client = await gateway_client(settings, sink=sink)
    port = client.port
    assert port is not None
    caplog.clear()
    answers = []
    held: list[asyncio.StreamWriter] = []
    for step in steps:
        sink.is_ready = step.before != "sink down"
        sink.spooling = step.before == "spooling"
        if step.before == "draining":
            client.app[DRAINING].set()
        if step.before == "past the cap":
            for _ in range(MAX_CONNECTIONS):
                _, holder = await asyncio.open_connection("127.0.0.1", port)
                held.append(holder)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(step.request)
        if b"Expect: 100-continue" in step.request:
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
        answer: Answer = await asyncio.wait_for(read_answer(reader), 10)
        headers = {k: _id(v) for k, v in answer.headers.items() if k != "date"}
        # What the answer says of the connection, then whether the gateway did so.
        says_close = headers.get("connection") == "close" or (
            step.request.split(b"\r\n", 1)[0].endswith(b"HTTP/1.0")
            and headers.get("connection") != "keep-alive"
        )
        closed = await _closed(reader, 5 if says_close else 0.02)
        writer.close()
        body = _GENERATED.sub(b"<generated>", answer.body)
        answers.append((answer.status, headers, body, closed))
        for each in held:
            each.close()
        held.clear()
    client.app[DRAINING].clear()
    metrics = await scrape(client)
    log = [
        {k: _id(v) for k, v in line.items() if k not in ("latency_ms", "time")}
        for line in access_lines(caplog)
        if line.get("route") != "/metrics"
    ]
    return Seen(answers, metrics, log, sink, taken)


# A request id the gateway made (each gateway draws its own prefix).
_GENERATED = re.compile(rb"\b[0-9a-f]{32}\b")


def _id(value: Any) -> Any:
    """`value`, or "<generated>" if it is a request id a gateway made."""
    if isinstance(value, str) and re.fullmatch("[0-9a-f]{32}", value):
        return "<generated>"
    return value


async def _closed(reader: asyncio.StreamReader, wait_s: float) -> bool:
    """Whether the server closed the connection after its answer, within `wait_s`."""
    try:
        return await asyncio.wait_for(reader.read(1), wait_s) == b""
    except TimeoutError:
        return False


# Series that measure time, or a moment (and each series' _created): they differ from
# run to run on either path.
_TIMED = ("cafe_http_request_duration_seconds_bucket", "cafe_http_request_duration_seconds_sum")


def _series(samples: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in samples.samples
        if name.startswith("cafe_")
        and name not in _TIMED
        and not name.endswith("_created")
        and not name.startswith(("cafe_build_info", "cafe_http_connections_open"))
    }


def _stored(sink: MemorySink) -> Any:
    """What the sink holds, its arrival times aside."""

    def context(c: Context) -> Context:
        # A trace of the gateway's own is drawn at random, on either path.
        parent = c.traceparent if c.traceparent == TRACEPARENT else "<generated>"
        return c._replace(request_id=_id(c.request_id), received_at="", traceparent=parent)

    records = {
        name: [(r.session_id, r.value, context(r.context)) for r in kept]
        for name, kept in sink.records.items()
    }
    rejected = {
        name: [r._replace(context=context(r.context)) for r in kept]
        for name, kept in sink.rejected.items()
    }
    return records, rejected


async def test_the_fast_lane_answers_as_the_general_path_does(
    gateway_client: GatewayClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    keys = _keys(tmp_path)
    steps = corpus(keys)
    general = await _run(
        gateway_client, keys, steps, fast_lane=False, caplog=caplog, monkeypatch=monkeypatch
    )
    fast = await _run(
        gateway_client, keys, steps, fast_lane=True, caplog=caplog, monkeypatch=monkeypatch
    )
    # The fast lane took every POST to an ingest path as such but the one that expects a
    # 100 Continue; the general path, none.
    assert general.taken == []
    by_id = {step.request.split(b"X-Request-Id: ")[1].split(b"\r\n")[0]: step for step in steps}
    took = {by_id[rid.encode()].name for rid in fast.taken}
    assert took == {
        step.name
        for step in steps
        if step.request.startswith((b"POST /v1/activity ", b"POST /v1/log ", b"POST /v1/profile "))
        and b"Expect:" not in step.request
    }
    assert {"valid", "past the cap", "draining", "HTTP/1.0", "sink down"} <= took

    for step, one, other in zip(steps, general.answers, fast.answers, strict=True):
        assert one == other, f"{step.name}: the general path and the fast lane differ"
    # The corpus reaches what it says it does (so that a broken gateway cannot pass by
    # answering everything alike).
    statuses = {step.name: status for step, (status, *_) in zip(steps, fast.answers, strict=True)}
    assert statuses["valid"] == 200 and statuses["mixed"] == 207 and statuses["invalid"] == 422
    assert statuses["forbidden"] == 422 and statuses["no key"] == 401
    assert statuses["declared too large"] == 413 and statuses["decoded too large"] == 413
    assert statuses["request limit 1"] == 429 and statuses["records limit 2"] == 429
    assert statuses["sink down"] == 503 and statuses["past the cap"] == 503
    assert statuses["preflight"] == 204 and statuses["beacon"] == 200
    spooled = fast.answers[[s.name for s in steps].index("spooled, all valid")]
    assert spooled[1].get("x-cafe-spooled") == "true"
    closing = {s.name for s, answer in zip(steps, fast.answers, strict=True) if answer[3]}
    assert {"HTTP/1.0", "Connection: close", "draining", "past the cap"} <= closing
    assert "valid" not in closing

    general_series, fast_series = _series(general.metrics), _series(fast.metrics)
    assert general_series == fast_series
    assert general_series[("cafe_records_total", (("outcome", "accepted"), ("type", "activity")))]

    assert len(general.log) == len(steps) == len(fast.log)
    for step, one_line, other_line in zip(steps, general.log, fast.log, strict=True):
        assert one_line == other_line, f"{step.name}: the access-log lines differ"

    assert _stored(general.sink) == _stored(fast.sink)
    assert sum(len(kept) for kept in fast.sink.records.values()) > 20
