"""Attacks on the fast lane (gateway/http/fastlane.py): requests and situations where it
might part from the general path (CAFE_FAST_LANE=false).

Each differential test runs one scenario against a gateway with the fast lane on and one
with it off, over raw sockets, and compares every answer byte for byte (header order,
Date and generated request ids aside; several answers on one connection are split and
compared each), whether the server closed the connection, every metric series, the
access-log lines and the other log lines, what the sink holds, the requests in flight
and the body bytes admission holds afterwards (both back to rest).

The scenarios are those tests/test_fastlane.py leaves out: pipelining, a second request
after a pre-built answer, clients that vanish or stall, framing the parser refuses,
targets that only look like an ingest path, upgrades, sinks that raise what they should
not, many requests in flight with a scrape, a drain and a key change among them. The
Tally is checked against prometheus-client's own updates at the edges of the buckets,
and its every-second flush at exit.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram

from gateway.app import create_app
from gateway.http.admission import Admission
from gateway.http.listener import GatewayRunner
from gateway.http.state import DRAINING, KEYS
from gateway.keys.file import update_keys_file
from gateway.metrics import LATENCY_BUCKETS, Tally
from gateway.sink import Delivery, MemorySink
from tests.support.app import GatewayClient, access_lines, gateway_settings
from tests.support.keys import KeyFile, make_key_file
from tests.support.records import envelope, sample
from tests.support.scrape import scrape

_GENERATED = re.compile(rb"[0-9a-f]{32}")


@pytest.fixture
def keys(tmp_path: Path) -> KeyFile:
    return make_key_file(tmp_path)


@pytest.fixture(autouse=True)
def _access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")


def post(
    path: str = "/v1/activity",
    body: bytes | None = None,
    *,
    key: str | None,
    rid: str = "req-1",
    extra: str = "",
    version: str = "1.1",
    method: str = "POST",
) -> bytes:
    """A request as sent: one valid activity record unless `body`; `extra` header lines."""
    body = envelope(sample("activity")) if body is None else body
    head = f"{method} {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nX-Request-Id: {rid}\r\n"
    if key is not None:
        head += f"x-api-key: {key}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def _answers(raw: bytes) -> list[Any]:
    """The answers in `raw`, each (status line, sorted header lines, body), Date and the
    ids a gateway made aside."""
    found: list[Any] = []
    rest = raw
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            found.append(("partial", head))
            break
        status, *lines = head.split(b"\r\n")
        headers = sorted(
            _GENERATED.sub(b"<id>", line) for line in lines if not line.lower().startswith(b"date:")
        )
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in lines
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        body, rest = rest[:length], rest[length:]
        found.append((status, headers, _GENERATED.sub(b"<id>", body)))
    return found


_CLOSE = b"<close>"


async def _exchange(port: int, steps: list[bytes | float], *, wait_s: float = 0.8) -> Any:
    """Send `steps` on one connection (a float: pause that long; _CLOSE: close it and
    read nothing), then read until the server closes or is quiet for `wait_s`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for step in steps:
        if isinstance(step, float):
            await asyncio.sleep(step)
        elif step == _CLOSE:
            writer.close()
            return [], "closed by the client"
        else:
            writer.write(step)
            await writer.drain()
    data = b""
    closed = False
    while True:
        try:
            more = await asyncio.wait_for(reader.read(65536), wait_s)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed = True
            break
        if not more:
            closed = True
            break
        data += more
    writer.close()
    return _answers(data), closed


def _admission(app: web.Application) -> Admission:
    """The app's Admission (the general path's middleware and the fast lane share it)."""
    for middleware in app.middlewares:
        for cell in getattr(middleware, "__closure__", None) or ():
            if isinstance(cell.cell_contents, Admission):
                return cell.cell_contents
    raise AssertionError("the app has no admission middleware")


