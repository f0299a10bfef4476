"""Browsers as clients: headless Chromium runs clients/js/cafe.js against `cafe-gateway serve`.

Each test serves the gateway on one loopback port and the test page (tests/browser/page.html,
which loads cafe.js) on another, so the page is a cross-origin caller the way a product's
site is. The keys file lets the page's origin send with a header key and a browser (beacon)
key; a third port is an origin no key allows. What lands in Kafka is read back and compared
record by record, field by field.

Chromium is Debian's (/usr/bin/chromium, from tests/system-packages.sh, which `make test`
and the `chromium` fixture run if it is missing), driven by Playwright for Python; never
skipped.
"""

from __future__ import annotations

import contextlib
import gzip
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from playwright.async_api import Browser, Page, Request, async_playwright

from devkit.net import free_ports
from devkit.samples import curl_bodies
from gateway.keys.file import write_keys_file
from gateway.keys.model import mint_key
from tests.support.kafka import Broker, consume_all, delete_topics
from tests.support.keys import KeyFile
from tests.support.scrape import Samples, scrape
from tests.support.served import gateway_env, ready_in_a_row, running
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLIENT_JS = REPO / "clients" / "js" / "cafe.js"
PAGE_HTML = REPO / "tests" / "browser" / "page.html"
INSTALL_SH = REPO / "tests" / "system-packages.sh"
CHROMIUM = Path("/usr/bin/chromium")
TYPES = ("activity", "log", "profile")
PARTITIONS = 2


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed by tests/system-packages.sh if it is missing."""
    if not CHROMIUM.exists():
        run = subprocess.run(
            ["bash", str(INSTALL_SH)], capture_output=True, text=True, timeout=600, check=False
        )
        if run.returncode != 0 or not CHROMIUM.exists():
            pytest.fail(
                f"the browser tests need {CHROMIUM}, and {INSTALL_SH.relative_to(REPO)} "
                f"could not install it (exit {run.returncode}):\n{run.stdout}{run.stderr}"
            )
    return CHROMIUM


@dataclass
class Stage:
    """A served gateway, two page origins (one allowed, one not), and a browser."""

    gateway: str
    origin: str
    stranger: str  # an origin that no key lists
    header_key: str
    header_key_id: str
    beacon_key: str
    beacon_key_id: str
    limited_key: str  # a header key allowed half a request a second
    limited_key_id: str
    prefix: str
    browser: Browser
    # Every request a page of this test made to the gateway (preflights and beacons
    # aside), and when each was seen (time.monotonic()).
    requests: list[Request] = field(default_factory=list)
    seen_at: list[float] = field(default_factory=list)

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    async def open(self, origin: str) -> Page:
        """A new page at `origin`, with cafe.js loaded; its gateway requests are recorded."""
        page = await self.browser.new_page()
        page.on("request", self._seen)
        await page.goto(origin + "/")
        assert await page.evaluate("typeof CafeClient") == "function"
        return page

    def _seen(self, request: Request) -> None:
        if request.url.startswith(self.gateway):
            self.requests.append(request)
            self.seen_at.append(time.monotonic())


async def page_server(port: int) -> web.AppRunner:
    """Serves the test page and cafe.js on 127.0.0.1:`port`."""

    async def page(_: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE_HTML, headers={"Content-Type": "text/html"})

    async def script(_: web.Request) -> web.FileResponse:
        return web.FileResponse(CLIENT_JS, headers={"Content-Type": "text/javascript"})

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/cafe.js", script)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture
async def stage(kafka: Broker, chromium: Path, tmp_path: Path) -> AsyncIterator[Stage]:
    gateway_port, page_port, stranger_port = free_ports(3)
    origin = f"http://127.0.0.1:{page_port}"
    header_key, header_record = mint_key(("analytics-portal",), origins=(origin,))
    beacon_key, beacon_record = mint_key(("analytics-portal",), origins=(origin,), browser=True)
    limited_key, limited_record = mint_key(
        ("analytics-portal",), origins=(origin,), requests_per_second=0.5
    )
    keys_path = tmp_path / "keys.json"
    write_keys_file(keys_path, [header_record, beacon_record, limited_record])
    prefix = f"browser.{uuid.uuid4().hex[:8]}"
    env = gateway_env(
        gateway_port,
        kafka,
        KeyFile(keys_path, header_key, header_record),
        prefix,
        CAFE_TOPIC_PARTITIONS=str(PARTITIONS),
        CAFE_ACCESS_LOG="false",
    )
    gateway = f"http://127.0.0.1:{gateway_port}"
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(running(env))
            for port in (page_port, stranger_port):
                stack.push_async_callback((await page_server(port)).cleanup)
            playwright = await stack.enter_async_context(async_playwright())
            browser = await playwright.chromium.launch(
                executable_path=str(chromium), args=["--no-sandbox"]
            )
            stack.push_async_callback(browser.close)
            async with aiohttp.ClientSession(gateway) as http:
                await ready_in_a_row(http, 1)
            yield Stage(
                gateway=gateway,
                origin=origin,
                stranger=f"http://127.0.0.1:{stranger_port}",
                header_key=header_key,
                header_key_id=header_record.id,
                beacon_key=beacon_key,
                beacon_key_id=beacon_record.id,
                limited_key=limited_key,
                limited_key_id=limited_record.id,
                prefix=prefix,
                browser=browser,
            )
    finally:
        await delete_topics(kafka.bootstrap, lambda t: t.startswith(prefix + "."))


def sample(kind: str) -> dict[str, Any]:
    record: dict[str, Any] = orjson.loads(curl_bodies()[kind])["records"][0]
    return record


def activity(n: int, *, padding: int = 0) -> Iterator[dict[str, Any]]:
    """`n` activity records, each with its own eventId; every other one has a tag of
    `padding` bytes more."""
    for i in range(n):
        tags = [*sample("activity")["tags"], {"key": "pad", "value": "p" * padding}]
        yield {**sample("activity"), "eventId": str(uuid.uuid4()), "tags": tags[: 2 + (i % 2)]}


def logs(n: int) -> Iterator[dict[str, Any]]:
    """`n` log records whose messages differ and are not ASCII."""
    for i in range(n):
        yield {**sample("log"), "logMessage": f"café ☕ Ünïcode «{i}» {uuid.uuid4()}"}


def profiles(n: int) -> Iterator[dict[str, Any]]:
    for _ in range(n):
        yield {**sample("profile"), "sessionId": str(uuid.uuid4())}


def unique(kind: str, record: dict[str, Any]) -> str:
    """What tells one record from another of its type in these tests."""
    field = {"activity": "eventId", "log": "logMessage", "profile": "sessionId"}[kind]
    value: str = record[field]
    return value


async def assert_landed(
    kafka: Broker, stage: Stage, sent: dict[str, list[dict[str, Any]]], key_id: str
) -> None:
    """Every record sent is on its type's topic exactly once and as sent, field by field,
    produced under `key_id`; nothing else is on those topics, nor on the dead-letter one."""
    for kind, records in sent.items():
        on_topic: list[ConsumerRecord] = await consume_all(
            kafka.bootstrap, stage.topic(kind), PARTITIONS
        )
        got = {unique(kind, r): r for r in (orjson.loads(m.value) for m in on_topic)}
        assert len(got) == len(on_topic) == len(records), (kind, len(on_topic), len(records))
        for record in records:
            assert got[unique(kind, record)] == record
        assert {dict(m.headers)["cafe-key-id"] for m in on_topic} == {key_id.encode()}
    assert await end_offsets(kafka, [stage.topic("deadletter")]) == 0


async def end_offsets(kafka: Broker, topics: list[str]) -> int:
    """The sum of the end offsets of `topics`: how many messages were ever produced to them."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def wait_for_topics(kafka: Broker, stage: Stage, sent: dict[str, list[Any]]) -> None:
    """Wait until as many messages as were sent are on the topics (beacons are not awaited)."""
    topics = [stage.topic(kind) for kind in sent]
    total = sum(len(records) for records in sent.values())

    async def there() -> bool:
        return await end_offsets(kafka, topics) >= total

    await eventually(there, within=20)


