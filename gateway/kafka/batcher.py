"""One partition's record batches, shared by the requests writing to it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    UnknownTopicOrPartitionError,
)

# aiokafka's internal batch class, whose compiled builder adder calls directly;
# pyproject.toml keeps aiokafka below its next minor version for it, and
# tests/test_private_apis.py checks it.
from aiokafka.producer.message_accumulator import BatchBuilder

from gateway.kafka.messages import Message

log = logging.getLogger(__name__)


class BatchOwner(Protocol):
    """What a batcher tells, and asks of, the sink it batches for (KafkaSink): one call
    for each thing that happens to a batch."""

    def producer_for_batches(self) -> Awaitable[AIOKafkaProducer]:
        """The producer to hand the next batch to, once there is one."""

    def answered(
        self, producer: AIOKafkaProducer, batcher: Batcher, refused: BaseException | None
    ) -> None:
        """`producer` gave Kafka's verdict on a batch of `batcher`'s: taken, or `refused`
        for good (its sequence numbers are spent: the producer must be retired)."""

    def settled(
        self, batcher: Batcher, size: int, stored: bool, failure: BaseException | None
    ) -> None:
        """A batch of `batcher`'s holding `size` bytes of values is settled: `stored` by
        Kafka, or not (`failure` says why, if it failed rather than was given up)."""

    def forget(self, batcher: Batcher) -> None:
        """`batcher`'s partition is gone: it has stopped."""


async def send_batch(
    producer: AIOKafkaProducer, batch: Any, topic: str, partition: int
) -> asyncio.Future[Any] | None:
    """Queue a built batch; returns the future of its ack, or None if the partition is gone.

    aiokafka queues one batch per partition and makes the next wait for a free slot,
    but counts the time already waited again on every wake-up, so under load it gives
    up with KafkaTimeoutError long before its timeout. The batch is untouched then, so
    queue it again. Requests waiting on the batch stop at their own produce timeout.

    The partition is looked up each time: the topic may have been made again with fewer
    partitions meanwhile, and aiokafka refuses a batch for one it does not know.
    """
    while True:
        # A producer that has just replaced another may not know the topic yet. The
        # undocumented client's metadata answers without an await; partitions_for() is
        # the public way, and the fallback.
        partitions = producer.client.cluster.partitions_for_topic(
            topic
        ) or await producer.partitions_for(topic)
        if partition not in partitions:
            return None
        try:
            future: asyncio.Future[Any] = await producer.send_batch(
                batch, topic, partition=partition
            )
        except KafkaTimeoutError:
            continue
        return future


class _Batch:
    """One record batch of a partition, and the future its requests wait on."""

    __slots__ = ("ack", "acked", "add", "builder", "failures_seen", "producer", "records", "size")

    def __init__(self, builder: Any, acked: asyncio.Future[None]) -> None:
        self.builder = builder
        self.add = adder(builder)
        self.acked = acked
        self.records = 0
        self.size = 0  # bytes of record values, as the sink counts what it holds
        self.producer: AIOKafkaProducer | None = None  # the one it was handed to
        self.ack: asyncio.Future[Any] | None = None  # that producer's verdict on it
        self.failures_seen = 0  # its partition's failed batches when it was made