def _generated(value: Any) -> Any:
    if isinstance(value, str):
        return re.sub("[0-9a-f]{32}", "<id>", value)
    return value


async def _observe(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    scenario: Any,
    caplog: pytest.LogCaptureFixture,
    *,
    fast_lane: bool,
    sink: MemorySink | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Everything one gateway shows for `scenario(client, port)`."""
    sink = MemorySink() if sink is None else sink
    client = await gateway_client(
        gateway_settings(keys_file=key_file.path, fast_lane=fast_lane, **settings), sink=sink
    )
    caplog.clear()
    port = client.port
    assert port is not None
    result = await scenario(client, port)
    await asyncio.sleep(0.05)
    samples = await scrape(client)
    series = {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in samples.samples
        if name.startswith("cafe_")
        and not name.startswith("cafe_http_request_duration_seconds")
        and not name.endswith("_created")
        and not name.startswith(("cafe_build_info", "cafe_http_connections_open"))
    }
    log = sorted(
        repr({k: _generated(v) for k, v in line.items() if k not in ("latency_ms", "time")})
        for line in access_lines(caplog)
        if line.get("route") != "/metrics"
    )
    other = sorted(
        (r.name, r.levelname, _generated(r.getMessage()))
        for r in caplog.records
        if r.name != "gateway.access"
    )
    seen = {
        "result": result,
        "series": series,
        "log": log,
        "other": other,
        "records": {name: len(kept) for name, kept in sink.records.items()},
        "rejected": {name: len(kept) for name, kept in sink.rejected.items()},
        # The scrape itself is in flight.
        "in flight": samples.value("cafe_http_requests_in_flight"),
        "admitted bytes": _admission(client.app).in_flight_bytes,
    }
    await client.close()
    return seen


def _alike(general: dict[str, Any], fast: dict[str, Any]) -> None:
    for what in general:
        assert general[what] == fast[what], f"{what}: the general path and the fast lane differ"
    assert fast["in flight"] == 1, "only the scrape should be in flight"
    assert fast["admitted bytes"] == 0


def _raw_scenarios(key: str) -> dict[str, list[bytes | float]]:
    valid = envelope(sample("activity"))
    head = (
        "POST /v1/activity HTTP/1.1\r\nHost: x\r\nX-Request-Id: r\r\n"
        f"x-api-key: {key}\r\nContent-Type: application/json\r\n"
    )
    chunked = head + "Transfer-Encoding: chunked\r\n\r\n"
    upgrade_h2c = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n"
    return {
        "pipelined, every kind": [
            post(key=key, rid="a")
            + post(key=key, rid="b")
            + post("/v1/log", envelope(sample("log")), key=key, rid="c")
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            + post(key=key, rid="d", extra="Origin: https://x.example\r\n")
            + post(key="nope", rid="e")
            + post(key=key, rid="f", body=b"{")
            + post(key=key, rid="g")
        ],
        "vanishes mid-body": [
            (head + "Content-Length: 1000\r\n\r\n").encode() + b'{"records":',
            0.1,
            _CLOSE,
        ],
        "vanishes after the headers": [(head + "Content-Length: 1000\r\n\r\n").encode(), _CLOSE],
        "body slower than the timeout": [
            (head + f"Content-Length: {len(valid)}\r\n\r\n").encode() + valid[:5],
            0.6,
            valid[5:],
        ],
        "body stalls": [(head + "Content-Length: 500\r\n\r\n").encode() + b'{"rec', 0.6],
        "HEAD": [post(key=key, method="HEAD", body=b"")],
        "lower-case method": [post(key=key, method="post")],
        "PUT": [post(key=key, method="PUT")],
        "OPTIONS with a body": [post(key=key, method="OPTIONS")],
        "duplicate Content-Length": [post(key=key, extra=f"Content-Length: {len(valid)}\r\n")],
        "Transfer-Encoding and Content-Length": [
            post(key=key, extra="Transfer-Encoding: chunked\r\n")
        ],
        "Transfer-Encoding gzip, chunked": [
            post(key=key, extra="Transfer-Encoding: gzip, chunked\r\n")
        ],
        "percent-encoded path": [post("/v1/%61ctivity", key=key)],
        "double slash": [post("//v1/activity", key=key)],
        "absolute form": [post("http://127.0.0.1/v1/activity", key=key)],
        "fragment": [post("/v1/activity#x", key=key)],
        "?api_key= and x-api-key": [post("/v1/activity?api_key=nope", key=key)],
        "x-api-key twice": [post(key=key, extra="x-api-key: nope\r\n")],
        "empty x-api-key": [post(key="")],
        "non-ASCII key": [post(key="cl\u00e9")],
        "request id with a control character": [post(key=key, rid="a\x01b")],
        "request id too long": [post(key=key, rid="a" * 200)],
        "non-ASCII request id": [post(key=key, rid="\u00e9t\u00e9")],
        "two request ids": [post(key=key, extra="X-Request-Id: other\r\n")],
        "HTTP/1.0 keep-alive, twice": [
            post(key=key, version="1.0", extra="Connection: keep-alive\r\n") * 2
        ],
        "HTTP/1.0 without Host": [
            post(key=key, version="1.0").replace(b"Host: 127.0.0.1\r\n", b"")
        ],
        "HTTP/1.1 without Host": [post(key=key).replace(b"Host: 127.0.0.1\r\n", b"")],
        "HTTP/1.2": [post(key=key, version="1.2")],
        "Connection: keep-alive, twice": [post(key=key, extra="Connection: keep-alive\r\n") * 2],
        "Connection: keep-alive, close": [post(key=key, extra="Connection: keep-alive, close\r\n")],
        "Connection: Upgrade alone, twice": [post(key=key, extra="Connection: Upgrade\r\n") * 2],
        "upgrade to websocket, then another": [
            post(key=key, extra="Connection: Upgrade\r\nUpgrade: websocket\r\n")
            + post(key=key, rid="second")
        ],
        # aiohttp leaves the second unanswered, on either path (its parser, not the lane).
        "upgrade to h2c, then another": [
            post(key=key, extra=upgrade_h2c) + post(key=key, rid="second")
        ],
        "a pre-built answer, then 100-continue": [
            post(key=key) + post(key=key, rid="e", extra="Expect: 100-continue\r\n")
        ],
        "EXPECT in capitals": [post(key=key, extra="EXPECT: 100-continue\r\n")],
        "empty Expect": [post(key=key, extra="Expect: \r\n")],
        "unknown Expect": [post(key=key, extra="Expect: something\r\n")],
        "empty Origin": [post(key=key, extra="Origin: \r\n")],
        "oRiGiN": [post(key=key, extra="oRiGiN: https://x.example\r\n")],
        "no Content-Type": [
            (
                "POST /v1/activity HTTP/1.1\r\nHost: x\r\nX-Request-Id: r\r\n"
                f"x-api-key: {key}\r\nContent-Length: {len(valid)}\r\n\r\n"
            ).encode()
            + valid
        ],
        "Content-Encoding: identity": [post(key=key, extra="Content-Encoding: identity\r\n")],
        "gzip, then another": [
            post(key=key, body=gzip.compress(valid), extra="Content-Encoding: gzip\r\n")
            + post(key=key, rid="after")
        ],
        "deflate": [
            post(key=key, body=zlib.compress(valid), extra="Content-Encoding: deflate\r\n")
        ],
        "chunked with trailers, then another": [
            chunked.encode()
            + b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(valid), valid)
            + post(key=key, rid="after")
        ],
        "chunk extension": [
            chunked.encode() + b"%x;name=val\r\n%s\r\n0\r\n\r\n" % (len(valid), valid)
        ],
        "garbage after a valid request": [post(key=key) + b"garbage\r\n\r\n"],
        "obsolete line folding": [post(key=key, extra="X-Thing: a\r\n b\r\n")],
        "empty body": [post(key=key, body=b"")],
        "HTTP/1.0 chunked": [
            chunked.replace("HTTP/1.1", "HTTP/1.0").encode()
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(valid), valid)
        ],
        "HTTP/0.9": [f"POST /v1/activity\r\nx-api-key: {key}\r\n\r\n".encode()],
        "two spaces in the request line": [
            post(key=key).replace(b"POST /v1/activity", b"POST  /v1/activity")
        ],
        "Content-Length with leading zeros": [
            post(key=key).replace(b"Content-Length: ", b"Content-Length: 000")
        ],
        "Content-Length with a plus": [
            post(key=key).replace(b"Content-Length: ", b"Content-Length: +")
        ],
        "no records": [post(key=key, body=b'{"records":[]}')],
    }


async def test_raw_requests_are_answered_alike_on_both_paths(
    gateway_client: GatewayClient, keys: KeyFile, caplog: pytest.LogCaptureFixture
) -> None:
    """Every scenario at once, each on its own connection."""
    scenarios = _raw_scenarios(keys.key)

    async def scenario(client: Any, port: int) -> Any:
        results = await asyncio.gather(*(_exchange(port, steps) for steps in scenarios.values()))
        return dict(zip(scenarios, results, strict=True))

    general, fast = [
        await _observe(
            gateway_client, keys, scenario, caplog, fast_lane=on, body_timeout_seconds=0.3
        )
        for on in (False, True)
    ]
    for name in scenarios:
        assert general["result"][name] == fast["result"][name], name
    _alike(general, fast)
    # The scenarios reach what they say they do.
    answers = fast["result"]
    assert [a[0] for a in answers["pipelined, every kind"][0]] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 403 Forbidden",
        b"HTTP/1.1 401 Unauthorized",
        b"HTTP/1.1 400 Bad Request",
        b"HTTP/1.1 200 OK",
    ]
    assert answers["body slower than the timeout"][0][0][0] == b"HTTP/1.1 408 Request Timeout"
    assert len(answers["chunked with trailers, then another"][0]) == 2
    assert len(answers["gzip, then another"][0]) == 2


class OddSink(MemorySink):
    """A memory sink whose sends wait for `gate` if set, then raise `exc` if set."""

    def __init__(self, exc: BaseException | None = None) -> None:
        super().__init__()
        self.exc = exc
        self.gate: asyncio.Event | None = None
        self.waiting = 0
        self._arrived = asyncio.Event()

    async def until_waiting(self, count: int) -> None:
        """Return once `count` sends wait on the gate."""
        while self.waiting < count:
            self._arrived.clear()
            await self._arrived.wait()

    async def send(
        self,
        record_type: str,
        accepted: Any,
        rejected: Any = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        if self.gate is not None:
            self.waiting += 1
            self._arrived.set()
            await self.gate.wait()
        if self.exc is not None:
            raise self.exc
        return await super().send(record_type, accepted, rejected, patient=patient)


_RAISED: dict[str, Callable[[], BaseException]] = {
    "RuntimeError": lambda: RuntimeError("boom"),
    "CancelledError": lambda: asyncio.CancelledError(),
    "TimeoutError": lambda: TimeoutError(),
    "ConnectionResetError": lambda: ConnectionResetError(),
    "KeyError": lambda: KeyError("x"),
    "HTTPFound": lambda: web.HTTPFound("/elsewhere"),
    "HTTPBadRequest": lambda: web.HTTPBadRequest(),
    "HTTPException": lambda: web.HTTPException(),
}


@pytest.mark.parametrize("raised", list(_RAISED))
async def test_a_sink_that_raises_the_unexpected_is_answered_alike(
    gateway_client: GatewayClient, keys: KeyFile, caplog: pytest.LogCaptureFixture, raised: str
) -> None:
    async def scenario(client: Any, port: int) -> Any:
        return await _exchange(port, [post(key=keys.key) + post(key=keys.key, rid="second")])

    general, fast = [
        await _observe(
            gateway_client, keys, scenario, caplog, fast_lane=on, sink=OddSink(_RAISED[raised]())
        )
        for on in (False, True)
    ]
    _alike(general, fast)


async def test_many_in_flight_with_a_scrape_a_drain_and_a_disabled_key_among_them(
    gateway_client: GatewayClient, keys: KeyFile, caplog: pytest.LogCaptureFixture
) -> None:
    """30 requests at once under an admission cap that takes 20: a scrape while 20 wait on
    the sink, then the key is disabled and the gateway starts draining before they are
    answered; then one more request with the key."""
    one = len(envelope(sample("activity")))
    midway: dict[bool, Any] = {}

    def scenario_for(on: bool, sink: OddSink) -> Any:
        async def scenario(client: Any, port: int) -> Any:
            gate = sink.gate = asyncio.Event()
            requests = [
                asyncio.create_task(_exchange(port, [post(key=keys.key, rid=f"r{n}")]))
                for n in range(30)
            ]
            await asyncio.wait_for(sink.until_waiting(20), 5)
            samples = await scrape(client)
            midway[on] = (
                samples.value("cafe_http_requests_in_flight"),
                samples.value("cafe_http_requests_total"),
                _admission(client.app).in_flight_bytes,
            )
            keys.disable(keys.record.id)
            assert client.app[KEYS].reload_if_changed()
            client.app[DRAINING].set()
            gate.set()
            answered = sorted(map(repr, await asyncio.gather(*requests)))
            client.app[DRAINING].clear()
            after = await _exchange(port, [post(key=keys.key, rid="after")])
            _enable_again(keys)
            # Read now, not when the watcher next looks (a second later, or before the
            # scrape under load): both gateways end with the key enabled, and the same
            # reload counts.
            client.app[KEYS].reload_if_changed()
            return answered, after

        return scenario

    seen = {}
    for on in (False, True):
        sink = OddSink()
        seen[on] = await _observe(
            gateway_client,
            keys,
            scenario_for(on, sink),
            caplog,
            fast_lane=on,
            sink=sink,
            max_inflight_bytes=20 * one,
            max_body_bytes=4096,
        )
    assert midway[False] == midway[True] == (21, 10, 20 * one)
    _alike(seen[False], seen[True])
    assert seen[True]["result"][1][0][0][0] == b"HTTP/1.1 401 Unauthorized"


def _enable_again(keys: KeyFile) -> None:
    """Enable the key file's first key again (the next gateway reads the same file)."""
    update_keys_file(
        keys.path,
        lambda all_keys: [
            replace(k, enabled=True) if k.id == keys.record.id else k for k in all_keys
        ],
    )


@pytest.mark.parametrize("how", ["close", "half-close"])
async def test_a_client_gone_while_the_sink_waits_is_accounted_alike(
    gateway_client: GatewayClient, keys: KeyFile, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The client closes (or shuts its side) with a request and another pipelined behind
    it, while the first waits on the sink: nothing is left in flight or admitted."""

    def scenario_for(sink: OddSink) -> Any:
        async def scenario(client: Any, port: int) -> Any:
            gate = sink.gate = asyncio.Event()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(key=keys.key) + post(key=keys.key, rid="second"))
            await asyncio.wait_for(sink.until_waiting(1), 5)
            if how == "close":
                writer.close()
            else:
                writer.write_eof()
            await asyncio.sleep(0.1)
            gate.set()
            await asyncio.sleep(0.2)
            data = b""
            if how == "half-close":
                data = await asyncio.wait_for(reader.read(), 2)
                writer.close()
            return _answers(data)

        return scenario

    seen = {}
    for on in (False, True):
        sink = OddSink()
        seen[on] = await _observe(
            gateway_client, keys, scenario_for(sink), caplog, fast_lane=on, sink=sink
        )
    _alike(seen[False], seen[True])


async def test_150_pipelined_requests_some_cross_origin_are_answered_alike(
    gateway_client: GatewayClient, keys: KeyFile, caplog: pytest.LogCaptureFixture
) -> None:
    requests = b"".join(
        post(key=keys.key, rid=f"p{n}", extra="Origin: https://x.example\r\n" if n % 7 == 3 else "")
        for n in range(150)
    )

    async def scenario(client: Any, port: int) -> Any:
        return await _exchange(port, [requests], wait_s=0.5)

    general, fast = [
        await _observe(gateway_client, keys, scenario, caplog, fast_lane=on) for on in (False, True)
    ]
    assert len(fast["result"][0]) == 150
    _alike(general, fast)


# The Tally (gateway/metrics.py) against prometheus-client's own updates.


def test_a_tally_puts_each_edge_value_in_the_bucket_histogram_observe_does() -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    at_once = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=direct)
    later = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=tallied)
    values: list[float] = [0, -1.0, math.inf, 10**6, *LATENCY_BUCKETS]
    values += [math.nextafter(b, math.inf) for b in LATENCY_BUCKETS]
    values += [math.nextafter(b, -math.inf) for b in LATENCY_BUCKETS]
    tally = Tally()
    for value in values:
        at_once.observe(value)
        tally.observe(later, value)
    tally.flush()

    def exposed(registry: CollectorRegistry) -> dict[str, float]:
        return {
            f"{s.name}{sorted(s.labels.items())}": s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert exposed(tallied) == exposed(direct)


async def test_flush_often_flushes_every_period_and_once_more_when_cancelled() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("g", "g", registry=registry)
    tally = Tally()
    flusher = asyncio.create_task(tally.flush_often(every_s=0.05))
    tally.add(gauge, 1)
    await asyncio.sleep(0.2)
    assert registry.get_sample_value("g") == 1
    tally.add(gauge, -1)
    tally.add(gauge, 1)
    tally.add(gauge, 1)
    flusher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flusher
    assert registry.get_sample_value("g") == 2


def test_the_app_has_no_response_prepare_hook_the_fast_lane_would_skip(keys: KeyFile) -> None:
    """The fast lane never routes, so a request it serves has no match_info: aiohttp
    sends `on_response_prepare` only for a routed request, and so skips any hook for every
    answer of the fast lane, pre-built or not (checked by hand: a hook adding a header
    adds it to a 200 and a 403 on the general path, to neither on the fast lane); and
    request.app would fail in any step that read it. None is registered today: one
    added must be added to the fast lane too."""
    app = create_app(gateway_settings(keys_file=keys.path), sink=MemorySink())
    assert len(app.on_response_prepare) == 0
    assert len(app.middlewares) == 6


# Findings: where the fast lane and the general path differ.


async def test_aiohttp_access_log_sees_a_pre_built_answer_as_the_general_one(
    keys: KeyFile, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own access log (on in any GatewayRunner not given access_log=None;
    `cafe-gateway serve` turns it off) reads a pre-built 200's length and headers as it
    reads the general path's answer: "%b" the bytes sent, "%{X-Request-Id}o" the id."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    logged = {}
    for on in (False, True):
        app = create_app(gateway_settings(keys_file=keys.path, fast_lane=on), sink=MemorySink())
        runner = GatewayRunner(app, access_log_format="%s %b %{X-Request-Id}o")
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        caplog.clear()
        answers, _ = await _exchange(port, [post(key=keys.key, rid="logged")], wait_s=0.2)
        await runner.cleanup()
        assert answers[0][0] == b"HTTP/1.1 200 OK"
        logged[on] = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert logged[False][0].startswith("200 ") and logged[False][0].endswith(" logged")
    assert logged[True] == logged[False]