# Sends each [type, record] pair with a new client, then flushes; returns the flush's
# error message, or null if it resolved.
TRACK_AND_FLUSH = """async ([options, pairs]) => {
    const cafe = new CafeClient(options);
    for (const [type, record] of pairs) cafe.track(type, record);
    try { await cafe.flush(); return null; } catch (error) { return String(error); }
}"""

# Queues each [type, record] pair with a client that would wait a minute to send them.
TRACK_ONLY = """([options, pairs]) => {
    window.cafe = new CafeClient({...options, flushMs: 60000, batchSize: 500});
    for (const [type, record] of pairs) window.cafe.track(type, record);
}"""


def pairs(sent: dict[str, list[dict[str, Any]]]) -> list[list[Any]]:
    return [[kind, record] for kind, records in sent.items() for record in records]


async def test_fetch_with_the_header_key_lands_every_record_as_sent(
    kafka: Broker, stage: Stage
) -> None:
    # 150 activity records of ~1.6 KB do not fit one keepalive body (64 KiB).
    sent = {
        "activity": list(activity(150, padding=1000)),
        "log": list(logs(25)),
        "profile": list(profiles(5)),
    }
    page = await stage.open(stage.origin)
    options = {"endpoint": stage.gateway, "apiKey": stage.header_key, "gzip": False}
    error = await page.evaluate(TRACK_AND_FLUSH, [{**options, "batchSize": 100}, pairs(sent)])
    assert error is None

    posts = [r for r in stage.requests if r.method == "POST"]
    sizes = [len(r.post_data_buffer or b"") for r in posts]
    assert all(size < 65536 for size in sizes), sizes
    assert len([r for r in posts if r.url.endswith("/v1/activity")]) >= 3  # 150 split by size
    assert len([r for r in posts if r.url.endswith("/v1/log")]) == 1  # 25 in one batch of 100
    for request in posts:
        headers = await request.all_headers()
        assert headers["x-api-key"] == stage.header_key
        assert headers["content-type"] == "application/json"
        assert headers["origin"] == stage.origin
        assert "content-encoding" not in headers
        response = await request.response()
        assert response is not None
        assert response.status == 200
        assert response.headers["access-control-allow-origin"] == stage.origin
    await assert_landed(kafka, stage, sent, stage.header_key_id)

    # The page may read the headers the gateway exposes to it.
    exposed = await page.evaluate(
        """async ([url, key]) => {
            const r = await fetch(url, {method: 'POST', body: '{"records":[]}',
                headers: {'content-type': 'application/json', 'x-api-key': key}});
            return [r.status, r.headers.get('x-request-id')];
        }""",
        [stage.gateway + "/v1/log", stage.header_key],
    )
    assert exposed[0] == 400
    assert exposed[1]


