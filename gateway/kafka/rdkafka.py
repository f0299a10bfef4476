"""The Kafka sink on librdkafka (confluent-kafka), for CAFE_KAFKA_CLIENT=librdkafka.

The same contract as `KafkaSink` (gateway/kafka/sink.py): a send returns once Kafka
(acks=all, idempotence) has every record; a request not acknowledged within the produce
timeout gets KafkaUnavailable and marks its partitions down; the bytes held are bounded;
topics missing or forbidden stop only their type; close delivers what is held. The
topics are created and checked, and a refused connection explained, by the same code as
KafkaSink's (gateway/kafka/topics.py and auth.py, on aiokafka's admin client): only the
producing is librdkafka's.

librdkafka produces on its own threads; its delivery reports are served by `poll()`, which
a timer of the event loop calls, so each report's callback runs on the loop's thread and
settles the request's future directly. Nothing here blocks the loop: what librdkafka may
block on (metadata, closing) runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka.errors import KafkaError as AioKafkaError
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka import Message as RdMessage

from gateway.backoff import Backoff
from gateway.config import KafkaSettings, first_line
from gateway.errors import KafkaForbidden, KafkaUnavailable, RecordTooLarge
from gateway.kafka.auth import SecretUnavailable
from gateway.kafka.health import (
    DIAGNOSE_S,
    FIRST_RETRY_S,
    HEALTH_EVERY_S,
    LAST_RETRY_S,
    enough_brokers,
)
from gateway.kafka.messages import Message
from gateway.kafka.partitioner import key_partition
from gateway.kafka.sink import (
    MAX_MESSAGE_BYTES,
    WEIGH_ABOVE,
    RecordSender,
    check_size,
)
from gateway.kafka.topics import prepare_topics
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

# While messages wait for their delivery reports, poll() runs this often: a report waits
# at most this long beyond Kafka's answer (a W1 request's ack takes ~2 ms of linger and a
# round trip). Idle, less often: only librdkafka's logs, errors and statistics wait.
_POLL_BUSY_S = 0.0005
_POLL_IDLE_S = 0.05
# How often librdkafka reports the state of its broker connections (readiness).
_STATS_MS = 1000
_RECONNECT_MAX_MS = 1000
# The longest a metadata request (run in a thread) may take.
_METADATA_S = 5.0
# librdkafka's own bound on the messages it queues; the sink's (max_queued_bytes) is
# the one that counts, so librdkafka's is set above it.
_QUEUE_MAX_MESSAGES = 10_000_000
_QUEUE_MAX_KBYTES = 2_147_483_647
# Delivery-report errors that say the topic or its partition is not there (now).
_GONE = frozenset(
    {KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART}
)
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})
# confluent-kafka passes librdkafka's log lines on at Python's levels. Its ERROR lines
# repeat at each failed reconnect, so they are WARNINGs here: the sink logs the cause of
# a connection Kafka refuses as one ERROR, as KafkaSink does.
_LOUDEST = logging.WARNING


def rdkafka_config(settings: KafkaSettings) -> dict[str, Any]:
    """librdkafka's configuration for the gateway's producer, its secret files read now;
    SecretUnavailable if one cannot be."""
    s = settings
    security = s.security
    if security.sasl_mechanism == "OAUTHBEARER":
        raise ValueError("OAUTHBEARER on librdkafka (Settings refuses that combination)")
    config: dict[str, Any] = {
        "bootstrap.servers": s.bootstrap,
        "client.id": s.client_id,
        # A record is acknowledged to the client only once every in-sync replica has it,
        # and retries never duplicate or reorder records of one partition.
        "acks": "all",
        "enable.idempotence": True,
        # No message expires in librdkafka, as none does in aiokafka: a request gives up
        # at the produce timeout, but its records stay queued until Kafka takes them or
        # refuses them for good. One that expired could leave a gap, a later record of
        # its session stored ahead of it when it is sent again.
        "message.timeout.ms": 0,
        "linger.ms": s.linger_ms,
        "compression.codec": s.compression,
        "request.timeout.ms": s.request_timeout_ms,
        "message.max.bytes": MAX_MESSAGE_BYTES,
        "queue.buffering.max.messages": _QUEUE_MAX_MESSAGES,
        "queue.buffering.max.kbytes": _QUEUE_MAX_KBYTES,
        # The sink picks each partition itself (murmur2, as KafkaSink and Java do); this
        # is librdkafka's equal, should a message go without one.
        "partitioner": "murmur2_random",
        # A connection to every broker, not only to those a message needs: readiness
        # counts the brokers that answer, as KafkaSink's does.
        "enable.sparse.connections": False,
        # A broker that is back is reconnected to within a second (librdkafka's default
        # backs off to 10 s): the spool's replay, and the partitions down, wait on it.
        "reconnect.backoff.max.ms": _RECONNECT_MAX_MS,
        "statistics.interval.ms": _STATS_MS,
        "security.protocol": security.protocol,
    }
    if security.protocol in ("SSL", "SASL_SSL"):
        # Without a bundle, the system's CAs (librdkafka looks in the usual places).
        config["ssl.ca.location"] = str(security.ca_file) if security.ca_file else "probe"
        config["ssl.endpoint.identification.algorithm"] = (
            "https" if security.check_hostname else "none"
        )
        if security.cert_file is not None:
            config["ssl.certificate.location"] = str(security.cert_file)
            # No key file: the key is in the certificate file, as Python's ssl takes it.
            config["ssl.key.location"] = str(security.key_file or security.cert_file)
            if security.key_password_file is not None:
                config["ssl.key.password"] = _read_secret(
                    security.key_password_file, "CAFE_KAFKA_SSL_KEY_PASSWORD_FILE"
                )
    if security.sasl_mechanism is not None:
        config["sasl.mechanism"] = security.sasl_mechanism
        config["sasl.username"] = security.sasl_username
        if security.sasl_password_file is not None:
            config["sasl.password"] = _read_secret(
                security.sasl_password_file, "CAFE_KAFKA_SASL_PASSWORD_FILE"
            )
        elif security.sasl_password is not None:
            config["sasl.password"] = security.sasl_password.value
    return config


def _read_secret(path: Any, variable: str) -> str:
    try:
        return first_line(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretUnavailable(f"{variable}={path} cannot be read now: {exc}") from exc


class _LibrdkafkaLog:
    """Where librdkafka's log lines go (confluent-kafka calls `log`), at levels of ours."""

    def __init__(self) -> None:
        self._log = logging.getLogger("gateway.kafka.librdkafka")

    def log(self, level: int, message: str, *args: Any) -> None:
        self._log.log(min(level, _LOUDEST), message, *args)


