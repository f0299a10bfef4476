"""A fake Kafka cluster, and a fake aiokafka producer for gateway/kafka/sink.py to drive.

The producer implements just what gateway/kafka/sink.py uses of AIOKafkaProducer, and as
aiokafka 0.14 does it (aiokafka/producer/{producer,message_accumulator,sender}.py):

- `send_batch` queues a closed batch for its partition; a partition holds one batch
  waiting to be sent, and the next waits for that one to go out, up to the request
  timeout, then gets KafkaTimeoutError (the batch is untouched; the gateway retries);
- a sender task sends one batch per partition at a time and settles its future, as the
  topic's mode says (`Mode`);
- `stop()` waits until every batch has settled or the sender has stopped, then closes
  the sender: cancelled, the sender still waits for the requests it has in flight, and
  fails nothing; batches it had not sent are never settled. Cancelled again, it stops
  waiting, and the batches of those requests are never settled either.

The cluster keeps every record it stores, in order, per topic, with the time and a tag
saying who appended it to its batch (`origin`, a function the test gives).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    ProducerClosed,
    TopicAuthorizationFailedError,
)

# How often aiokafka tries a batch again while its partition has no leader (retry_backoff_ms).
_RETRY_S = 0.1


class Mode(enum.Enum):
    UP = "up"  # stores a batch and acknowledges it after `ack_delay`
    SLOW = "slow"  # stores it when it acknowledges it, after `slow_delay`
    DOWN = "down"  # stores nothing; the batch fails with KafkaTimeoutError once it expires
    REFUSING = "refusing"  # fails every batch at once, for good


class Copy(NamedTuple):
    """One record as the cluster stored it."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes
    origin: Any  # who appended it to its batch (FakeKafka.origin at that moment)
    at: float  # when it was stored (the loop's time)
    producer: int  # the number of the producer that sent it
    acked: bool  # False: stored as its process was killed, so never acknowledged


class Broker(NamedTuple):
    nodeId: int  # aiokafka's name


class FakeKafka:
    def __init__(
        self,
        topics: list[str],
        *,
        partitions: int = 2,
        request_timeout: float = 30.0,
        ack_delay: float = 0.002,
        slow_delay: float = 7.5,
        batch_records: int = 4,
        origin: Callable[[], Any] = lambda: None,
        clock: Callable[[], float] = lambda: asyncio.get_running_loop().time(),
    ) -> None:
        self.modes = dict.fromkeys(topics, Mode.UP)
        self.partitions = partitions
        self.request_timeout = request_timeout
        self.ack_delay = ack_delay
        self.slow_delay = slow_delay
        self.batch_records = batch_records
        self.origin = origin
        self.clock = clock
        self.log: list[Copy] = []  # every record stored, in the order it was stored
        self.producers: list[FakeProducer] = []

    def all_down(self) -> bool:
        return all(mode is Mode.DOWN for mode in self.modes.values())

    def new_producer(self) -> FakeProducer:
        producer = FakeProducer(self)
        self.producers.append(producer)
        return producer

    def store(self, batch: FakeBatch, acked: bool = True) -> None:
        if batch.stored:
            return
        batch.stored = True
        now = self.clock()
        for key, value, origin in batch.builder.records:
            copy = Copy(
                batch.topic, batch.partition, key, value, origin, now, batch.producer, acked
            )
            self.log.append(copy)

    def crash(self, land: bool) -> None:
        """The gateway's process is killed: its producers are gone. With `land`, the
        batches they had sent and Kafka was about to take are stored; else they are not
        (the broker never got the whole request)."""
        for producer in self.producers:
            if producer.dead:
                continue
            producer.dead = True
            for line in producer.lines.values():
                batch = line.in_flight
                if land and batch is not None and batch.landing:
                    self.store(batch, acked=False)

    async def deliver(self, batch: FakeBatch) -> None:
        """The broker's side of sending a batch: store it or not, and settle its future."""
        loop = asyncio.get_running_loop()
        expires = batch.created + self.request_timeout
        while True:
            mode = self.modes[batch.topic]
            if mode in (Mode.UP, Mode.SLOW):
                batch.landing = True
                await asyncio.sleep(self.ack_delay if mode is Mode.UP else self.slow_delay)
                self.store(batch)
                batch.settle(None)
                return
            if mode is Mode.REFUSING:
                batch.settle(TopicAuthorizationFailedError(f"not allowed to write {batch.topic}"))
                return
            # Down: tried again until the batch expires, unless the topic comes back.
            if loop.time() >= expires:
                batch.settle(KafkaTimeoutError(f"batch for {batch.topic} expired"))
                return
            await asyncio.sleep(min(_RETRY_S, expires - loop.time()))


