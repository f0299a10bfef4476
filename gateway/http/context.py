"""What one request carries from the middlewares down to its handler, made once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from aiohttp import StreamReader

from gateway.keys.model import ApiKey

if TYPE_CHECKING:
    from gateway.otel import RequestSpan


class BodyReader(Protocol):
    """Reads a request's body within what admission holds for it (`Reservation`)."""

    async def read(self, stream: StreamReader, limit: int) -> bytearray:
        """The body, decoded, cut at `limit` bytes, counted against the in-flight cap."""


class TraceContext(NamedTuple):
    """A request's W3C trace as it is passed on: its traceparent (version 00) and its
    tracestate (gateway/http/tracecontext.py)."""

    traceparent: str
    tracestate: str | None = None

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]


@dataclass(slots=True, eq=False)
class RequestContext:
    """Made by the outermost middleware (`access`); each middleware below fills in what
    it decided, so the handler needs none of them, and the access log says what
    happened. Unset fields are what a request that did not get that far lacks."""

    # Its X-Request-Id: the client's, if usable, else a new one (gateway/http/access.py).
    id: str
    # The key it was admitted with (gateway/http/auth.py).
    key: ApiKey | None = None
    # Takes the key's record tokens for that many records, raising RateLimited when they
    # are used up (gateway/http/ratelimit.py); None for a key without a records limit.
    take_records: Callable[[int], Awaitable[None]] | None = None
    # Reads the body of an admitted POST (gateway/http/admission.py).
    body: BodyReader | None = None
    # The code of the problem it was answered with (gateway/http/problems.py).
    problem_code: str | None = None
    # Records accepted and rejected (gateway/http/ingest.py).
    record_counts: tuple[int, int] | None = None
    # Its trace, read from its headers when first asked for (`trace_of`).
    trace: TraceContext | None = None
    # Its OpenTelemetry span, if tracing is on and sampled it (gateway/tracing.py).
    span: RequestSpan | None = None
