"""The Kafka sink: its producers, their lifecycle and renewal, backpressure and sending."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)

# aiokafka's internal record module (see check_size); pyproject.toml keeps aiokafka below
# its next minor version for it and the other internals used here (producer._sender and
# the undocumented producer.client), and tests/test_private_apis.py checks each one.
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from gateway.backoff import Backoff
from gateway.config import KafkaSettings
from gateway.errors import KafkaForbidden, KafkaUnavailable, RecordTooLarge
from gateway.kafka.auth import KafkaAuth
from gateway.kafka.batcher import Batcher, failed
from gateway.kafka.health import (
    DIAGNOSE_S,
    FIRST_RETRY_S,
    HEALTH_EVERY_S,
    LAST_RETRY_S,
    KafkaHealth,
    enough_brokers,
)
from gateway.kafka.messages import Framer, Message, is_truncated
from gateway.kafka.metrics import KafkaMetrics
from gateway.kafka.partitioner import key_partition
from gateway.kafka.topics import prepare_topics
from gateway.metrics import Metrics
from gateway.sink import Delivery, Record, Rejected

log = logging.getLogger(__name__)

# Watch rounds (of HEALTH_EVERY_S) a new client must get in while the producer gets no
# answer, before the producer is taken for one with stale credentials: one could be a
# broker coming back, which the producer would reach a moment later.
_STALE_ROUNDS = 2
# A readiness probe that cannot reach a broker within this time answers "not ready".
_READY_TIMEOUT_S = 2.0
# Room for a W500 request's share of one partition in one batch (records are ~0.5 KiB),
# well under the broker's default limit on a batch (message.max.bytes, ~1 MiB).
_MAX_BATCH_BYTES = 256 * 1024
# aiokafka's bound on one produce request, which also caps what one record may weigh;
# the broker's default for a batch (message.max.bytes) is a few bytes more. Every
# message is checked against it before it is batched (`produce`): a batch the broker
# refuses for good spends sequence numbers (see KafkaSink).
MAX_MESSAGE_BYTES = 1024 * 1024
# Weighing a message as Kafka will costs about 0.5 us, 3% of a record's whole cost at
# W500; keys (at most 512 bytes) and headers (a few hundred) are the gateway's own and
# small, so only a message whose value alone is past this could be over the limit.
WEIGH_ABOVE = MAX_MESSAGE_BYTES // 2
# How long a producer being closed without its records may wait for its sender to stop.
_SENDER_CLOSE_S = 1.0


class Deadlines:
    """The produce deadlines of the requests waiting on Kafka, kept by one timer.

    Every request waits on its batches' futures until its own deadline. A timer of its
    own (loop.call_at, then cancelled once Kafka answers) cost about 1.5 us of the 97 a
    W1 request takes. A request's deadline is its arrival plus the produce timeout, so
    deadlines come in order: they wait in a queue, and one timer, set for the earliest
    one still waiting, fails those whose time has come. A deadline before the last one
    queued (a caller with a shorter timeout) gets a timer of its own, as before."""

    __slots__ = ("_queue", "_timer")

    def __init__(self) -> None:
        self._queue: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def wait_all(
        self, futures: Collection[asyncio.Future[Any]], deadline: float | None
    ) -> None:
        """Return once every one of `futures` is done; raise TimeoutError if the loop's
        clock reaches `deadline` (if any) first. Cancels none of them, as other
        requests' records share them (gather() under a timeout would)."""
        if not futures:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if len(futures) == 1:
            for future in futures:
                future.add_done_callback(functools.partial(_resolve, waiter))
        else:
            count = _Countdown(waiter, len(futures))
            for future in futures:
                future.add_done_callback(count)
        if deadline is None:
            await waiter
            return
        queue = self._queue
        while queue and queue[0][1].done():  # answered already: nothing to time
            queue.popleft()
        if queue and deadline < queue[-1][0]:
            own = loop.call_at(deadline, _time_out, waiter)
            try:
                await waiter
            finally:
                own.cancel()
            return
        queue.append((deadline, waiter))
        # The timer is set no later than the first deadline in the queue; this one is
        # the first if those before it were answered.
        timer = self._timer
        if timer is None or deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._fire)
        await waiter

    def _fire(self) -> None:
        """Fail the waiters whose deadline has come; set the timer for the next one."""
        self._timer = None
        queue = self._queue
        loop = asyncio.get_running_loop()
        now = loop.time()
        while queue:
            deadline, waiter = queue[0]
            if not waiter.done():
                if deadline > now:
                    self._timer = loop.call_at(deadline, self._fire)
                    return
                waiter.set_exception(TimeoutError())
            queue.popleft()