class FakeBuilder:
    """aiokafka's BatchBuilder: takes records until `limit`, then answers None."""

    def __init__(self, kafka: FakeKafka) -> None:
        self._kafka = kafka
        self.records: list[tuple[bytes | None, bytes, Any]] = []
        self.closed = False
        self.created_at = asyncio.get_running_loop().time()

    def append(
        self,
        *,
        key: bytes | None,
        value: bytes,
        timestamp: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> object | None:
        assert not self.closed, "appended to a closed batch"
        if len(self.records) >= self._kafka.batch_records:
            return None
        self.records.append((key, value, self._kafka.origin()))
        return object()  # aiokafka's metadata; only its being there matters

    def close(self) -> None:
        self.closed = True


@dataclass(eq=False)
class FakeBatch:
    builder: FakeBuilder
    topic: str
    partition: int
    created: float
    future: asyncio.Future[None]
    producer: int
    landing: bool = False  # the broker has it and is about to store it
    stored: bool = False

    def settle(self, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(error)


@dataclass(eq=False)
class _Line:
    """One partition of one producer: the batch being sent, and the one waiting."""

    in_flight: FakeBatch | None = None
    waiting: FakeBatch | None = None
    drained: list[asyncio.Future[None]] = field(default_factory=list)

    def take(self) -> FakeBatch | None:
        batch, self.waiting = self.waiting, None
        if batch is not None:
            self.in_flight = batch
            for waiter in self.drained:
                if not waiter.done():
                    waiter.set_result(None)
            self.drained.clear()
        return batch


class FakeCluster:
    """The producer's metadata (aiokafka's ClusterMetadata)."""

    def __init__(self, kafka: FakeKafka) -> None:
        self._kafka = kafka
        self.known: set[str] = set()

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(self._kafka.partitions)) if topic in self.known else None

    def brokers(self) -> set[Broker]:
        return {Broker(0)}


class FakeClient:
    """aiokafka's AIOKafkaClient: metadata and connections."""

    def __init__(self, kafka: FakeKafka) -> None:
        self._kafka = kafka
        self.cluster = FakeCluster(kafka)
        self.closed = False

    async def ready(self, node_id: int) -> bool:
        return not self.closed and not self._kafka.all_down()

    async def close(self) -> None:
        self.closed = True


class FakeSender:
    """aiokafka's Sender: a task that sends each partition's batches, one at a time."""

    def __init__(self, producer: FakeProducer) -> None:
        self._producer = producer
        self.sender_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.sender_task = asyncio.create_task(
            self._routine(), name=f"fake-sender-{self._producer.number}"
        )

    def wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def close(self) -> None:
        task = self.sender_task
        if task is not None and not task.done():
            task.cancel()
            await task

    async def _routine(self) -> None:
        requests: dict[asyncio.Task[None], None] = {}  # ordered, unlike a set
        try:
            while True:
                for line in self._producer.lines.values():
                    if line.in_flight is None and (batch := line.take()) is not None:
                        request = asyncio.create_task(self._request(line, batch))
                        requests[request] = None
                        request.add_done_callback(lambda done: requests.pop(done, None))
                self._wake = asyncio.get_running_loop().create_future()
                await self._wake
        except asyncio.CancelledError:
            # As aiokafka's sender: waits for the requests in flight, fails nothing.
            for request in list(requests):
                await request

    async def _request(self, line: _Line, batch: FakeBatch) -> None:
        try:
            await self._producer.kafka.deliver(batch)
        finally:
            line.in_flight = None
            self.wake()


class FakeProducer:
    """What gateway/kafka/sink.py uses of AIOKafkaProducer."""

    _numbers = itertools.count()

    def __init__(self, kafka: FakeKafka) -> None:
        self.kafka = kafka
        self.number = next(self._numbers)
        self.client = FakeClient(kafka)
        self._sender = FakeSender(self)
        self.lines: dict[tuple[str, int], _Line] = {}
        self.closed = False
        self.dead = False  # its process was killed

    async def start(self) -> None:
        if self.kafka.all_down():
            raise KafkaConnectionError("no broker answers")
        self._sender.start()

    async def stop(self) -> None:
        if self.closed:
            return
        self.closed = True
        task = self._sender.sender_task
        if task is not None:
            flushed = asyncio.create_task(self._flush(), name="fake-flush")
            await asyncio.wait([flushed, task], return_when=asyncio.FIRST_COMPLETED)
            await self._sender.close()
            if not flushed.done():
                flushed.cancel()  # aiokafka leaves it pending; the test would too long
        await self.client.close()

    async def _flush(self) -> None:
        batches = [
            batch.future
            for line in self.lines.values()
            for batch in (line.in_flight, line.waiting)
            if batch is not None
        ]
        if batches:
            await asyncio.wait(batches)

    async def partitions_for(self, topic: str) -> set[int]:
        if self.kafka.all_down():
            # No broker answers the metadata request.
            await asyncio.sleep(self.kafka.request_timeout)
            raise KafkaTimeoutError()
        self.client.cluster.known.add(topic)
        return set(range(self.kafka.partitions))

    def create_batch(self) -> FakeBuilder:
        return FakeBuilder(self.kafka)

    async def send_batch(
        self, builder: FakeBuilder, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        if self.closed:
            raise ProducerClosed()
        assert partition in range(self.kafka.partitions), partition
        loop = asyncio.get_running_loop()
        line = self.lines.setdefault((topic, partition), _Line())
        deadline = loop.time() + self.kafka.request_timeout
        while line.waiting is not None:
            drained = loop.create_future()
            line.drained.append(drained)
            try:
                async with asyncio.timeout_at(deadline):
                    await drained
            except TimeoutError:
                raise KafkaTimeoutError() from None
        batch = FakeBatch(builder, topic, partition, loop.time(), loop.create_future(), self.number)
        line.waiting = batch
        self._sender.wake()
        return asyncio.shield(batch.future)
