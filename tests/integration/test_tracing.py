"""Tracing in a served gateway: its spans reach a real OTLP receiver, its records name
the gateway's span, and a collector that is down costs dropped spans, never a request."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import psutil
import pytest

from devkit.net import free_port
from tests.support.kafka import Broker, consume_all
from tests.support.keys import KeyFile, json_headers
from tests.support.otlp import OtlpReceiver
from tests.support.records import envelope, sample
from tests.support.scrape import scrape
from tests.support.served import GATEWAY_PARTITIONS, gateway_env, serving
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def traced_env(
    kafka: Broker, key_file: KeyFile, prefix: str, endpoint: str, **settings: str
) -> dict[str, str]:
    """A served gateway's environment with every request traced, sent to `endpoint`."""
    return gateway_env(
        free_port(),
        kafka,
        key_file,
        prefix,
        CAFE_TRACE_SAMPLE_RATIO="1",
        CAFE_OTLP_ENDPOINT=endpoint,
        **settings,
    )


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[OtlpReceiver]:
    otlp = OtlpReceiver(free_port())
    await otlp.start()
    try:
        yield otlp
    finally:
        await otlp.stop()


async def test_a_sampled_requests_spans_reach_the_collector_and_its_record_names_them(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    async with receiver() as otlp:
        env = traced_env(kafka, key_file, prefix, otlp.endpoint)
        async with serving(env) as (gateway, http):
            headers = {**json_headers(key_file.key), "traceparent": f"00-{TRACE}-{SPAN}-01"}
            body = envelope(sample("activity"))
            async with http.post("/v1/activity", data=body, headers=headers) as resp:
                assert resp.status == 200
            # The exporter sends every second.
            await eventually(
                lambda: len([s for s in otlp.spans if s.trace_id.hex() == TRACE]) == 3,
                within=15,
            )
            await gateway.stop()
    spans = {s.name: s for s in otlp.spans if s.trace_id.hex() == TRACE}
    request = spans["POST /v1/activity"]
    assert request.parent_span_id.hex() == SPAN
    for child in ("validate records", "await kafka acknowledgement"):
        assert spans[child].parent_span_id == request.span_id
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["cafe.records.accepted"].int_value == 1
    (message,) = await consume_all(kafka.bootstrap, f"{prefix}.activity", GATEWAY_PARTITIONS)
    assert dict(message.headers)["traceparent"] == f"00-{TRACE}-{request.span_id.hex()}-01".encode()


async def test_a_collector_that_is_down_costs_dropped_spans_and_no_request(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    closed = free_port()  # nothing listens there
    env = traced_env(kafka, key_file, prefix, f"http://127.0.0.1:{closed}/v1/traces")
    requests = 200
    async with serving(env, client_timeout_s=10) as (gateway, http):
        body = envelope(sample("log"))

        async def post() -> int:
            async with http.post("/v1/log", data=body, headers=json_headers(key_file.key)) as r:
                return r.status

        # Sent in waves over a few seconds, so some go while an export is failing. No
        # wave waits on the exporter: each is answered well within its 2 s timeout.
        statuses = []
        for _ in range(4):
            started = time.monotonic()
            statuses += await asyncio.gather(*(post() for _ in range(50)))
            assert time.monotonic() - started < 1.5
            await asyncio.sleep(1)
        assert statuses == [200] * requests

        async def dropped() -> bool:
            return (await scrape(http)).value("cafe_trace_spans_dropped_total") > 0

        # Every span of the first export (a second in) fails, within its 2 s timeout.
        await eventually(dropped, within=15)
        await gateway.stop()
    messages = await consume_all(kafka.bootstrap, f"{prefix}.log", GATEWAY_PARTITIONS)
    assert len(messages) == requests


async def test_each_worker_sends_its_own_spans(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    async with receiver() as otlp:
        env = traced_env(kafka, key_file, prefix, otlp.endpoint, CAFE_WORKERS="2")
        async with serving(env) as (gateway, http):
            # A new connection each: the kernel spreads them over both workers.
            headers = {**json_headers(key_file.key), "Connection": "close"}
            body = envelope(sample("log"))
            for _ in range(40):
                async with http.post("/v1/log", data=body, headers=headers) as resp:
                    assert resp.status == 200

            def from_both() -> bool:
                requests = [s for s in otlp.spans if s.name == "POST /v1/log"]
                return len(requests) == 40 and len({otlp.pids[s.span_id] for s in requests}) == 2

            await eventually(from_both, within=15)
            worker_pids = {p.pid for p in psutil.Process(gateway.pid).children()}
            await gateway.stop()
    assert set(otlp.pids.values()) == worker_pids