# A trace the page's server started (W3C's example ids), and one a tracing library in the
# page gives the client through its `trace` option.
PAGE_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SCRIPT_TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_a_trace_started_in_the_page_reaches_the_records_kafka_headers(
    kafka: Broker, stage: Stage
) -> None:
    page = await stage.open(stage.origin)
    await page.evaluate(
        """(parent) => document.head.insertAdjacentHTML('beforeend',
            `<meta name="traceparent" content="${parent}">` +
            '<meta name="tracestate" content="shop=1">')""",
        PAGE_TRACE,
    )
    from_meta = {"activity": list(activity(3)), "log": list(logs(2))}
    options = {"endpoint": stage.gateway, "apiKey": stage.header_key}
    assert await page.evaluate(TRACK_AND_FLUSH, [options, pairs(from_meta)]) is None
    given = {"profile": list(profiles(2))}
    assert (
        await page.evaluate(
            """async ([options, pairs, parent]) => {
                const cafe = new CafeClient({...options, trace: () => ({traceparent: parent})});
                for (const [type, record] of pairs) cafe.track(type, record);
                await cafe.flush();
                return null;
            }""",
            [options, pairs(given), SCRIPT_TRACE],
        )
        is None
    )
    # The preflight let the header through, and the gateway took it.
    posts = [r for r in stage.requests if r.method == "POST"]
    assert {(await r.all_headers()).get("traceparent") for r in posts} == {PAGE_TRACE, SCRIPT_TRACE}
    await assert_landed(kafka, stage, {**from_meta, **given}, stage.header_key_id)
    for kind, (parent, state) in {
        "activity": (PAGE_TRACE, b"shop=1"),
        "log": (PAGE_TRACE, b"shop=1"),
        "profile": (SCRIPT_TRACE, None),
    }.items():
        for message in await consume_all(kafka.bootstrap, stage.topic(kind), PARTITIONS):
            headers = dict(message.headers)
            assert headers["traceparent"] == parent.encode(), kind
            assert headers.get("tracestate") == state, kind


