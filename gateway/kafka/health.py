"""What a Kafka sink knows of Kafka besides its client's state, kept alike by both sinks
(aiokafka's, gateway/kafka/sink.py, and librdkafka's, gateway/kafka/rdkafka.py): topics
that are missing or that Kafka refuses the gateway, partitions that have stopped
acknowledging, and why Kafka cannot be used; each change logged once and counted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka.errors import KafkaError

from gateway.config import KafkaSettings
from gateway.errors import KafkaForbidden, KafkaTopicMissing
from gateway.kafka.auth import KafkaAuth, Problem, explain_refusal
from gateway.kafka.metrics import KafkaMetrics
from gateway.kafka.topics import missing_topics

log = logging.getLogger("gateway.kafka.sink")

# Reconnect attempts back off from the first to the last delay, doubling each time.
FIRST_RETRY_S = 0.25
LAST_RETRY_S = 5.0
# The longest a connection made to learn why Kafka cannot be used may take.
DIAGNOSE_S = 2.0
# While a topic is missing, how often the gateway looks for it; while Kafka refuses the
# gateway writes to one, how often a request goes through to try again. Each refused
# batch costs a new producer (its sequence numbers are spent), so not more often.
TOPICS_EVERY_S = 30.0
FORBIDDEN_PROBE_S = 10.0
# How often cafe_kafka_ready is refreshed once connected.
HEALTH_EVERY_S = 5.0

# A partition: its topic and number.
Partition = tuple[str, int]


def enough_brokers(answering: int, known: int) -> bool:
    """Ready takes most of the brokers: with the usual 3 replicas and
    min.insync.replicas=2, one broker left answers but is too few to write to."""
    return answering > 0 and answering > known // 2


class KafkaHealth:
    """A sink's account of what it may not write to now, and why Kafka cannot be used."""

    def __init__(
        self, settings: KafkaSettings, auth: KafkaAuth, metrics: KafkaMetrics | None
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._metrics = metrics
        # Why the last try to connect failed, while no producer could be made (or none of
        # its brokers answered it).
        self.problem: Problem | None = None
        # Topics that do not exist, looked for again every TOPICS_EVERY_S meanwhile.
        self.missing: set[str] = set()
        # Topics Kafka refuses the gateway the right to write to, with when a request
        # may next go through to try again (the others are refused at once).
        self.forbidden: dict[str, float] = {}
        # Partitions Kafka has not acknowledged in time; records for them are refused at
        # once (but for a probe) until Kafka acknowledges them again.
        self.down: set[Partition] = set()
        self._down_since = 0.0  # when the first of them went down
        self._refused_while_down = 0

    def refuse(self, topic: str, records: int, reason: str) -> None:
        """Count records refused before Kafka saw them."""
        if self._metrics is not None:
            self._metrics.refused.labels(topic, reason).inc(records)

    def refuse_down(self, topic: str, records: int) -> None:
        """Count records refused because a partition they go to is down."""
        self.refuse(topic, records, "kafka_down")
        self._refused_while_down += records

    def count_error(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.errors.labels(kind).inc()

    def refuse_unwritable(self, topic: str, records: int) -> None:
        """Refuse records for a topic that does not exist, or that Kafka has refused the
        gateway the right to write to (but for one request in a while, which tries)."""
        if topic in self.missing:
            self.refuse(topic, records, "topic_missing")
            raise KafkaTopicMissing(f"topic {topic} does not exist")
        probe_at = self.forbidden.get(topic)
        if probe_at is None:
            return
        now = asyncio.get_running_loop().time()
        if now < probe_at:
            self.refuse(topic, records, "forbidden")
            raise KafkaForbidden(f"Kafka refuses the gateway writes to topic {topic}")
        self.forbidden[topic] = now + FORBIDDEN_PROBE_S  # this request tries

    def forbid(self, topic: str) -> None:
        """Kafka refused records for `topic` to the gateway's principal: refuse its records
        at once, but for one request every FORBIDDEN_PROBE_S, which tries again."""
        if topic not in self.forbidden:
            log.error(
                "Kafka refuses the gateway the right to write to topic %s "
                "(TOPIC_AUTHORIZATION_FAILED): requests that write to it get 503 kafka_forbidden "
                "until the principal is granted Write and Describe on it; the others are served",
                topic,
            )
        self.forbidden[topic] = asyncio.get_running_loop().time() + FORBIDDEN_PROBE_S

    def allow(self, topic: str) -> None:
        """Kafka took records for `topic`."""
        if self.forbidden.pop(topic, None) is not None:
            log.info("Kafka takes records for topic %s again", topic)

    def note_missing(self, missing: list[str]) -> set[str]:
        """Log each topic that went missing, or came to exist, once; return the latter."""
        for topic in sorted(set(missing) - self.missing):
            log.error(
                "topic %s does not exist, and CAFE_KAFKA_CREATE_TOPICS=%s%s: requests that write "
                "to it get 503 kafka_topic_missing until it is created; the others are served",
                topic,
                self._settings.topics.create,
                ""
                if self._settings.topics.create == "never"
                else " but Kafka refused to create it",
            )
        found = self.missing - set(missing)
        for topic in sorted(found):
            log.info("topic %s exists now: its records are produced", topic)
        self.missing = set(missing)
        return found

    async def look_for_topics(self, on_found: Callable[[set[str]], None] | None = None) -> None:
        """Until every topic exists: look for the missing ones every TOPICS_EVERY_S, and
        tell `on_found` of those that came to exist."""
        while self.missing:
            await asyncio.sleep(TOPICS_EVERY_S)
            try:
                found = self.note_missing(await missing_topics(self._settings, self._auth))
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("could not look for the missing topics: %r", exc)
                continue
            if on_found is not None and found:
                on_found(found)

    def degraded(self) -> list[str]:
        """The topics the sink cannot write to now, and why."""
        said = [f"topic {topic} does not exist" for topic in sorted(self.missing)]
        said += [f"Kafka refuses writes to topic {topic}" for topic in sorted(self.forbidden)]
        return said

    def partition_down(self, partition: Partition) -> None:
        """Kafka has not acknowledged `partition` in time."""
        if partition in self.down:
            return
        if not self.down:
            log.warning(
                "Kafka has not acknowledged %s-%d in time; requests for partitions in this "
                "state are answered 503 at once until Kafka acknowledges them again",
                *partition,
            )
            self._down_since = time.monotonic()
            self._refused_while_down = 0
        self.down.add(partition)
        if self._metrics is not None:
            self._metrics.partitions_down.set(len(self.down))

    def partition_up(self, partition: Partition) -> None:
        """Kafka acknowledges `partition` again (or it is gone)."""
        if partition not in self.down:
            return
        self.down.discard(partition)
        if self._metrics is not None:
            self._metrics.partitions_down.set(len(self.down))
        if not self.down:
            log.info(
                "Kafka acknowledges every partition again after %.1fs; %d records were "
                "refused meanwhile",
                time.monotonic() - self._down_since,
                self._refused_while_down,
            )

    async def cannot_connect(self, exc: BaseException, delay: float) -> None:
        """Say why Kafka cannot be used, and wait before the next try.

        A client's start reports little more than that no bootstrap server would do, so
        one connection is made again to learn why. A cause the operator must fix
        (credentials, TLS, a secret file) is logged as one ERROR until the cause changes,
        and is what /readyz says; the gateway keeps trying.
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            # Within the wait before the next try, unless that is too short for a TLS
            # handshake and a SASL exchange far away: a broker that does not answer
            # (frozen, or not listening yet) must not hold the next try back.
            async with asyncio.timeout(max(delay, DIAGNOSE_S)):
                problem = await self._auth.diagnose()
        except TimeoutError:
            problem = Problem("unreachable", f"Kafka at {self._settings.bootstrap} did not answer")
        if problem is None:
            # Connected and authenticated, then refused: e.g. a producer id.
            problem = explain_refusal(exc, self._settings.bootstrap, self._settings.security)
        if problem is None or problem.cause == "unreachable":
            # Kafka answered this time (the failure came after connecting, e.g. while
            # creating topics), or is not there yet: a state that mends itself.
            log.warning(
                "Kafka at %s not usable (%s); retrying in %.2fs",
                self._settings.bootstrap,
                problem.words if problem is not None else exc,
                delay,
            )
        elif problem != self.problem:
            log.error("cannot use Kafka: %s; trying again every %gs", problem.words, LAST_RETRY_S)
        if problem is not None and problem.cause != "unreachable":
            delay = LAST_RETRY_S
        self.set_problem(problem)
        await asyncio.sleep(max(0.0, delay - (loop.time() - began)))

    def connected(self) -> None:
        """A producer is made and Kafka answers it."""
        if self.problem is not None and self.problem.cause != "unreachable":
            log.info(
                "connected to Kafka at %s: %s no more", self._settings.bootstrap, self.problem.cause
            )
        self.set_problem(None)

    def set_problem(self, problem: Problem | None) -> None:
        if self._metrics is not None:
            gauge = self._metrics.connection_problem
            if self.problem is not None:
                gauge.labels(self.problem.cause).set(0)
            if problem is not None:
                gauge.labels(problem.cause).set(1)
        self.problem = problem
