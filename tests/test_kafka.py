"""The Kafka sink without a broker: its partitioning (Kafka's murmur2, so Java consumers
and producers agree), a producer closed without answering, and readiness."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import KafkaSettings
from gateway.errors import KafkaUnavailable
from gateway.kafka.messages import Message
from gateway.kafka.sink import Deadlines, KafkaSink
from tests.support.virtual_time import VirtualTimeLoop


def test_keyed_partitions_match_the_default_partitioner() -> None:
    sink = KafkaSink(KafkaSettings())
    rng = random.Random(7)
    keys = [f"session-{rng.randrange(10**9)}".encode() for _ in range(2000)]
    for partitions in (1, 3, 6, 7, 64):
        all_partitions = list(range(partitions))
        for key in keys:
            expected = DefaultPartitioner()(key, all_partitions, all_partitions)
            assert sink._partition(key, partitions) == expected


def test_unkeyed_messages_go_round_robin() -> None:
    sink = KafkaSink(KafkaSettings())
    assert [sink._partition(None, 3) for _ in range(6)] == [1, 2, 0, 1, 2, 0]


async def test_a_sink_that_has_not_connected_says_which_kafka_it_waits_for() -> None:
    sink = KafkaSink(KafkaSettings(bootstrap="kafka.invalid:9092"))
    assert await sink.unavailable() == "Kafka at kafka.invalid:9092 is not reachable"


class _Builder:
    def __init__(self) -> None:
        self.records = 0

    def append(self, **_: object) -> object:
        self.records += 1
        return object()

    def close(self) -> None:
        pass


class _Node:
    def __init__(self, node_id: int) -> None:
        self.nodeId = node_id


class StalledProducer:
    """Just what KafkaSink asks of aiokafka's producer, for a broker that stopped
    answering: batches are taken and never answered, and stop() never returns."""

    def __init__(self, answering: tuple[int, ...] = (0,), brokers: int = 1) -> None:
        self.client = self
        self.cluster = self
        self._sender = self
        self.answering = answering
        self.nodes = [_Node(n) for n in range(brokers)]
        self.acks: list[asyncio.Future[None]] = []
        self.handed = asyncio.Event()
        self.closed = False

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def brokers(self) -> list[_Node]:
        return self.nodes

    async def ready(self, node_id: int) -> bool:
        return node_id in self.answering

    def create_batch(self) -> _Builder:
        return _Builder()

    async def send_batch(self, batch: _Builder, topic: str, partition: int) -> asyncio.Future[None]:
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        self.handed.set()
        return ack

    async def stop(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        self.closed = True


async def test_batches_of_a_producer_closed_without_answering_fail_and_free_their_bytes() -> None:
    """A stop that times out cancels the sender, which fails none of its batches: the sink
    fails them, so their requests end and the partition is not refused for good."""
    sink = KafkaSink(KafkaSettings(produce_timeout_ms=60_000))
    stalled = StalledProducer()
    sink._producer = stalled
    sending = asyncio.create_task(sink.produce("cafe.activity", [Message(b"s1", b"{}")]))
    await stalled.handed.wait()
    assert sink._held_bytes == 2
    loop = asyncio.get_running_loop()
    await sink._stop(stalled, loop.time() + 0.05)
    assert stalled.closed
    with pytest.raises(KafkaUnavailable, match="closed without an answer"):
        await asyncio.wait_for(sending, timeout=5)
    await asyncio.sleep(0)
    assert sink._held_bytes == 0
    for batcher in sink._batchers.values():
        await batcher.close()


@pytest.mark.parametrize(
    ("answering", "brokers", "ready"),
    [((0,), 1, True), ((0, 1), 3, True), ((2,), 3, False), ((), 3, False), ((0, 1), 4, False)],
)
async def test_ready_takes_most_of_the_brokers(
    answering: tuple[int, ...], brokers: int, ready: bool
) -> None:
    """With 3 replicas and min.insync.replicas=2, one broker of three cannot take a write."""
    sink = KafkaSink(KafkaSettings(bootstrap="k1:9092"))
    sink._producer = StalledProducer(answering, brokers)
    reason = await sink.unavailable()
    assert (reason is None) == ready, reason
    if not ready and answering:
        assert reason == (
            f"only {len(answering)} of the {brokers} Kafka brokers at k1:9092 answer: too few "
            "for the replicas a write needs"
        )


# A request waiting on Kafka (Deadlines.wait_all): when it arrives, its produce timeout
# (most share the sink's; some are shorter), and when each of its batches is answered
# (None: never).
WAITS = st.lists(
    st.tuples(
        st.integers(0, 300),
        st.sampled_from([1000, 1000, 1000, 250]),
        st.lists(st.none() | st.integers(0, 1500), min_size=0, max_size=3),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None, database=None)
@given(waits=WAITS)
def test_each_request_waits_until_its_batches_are_answered_or_its_own_deadline(
    waits: list[tuple[int, int, list[int | None]]],
) -> None:
    """One timer serves every waiting request's deadline, yet each request ends exactly
    when its last batch is answered, or at its own deadline if that comes first, whatever
    the order of arrivals, answers and timeouts (times in virtual milliseconds)."""
    loop = VirtualTimeLoop()
    deadlines = Deadlines()
    ended: dict[int, tuple[str, float]] = {}

    async def wait(n: int, arrives: int, timeout_ms: int, answers: list[int | None]) -> None:
        await asyncio.sleep(arrives / 1000)
        futures = [loop.create_future() for _ in answers]
        for future, at in zip(futures, answers, strict=True):
            if at is not None:
                loop.call_later(at / 1000, future.set_result, None)
        try:
            await deadlines.wait_all(futures, loop.time() + timeout_ms / 1000)
        except TimeoutError:
            ended[n] = ("timed out", loop.time())
        else:
            ended[n] = ("answered", loop.time())

    async def all_waits() -> None:
        await asyncio.gather(*(wait(n, *w) for n, w in enumerate(waits)))
        await asyncio.sleep(2)  # past every deadline: the timer is done with the queue

    try:
        loop.run_until_complete(all_waits())
    finally:
        loop.close()
    for n, (arrives, timeout, answers) in enumerate(waits):
        last = max((at for at in answers if at is not None), default=0)
        expected = (
            ("answered", arrives + last)
            if None not in answers and last <= timeout
            else ("timed out", arrives + timeout)
        )
        how, when = ended[n]
        assert (how, round(when * 1000, 6)) == expected, (n, waits[n])
    assert not deadlines._queue and deadlines._timer is None
