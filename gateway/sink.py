"""Where accepted records go: the `Sink` interface, and an in-memory sink for tests.

The production sink is `gateway.kafka.KafkaSink`. `MemorySink` is a seam for unit tests
and for measuring the gateway's ceiling without a broker; it is never a default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


class Message(NamedTuple):
    """One Kafka message, already encoded."""

    key: bytes | None
    value: bytes
    # A list, as aiokafka's record builder requires; one list may serve many messages.
    headers: list[tuple[str, bytes]] | None = None


class Sink(Protocol):
    """Accepts encoded messages and says when they are durably stored."""

    async def start(self) -> None:
        """Begin connecting; must return promptly even if the backend is down."""

    async def close(self) -> None:
        """Deliver what is pending, then release connections."""

    async def ready(self) -> bool:
        """True when a send now would reach the backend."""

    async def send(self, topic: str, messages: Sequence[Message]) -> None:
        """Return once every message is acknowledged; raise `SinkUnavailable` otherwise.

        Within one key, messages are stored in the order given.
        """


class MemorySink:
    """Keeps messages in a dict of lists by topic; `is_ready` is set by the test."""

    def __init__(self, *, ready: bool = True) -> None:
        self.is_ready = ready
        self.started = False
        self.closed = False
        self.topics: dict[str, list[Message]] = {}

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def ready(self) -> bool:
        return self.is_ready

    async def send(self, topic: str, messages: Sequence[Message]) -> None:
        self.topics.setdefault(topic, []).extend(messages)


class DiscardSink:
    """Acknowledges everything at once and keeps nothing: the benchmark's no-Kafka ceiling."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def send(self, topic: str, messages: Sequence[Message]) -> None:
        pass
