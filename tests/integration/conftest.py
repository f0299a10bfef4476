"""A real Kafka for the integration tests, and a unique topic per test.

The broker is chosen once per session, in this order:
1. `CAFE_KAFKA_BOOTSTRAP` if set (what `make test` does, after starting the local broker);
2. testcontainers' Kafka, if a Docker daemon answers;
3. the local broker from `deploy/kafka/kafka.sh`, started if it is not running.
A broker that cannot be had fails the tests; it never skips them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.integration.tcp_proxy import free_ports

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
TOPIC_PARTITIONS = 3


@dataclass(frozen=True)
class Broker:
    """The Kafka the integration tests use, and where it came from."""

    bootstrap: str
    source: str


BROKER_USED = pytest.StashKey[Broker]()
SUMMARY_LINES = pytest.StashKey[list[str]]()


def _docker_answers() -> bool:
    """True if a Docker daemon answers `GET /_ping` at $DOCKER_HOST or the default socket.

    Asked with the standard library: the docker package leaks its socket when the
    daemon is absent, which `filterwarnings = error` would turn into a test error.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    address: str | tuple[str, int]
    if host.startswith("unix://"):
        family, address = socket.AF_UNIX, host.removeprefix("unix://")
    elif host.startswith("tcp://"):
        name, _, port = host.removeprefix("tcp://").rpartition(":")
        family, address = socket.AF_INET, (name, int(port))
    else:
        return False
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(64).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka(pytestconfig: pytest.Config) -> Iterator[Broker]:
    """The session's broker (see the module docstring for the order of choice)."""
    bootstrap = os.environ.get("CAFE_KAFKA_BOOTSTRAP", "").strip()
    if bootstrap:
        broker = Broker(bootstrap, "CAFE_KAFKA_BOOTSTRAP")
        pytestconfig.stash[BROKER_USED] = broker
        yield broker
    elif _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            broker = Broker(container.get_bootstrap_server(), "testcontainers")
            pytestconfig.stash[BROKER_USED] = broker
            yield broker
    else:
        subprocess.run([str(KAFKA_SH), "up"], check=True)
        port = os.environ.get("CAFE_KAFKA_PORT", "9092")
        broker = Broker(f"127.0.0.1:{port}", f"local broker ({KAFKA_SH.relative_to(REPO)})")
        pytestconfig.stash[BROKER_USED] = broker
        yield broker


@pytest.fixture
async def topic(kafka: Broker, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh topic of TOPIC_PARTITIONS partitions, named after the test; deleted afterwards."""
    name = f"test.{request.node.name[:60]}.{uuid.uuid4().hex[:8]}"
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=TOPIC_PARTITIONS, replication_factor=1)]
        )
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


@pytest.fixture
def spare_broker() -> Iterator[tuple[str, dict[str, str]]]:
    """A broker of our own on free ports, which a test may freeze or stop.

    Yields its bootstrap address and the environment that `kafka.sh up` / `down` need
    to act on it (and never on the session's broker).
    """
    port, controller_port = free_ports(2)
    env = {
        **os.environ,
        "CAFE_KAFKA_PORT": str(port),
        "CAFE_KAFKA_CONTROLLER_PORT": str(controller_port),
    }
    up = subprocess.run(
        [str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    if up.returncode != 0:
        pytest.fail(f"the spare broker did not start:\n{up.stderr}")
    try:
        yield f"127.0.0.1:{env['CAFE_KAFKA_PORT']}", env
    finally:
        # Its data and logs go too: each test run would otherwise leave a directory.
        subprocess.run([str(KAFKA_SH), "destroy"], env=env, check=True, capture_output=True)


async def delete_topics(bootstrap: str, wanted: Callable[[str], bool]) -> None:
    """Delete the topics that exist and for whose names `wanted` is true (test clean-up)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if wanted(t)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


def summarise(config: pytest.Config, line: str) -> None:
    """Have `line` printed at the end of the run, where `make test` shows it (pytest
    captures what a test prints)."""
    config.stash.setdefault(SUMMARY_LINES, []).append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the lines tests asked for, and say which real Kafka the integration tests
    talked to, if any ran."""
    for line in terminalreporter.config.stash.get(SUMMARY_LINES, []):
        terminalreporter.write_line(line)
    broker = terminalreporter.config.stash.get(BROKER_USED, None)
    if broker is not None:
        terminalreporter.write_line(
            f"integration tests ran against Kafka at {broker.bootstrap} ({broker.source})"
        )


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 30.0) -> None:
    """Poll `check` until it is true; fail after `within` seconds (a deadline, not a timing)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.1)


async def consume(
    bootstrap: str, topic: str, partitions: int = TOPIC_PARTITIONS
) -> AsyncIterator[ConsumerRecord]:
    """Every message on `topic`, read up to the end offsets it has now, as it arrives
    (for topics too large to hold at once).

    Reading to the end offsets, not until a quiet period, proves positively that
    nothing else is there.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(*tps, timeout_ms=1000)
            for messages in batches.values():
                for message in messages:
                    yield message
    finally:
        await consumer.stop()


async def consume_all(
    bootstrap: str, topic: str, partitions: int = TOPIC_PARTITIONS
) -> list[ConsumerRecord]:
    """Every message on `topic`, read up to the end offsets it has now (see `consume`)."""
    return [message async for message in consume(bootstrap, topic, partitions)]
