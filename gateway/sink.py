"""Where accepted records go: the `Sink` interface, and an in-memory sink for tests.

The production sink is `gateway.kafka.sink.KafkaSink`. `MemorySink` is a seam for unit tests
and for measuring the gateway's ceiling without a broker; it is never a default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from gateway.config import TopicSettings
from gateway.errors import SinkUnavailable


class Message(NamedTuple):
    """One record or dead letter as the sink stores it: key, value and headers, encoded."""

    key: bytes | None
    value: bytes
    # A list, as aiokafka's record builder requires; one list may serve many messages.
    headers: list[tuple[str, bytes]] | None = None


class Sink(Protocol):
    """Stores a request's records and says when they are durably stored.

    The sink owns where records go: it knows each record type's destination and where
    rejected records (dead letters) are kept, so the request handler names only types.
    """

    async def start(self) -> None:
        """Begin connecting; must return promptly even if the backend is down."""

    async def close(self) -> None:
        """Deliver what is pending, then release connections."""

    async def unavailable(self) -> str | None:
        """None when a send now would be stored; else why not, in words for an operator.

        Only a question: asking changes nothing.
        """

    def degraded(self) -> list[str]:
        """What the sink cannot store while it is otherwise ready (a record type whose
        topic is missing or forbidden), in words for an operator."""

    async def send(
        self,
        record_type: str,
        accepted: Sequence[Message],
        dead_letters: Sequence[Message] = (),
        *,
        patient: bool = False,
    ) -> bool:
        """Return once every message is stored: `accepted` as records of `record_type`,
        `dead_letters` with the rejected records. Raise a `SinkUnavailable` otherwise.

        Within one key, messages are stored in the order given. True if they are stored
        in the local spool (gateway/spool/sink.py), to reach Kafka later; False if in Kafka.
        `patient`: wait for the store's verdict however long it takes, rather than give
        up at the produce timeout (the spool's replay, which must not send twice).
        """


class MemorySink:
    """Keeps messages in a dict of lists by topic name; `is_ready` is set by the test."""

    def __init__(self, *, ready: bool = True, topics: TopicSettings | None = None) -> None:
        self.is_ready = ready
        self.started = False
        self.closed = False
        self.topics: dict[str, list[Message]] = {}
        self._names = topics or TopicSettings()

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def unavailable(self) -> str | None:
        return None if self.is_ready else "the test made the memory sink unavailable"

    def degraded(self) -> list[str]:
        return []

    async def send(
        self,
        record_type: str,
        accepted: Sequence[Message],
        dead_letters: Sequence[Message] = (),
        *,
        patient: bool = False,
    ) -> bool:
        if not self.is_ready:
            raise SinkUnavailable("the test made the memory sink unavailable")
        self.store(self._names.by_record_type()[record_type], accepted)
        self.store(self._names.deadletter, dead_letters)
        return False

    def store(self, topic: str, messages: Sequence[Message]) -> None:
        if messages:
            self.topics.setdefault(topic, []).extend(messages)


class DiscardSink:
    """Acknowledges everything at once and keeps nothing: the benchmark's no-Kafka ceiling."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def unavailable(self) -> str | None:
        return None

    def degraded(self) -> list[str]:
        return []

    async def send(
        self,
        record_type: str,
        accepted: Sequence[Message],
        dead_letters: Sequence[Message] = (),
        *,
        patient: bool = False,
    ) -> bool:
        return False
