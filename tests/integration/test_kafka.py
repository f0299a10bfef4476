"""The Kafka sink and readiness against a real broker."""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import KafkaSettings, Settings
from gateway.kafka import KafkaSink
from gateway.sink import Message
from tests.integration.conftest import KAFKA_SH, Broker, consume_all, eventually
from tests.integration.tcp_proxy import TcpProxy, free_port

pytestmark = pytest.mark.integration

AiohttpClient = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


@pytest.fixture
async def sink(kafka: Broker) -> AsyncIterator[KafkaSink]:
    sink = KafkaSink(KafkaSettings(bootstrap=kafka.bootstrap))
    await sink.start()
    await eventually(sink.ready)
    yield sink
    await sink.close()


async def test_every_sent_record_is_on_the_topic_in_key_order(
    kafka: Broker, topic: str, sink: KafkaSink
) -> None:
    sent = [(f"session-{i % 20}".encode(), f"record-{i}".encode()) for i in range(300)]
    await sink.send(topic, [Message(key, value) for key, value in sent])

    seen = [(m.partition, m.key, m.value) for m in await consume_all(kafka.bootstrap, topic)]

    # Exactly what was sent, nothing more: the end offsets bound what was read.
    assert sorted((k, v) for _, k, v in seen) == sorted(sent)
    by_key: dict[bytes, list[tuple[int, int]]] = {}
    for partition, key, value in seen:
        by_key.setdefault(key, []).append((partition, int(value.split(b"-")[1])))
    for key, entries in by_key.items():
        assert len({p for p, _ in entries}) == 1, f"{key!r} spread over partitions"
        sequence = [n for _, n in entries]
        assert sequence == sorted(sequence), f"{key!r} reordered"
    assert len({p for p, _, _ in seen}) > 1, "20 keys should use more than one partition"


async def test_readyz_is_503_until_kafka_is_reachable_then_200(
    kafka: Broker, aiohttp_client: AiohttpClient
) -> None:
    proxy = TcpProxy(kafka.bootstrap)
    settings = Settings(kafka=KafkaSettings(bootstrap=f"127.0.0.1:{proxy.port}"))
    client = await aiohttp_client(create_app(settings))

    resp = await client.get("/readyz")
    assert resp.status == 503
    assert resp.content_type == "application/problem+json"
    body = await resp.json(content_type=None)
    assert body["code"] == "not_ready"
    assert f"127.0.0.1:{proxy.port}" in body["detail"]
    assert resp.headers["Retry-After"] == "1"
    assert (await client.get("/healthz")).status == 200

    await proxy.open()
    try:

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready)
        assert await (await client.get("/readyz")).json() == {"status": "ready"}
    finally:
        await proxy.close()


async def test_readyz_stays_503_while_the_port_is_closed(aiohttp_client: AiohttpClient) -> None:
    settings = Settings(kafka=KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}"))
    client = await aiohttp_client(create_app(settings))
    # Long enough for several reconnect attempts (0.25 s, 0.5 s, 1 s backoff).
    for _ in range(3):
        assert (await client.get("/readyz")).status == 503
        await asyncio.sleep(0.6)


def test_partitions_agree_with_the_java_client() -> None:
    # The jars the local broker runs on hold the Java client's own murmur2.
    subprocess.run([str(KAFKA_SH), "fetch"], check=True, capture_output=True, timeout=300)
    home = Path(
        os.environ.get("CAFE_KAFKA_HOME", Path.home() / ".cache" / "cafe-gateway" / "kafka")
    )
    pom = (KAFKA_SH.parent / "pom.xml").read_text()
    version = re.search(r"<kafka.version>(.+)</kafka.version>", pom)
    assert version is not None
    libs = home / version.group(1) / "libs"
    keys = [str(uuid.UUID(int=random.Random(i).getrandbits(128))) for i in range(200)]
    result = subprocess.run(
        ["java", "-cp", f"{libs}/*", str(Path(__file__).with_name("Partitions.java")), "6", *keys],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    java = [int(line) for line in result.stdout.split()]
    sink = KafkaSink(KafkaSettings())
    assert [sink._partition(key.encode(), 6) for key in keys] == java


async def test_sending_nothing_returns_at_once(kafka: Broker, sink: KafkaSink, topic: str) -> None:
    await sink.send(topic, [])  # asyncio.wait() would raise ValueError on no futures
    assert await consume_all(kafka.bootstrap, topic) == []