class _Acks:
    """One request's messages to one topic: the delivery callback each of them is
    produced with, and the future the request waits on, resolved with the first error
    (or None) once librdkafka has reported on every message."""

    __slots__ = (
        "done",
        "failure",
        "flags",
        "left",
        "order",
        "parts",
        "sent",
        "sink",
        "size",
        "started",
        "topic",
    )

    def __init__(self, sink: RdKafkaSink, topic: str, count: int, size: int, patient: bool) -> None:
        self.sink = sink
        self.topic = topic
        self.done: asyncio.Future[KafkaError | None] = asyncio.get_running_loop().create_future()
        self.left = count
        self.size = size
        self.failure: KafkaError | None = None
        # Messages handed to librdkafka, and those not yet reported on, by partition (a
        # report's partition is never None: the sink names the partition of each).
        self.sent: dict[int, int] = {}
        self.parts: dict[int | None, int] = {}
        # Patient sends (the spool's replay) learn which messages Kafka took: reports come
        # in order within a partition, so each partition's indexes, in order, say which.
        self.order: dict[int, deque[int]] | None = {} if patient else None
        self.flags: list[bool] | None = [True] * count if patient else None
        self.started = time.perf_counter()

    def __call__(self, error: KafkaError | None, message: RdMessage) -> None:
        # Once per message at W500: what can wait for the last report does.
        partition = message.partition()
        self.parts[partition] -= 1
        if error is not None and self.failure is None:
            self.failure = error
        if self.order is not None and self.flags is not None:
            index = self.order[partition or 0].popleft()
            if error is not None:
                self.flags[index] = False
        self.left -= 1
        if self.left == 0:
            self.sink._settled(self)


