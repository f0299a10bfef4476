"""Where accepted records go: the `Sink` interface, what it is given, and two seams.

A sink is given records, not messages: each valid `Record` and each `Rejected` one
comes with the `Context` of its request, and the sink decides how to store them (the
Kafka sink makes each a message with its key and headers; dead letters cut to what
Kafka takes). The production sink is `gateway.kafka.sink.KafkaSink`; `MemorySink` is a
seam for unit tests and `DiscardSink` for measuring the gateway's ceiling without a
broker; neither is ever a default.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from gateway.errors import SinkUnavailable


class Context(NamedTuple):
    """Where a request's records came from, and which format version judged them: stored
    beside each of them. One per request and version, shared by those records."""

    key_id: str  # the API key's id, never the key
    client_ip: str | None  # as the key's CAFE_CLIENT_IP mode keeps it; None: not kept
    request_id: str
    received_at: str  # when the request arrived, as the gateway writes times (UTC, ms)
    # The messageFormatVersion whose schema judged the records; None for records whose
    # version the gateway does not know.
    schema_version: int | None = 1
    # The request's W3C trace context, passed on to consumers (gateway/http/tracecontext.py).
    traceparent: str | None = None
    tracestate: str | None = None


class Record(NamedTuple):
    """A valid record: its JSON, and the session it is kept in order by."""

    session_id: str
    value: bytes
    context: Context


class Rejected(NamedTuple):
    """A rejected record as sent, and why: what a dead letter keeps."""

    value: bytes  # the record's JSON, whole
    position: int  # its index in its request's records
    reason: str  # invalid, unknown_format_version or forbidden
    errors: list[dict[str, str]]  # what the client was told: {pointer, message}
    session_id: str | None  # its sessionId, if it had a string there
    context: Context
    # Set when the record reached the gateway cut already (a dead letter spooled by a
    # version that cut it before spooling): its size and SHA-256 (hex) before the cut.
    cut_from: tuple[int, str] | None = None


class Delivery(enum.Enum):
    """Where a send's records are once it returns."""

    STORED = "stored"  # in the sink's store: Kafka has acknowledged them
    SPOOLED = "spooled"  # in the gateway's spool, fsynced, to reach Kafka later


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
        accepted: Sequence[Record],
        rejected: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        """Return once every record is stored: `accepted` as records of `record_type`,
        `rejected` as its dead letters. Raise a `SinkUnavailable` otherwise.

        Within one session, records are stored in the order given. Returns where they
        are: in the store, or in the local spool (gateway/spool/) to reach it later.
        `patient`: wait for the store's verdict however long it takes, rather than give
        up at the produce timeout (the spool's replay, which must not send twice).
        """


class MemorySink:
    """Keeps what it is sent by record type; `is_ready` is set by the test, and so is
    `spooling` (the sends answer SPOOLED, as the spool's would with Kafka away)."""

    def __init__(self, *, ready: bool = True) -> None:
        self.is_ready = ready
        self.spooling = False
        self.started = False
        self.closed = False
        self.records: dict[str, list[Record]] = {}
        self.rejected: dict[str, list[Rejected]] = {}

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
        accepted: Sequence[Record],
        rejected: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        if not self.is_ready:
            raise SinkUnavailable("the test made the memory sink unavailable")
        if accepted:
            self.records.setdefault(record_type, []).extend(accepted)
        if rejected:
            self.rejected.setdefault(record_type, []).extend(rejected)
        return Delivery.SPOOLED if self.spooling else Delivery.STORED


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
        accepted: Sequence[Record],
        rejected: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        return Delivery.STORED
