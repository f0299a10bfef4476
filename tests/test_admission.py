"""Load shedding: past the cap on bytes in progress, requests get 503 at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import Settings
from gateway.sink import MemorySink, Message
from tests.keys import KeyFile
from tests.spec_samples import curl_bodies

AiohttpClient = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


class GatedSink(MemorySink):
    """Holds every send until the test opens the gate, like a slow Kafka."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.arrived: asyncio.Queue[str] = asyncio.Queue()

    async def send(self, topic: str, messages: Sequence[Message]) -> None:
        self.arrived.put_nowait(topic)
        await self.gate.wait()
        await super().send(topic, messages)


def batch(records: int) -> bytes:
    (record,) = orjson.loads(curl_bodies()["log"])["records"]
    return orjson.dumps({"records": [record] * records})


async def test_requests_past_the_cap_are_shed_and_the_rest_still_served(
    aiohttp_client: AiohttpClient, key_file: KeyFile
) -> None:
    small, large = batch(1), batch(20)
    cap = len(small) * 2 + len(large) // 2  # room for two small ones, not a large one more
    sink = GatedSink()
    settings = Settings(keys_file=key_file.path, max_inflight_bytes=cap)
    client = await aiohttp_client(create_app(settings, sink=sink))
    headers = {"Content-Type": "application/json", "x-api-key": key_file.key}

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
    assert sum(len(m) for m in sink.topics.values()) == 1 + 1 + 20


async def test_a_single_request_larger_than_the_cap_is_still_served(
    aiohttp_client: AiohttpClient, key_file: KeyFile
) -> None:
    settings = Settings(keys_file=key_file.path, max_inflight_bytes=1024)
    client = await aiohttp_client(create_app(settings, sink=MemorySink()))
    headers = {"Content-Type": "application/json", "x-api-key": key_file.key}
    resp = await client.post("/v1/log", data=batch(20), headers=headers)
    assert resp.status == 200


async def test_a_body_over_the_limit_is_413_even_when_busy(
    aiohttp_client: AiohttpClient, key_file: KeyFile
) -> None:
    sink = GatedSink()
    settings = Settings(keys_file=key_file.path, max_body_bytes=4096, max_inflight_bytes=8192)
    client = await aiohttp_client(create_app(settings, sink=sink))
    headers = {"Content-Type": "application/json", "x-api-key": key_file.key}
    busy = asyncio.create_task(client.post("/v1/log", data=batch(1), headers=headers))
    await sink.arrived.get()
    resp = await client.post("/v1/log", data=b" " * 5000, headers=headers)
    assert resp.status == 413
    sink.gate.set()
    assert (await busy).status == 200