def _resolve(waiter: asyncio.Future[None], _: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Countdown:
    """Resolves a waiter once each of the futures it was added to is done."""

    __slots__ = ("left", "waiter")

    def __init__(self, waiter: asyncio.Future[None], left: int) -> None:
        self.waiter = waiter
        self.left = left

    def __call__(self, _: asyncio.Future[Any]) -> None:
        self.left -= 1
        if self.left == 0 and not self.waiter.done():
            self.waiter.set_result(None)


def check_size(topic: str, message: Message) -> None:
    """Raise RecordTooLarge for a message the producer would refuse, before it is batched."""
    # The producer's own check, from its send(), which batches bypass; aiokafka offers
    # it only on this internal class.
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        message.key, message.value, message.headers or []
    )
    if size > MAX_MESSAGE_BYTES:
        raise RecordTooLarge(
            f"a record for {topic} is {size} bytes as a Kafka message; "
            f"the limit is {MAX_MESSAGE_BYTES}"
        )


class RecordSender:
    """What both Kafka sinks do with a request's records (aiokafka's here, librdkafka's
    in gateway/kafka/rdkafka.py): frame them, refuse them at once for a topic that cannot
    be written to, produce the records and the dead letters together, and count the dead
    letters cut to fit. A sink gives its own `produce`."""

    def __init__(self, settings: KafkaSettings, metrics: Metrics | None) -> None:
        self._settings = settings
        self._topics = settings.topics.by_record_type()
        self._framers = {name: Framer(name) for name in self._topics}
        # Its own group of metrics, on the registry of those it is given.
        self.metrics = KafkaMetrics(metrics.registry) if metrics is not None else None
        # Both clients create and check topics, and explain a refused connection, with
        # aiokafka's clients.
        self._auth = KafkaAuth(settings)
        # Missing and forbidden topics, partitions down, why Kafka cannot be used.
        self.health = KafkaHealth(settings, self._auth, self.metrics)
        self._deadlines = Deadlines()  # of the requests waiting on Kafka

    async def produce(
        self, topic: str, messages: Sequence[Message], *, patient: bool = False
    ) -> None:
        raise NotImplementedError

    async def send(
        self,
        record_type: str,
        accepted: Sequence[Record],
        rejected: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        """Produce the records to their type's topic and the rejected ones, as dead
        letters, to the dead-letter topic, at once; return when Kafka has acknowledged
        both. `patient`: wait for Kafka's verdict past the produce timeout."""
        framer = self._framers[record_type]
        records = framer.records(accepted)
        dead_letters = [framer.dead_letter(each) for each in rejected]
        sends = [
            (topic, messages)
            for topic, messages in (
                (self._topics[record_type], records),
                (self._settings.topics.deadletter, dead_letters),
            )
            if messages
        ]
        if self.health.missing or self.health.forbidden:
            # Both before either is produced: records stored while their dead letters are
            # refused would be stored again at each retry of the request.
            for topic, messages in sends:
                self.health.refuse_unwritable(topic, len(messages))
        if len(sends) == 1:
            await self.produce(*sends[0], patient=patient)
        elif sends:
            results = await asyncio.gather(
                *(self.produce(topic, messages, patient=patient) for topic, messages in sends),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        if self.metrics is not None and dead_letters:
            truncated = sum(1 for message in dead_letters if is_truncated(message))
            if truncated:
                self.metrics.dead_letters_truncated.labels(record_type).inc(truncated)
        return Delivery.STORED


class KafkaSink(RecordSender):
    """Produces to Kafka with acks from all in-sync replicas and idempotence.

    `start` returns at once and connects in the background, retrying until the cluster
    answers and every topic exists (created if missing), so the gateway can boot, and
    report not-ready, while Kafka is down.

    The broker refuses a batch for good (too large for the topic, a partition that has
    gone, or one that waited leaderless past the request timeout) after the idempotent
    producer has numbered its records; every later batch to that partition would then
    be refused as out of sequence. So a refused batch retires its producer: a new one,
    with a new producer id whose sequences start afresh, takes the next batches, and the
    old one delivers what it holds and closes (`_retire`).
    """

    def __init__(self, settings: KafkaSettings, metrics: Metrics | None = None) -> None:
        super().__init__(settings, metrics)
        self._stale_rounds = 0  # watch rounds a new client got in and the producer did not
        self._looking: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        # A producer being made to replace one whose batch was refused.
        self._renewing: asyncio.Task[None] | None = None
        # Replaced producers delivering what they hold before they close.
        self._retiring: set[asyncio.Task[None]] = set()
        # When Kafka last answered for a batch of each of them (see _stop).
        self._answered_at: dict[AIOKafkaProducer, float] = {}
        self._request_timeout_s = settings.request_timeout_ms / 1000
        self._unkeyed = 0  # round-robin position for messages without a key
        self._batchers: dict[tuple[str, int], Batcher] = {}
        self._held_bytes = 0  # record values in unsettled batches (see _admit)

    async def start(self) -> None:
        self._connecting = asyncio.create_task(self._connect(), name="kafka-connect")

    async def close(self) -> None:
        """Deliver what the sink holds, for as long as a request would wait for it, then
        close; log how many records were dropped, if any were."""
        deadline = asyncio.get_running_loop().time() + self._settings.produce_timeout_ms / 1000
        for task in (self._connecting, self._watching, self._looking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        batchers = list(self._batchers.values())
        if self._producer is not None:
            # Records of requests already answered 503 are delivered too: the client
            # may have given up on them, but a retry is only a duplicate, not a loss.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.gather(*(batcher.flush() for batcher in batchers))
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        for batcher in batchers:
            await batcher.close()
        if self._retiring:
            await asyncio.wait(self._retiring)
        if self._producer is not None:
            await self._stop(self._producer, deadline)
            self._producer = None
        dropped = sum(batch.records for b in batchers for batch in b.unsettled)
        if dropped:
            log.error(
                "closed with %d records Kafka had not acknowledged; they are dropped "
                "(no client was told they were stored)",
                dropped,
            )

    async def _stopped(
        self,
        producer: AIOKafkaProducer,
        stopping: asyncio.Future[None],
        deadline: float,
        retiring: bool,
    ) -> bool:
        """Whether `stopping` ends by `deadline` (or, `retiring`, before Kafka has gone a
        request timeout without answering for one of the producer's batches)."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(stopping)
                return True
            quiet_until = self._answered_at.get(producer, -1.0) + self._request_timeout_s
            if not retiring or quiet_until <= loop.time():
                return False
            deadline = quiet_until

    def answered(
        self, producer: AIOKafkaProducer, batcher: Batcher, refused: BaseException | None
    ) -> None:
        """Kafka answered for one of `producer`'s batches (see _stop); one it refused for
        good retires the producer (`_retire`)."""
        self._answered_at[producer] = asyncio.get_running_loop().time()
        if refused is not None:
            self._retire(producer, f"{batcher.topic}-{batcher.partition}", refused)

    async def _stop(
        self, producer: AIOKafkaProducer, deadline: float | None = None, *, retiring: bool = False
    ) -> None:
        """Deliver what is buffered, until `deadline` (by default for as long as a request
        would wait for it), then close. `retiring` (a producer replaced after a refused
        batch): past `deadline` too, for as long as Kafka answers one of its batches within
        the request timeout. Its batches to partitions that are only slow may yet be
        stored; closed with them unanswered, what the spool replays would be sent again."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._settings.produce_timeout_ms / 1000
        stopping = asyncio.ensure_future(producer.stop())
        try:
            if await self._stopped(producer, stopping, deadline, retiring):
                return
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
            # With idempotence aiokafka retries a batch until a broker takes it, so stop()
            # would wait forever for a cluster that is gone. The requests these records
            # came with have already been answered 503, so nothing acknowledged is lost.
            log.warning("Kafka did not take every buffered record in time; closing without them")
            # stop() is the public way, and the one that just timed out: the private
            # _sender and the undocumented client are closed directly, as stop() would.
            # Cancelled, the sender still waits for the answers to its requests in flight,
            # which a stalled broker may never give; cancelled again by this timeout, it
            # stops waiting.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SENDER_CLOSE_S):
                    await producer._sender.close()
            await producer.client.close()
            # A cancelled sender fails none of its batches (aiokafka's Sender._fail_all
            # returns early): their futures would never be done, their requests would
            # wait and their bytes stay held, refusing the partition for good.
            for batcher in list(self._batchers.values()):
                batcher.fail_handed_to(producer)
        finally:
            self._answered_at.pop(producer, None)

    async def unavailable(self) -> str | None:
        answering, known = await self._brokers_answering()
        if enough_brokers(answering, known):
            return None
        if not answering:
            if self.health.problem is not None:
                return f"cannot use Kafka: {self.health.problem.words}"
            return f"Kafka at {self._settings.bootstrap} is not reachable"
        return (
            f"only {answering} of the {known} Kafka brokers at {self._settings.bootstrap} "
            "answer: too few for the replicas a write needs"
        )

    async def _brokers_answering(self) -> tuple[int, int]:
        """How many of the brokers the producer knows answer, and how many it knows."""
        producer = self._producer
        if producer is None:
            return 0, 0
        # The producer has no public "is a broker reachable"; its undocumented client,
        # which holds the connections and metadata, answers that.
        client = producer.client
        brokers = client.cluster.brokers()

        async def answers(node_id: int) -> bool:
            # Reuses the open connection; reconnects if the broker went away.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_READY_TIMEOUT_S):
                    return bool(await client.ready(node_id))
            return False

        results = await asyncio.gather(*(answers(broker.nodeId) for broker in brokers))
        return sum(results), len(brokers)

    async def _watch(self) -> None:
        """Keep cafe_kafka_ready and cafe_kafka_queued_bytes current, and mark every
        partition down while no broker answers."""
        while True:
            answering, known = await self._brokers_answering()
            if self.metrics is not None:
                self.metrics.ready.set(1 if enough_brokers(answering, known) else 0)
                self.metrics.queued_bytes.set(self._held_bytes)
            if not answering:
                for batcher in list(self._batchers.values()):
                    if batcher.mark_down():
                        self.health.partition_down((batcher.topic, batcher.partition))
                await self._check_credentials()
            else:
                self._stale_rounds = 0
                if self.health.problem is not None:
                    self.health.connected()
            await asyncio.sleep(HEALTH_EVERY_S)

    async def _check_credentials(self) -> None:
        """No broker answers the producer. With TLS or SASL, its credentials may be stale:
        a password or certificate rotated, and its connections since dropped. A client made
        now reads the files again: if Kafka lets that one in, round after round, a new
        producer takes over (it reads them too); if not, the reason is told, as at start."""
        producer = self._producer
        if self._settings.security.protocol == "PLAINTEXT" or self._renewing is not None:
            return
        try:
            async with asyncio.timeout(DIAGNOSE_S):
                problem = await self._auth.diagnose()
        except TimeoutError:
            return  # the cluster is away, not the credentials
        if problem is not None:
            self._stale_rounds = 0
            if problem.cause != "unreachable" and problem != self.health.problem:
                log.error(
                    "cannot use Kafka: %s; trying again every %gs", problem.words, HEALTH_EVERY_S
                )
            self.health.set_problem(problem)
            return
        self._stale_rounds += 1
        # A renewal may have begun while the new client was connecting.
        replaced = producer is not self._producer or self._renewing is not None
        if self._stale_rounds < _STALE_ROUNDS or replaced:
            return
        self._stale_rounds = 0
        log.warning(
            "Kafka at %s lets a new client in with the credentials as the files hold them "
            "now, and answers none of the producer's connections: a new producer takes over",
            self._settings.bootstrap,
        )
        if self.metrics is not None:
            self.metrics.producer_renewals.labels("stale_credentials").inc()
        self._renewing = asyncio.create_task(self._renew(producer), name="kafka-renew")

    async def produce(
        self, topic: str, messages: Sequence[Message], *, patient: bool = False
    ) -> None:
        """Return once Kafka has acknowledged every message on `topic`; raise
        KafkaUnavailable (or RecordTooLarge) otherwise. Within the produce timeout, or
        `patient`ly, until Kafka answers for every batch: what the spool replays waits
        so, as records given up on may still be stored, and sent again would be twice."""
        producer = self._producer
        if producer is None:
            self.health.count_error("not_connected")
            raise KafkaUnavailable(f"not connected to Kafka at {self._settings.bootstrap}")
        for message in messages:
            if len(message.value) > WEIGH_ABOVE:
                check_size(topic, message)
        timeout_s = self._settings.produce_timeout_ms / 1000
        deadline = None if patient else asyncio.get_running_loop().time() + timeout_s
        acks: dict[asyncio.Future[None], Batcher] = {}
        appended: list[asyncio.Future[None]] = []  # each message's batch's future
        try:
            # As in send_batch: known metadata without an await, else the public way.
            partitions = producer.client.cluster.partitions_for_topic(topic)
            if not partitions:
                async with asyncio.timeout_at(deadline):
                    partitions = await producer.partitions_for(topic)
            batchers, distinct = self._batchers_for(topic, messages, len(partitions))
            self._admit(topic, messages, distinct)
            try:
                # Appended in order, so one key's messages keep their order.
                appended = [
                    batcher.append(producer, message)
                    for batcher, message in zip(batchers, messages, strict=True)
                ]
            finally:
                for batcher in distinct:
                    batcher.wake()
            acks = dict(zip(appended, batchers, strict=True))
            await self._deadlines.wait_all(acks, deadline)
            for ack in acks:
                failure = ack.exception()
                if failure is not None:
                    raise failure
        except TimeoutError:
            for ack, batcher in acks.items():
                if not ack.done() and batcher.mark_down():
                    self.health.partition_down((batcher.topic, batcher.partition))
            self.health.count_error("timeout")
            raise KafkaUnavailable(
                f"Kafka did not acknowledge the records within {timeout_s:g}s"
            ) from None
        except (MessageSizeTooLargeError, RecordListTooLargeError) as exc:
            # The topic's own limit (max.message.bytes) is below the producer's.
            self.health.count_error(type(exc).__name__)
            raise RecordTooLarge(f"Kafka refused a record as too large for {topic}") from exc
        except KafkaError as exc:
            # aiokafka's error classes are a fixed set: a bounded label.
            self.health.count_error(type(exc).__name__)
            error: KafkaUnavailable
            if isinstance(exc, TopicAuthorizationFailedError):
                # Refused at the metadata (no Describe) or at the batch (no Write).
                self.health.forbid(topic)
                error = KafkaForbidden(f"Kafka refuses the gateway writes to topic {topic}")
            else:
                error = KafkaUnavailable(f"Kafka did not acknowledge the records: {exc}")
            if patient and appended:
                # All settled: which messages Kafka took. Batches of one partition after
                # one that failed fail too (Batcher._send), so those are a prefix of
                # each key's messages, and the others can be sent again in order.
                error.stored = tuple(not failed(ack) for ack in appended)
            raise error from exc

    def _batchers_for(
        self, topic: str, messages: Sequence[Message], partitions: int
    ) -> tuple[list[Batcher], set[Batcher]]:
        """Each message's batcher, and the distinct ones. A request's records mostly share
        one session's key, and a replayed window is a run of such requests: a key like
        the one before it is not looked up again."""
        batchers: list[Batcher] = []
        distinct: set[Batcher] = set()
        batcher: Batcher | None = None
        last: bytes | None = None
        for message in messages:
            key = message.key
            if batcher is None or key is None or key != last:
                batcher = self._batcher(topic, self._partition(key, partitions))
                distinct.add(batcher)
                last = key
            batchers.append(batcher)
        return batchers, distinct

    def _admit(self, topic: str, messages: Sequence[Message], batchers: set[Batcher]) -> None:
        """Refuse the request (503) before anything of it is queued, if the sink holds
        too much already or a partition it writes to is down; else count its bytes held.

        Queued while Kafka is down, records would be delivered when it is back, and so
        would every client's retry of them: one record could land many times.
        """
        size = sum(len(message.value) for message in messages)
        limit = self._settings.max_queued_bytes
        if self._held_bytes + size > limit:
            self.health.refuse(topic, len(messages), "queue_full")
            raise KafkaUnavailable(
                f"the gateway holds {self._held_bytes} bytes of records Kafka has not yet "
                f"acknowledged; the limit is {limit}"
            )
        if self.health.down:
            renewing = self._renewing is not None
            if not all(batcher.admits(renewing) for batcher in batchers):
                self.health.refuse_down(topic, len(messages))
                raise KafkaUnavailable(f"Kafka is not acknowledging records for {topic} now")
        self._held_bytes += size

    def settled(
        self, batcher: Batcher, size: int, stored: bool, failure: BaseException | None
    ) -> None:
        """A batch of `batcher`'s is settled: its records are no longer held; Kafka's
        verdict says whether the gateway may write to the topic, and whether the
        partition answers again."""
        self._held_bytes -= size
        if isinstance(failure, TopicAuthorizationFailedError):
            self.health.forbid(batcher.topic)
        elif stored:
            self.health.allow(batcher.topic)
            self.health.partition_up((batcher.topic, batcher.partition))

    def _partition(self, key: bytes | None, partitions: int) -> int:
        """Kafka's default partitioner: murmur2 of the key, so Java clients agree."""
        if key is None:
            self._unkeyed = (self._unkeyed + 1) % partitions
            return self._unkeyed
        return key_partition(key, partitions)

    def _batcher(self, topic: str, partition: int) -> Batcher:
        batcher = self._batchers.get((topic, partition))
        if batcher is None:
            histogram = self.metrics.produce_seconds.labels(topic) if self.metrics else None
            batcher = Batcher(self, topic, partition, histogram)
            self._batchers[(topic, partition)] = batcher
        return batcher

    def forget(self, batcher: Batcher) -> None:
        """Drop the batcher of a partition that no longer exists."""
        del self._batchers[(batcher.topic, batcher.partition)]
        self.health.partition_up((batcher.topic, batcher.partition))

    async def producer_for_batches(self) -> AIOKafkaProducer:
        """The producer to hand the next batch to: the new one, while one is being made."""
        if self._renewing is not None:
            await asyncio.shield(self._renewing)
        if self._producer is None:  # closed while the batch waited
            raise KafkaError("the Kafka sink is closed")
        return self._producer

    def _retire(self, producer: AIOKafkaProducer, where: str, error: BaseException) -> None:
        """Replace `producer`, whose batch for `where` Kafka refused for good."""
        if producer is not self._producer or self._renewing is not None:
            return  # already replaced, or being replaced
        name = type(error).__name__
        log.warning(
            "Kafka refused a batch for %s for good (%s); a new producer takes over, since "
            "the old one's sequence numbers for it are spent",
            where,
            name,
        )
        if self.metrics is not None:
            self.metrics.producer_renewals.labels(name).inc()
        self._renewing = asyncio.create_task(self._renew(producer), name="kafka-renew")

    async def _renew(self, old: AIOKafkaProducer) -> None:
        self._producer = await self._started_producer()
        self._renewing = None
        retiring = asyncio.create_task(self._stop(old, retiring=True), name="kafka-retire")
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)

    def _new_producer(self) -> AIOKafkaProducer:
        s = self._settings
        return AIOKafkaProducer(
            bootstrap_servers=s.bootstrap,
            client_id=s.client_id,
            **self._auth.options(),
            # A record is acknowledged to the client only once every in-sync replica has
            # it, and retries never duplicate or reorder records of one partition.
            acks="all",
            enable_idempotence=True,
            linger_ms=s.linger_ms,
            compression_type=None if s.compression == "none" else s.compression,
            request_timeout_ms=s.request_timeout_ms,
            max_batch_size=_MAX_BATCH_BYTES,
            max_request_size=MAX_MESSAGE_BYTES,
        )

    async def _connect(self) -> None:
        self._producer = await self._started_producer(self._ensure_topics)
        log.info("connected to Kafka at %s", self._settings.bootstrap)
        self._watching = asyncio.create_task(self._watch(), name="kafka-watch")

    async def _started_producer(
        self, prepare: Callable[[AIOKafkaProducer], Awaitable[None]] | None = None
    ) -> AIOKafkaProducer:
        """A new producer, started (and `prepare`d), retrying until the cluster answers."""
        backoff = Backoff(FIRST_RETRY_S, LAST_RETRY_S)
        while True:
            producer = None
            try:
                producer = self._new_producer()
                await producer.start()
                if prepare is not None:
                    await prepare(producer)
            except (KafkaError, OSError, TimeoutError) as exc:
                if producer is not None:
                    await producer.stop()
                self.health.count_error("connect")
                await self.health.cannot_connect(exc, backoff.failed())
                continue
            self.health.connected()
            return producer

    async def _ensure_topics(self, producer: AIOKafkaProducer) -> None:
        """Create and check the topics, then wait until the producer sees them all."""
        # The brokers the producer's undocumented client learned of; no public getter.
        brokers = len(producer.client.cluster.brokers())
        missing = await prepare_topics(self._settings, self._auth, brokers, self.metrics)
        async with asyncio.timeout(self._settings.request_timeout_ms / 1000):
            for topic in self._settings.topics.all():
                if topic not in missing:
                    await producer.partitions_for(topic)
        self.health.note_missing(missing)
        if missing:
            self._looking = asyncio.create_task(self.health.look_for_topics(), name="kafka-topics")

    def degraded(self) -> list[str]:
        """The topics the sink cannot write to now, and why."""
        return self.health.degraded()
