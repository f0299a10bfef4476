"""The Kafka sink and readiness against a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from devkit.net import free_port
from devkit.samples import curl_bodies
from gateway.config import KafkaSettings, TopicSettings
from gateway.errors import KafkaUnavailable, RecordTooLarge
from gateway.kafka.messages import Message
from gateway.kafka.partitioner import murmur2
from gateway.kafka.rdkafka import RdKafkaSink
from gateway.kafka.sink import KafkaSink
from gateway.metrics import Metrics
from tests.support.app import GatewayClient, gateway_settings
from tests.support.kafka import (
    KAFKA_CLIENTS,
    TOPIC_PARTITIONS,
    Broker,
    broker_pid,
    consume_all,
    delete_topics,
    frozen,
    kafka_libs,
    kafka_sink,
)
from tests.support.keys import json_headers, make_key_file
from tests.support.net import TcpProxy
from tests.support.records import record, rejected
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

# Either client's sink: the tests below run on each (CAFE_KAFKA_CLIENT).
AnySink = KafkaSink | RdKafkaSink


@pytest.fixture(params=KAFKA_CLIENTS)
async def sink(kafka: Broker, request: pytest.FixtureRequest) -> AsyncIterator[AnySink]:
    sink = kafka_sink(KafkaSettings(bootstrap=kafka.bootstrap, client=request.param))
    await sink.start()
    await eventually(functools.partial(connected, sink))
    yield sink
    await sink.close()


async def connected(sink: AnySink) -> bool:
    return await sink.unavailable() is None


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
async def test_the_sink_puts_records_on_their_type_s_topic_and_dead_letters_apart(
    kafka: Broker, client: str
) -> None:
    run = uuid.uuid4().hex[:8]
    topics = TopicSettings(
        log=f"test.routed.{run}.log",
        activity=f"test.routed.{run}.activity",
        profile=f"test.routed.{run}.profile",
        deadletter=f"test.routed.{run}.deadletter",
        partitions=TOPIC_PARTITIONS,
    )
    sink = kafka_sink(KafkaSettings(bootstrap=kafka.bootstrap, topics=topics, client=client))
    await sink.start()  # creates the four topics
    try:
        await eventually(functools.partial(connected, sink))
        await sink.send("log", [record("s", b"valid")], [rejected(b"rejected")])
        await sink.send("profile", [], [rejected(b"rejected-profile")])
    finally:
        await sink.close()

    async def values(topic: str) -> list[bytes]:
        return sorted(m.value for m in await consume_all(kafka.bootstrap, topic))

    assert await values(topics.log) == [b"valid"]
    assert await values(topics.deadletter) == [b"rejected", b"rejected-profile"]
    assert await values(topics.profile) == []
    assert await values(topics.activity) == []
    await delete_topics(kafka.bootstrap, lambda t: t.startswith(f"test.routed.{run}."))


async def test_every_sent_record_is_on_the_topic_in_key_order(
    kafka: Broker, topic: str, sink: AnySink
) -> None:
    sent = [(f"session-{i % 20}".encode(), f"record-{i}".encode()) for i in range(300)]
    await sink.produce(topic, [Message(key, value) for key, value in sent])

    seen = [(m.partition, m.key, m.value) for m in await consume_all(kafka.bootstrap, topic)]

    # Exactly what was sent, nothing more: the end offsets bound what was read.
    assert sorted((k, v) for _, k, v in seen) == sorted(sent)
    by_key: dict[bytes, list[tuple[int, int]]] = {}
    for partition, key, value in seen:
        by_key.setdefault(key, []).append((partition, int(value.split(b"-")[1])))
    for key, entries in by_key.items():
        assert len({p for p, _ in entries}) == 1, f"{key!r} spread over partitions"
        # Where Kafka's default partitioner (and so Java's) puts the key.
        assert entries[0][0] == sink._partition(key, TOPIC_PARTITIONS), key
        sequence = [n for _, n in entries]
        assert sequence == sorted(sequence), f"{key!r} reordered"
    assert len({p for p, _, _ in seen}) > 1, "20 keys should use more than one partition"


@pytest.mark.parametrize("kafka_client", KAFKA_CLIENTS)
async def test_readyz_is_503_until_kafka_is_reachable_then_200(
    kafka: Broker, gateway_client: GatewayClient, kafka_client: str
) -> None:
    proxy = TcpProxy(kafka.bootstrap)
    settings = gateway_settings(
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{proxy.port}", client=kafka_client)
    )
    client = await gateway_client(settings)

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


@pytest.mark.parametrize("kafka_client", KAFKA_CLIENTS)
async def test_readyz_stays_503_while_the_port_is_closed(
    gateway_client: GatewayClient, kafka_client: str
) -> None:
    settings = gateway_settings(
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}", client=kafka_client)
    )
    client = await gateway_client(settings)
    # Long enough for several reconnect attempts (0.25 s, 0.5 s, 1 s backoff).
    for _ in range(3):
        assert (await client.get("/readyz")).status == 503
        await asyncio.sleep(0.6)


def random_text(rng: random.Random) -> str:
    """Up to 80 characters from every plane: ASCII, the rest of the BMP, and beyond it (4
    bytes in UTF-8). No surrogates, which UTF-8 cannot encode, and no control characters:
    a line break would split a key in two on its way to Java."""
    ranges = [(0x20, 0x7F), (0xA0, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(rng.randrange(1, 80)))


def test_partitions_agree_with_the_java_client() -> None:
    # The jars the local broker runs on hold the Java client's own murmur2.
    libs = kafka_libs()
    rng = random.Random(28)
    keys = [
        *(str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(200)),
        # Every tail murmur2 treats apart (0-3 bytes past its blocks of 4), empty included.
        *("s" * n for n in range(9)),
        # Multi-byte UTF-8: 2, 3 and 4 bytes a character, alone and mixed.
        "ü",
        "日本",
        "🦊",
        "sessão-日本-🦊",
        "😀" * 32,
        # As long as a sessionId may be (schemas.MAX_KEY_LENGTH), and past it.
        "x" * 128,
        "日" * 128,
        "y" * 1000,
        *(random_text(rng) for _ in range(200)),
    ]
    result = subprocess.run(
        ["java", "-cp", f"{libs}/*", str(Path(__file__).with_name("Partitions.java")), "6"],
        input="".join(f"{key}\n" for key in keys).encode(),
        capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    java = [line.split() for line in result.stdout.decode().splitlines()]
    assert len(java) == len(keys)
    assert [murmur2(key.encode()) for key in keys] == [int(h) & 0xFFFFFFFF for h, _ in java]
    sink = KafkaSink(KafkaSettings())
    assert [sink._partition(key.encode(), 6) for key in keys] == [int(p) for _, p in java]


async def test_sending_nothing_returns_at_once(kafka: Broker, sink: AnySink, topic: str) -> None:
    await sink.produce(topic, [])  # asyncio.wait() would raise ValueError on no futures
    assert await consume_all(kafka.bootstrap, topic) == []


async def test_a_message_over_the_size_limit_is_refused_before_kafka(
    kafka: Broker, sink: AnySink, topic: str
) -> None:
    with pytest.raises(RecordTooLarge):
        await sink.produce(topic, [Message(b"session", b"x" * 2_000_000)])
    await sink.produce(topic, [Message(b"session", b"small")])
    assert [m.value for m in await consume_all(kafka.bootstrap, topic)] == [b"small"]


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
async def test_a_batch_kafka_refuses_for_good_does_not_wedge_its_partition(
    kafka: Broker, caplog: pytest.LogCaptureFixture, client: str
) -> None:
    # A topic whose own limit is below the producer's: the broker refuses the batch after
    # the producer has numbered it, which used to fail every later batch to the partition.
    name = f"test.small-limit.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, 1, 1, topic_configs={"max.message.bytes": "10000"})]
        )
        metrics = Metrics(CollectorRegistry(), "test")
        sink = kafka_sink(KafkaSettings(bootstrap=kafka.bootstrap, client=client), metrics)
        await sink.start()
        try:
            await eventually(functools.partial(connected, sink))
            await sink.produce(name, [Message(b"session", b"before")])
            with pytest.raises(RecordTooLarge):
                # Random bytes: past the topic's limit however the batch is compressed.
                big = random.Random(50).randbytes(50_000)
                await sink.produce(name, [Message(b"session", big)])
            for n in range(3):
                await sink.produce(name, [Message(b"session", f"after-{n}".encode())])
        finally:
            await sink.close()
        stored = [m.value for m in await consume_all(kafka.bootstrap, name, partitions=1)]
        assert stored == [b"before", b"after-0", b"after-1", b"after-2"]
        renewals = metrics.registry.get_sample_value(
            "cafe_kafka_producer_renewals_total", {"error": "MessageSizeTooLargeError"}
        )
        if client == "aiokafka":
            assert renewals == 1
            assert "a new producer takes over" in caplog.text
        else:  # librdkafka bumps its idempotent producer's epoch itself
            assert renewals is None
    finally:
        await admin.delete_topics([name])
        await admin.close()


@pytest.mark.parametrize("kafka_client", KAFKA_CLIENTS)
async def test_a_topic_made_again_with_fewer_partitions_is_followed(
    kafka: Broker, gateway_client: GatewayClient, tmp_path: Path, kafka_client: str
) -> None:
    topics = TopicSettings(
        activity=f"test.shrink.{uuid.uuid4().hex[:8]}",
        log=f"test.shrink-log.{uuid.uuid4().hex[:8]}",
        profile=f"test.shrink-profile.{uuid.uuid4().hex[:8]}",
        deadletter=f"test.shrink-dead.{uuid.uuid4().hex[:8]}",
        partitions=6,
    )
    key_file = make_key_file(tmp_path)
    settings = gateway_settings(
        keys_file=key_file.path,
        # A short request timeout lets a batch held for a partition that has gone expire
        # within the test, as it does after 30 s by default.
        kafka=KafkaSettings(
            bootstrap=kafka.bootstrap,
            topics=topics,
            produce_timeout_ms=2000,
            request_timeout_ms=1000,
            client=kafka_client,
        ),
    )
    client = await gateway_client(settings)
    headers = json_headers(key_file.key)
    (base,) = orjson.loads(curl_bodies()["activity"])["records"]
    sessions = [f"session-{n}" for n in range(24)]  # enough to reach all six partitions
    statuses: Counter[int] = Counter()

    async def send_all(tag: str) -> list[int]:
        """One record per session, three times each, all at once; their statuses."""
        records = [
            {**base, "sessionId": s, "eventId": f"{tag}-{s}-{n}"}
            for s in sessions
            for n in range(3)
        ]
        answers = await asyncio.gather(
            *(
                client.post("/v1/activity", data=orjson.dumps({"records": [r]}), headers=headers)
                for r in records
            )
        )
        statuses.update(a.status for a in answers)
        return [a.status for a in answers]

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await eventually(ready)
        assert await send_all("six") == [200] * len(sessions) * 3
        await admin.delete_topics([topics.activity])

        async def made_again() -> bool:
            response = await admin.create_topics([NewTopic(topics.activity, 2, 1)])
            return not response.topic_errors[0][1]  # a deletion takes a moment

        await eventually(made_again)
        rounds = 0

        async def all_sent() -> bool:
            nonlocal rounds
            rounds += 1
            return await send_all(f"two-{rounds}") == [200] * len(sessions) * 3

        await eventually(all_sent, within=60)
        stored = await consume_all(kafka.bootstrap, topics.activity, partitions=2)
        acknowledged = {f"two-{rounds}-{s}-{n}" for s in sessions for n in range(3)}
        assert acknowledged <= {orjson.loads(m.value)["eventId"] for m in stored}
        assert set(statuses) <= {200, 503}, statuses
    finally:
        await admin.close()
        await delete_topics(kafka.bootstrap, lambda t: t in topics.all())


@contextlib.asynccontextmanager
async def spare_sink(
    bootstrap: str, partitions: int, topic_configs: dict[str, str] | None = None, **settings: Any
) -> AsyncIterator[tuple[AnySink, Metrics, str]]:
    """A started sink on the spare broker, its metrics, and a fresh topic."""
    name = f"test.spare.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=topic_configs)])
    finally:
        await admin.close()
    metrics = Metrics(CollectorRegistry(), "test")
    sink = kafka_sink(KafkaSettings(bootstrap=bootstrap, **settings), metrics)
    await sink.start()
    try:
        await eventually(functools.partial(connected, sink))
        yield sink, metrics, name
    finally:
        await sink.close()


async def send_until_taken(sink: AnySink, topic: str) -> list[bytes]:
    """Send one record at a time, "after-0", "after-1", ..., until one is acknowledged
    (30 s at most); returns every value sent, the acknowledged one last."""
    sent: list[bytes] = []

    async def taken() -> bool:
        sent.append(f"after-{len(sent)}".encode())
        try:
            await sink.produce(topic, [Message(b"session", sent[-1])])
        except KafkaUnavailable:
            return False
        return True

    await eventually(taken)
    return sent


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
async def test_while_a_partition_is_not_acknowledging_its_new_records_are_refused_not_queued(
    spare_broker: tuple[str, dict[str, str]], client: str
) -> None:
    bootstrap, env = spare_broker
    async with spare_sink(bootstrap, 1, produce_timeout_ms=1000, client=client) as (
        sink,
        metrics,
        topic,
    ):
        await sink.produce(topic, [Message(b"session", b"before")])
        with frozen(broker_pid(env["CAFE_KAFKA_PORT"])):
            with pytest.raises(KafkaUnavailable, match="within 1s"):
                await sink.produce(topic, [Message(b"session", b"timed-out")])
            assert _sample(metrics, "cafe_kafka_partitions_down") == 1
            # Queued now, these would reach Kafka after the frozen batch, and so would
            # every client's retry of them.
            for n in range(3):
                with pytest.raises(KafkaUnavailable, match="not acknowledging"):
                    await sink.produce(topic, [Message(b"session", f"refused-{n}".encode())])
        # Thawed: the held batch is acknowledged, which takes the partition up again.
        sent_after = await send_until_taken(sink, topic)
        assert _sample(metrics, "cafe_kafka_partitions_down") == 0
        refused = _sample(
            metrics, "cafe_kafka_records_refused_total", topic=topic, reason="kafka_down"
        )
    stored = [m.value for m in await consume_all(bootstrap, topic, partitions=1)]
    assert stored[:2] == [b"before", b"timed-out"]
    assert sent_after[-1] in stored
    assert not [value for value in stored if value.startswith(b"refused")]
    assert len(stored) == len(set(stored))
    # The three, and any attempt after the thaw that came before the acknowledgement.
    assert refused >= 3


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
async def test_a_down_partition_whose_held_batch_fails_is_probed_by_one_request(
    spare_broker: tuple[str, dict[str, str]], client: str
) -> None:
    bootstrap, env = spare_broker
    # The held batch must fail rather than be acknowledged when the broker thaws: one
    # record over the topic's own size limit, refused for good.
    small_limit = {"max.message.bytes": "10000"}
    async with spare_sink(bootstrap, 1, small_limit, produce_timeout_ms=1000, client=client) as (
        sink,
        _,
        topic,
    ):
        await sink.produce(topic, [Message(b"session", b"before")])
        with frozen(broker_pid(env["CAFE_KAFKA_PORT"])):
            with pytest.raises(KafkaUnavailable, match="within 1s"):
                await sink.produce(topic, [Message(b"session", b"x" * 50_000)])
            with pytest.raises(KafkaUnavailable, match="not acknowledging"):
                await sink.produce(topic, [Message(b"session", b"refused")])
        # Thawed: Kafka refuses the held batch, which leaves nothing to show it is back;
        # so a request goes through as the probe, and its acknowledgement ends the outage.
        sent_after = await send_until_taken(sink, topic)
        assert not sink.health.down
    stored = [m.value for m in await consume_all(bootstrap, topic, partitions=1)]
    assert stored[0] == b"before"
    assert sent_after[-1] in stored
    assert b"refused" not in stored


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
async def test_the_records_the_sink_holds_are_bounded_in_bytes(
    spare_broker: tuple[str, dict[str, str]], client: str
) -> None:
    bootstrap, env = spare_broker
    limit = 64 * 1024
    async with spare_sink(
        bootstrap, 2, produce_timeout_ms=1000, max_queued_bytes=limit, client=client
    ) as (
        sink,
        metrics,
        topic,
    ):
        # Two keys on different partitions: the second is refused for the bytes held,
        # not because its own partition is down.
        first, second = b"session-1", b"session-2"
        assert sink._partition(first, 2) != sink._partition(second, 2)
        await sink.produce(topic, [Message(first, b"before")])  # the sink learns the topic
        with frozen(broker_pid(env["CAFE_KAFKA_PORT"])):
            with pytest.raises(KafkaUnavailable, match="within 1s"):
                await sink.produce(topic, [Message(first, b"x" * 40_000)])
            with pytest.raises(KafkaUnavailable, match="the limit is 65536"):
                await sink.produce(topic, [Message(second, b"y" * 40_000)])
        assert (
            _sample(metrics, "cafe_kafka_records_refused_total", topic=topic, reason="queue_full")
            == 1
        )

        async def taken() -> bool:
            try:
                await sink.produce(topic, [Message(second, b"y" * 40_000)])
            except KafkaUnavailable:
                return False
            return True

        # Once the held batch is acknowledged, its bytes are free again.
        await eventually(taken)
    stored = sorted(m.value[:1] for m in await consume_all(bootstrap, topic, partitions=2))
    assert stored == [b"b", b"x", b"y"]


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
async def test_closing_delivers_what_the_sink_holds_or_says_how_many_records_it_dropped(
    spare_broker: tuple[str, dict[str, str]], caplog: pytest.LogCaptureFixture, client: str
) -> None:
    bootstrap, env = spare_broker

    async def hold_three(sink: AnySink, topic: str, tag: str) -> None:
        """Three requests answered 503 while the broker is frozen; their batches wait at
        aiokafka, for aiokafka's one slot per partition, and open in the sink."""
        sends = []
        for n in range(3):
            message = Message(b"session", f"{tag}-{n}".encode())
            sends.append(asyncio.create_task(sink.produce(topic, [message])))
            await asyncio.sleep(0.1)  # each its own batch
        for send in sends:
            with pytest.raises(KafkaUnavailable, match="within 2s"):
                await send

    async with spare_sink(bootstrap, 1, produce_timeout_ms=2000, client=client) as (
        sink,
        _,
        topic,
    ):
        await sink.produce(topic, [Message(b"session", b"before")])  # the sink learns the topic
        with frozen(broker_pid(env["CAFE_KAFKA_PORT"])):
            await hold_three(sink, topic, "delivered")
    # closed right after the thaw: every held batch was handed over and acknowledged
    stored = [m.value for m in await consume_all(bootstrap, topic, partitions=1)]
    assert stored == [b"before", b"delivered-0", b"delivered-1", b"delivered-2"]
    assert "dropped" not in caplog.text

    # Closed while the broker is still frozen: nothing can be delivered, and the log
    # says how much was lost (none of it acknowledged to a client).
    caplog.clear()
    async with spare_sink(bootstrap, 1, produce_timeout_ms=2000, client=client) as (
        sink,
        _,
        topic,
    ):
        await sink.produce(topic, [Message(b"session", b"before")])
        with frozen(broker_pid(env["CAFE_KAFKA_PORT"])):
            await hold_three(sink, topic, "dropped")
            await sink.close()
    assert "closed with 3 records Kafka had not acknowledged" in caplog.text