async def test_records_left_when_the_page_is_left_go_by_beacon(kafka: Broker, stage: Stage) -> None:
    sent = {"activity": list(activity(30)), "log": list(logs(30)), "profile": list(profiles(3))}
    page = await stage.open(stage.origin)
    options = {"endpoint": stage.gateway, "apiKey": stage.header_key, "beaconKey": stage.beacon_key}
    await page.evaluate(TRACK_ONLY, [options, pairs(sent)])
    assert stage.requests == []  # all queued, nothing sent yet

    await page.goto("about:blank")  # pagehide: what is queued goes by beacon
    await wait_for_topics(kafka, stage, sent)
    # Under the browser key, which cafe.js sends only as ?api_key= in a beacon (Playwright
    # does not report requests made as a page unloads, so the key id is the witness).
    await assert_landed(kafka, stage, sent, stage.beacon_key_id)


async def test_gzip_bodies_land_every_record_as_sent(kafka: Broker, stage: Stage) -> None:
    sent = {"activity": list(activity(40, padding=200)), "log": list(logs(40))}
    page = await stage.open(stage.origin)
    options = {"endpoint": stage.gateway, "apiKey": stage.header_key, "batchSize": 20}
    assert await page.evaluate(TRACK_AND_FLUSH, [options, pairs(sent)]) is None

    posts = [r for r in stage.requests if r.method == "POST"]
    assert len(posts) == 4
    for request in posts:
        headers = await request.all_headers()
        assert headers["content-encoding"] == "gzip"
        body = request.post_data_buffer or b""
        assert body[:2] == b"\x1f\x8b"
        assert len(orjson.loads(gzip.decompress(body))["records"]) == 20
        response = await request.response()
        assert response is not None
        assert response.status == 200
    await assert_landed(kafka, stage, sent, stage.header_key_id)


async def test_a_batch_refused_with_429_goes_again_after_retry_after(
    kafka: Broker, stage: Stage
) -> None:
    # The key allows 0.5 requests/s and a burst of 1: of 3 batches sent at once, the 2nd
    # and 3rd are each refused with 429 and Retry-After: 2. cafe.js waits that long (not
    # its 1 s fallback, so it can read the header) and sends each again.
    sent = {"log": list(logs(6))}
    page = await stage.open(stage.origin)
    options = {"endpoint": stage.gateway, "apiKey": stage.limited_key, "batchSize": 2}
    assert await page.evaluate(TRACK_AND_FLUSH, [options, pairs(sent)]) is None

    answers = []
    for request in stage.requests:
        response = await request.response()
        assert response is not None
        answers.append((response.status, response.headers.get("retry-after")))
    assert answers == [(200, None), (429, "2"), (200, None), (429, "2"), (200, None)]
    for refused in (1, 3):
        assert stage.seen_at[refused + 1] - stage.seen_at[refused] >= 1.9
    await assert_landed(kafka, stage, sent, stage.limited_key_id)


async def test_a_page_of_an_origin_no_key_lists_sends_nothing(kafka: Broker, stage: Stage) -> None:
    page = await stage.open(stage.stranger)
    options = {
        "endpoint": stage.gateway,
        "apiKey": stage.header_key,
        "beaconKey": stage.beacon_key,
        "gzip": False,
    }
    # fetch: the preflight gets no Access-Control-Allow-Origin, so the browser rejects it.
    error = await page.evaluate(TRACK_AND_FLUSH, [options, pairs({"log": list(logs(5))})])
    assert error == "TypeError: Failed to fetch"

    # sendBeacon needs no preflight, so the POST reaches the gateway, which refuses it.
    await page.evaluate(TRACK_ONLY, [options, pairs({"activity": list(activity(5))})])
    await page.goto("about:blank")

    async def metrics() -> Samples:
        async with aiohttp.ClientSession(stage.gateway) as http:
            return await scrape(http)

    async def refused() -> bool:
        activity_403 = {"route": "/v1/activity", "method": "POST", "status": "403"}
        return (await metrics()).value("cafe_http_requests_total", **activity_403) == 1

    # Once the gateway has answered the beacon (403), no topic has ever had a message.
    await eventually(refused, within=20)
    samples = await metrics()
    assert samples.value("cafe_http_errors_total", code="origin_not_allowed") == 1
    log_route = {"route": "/v1/log"}
    assert samples.value("cafe_http_requests_total", **log_route, method="OPTIONS") == 1
    assert samples.value("cafe_http_requests_total", **log_route, method="POST") == 0
    topics = [stage.topic(t) for t in (*TYPES, "deadletter")]
    assert await end_offsets(kafka, topics) == 0, "nothing may reach any topic"
