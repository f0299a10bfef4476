"""Load shedding: a cap on the request bodies being worked on at once, and on connections.

A POST with a plain body reserves its declared size before a byte of it is read; a
compressed or chunked body, whose size is known only once decoded, reserves as it is
decoded: the handler reads the body through its `Reservation` (`RequestContext.body`),
which counts every piece it reads. Either way the bytes are given back when the request
is answered. A request that would pass the cap is answered 503 `overloaded` with
Retry-After at once, so under a flood the gateway keeps a bounded amount of work and
memory in hand, serves what it can at full speed, and is back to normal the moment the
load drops. A request alone in progress is never shed, so a body up to the body limit
is served even when that is more than the cap. A POST on a connection opened past the
connection cap (gateway/http/listener.py) is shed the same way.
"""

from __future__ import annotations

from aiohttp import StreamReader, web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import Overloaded, PayloadTooLarge, TooManyConnections
from gateway.http.context import RequestContext
from gateway.http.listener import over_capacity
from gateway.http.state import CONTEXT


class Admission:
    """Counts the body bytes of requests in progress against a cap."""

    def __init__(self, cap_bytes: int, max_body_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self.max_body_bytes = max_body_bytes
        self.in_flight_bytes = 0

    def admit(self, request: web.BaseRequest, context: RequestContext) -> Reservation | None:
        """The reservation of a POST whose body may be read, also set as `context.body`;
        None for a request with nothing to read, or a body the handler refuses unread
        (413). Raise the refusal of a POST that does not fit. Give it back with `release`."""
        declared = request.content_length
        if request.method != "POST" or (declared is not None and declared > self.max_body_bytes):
            return None
        if over_capacity(request):
            raise TooManyConnections("the gateway has too many connections open")
        reservation = Reservation(self)
        if declared is not None and not request.headers.get("Content-Encoding"):
            reservation.reserve(declared)
        context.body = reservation
        return reservation

    def release(self, reservation: Reservation | None) -> None:
        """Give back what an answered request held."""
        if reservation is not None:
            self.in_flight_bytes -= reservation.held


class Reservation:
    """One request's share of the cap: what it holds, and how much of that its body uses."""

    __slots__ = ("_admission", "held", "used")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.held = 0
        self.used = 0

    def reserve(self, size: int) -> None:
        """Hold `size` bytes before the body is read; raise Overloaded if they do not fit."""
        self._grow(size)

    def take(self, size: int) -> None:
        """Count `size` more body bytes read, holding more if they pass what is held."""
        self.used += size
        if self.used > self.held:
            self._grow(self.used - self.held)

    async def read(self, stream: StreamReader, limit: int) -> bytearray:
        """The body, decoded (Content-Encoding) and counted against the cap as it arrives.

        aiohttp decodes a compressed body a piece at a time as it is read, so a body is
        cut at `limit` and shed past the in-flight cap without ever being decoded whole.
        """
        body = bytearray()
        while chunk := await stream.readany():
            if len(body) + len(chunk) > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
            self.take(len(chunk))
            body += chunk
        return body

    def _grow(self, more: int) -> None:
        admission = self._admission
        others = admission.in_flight_bytes - self.held
        # A request alone in progress always fits, however large.
        if others and admission.in_flight_bytes + more > admission.cap_bytes:
            raise Overloaded(
                f"the gateway is at capacity ({admission.in_flight_bytes} body bytes in progress)"
            )
        admission.in_flight_bytes += more
        self.held += more


def admission_middleware(admission: Admission) -> Middleware:
    """A middleware that admits a POST only while its body fits under the cap."""

    @web.middleware
    async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
        reservation = admission.admit(request, request[CONTEXT])
        try:
            return await handler(request)
        finally:
            admission.release(reservation)

    return admit
