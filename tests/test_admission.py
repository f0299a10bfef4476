"""Load shedding: past the cap on bytes in progress, requests get 503 at once."""

from __future__ import annotations

import asyncio
import gzip
import tracemalloc
from collections.abc import Sequence
from typing import Any

import aiohttp
import brotli
import orjson
import pytest
from aiohttp.test_utils import TestClient
from backports import zstd

from devkit.samples import curl_bodies
from gateway.sink import Delivery, MemorySink, Record, Rejected
from tests.support.app import GatewayClient, gateway_settings
from tests.support.keys import KeyFile, json_headers


class GatedSink(MemorySink):
    """Holds every send until the test opens the gate, like a slow Kafka."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.arrived: asyncio.Queue[str] = asyncio.Queue()

    async def send(
        self,
        record_type: str,
        accepted: Sequence[Record],
        rejected: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        self.arrived.put_nowait(record_type)
        await self.gate.wait()
        return await super().send(record_type, accepted, rejected)

    async def post(self, client: TestClient, body: bytes, headers: dict[str, str]) -> int | str:  # type: ignore[type-arg]
        """POST to /v1/log; the status, or the error of a connection closed on a shed
        request. One answered while the gate is shut counts as arrived too."""
        try:
            status: int | str = (await client.post("/v1/log", data=body, headers=headers)).status
        except aiohttp.ClientError as exc:
            status = type(exc).__name__
        if not self.gate.is_set():
            self.arrived.put_nowait("answered before the gate opened")
        return status


def batch(records: int) -> bytes:
    (record,) = orjson.loads(curl_bodies()["log"])["records"]
    return orjson.dumps({"records": [record] * records})


async def test_requests_past_the_cap_are_shed_and_the_rest_still_served(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    small, large = batch(1), batch(20)
    cap = len(small) * 2 + len(large) // 2  # room for two small ones, not a large one more
    sink = GatedSink()
    settings = gateway_settings(keys_file=key_file.path, max_inflight_bytes=cap)
    client = await gateway_client(settings, sink=sink)
    headers = json_headers(key_file.key)

    async def post(body: bytes) -> Any:
        return await client.post("/v1/log", data=body, headers=headers)

    first = asyncio.create_task(post(small))
    await sink.arrived.get()

    shed = await post(large)
    assert shed.status == 503
    assert shed.headers["Retry-After"] == "1"
    assert (await shed.json(content_type=None))["code"] == "overloaded"

    second = asyncio.create_task(post(small))
    await sink.arrived.get()

    sink.gate.set()
    assert [(await r).status for r in (first, second)] == [200, 200]
    # Recovered at once: the large batch fits now that nothing is in progress.
    assert (await post(large)).status == 200
    assert sum(len(r) for r in sink.records.values()) == 1 + 1 + 20


async def test_as_many_requests_as_the_cap_holds_are_served_at_once(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    body = batch(20)
    sink = GatedSink()
    settings = gateway_settings(keys_file=key_file.path, max_inflight_bytes=4 * len(body))
    client = await gateway_client(settings, sink=sink)
    headers = json_headers(key_file.key)
    posts = [asyncio.create_task(sink.post(client, body, headers)) for _ in range(4)]
    for _ in posts:
        await sink.arrived.get()
    sink.gate.set()
    # Each counted once: its Content-Length up front covers the bytes then read.
    assert [await p for p in posts] == [200] * 4


async def test_a_single_request_larger_than_the_cap_is_still_served(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    settings = gateway_settings(keys_file=key_file.path, max_inflight_bytes=1024)
    client = await gateway_client(settings, sink=MemorySink())
    headers = json_headers(key_file.key)
    resp = await client.post("/v1/log", data=batch(20), headers=headers)
    assert resp.status == 200


async def test_a_body_over_the_limit_is_413_even_when_busy(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    sink = GatedSink()
    settings = gateway_settings(
        keys_file=key_file.path, max_body_bytes=4096, max_inflight_bytes=8192
    )
    client = await gateway_client(settings, sink=sink)
    headers = json_headers(key_file.key)
    busy = asyncio.create_task(client.post("/v1/log", data=batch(1), headers=headers))
    await sink.arrived.get()
    resp = await client.post("/v1/log", data=b" " * 5000, headers=headers)
    assert resp.status == 413
    sink.gate.set()
    assert (await busy).status == 200


def compress(body: bytes, encoding: str) -> bytes:
    """`body` in one of the Content-Encodings the gateway decodes."""
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "br":
        compressed: bytes = brotli.compress(body)  # the brotli package is untyped
        return compressed
    return zstd.compress(body)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_concurrent_compressed_requests_are_all_served(
    gateway_client: GatewayClient, key_file: KeyFile, encoding: str
) -> None:
    # Sixteen compressed batches of 20, all in progress at once under the default cap:
    # each holds what it decodes to (about 7 KB), not the whole body limit.
    sink = GatedSink()
    client = await gateway_client(gateway_settings(keys_file=key_file.path), sink=sink)
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": encoding,
        "x-api-key": key_file.key,
    }
    body = compress(batch(20), encoding)

    posts = [asyncio.create_task(sink.post(client, body, headers)) for _ in range(16)]
    # Each is held at the sink, or answered (shed); then they are let through together.
    for _ in posts:
        await sink.arrived.get()
    sink.gate.set()
    assert [await p for p in posts] == [200] * 16
    assert len(sink.records["log"]) == 16 * 20


async def test_compressed_bodies_count_what_they_decode_to(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    # The cap fits one decoded batch of 100 but not two, though both are small on the wire.
    large, small = batch(100), batch(1)
    sink = GatedSink()
    settings = gateway_settings(keys_file=key_file.path, max_inflight_bytes=len(large) * 3 // 2)
    client = await gateway_client(settings, sink=sink)
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "x-api-key": key_file.key,
    }
    assert len(gzip.compress(large)) < len(large) // 10

    first = asyncio.create_task(sink.post(client, gzip.compress(large), headers))
    await sink.arrived.get()
    shed = await client.post("/v1/log", data=gzip.compress(large), headers=headers)
    assert shed.status == 503
    assert (await shed.json(content_type=None))["code"] == "overloaded"
    # What fits beside it is served.
    second = asyncio.create_task(sink.post(client, gzip.compress(small), headers))
    await sink.arrived.get()
    sink.gate.set()
    assert [await r for r in (first, second)] == [200, 200]
    assert len(sink.records["log"]) == 101


async def test_a_gzip_bomb_is_413_and_takes_no_memory_beyond_the_limit(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    limit = 4 * 1024 * 1024
    settings = gateway_settings(keys_file=key_file.path, max_body_bytes=limit)
    client = await gateway_client(settings, sink=MemorySink())
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "x-api-key": key_file.key,
    }
    bomb = gzip.compress(b" " * 200_000_000, compresslevel=9)
    tracemalloc.start()
    try:
        resp = await client.post("/v1/log", data=bomb, headers=headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status == 413
    assert (await resp.json(content_type=None))["code"] == "payload_too_large"
    # Decoded a piece at a time and cut at the limit, never the 200 MB it expands to: the
    # body read so far and a few buffers (about 1.4 times the limit, measured).
    assert peak < 3 * limit