class Batcher:
    """Builds one partition's record batches from the messages of many requests.

    aiokafka's `send()` costs a future and some Python per record; here records go
    into an open batch shared by every request writing to the partition, and a request
    waits on the one future of each batch that holds its records. One task per
    partition hands the batches to the sink's producer in order: while one waits for
    its slot (aiokafka queues a single batch per partition), records gather in the next.

    A partition is *down* from the moment a request's records for it were not
    acknowledged within the produce timeout (or no broker answered the sink at all),
    until Kafka acknowledges one of its batches again. While it is down the sink queues
    nothing new for it: the batches it already holds are the probe. Should those fail
    instead, one request may go through to probe again (`admits`).
    """

    def __init__(
        self, owner: BatchOwner, topic: str, partition: int, produce_seconds: Any = None
    ) -> None:
        self._sink = owner
        self.topic = topic
        self.partition = partition
        self._produce_seconds = produce_seconds  # a histogram of ack times, if measured
        self._open: _Batch | None = None
        self._ready: collections.deque[_Batch] = collections.deque()
        # Batches made and not yet settled: being filled, waiting, or with aiokafka.
        self.unsettled: set[_Batch] = set()
        self.down = False
        # The batch handed to a producer last, and how many handed batches have failed.
        self._last_handed: _Batch | None = None
        self._failures = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing is waiting to be handed over
        self._idle.set()
        self._task = asyncio.create_task(self._hand_over(), name=f"batches-{topic}-{partition}")

    def append(self, producer: AIOKafkaProducer, message: Message) -> asyncio.Future[None]:
        """Add a message to the open batch; returns that batch's ack future. The caller
        wakes the batcher once it has added what it sends (a replayed window holds
        thousands of messages for a few partitions)."""
        batch = self._open
        if batch is None or not batch.add(message):
            if batch is not None:
                self._ready.append(batch)  # full: it goes as it is
            batch = self._open = self._new_batch(producer)
            batch.add(message)  # an empty batch always takes a record
        batch.records += 1
        batch.size += len(message.value)
        return batch.acked

    def wake(self) -> None:
        """Messages were appended: hand over what is ready."""
        self._idle.clear()
        self._wake.set()

    def admits(self, renewing: bool) -> bool:
        """Whether records for this partition may be queued now."""
        if not self.down:
            return True
        # Down, and holding nothing that could show Kafka is back: a probe may go, once
        # a producer is there to take it.
        return not self.unsettled and not renewing

    def mark_down(self) -> bool:
        """The partition did not answer in time: queue nothing new for it (`admits`).
        True if it was up until now."""
        was_up = not self.down
        self.down = True
        return was_up

    def fail_handed_to(self, producer: AIOKafkaProducer) -> None:
        """`producer` was closed without answering for its batches: fail those it holds,
        so their requests and the bytes they hold are let go."""
        for batch in self.unsettled:
            # One whose verdict came as it closed is settled by that verdict (_settle).
            answered = batch.ack is not None and batch.ack.done()
            if batch.producer is producer and not answered:
                _fail(batch, KafkaError("the producer closed without an answer"))

    async def flush(self) -> None:
        """Return once every batch made so far has been handed to the producer."""
        self._wake.set()
        await self._idle.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def _new_batch(self, producer: AIOKafkaProducer) -> _Batch:
        # A built batch belongs to no producer until it is handed over, so one made
        # here may go out through a producer that replaces this one.
        batch = _Batch(producer.create_batch(), asyncio.get_running_loop().create_future())
        batch.failures_seen = self._failures
        self.unsettled.add(batch)
        batch.acked.add_done_callback(functools.partial(self._settled, batch))
        return batch

    def _settled(self, batch: _Batch, acked: asyncio.Future[None]) -> None:
        self.unsettled.discard(batch)
        if batch.producer is not None and failed(acked):
            self._failures += 1
        if batch is self._last_handed:
            self._wake.set()  # the next batch's turn
        # Also tells of a failure, even if every request waiting on it timed out.
        failure = None if acked.cancelled() else acked.exception()
        stored = not acked.cancelled() and failure is None
        if stored:
            self.down = False  # Kafka acknowledges the partition again
        self._sink.settled(self, batch.size, stored, failure)

    async def _hand_over(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                # One batch of the partition with Kafka at a time, as aiokafka sends them
                # anyway: were the next one queued behind it, aiokafka could store it after
                # this one failed (a batch that expires unsent leaves the next its turn),
                # and the records sent again would come after it. Records meanwhile fill
                # the open batch. (_settled wakes this loop.)
                last = self._last_handed
                if last is not None and not last.acked.done():
                    break
                if self._ready:
                    batch = self._ready.popleft()
                elif self._open is not None:
                    batch, self._open = self._open, None
                else:
                    break
                batch.builder.close()
                try:
                    if not await self._send(batch):
                        self._end(batch)
                        return
                except KafkaError as exc:
                    # E.g. the topic is gone; fail this batch's requests (503), and keep
                    # serving the partition.
                    log.warning(
                        "could not queue a batch for %s-%d: %r", self.topic, self.partition, exc
                    )
                    _fail(batch, exc)
                except Exception as exc:
                    log.exception("could not queue a batch for %s-%d", self.topic, self.partition)
                    _fail(batch, exc)
            if not self._ready and self._open is None:
                self._idle.set()

    async def _send(self, batch: _Batch) -> bool:
        """Hand one closed batch to the sink's producer; False if the partition is gone.

        The one handed before it has its verdict (_hand_over). If that one failed after
        this one was made, this one fails too: stored, it would be ahead of the failed
        one's records, sent again. So of one key's records, what Kafka stores of a send is
        the first ones, and what a client or the spool sends again keeps their order."""
        producer = await self._sink.producer_for_batches()
        last = self._last_handed
        if last is not None and failed(last.acked) and self._failures > batch.failures_seen:
            raise KafkaError(f"an earlier batch for {self.topic}-{self.partition} failed")
        handed_at = time.perf_counter()
        batch.producer = producer
        ack = await send_batch(producer, batch.builder, self.topic, self.partition)
        if ack is None:
            return False
        self._last_handed = batch
        batch.ack = ack
        ack.add_done_callback(functools.partial(self._settle, producer, batch.acked))
        if self._produce_seconds is not None:
            ack.add_done_callback(functools.partial(_observe, self._produce_seconds, handed_at))
        return True

    def _end(self, batch: _Batch) -> None:
        """The topic is gone, or was made again with fewer partitions: fail what is held
        (503) and leave the sink, whose next send to the topic goes by its partitions now."""
        self._sink.forget(self)
        gone = UnknownTopicOrPartitionError(f"{self.topic} has no partition {self.partition}")
        held = [batch, *self._ready]
        if self._open is not None:
            held.append(self._open)
        for waiting in held:
            _fail(waiting, gone)
        self._idle.set()
        log.info("%s has no partition %d now; stopped batching for it", self.topic, self.partition)

    def _settle(
        self, producer: AIOKafkaProducer, acked: asyncio.Future[None], ack: asyncio.Future[Any]
    ) -> None:
        """Pass aiokafka's verdict on a batch to the future its requests wait on, and
        to the sink."""
        refused = None
        if acked.done():
            pass  # failed already, as its producer closed (fail_handed_to)
        elif ack.cancelled():
            acked.set_exception(KafkaError("the batch was cancelled"))
        elif (failure := ack.exception()) is None:
            acked.set_result(None)
        else:
            acked.set_exception(failure)
            # With idempotence aiokafka retries what can be retried, so a batch that
            # fails was refused for good, and the sequence numbers it was given are spent.
            refused = failure
        self._sink.answered(producer, self, refused)


def failed(future: asyncio.Future[Any]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def _fail(batch: _Batch, error: BaseException) -> None:
    """Fail a batch's requests, unless it has failed already (a producer closed while
    the batch was being handed to it, see fail_handed_to)."""
    if not batch.acked.done():
        batch.acked.set_exception(error)


def adder(builder: Any) -> Callable[[Message], bool]:
    """The function that appends a message to `builder`, a batch the producer made, and
    says False if the batch is full.

    aiokafka's batch (BatchBuilder) is a Python wrapper whose append() takes keywords,
    calls a serializer hook (unused here) and then its compiled record builder; that
    builder is called here directly, as the wrapper would: 0.41 us a record against
    0.51-0.84 (measured), on every record of every request. Anything else the producer
    made (a test's stand-in) is given the public append()."""
    if type(builder) is not BatchBuilder:
        return functools.partial(_append, builder)
    records = builder._builder

    def add(message: Message) -> bool:
        key, value, headers = message
        offset = builder._relative_offset
        if records.append(offset, None, key, value, headers or []) is None:
            return False
        builder._relative_offset = offset + 1
        return True

    return add


def _append(builder: Any, message: Message) -> bool:
    metadata = builder.append(
        key=message.key, value=message.value, timestamp=None, headers=message.headers
    )
    return metadata is not None


def _observe(histogram: Any, since: float, ack: asyncio.Future[Any]) -> None:
    """Time a batch from its hand-over to its successful acknowledgement."""
    if not ack.cancelled() and ack.exception() is None:
        histogram.observe(time.perf_counter() - since)