class RdKafkaSink(RecordSender):
    """Produces to Kafka through librdkafka with acks from all in-sync replicas and
    idempotence; the same contract as KafkaSink.

    librdkafka renews its idempotent producer's epoch itself when a batch is refused for
    good, so no producer is replaced here; nor for stale credentials: a rotated password
    or certificate needs a restart (librdkafka reads the files once).
    """

    def __init__(self, settings: KafkaSettings, metrics: Metrics | None = None) -> None:
        super().__init__(settings, metrics)
        # The producer librdkafka runs, polled from its making to its closing; and the same
        # once connected (the topics made and their partitions known), taking records.
        self._client: Producer | None = None
        self._producer: Producer | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._looking: asyncio.Task[None] | None = None
        self._partitions: dict[str, int] = {}  # each topic's partitions, as last learned
        self._unkeyed = 0
        self._held_bytes = 0
        # Messages handed to librdkafka, by (topic, partition), until the last report of
        # their request's share is in (_settled).
        self._outstanding: dict[tuple[str, int], int] = {}
        self._brokers = (0, 0)  # answering, known: from librdkafka's last statistics
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # the timer runs at _POLL_BUSY_S

    async def start(self) -> None:
        self._connecting = asyncio.create_task(self._connect(), name="kafka-connect")

    async def close(self) -> None:
        """Deliver what the sink holds, for as long as a request would wait for it, then
        close; log how many records were dropped, if any were."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.produce_timeout_ms / 1000
        for task in (self._connecting, self._watching, self._looking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        producer = self._producer
        if producer is None:
            # Never connected, so it holds no records. Not closed here: a metadata request
            # of the connection cancelled may still be using it in a thread; it is
            # destroyed with its last reference.
            self._client = None
            self._stop_polling()
            return
        # Polled here, with a deadline, rather than flush(): that blocks.
        while len(producer) and loop.time() < deadline:
            self._poll_once(producer)
            await asyncio.sleep(0.005)
        self._poll_once(producer)
        dropped = len(producer)
        if dropped:
            # Their reports say they were purged, which lets their requests go.
            await asyncio.to_thread(producer.purge)
            self._poll_once(producer)
            log.error(
                "closed with %d records Kafka had not acknowledged; they are dropped "
                "(no client was told they were stored)",
                dropped,
            )
        self._client = self._producer = None
        self._stop_polling()
        # Joins librdkafka's threads, which may take a moment.
        await asyncio.to_thread(producer.close)

    async def unavailable(self) -> str | None:
        if self._producer is not None:
            answering, known = self._brokers
            if enough_brokers(answering, known):
                return None
            if answering:
                return (
                    f"only {answering} of the {known} Kafka brokers at "
                    f"{self._settings.bootstrap} answer: too few for the replicas a write needs"
                )
        if self.health.problem is not None:
            return f"cannot use Kafka: {self.health.problem.words}"
        return f"Kafka at {self._settings.bootstrap} is not reachable"

    def degraded(self) -> list[str]:
        """The topics the sink cannot write to now, and why."""
        return self.health.degraded()

    async def produce(
        self, topic: str, messages: Sequence[Message], *, patient: bool = False
    ) -> None:
        """Return once Kafka has acknowledged every message on `topic`; raise
        KafkaUnavailable (or RecordTooLarge) otherwise; `patient`ly, as KafkaSink.produce."""
        producer = self._producer
        if producer is None:
            self.health.count_error("not_connected")
            raise KafkaUnavailable(f"not connected to Kafka at {self._settings.bootstrap}")
        if not messages:
            return
        for message in messages:
            if len(message.value) > WEIGH_ABOVE:
                check_size(topic, message)
        timeout_s = self._settings.produce_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        deadline = None if patient else loop.time() + timeout_s
        acks: _Acks | None = None
        try:
            count = self._partitions.get(topic)
            if count is None:
                async with asyncio.timeout_at(deadline):
                    count = await self._learn_partitions(producer, topic)
            partitions = self._partitions_for(messages, count)
            size = self._admit(topic, messages, partitions)
            acks = _Acks(self, topic, len(messages), size, patient)
            self._produce_all(producer, topic, messages, partitions, acks)
            await self._deadlines.wait_all((acks.done,), deadline)
        except TimeoutError:
            if acks is not None:
                for partition in acks.sent:
                    if acks.parts[partition]:
                        self.health.partition_down((topic, partition))
            self.health.count_error("timeout")
            raise KafkaUnavailable(
                f"Kafka did not acknowledge the records within {timeout_s:g}s"
            ) from None
        failure = acks.done.result()
        if failure is not None:
            self._failed(topic, failure, acks)

    def _produce_all(
        self,
        producer: Producer,
        topic: str,
        messages: Sequence[Message],
        partitions: list[int],
        acks: _Acks,
    ) -> None:
        """Hand every message to librdkafka, in order, each with `acks` as its callback."""
        produce = producer.produce
        handed = 0
        try:
            for message, partition in zip(messages, partitions, strict=True):
                produce(
                    topic,
                    message.value,
                    message.key,
                    partition,
                    on_delivery=acks,
                    # A list of (str, bytes), which it takes; its stub asks for invariance.
                    headers=message.headers,  # type: ignore[arg-type]
                )
                handed += 1
        except (BufferError, KafkaException) as exc:
            # Refused before it was queued (librdkafka's own bounds): what was handed over
            # is reported on as usual; the rest is not.
            self._held_bytes -= acks.size
            acks.size = 0
            acks.left -= len(messages) - handed
            self._handed(topic, partitions[:handed], acks)
            if acks.left == 0 and not acks.done.done():
                acks.done.set_result(None)
            self.health.count_error(type(exc).__name__)
            raise KafkaUnavailable(
                f"librdkafka did not take the records for {topic}: {exc}"
            ) from exc
        finally:
            self._poll_soon()
        self._handed(topic, partitions, acks)

    def _handed(self, topic: str, partitions: list[int], acks: _Acks) -> None:
        """Count the messages handed over, by partition (reports come after this: poll()
        runs on this thread)."""
        acks.sent = dict(Counter(partitions))
        for partition, count in acks.sent.items():
            acks.parts[partition] = count
        if acks.order is not None:
            for index, partition in enumerate(partitions):
                acks.order.setdefault(partition, deque()).append(index)
        outstanding = self._outstanding
        for partition, count in acks.sent.items():
            key = (topic, partition)
            outstanding[key] = outstanding.get(key, 0) + count

    def _failed(self, topic: str, failure: KafkaError, acks: _Acks) -> None:
        """Raise what a failed delivery means for the request."""
        code = failure.code()
        name = failure.name()
        self.health.count_error(name)
        error: KafkaUnavailable
        if code in _TOO_LARGE:
            # The topic's own limit (max.message.bytes) is below the producer's.
            raise RecordTooLarge(f"Kafka refused a record as too large for {topic}")
        if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            self.health.forbid(topic)
            error = KafkaForbidden(f"Kafka refuses the gateway writes to topic {topic}")
        else:
            if code in _GONE:
                self._partitions.pop(topic, None)  # learned again by the next send
            error = KafkaUnavailable(f"Kafka did not acknowledge the records: {failure.str()}")
        if acks.flags is not None:
            # Which messages Kafka took (see KafkaSink.produce).
            error.stored = tuple(acks.flags)
        raise error

    def _settled(self, acks: _Acks) -> None:
        """librdkafka has reported on every message of a request's share (on the loop's
        thread, in poll()): let its bytes go; Kafka's verdict says whether the gateway may
        write to the topic, and whether its partitions answer again."""
        self._held_bytes -= acks.size
        acks.size = 0
        topic, failure = acks.topic, acks.failure
        for partition, count in acks.sent.items():
            key = (topic, partition)
            self._outstanding[key] -= count
            if failure is None:
                self.health.partition_up(key)
        if failure is None:
            self.health.allow(topic)
            if self.metrics is not None:
                self.metrics.produce_seconds.labels(topic).observe(
                    time.perf_counter() - acks.started
                )
        elif failure.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            self.health.forbid(topic)
        if not acks.done.done():
            acks.done.set_result(acks.failure)

    def _partitions_for(self, messages: Sequence[Message], count: int) -> list[int]:
        """Each message's partition; a key like the one before it is not hashed again."""
        partitions = []
        last: bytes | None = None
        partition = 0
        for message in messages:
            key = message.key
            if key is None or key != last:
                partition = self._partition(key, count)
                last = key
            partitions.append(partition)
        return partitions

    def _partition(self, key: bytes | None, partitions: int) -> int:
        """Kafka's default partitioner: murmur2 of the key, so Java clients agree."""
        if key is None:
            self._unkeyed = (self._unkeyed + 1) % partitions
            return self._unkeyed
        return key_partition(key, partitions)

    def _admit(self, topic: str, messages: Sequence[Message], partitions: list[int]) -> int:
        """Refuse the request (503) before anything of it is queued, if the sink holds
        too much already or a partition it writes to is down (see KafkaSink._admit);
        else count its bytes held, and return them."""
        size = sum(len(message.value) for message in messages)
        limit = self._settings.max_queued_bytes
        if self._held_bytes + size > limit:
            self.health.refuse(topic, len(messages), "queue_full")
            raise KafkaUnavailable(
                f"the gateway holds {self._held_bytes} bytes of records Kafka has not yet "
                f"acknowledged; the limit is {limit}"
            )
        if self.health.down:
            for partition in set(partitions):
                key = (topic, partition)
                # Down, and holding nothing that could show Kafka is back: a probe may go.
                if key in self.health.down and self._outstanding.get(key, 0):
                    self.health.refuse_down(topic, len(messages))
                    raise KafkaUnavailable(f"Kafka is not acknowledging records for {topic} now")
        self._held_bytes += size
        return size

    def _poll_soon(self) -> None:
        """Messages wait for reports: poll at the busy pace from now on."""
        if not self._busy and self._client is not None:
            self._busy = True
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(_POLL_BUSY_S, self._poll)

    def _poll(self) -> None:
        producer = self._client
        if producer is None:
            self._timer = None
            return
        self._poll_once(producer)
        self._busy = len(producer) > 0
        self._timer = asyncio.get_running_loop().call_later(
            _POLL_BUSY_S if self._busy else _POLL_IDLE_S, self._poll
        )

    def _poll_once(self, producer: Producer) -> None:
        try:
            producer.poll(0)
        except Exception:  # a callback's: the loop's timer must go on
            log.exception("a librdkafka callback failed")

    def _stop_polling(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _statistics(self, stats: str) -> None:
        """librdkafka's statistics: how many of the brokers it knows answer."""
        brokers = [b for b in orjson.loads(stats).get("brokers", {}).values() if b["nodeid"] >= 0]
        self._brokers = (sum(1 for b in brokers if b["state"] == "UP"), len(brokers))

    def _error(self, error: KafkaError) -> None:
        """librdkafka's errors outside any message: logged at DEBUG (it retries; the
        watch says when no broker answers, and why)."""
        log.debug("librdkafka: %s", error.str())

    # Connecting, and watching the connection.

    def _new_producer(self) -> Producer:
        config = rdkafka_config(self._settings)
        config["stats_cb"] = self._statistics
        config["error_cb"] = self._error
        config["logger"] = _LibrdkafkaLog()
        return Producer(config)

    async def _connect(self) -> None:
        backoff = Backoff(FIRST_RETRY_S, LAST_RETRY_S)
        while True:
            producer = None
            try:
                producer = self._new_producer()
                self._client = producer
                self._stop_polling()
                self._poll()
                metadata = await asyncio.to_thread(producer.list_topics, None, _METADATA_S)
                missing = await prepare_topics(
                    self._settings, self._auth, len(metadata.brokers), self.metrics
                )
                for topic in self._settings.topics.all():
                    if topic not in missing:
                        await self._learn_partitions(producer, topic)
            except (KafkaException, KafkaUnavailable, AioKafkaError, OSError, TimeoutError) as exc:
                self._client = None
                self._stop_polling()
                if producer is not None:
                    await asyncio.to_thread(producer.close)
                self.health.count_error("connect")
                await self.health.cannot_connect(exc, backoff.failed())
                continue
            break
        self._producer = producer
        self.health.note_missing(missing)
        if missing:
            self._looking = asyncio.create_task(
                self.health.look_for_topics(self._found), name="kafka-topics"
            )
        self.health.connected()
        log.info("connected to Kafka at %s (librdkafka)", self._settings.bootstrap)
        self._watching = asyncio.create_task(self._watch(), name="kafka-watch")

    async def _learn_partitions(self, producer: Producer, topic: str) -> int:
        """The partitions of `topic`, asked of the cluster (in a thread: it blocks)."""
        metadata = await asyncio.to_thread(producer.list_topics, topic, _METADATA_S)
        found: Any = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            why = found.error.str() if found is not None and found.error else "no partitions"
            raise KafkaUnavailable(f"Kafka does not know topic {topic} now: {why}")
        count = len(found.partitions)
        self._partitions[topic] = count
        return count

    async def _watch(self) -> None:
        """Keep cafe_kafka_ready and cafe_kafka_queued_bytes current, mark every partition
        holding records down while no broker answers, and say why."""
        while True:
            answering, known = self._brokers
            if self.metrics is not None:
                self.metrics.ready.set(1 if enough_brokers(answering, known) else 0)
                self.metrics.queued_bytes.set(self._held_bytes)
            if not answering:
                for (topic, partition), left in list(self._outstanding.items()):
                    if left:
                        self.health.partition_down((topic, partition))
                if self._settings.security.protocol != "PLAINTEXT":
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DIAGNOSE_S):
                            problem = await self._auth.diagnose()
                        if problem is not None and problem.cause != "unreachable":
                            if problem != self.health.problem:
                                log.error(
                                    "cannot use Kafka: %s; a restart is needed once it is "
                                    "fixed (librdkafka reads the secrets once)",
                                    problem.words,
                                )
                            self.health.set_problem(problem)
            elif self.health.problem is not None:
                self.health.set_problem(None)
            await asyncio.sleep(HEALTH_EVERY_S)

    def _found(self, topics: set[str]) -> None:
        """Topics that came to exist: their partitions are learned again at the next send."""
        for topic in topics:
            self._partitions.pop(topic, None)
