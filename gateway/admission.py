"""Load shedding: a cap on the request bodies being worked on at once, and on connections.

Every POST reserves its declared body size (or the body limit, when chunked) before a
byte of it is read, and gives it back when answered. A request that would pass the cap
is answered 503 `overloaded` with Retry-After at once, so under a flood the gateway
keeps a bounded amount of work and memory in hand, serves what it can at full speed,
and is back to normal the moment the load drops. A POST on a connection opened past the
connection cap (gateway/listener.py) is shed the same way.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import Overloaded, TooManyConnections
from gateway.listener import over_capacity


class Admission:
    """Counts the body bytes of requests in progress against a cap."""

    def __init__(self, cap_bytes: int, max_body_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self.max_body_bytes = max_body_bytes
        self.in_flight_bytes = 0

    def middleware(self) -> Middleware:
        """A middleware that admits a POST only while its body fits under the cap."""

        @web.middleware
        async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
            need = request.content_length
            if request.method != "POST" or (need is not None and need > self.max_body_bytes):
                # Nothing to read, or a body the handler refuses unread (413).
                return await handler(request)
            if over_capacity(request):
                raise TooManyConnections("the gateway has too many connections open")
            if need is None or request.headers.get("Content-Encoding"):
                # Chunked, or compressed (the declared size is not what it decodes to):
                # the handler reads at most this.
                need = self.max_body_bytes
            if self.in_flight_bytes and self.in_flight_bytes + need > self.cap_bytes:
                raise Overloaded(
                    f"the gateway is at capacity ({self.in_flight_bytes} body bytes in progress)"
                )
            self.in_flight_bytes += need
            try:
                return await handler(request)
            finally:
                self.in_flight_bytes -= need

        return admit
