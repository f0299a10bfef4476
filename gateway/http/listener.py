"""Connections: aiohttp's server with a cap on open connections, and problem+json
answers for requests that aiohttp's HTTP parser refuses.

Both happen below the application, where no middleware reaches: a request line or
header block that does not parse never becomes a request, and a connection is open
before any request arrives on it. So the gateway serves each connection with its own
subclass of aiohttp's per-connection protocol (`RequestHandler`), made by
`GatewayRunner`, an `AppRunner` that otherwise works as aiohttp's does.

The cap (CAFE_MAX_CONNECTIONS, per process): the kernel hands over a connection
before anyone can refuse it, so one past the cap is accepted but marked. A POST on it
is answered 503 `too_many_connections` with Retry-After, unread, and every answer on
it closes it; one that sends no request is closed after OVER_CAP_GRACE_SECONDS, so
idle connections cannot pile up past the cap. Connections opened before it are served
as usual.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)

from gateway.errors import (
    GatewayError,
    HeaderTooLarge,
    MalformedRequest,
    TooManyHeaders,
    UriTooLong,
)
from gateway.http.metrics import HttpMetrics
from gateway.http.problems import render
from gateway.http.requestid import RequestIds
from gateway.http.responses import SECURITY_HEADERS
from gateway.http.state import FAST_LANE, METRICS, SETTINGS

log = logging.getLogger(__name__)

# What aiohttp's parser accepts. The request target and a header line get different
# limits so that a LineTooLong error, which names only its limit, says which it was.
URI_LIMIT = 4096  # bytes of the request target (path and query); ours are short
FIELD_LIMIT = 8190  # bytes of one header line, name and value (aiohttp's default)
HEADER_LIMIT = 128  # header lines (aiohttp's default)

# How long a connection past the cap may wait before sending its request.
OVER_CAP_GRACE_SECONDS = 1.0


# Private parts of aiohttp used below, where no public API reaches: AppRunner._make_server,
# BaseRunner._kwargs, Server._kwargs and RequestHandler._waiter. pyproject.toml keeps aiohttp
# below its next minor version for them, and tests/test_private_apis.py checks each one.
class GatewayRunner(web.AppRunner):
    """aiohttp's AppRunner, whose connections are `_Connection`s under the app's cap."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(
            app,
            max_line_size=URI_LIMIT,
            max_field_size=FIELD_LIMIT,
            max_headers=HEADER_LIMIT,
            **kwargs,
        )

    async def _make_server(self) -> web.Server:
        # aiohttp has no public hook for the per-connection protocol: this private
        # method starts the app and builds the Server that makes the connections. Its
        # Server is rebuilt here, with the same handler and settings, as ours.
        plain = await super()._make_server()
        handler = plain.request_handler
        in_front = self.app.get(FAST_LANE)
        if in_front is not None:
            handler = in_front(handler)
        return _Server(
            handler,
            request_factory=plain.request_factory,
            max_connections=self.app[SETTINGS].max_connections,
            metrics=self.app[METRICS],
            # The runner's private copy of its keyword arguments, as AppRunner completed
            # them (it adds access_log_class); no public attribute holds them.
            **self._kwargs,
        )


class _Server(web.Server):
    """Makes the connections, and counts the open ones against the cap."""

    def __init__(
        self, handler: Any, *, max_connections: int, metrics: HttpMetrics, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.open_connections = 0
        self.metrics = metrics
        # The ids of answers given here, where the access middleware never runs.
        self.request_ids = RequestIds()

    def __call__(self) -> _Connection:
        # As aiohttp's Server.__call__, with our class (Server takes no protocol class).
        # Its private _kwargs are the connection settings, less the options Server.__init__
        # keeps for itself; reading them keeps that split aiohttp's, not a copy of it here.
        return _Connection(self, loop=asyncio.get_running_loop(), **self._kwargs)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1
        self.metrics.connections.inc()
        if self.open_connections > self.max_connections and isinstance(handler, _Connection):
            handler.over_capacity = True
            asyncio.get_running_loop().call_later(OVER_CAP_GRACE_SECONDS, handler.close_if_idle)

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1
        self.metrics.connections.dec()


class _Connection(web.RequestHandler):
    """One client connection: aiohttp's, with the gateway's answer to unparsable requests."""

    __slots__ = ("_gateway", "over_capacity")

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gateway = manager
        # Opened past the cap; set by _Server.connection_made.
        self.over_capacity = False

    def close_if_idle(self) -> None:
        """Close the connection if it is waiting for a request (or for the rest of one)."""
        # The test aiohttp's own idle timeout makes: a request being answered is left to
        # finish, and the answer on a connection past the cap closes it anyway. _waiter is
        # private, the future a connection awaits its next request on; aiohttp has no
        # public "is idle" to ask instead.
        if self._waiter is not None and not self._waiter.done():
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request the parser refused (or to an error that escaped
        every middleware): a problem+json, and the connection is closed after it."""
        if request.writer.output_size > 0:
            # As aiohttp does: part of an answer went out, another cannot follow it.
            raise ConnectionError("an answer was being sent; the connection is dropped")
        request_id = self._gateway.request_ids.next()
        fields = {"request_id": request_id, "client_ip": request.remote}
        if isinstance(exc, BadHttpMessage):
            error = refusal(exc)
            # The client's mistake: one line, naming no header (it may hold a key).
            log.debug(
                "refused a malformed request: %s", type(exc).__name__, extra={"fields": fields}
            )
        else:
            # A bug: problem_middleware answers every error raised below it.
            error = GatewayError("the gateway failed to handle this request")
            log.error(
                "request failed outside the middlewares", exc_info=exc, extra={"fields": fields}
            )
        metrics = self._gateway.metrics
        metrics.requests.labels("unmatched", "other", str(error.status)).inc()
        # No middleware runs for it: the headers the access middleware adds are added here.
        headers = {**SECURITY_HEADERS, "X-Request-Id": request_id}
        response = render(metrics, error.status, error.code, error.detail, request_id, headers)
        response.force_close()
        return response


def over_capacity(request: web.BaseRequest) -> bool:
    """Whether the request came on a connection opened past the cap."""
    protocol = request.protocol
    return isinstance(protocol, _Connection) and protocol.over_capacity


# aiohttp's messages quote the bytes they refused, which may be an API key: only
# these, which quote nothing from the request, are passed on to the client.
_SAFE_MESSAGE = re.compile(
    r"Duplicate '[A-Za-z-]+' header found\."
    r"|Missing 'Host' header in request\."
    r"|Request has invalid `Transfer-Encoding`"
    r"|Received HTTPS traffic on an HTTP port"
)


def refusal(exc: BadHttpMessage) -> GatewayError:
    """The error that answers a request aiohttp's parser refused."""
    if isinstance(exc, LineTooLong):
        if exc.args[1] == URI_LIMIT:
            return UriTooLong(f"the request target is longer than {URI_LIMIT} bytes")
        return HeaderTooLarge(f"a header line is longer than {FIELD_LIMIT} bytes")
    if exc.message == "Too many headers received":
        return TooManyHeaders(f"more than {HEADER_LIMIT} header lines")
    return MalformedRequest(f"not a valid HTTP/1.1 request: {_what(exc)}")


def _what(exc: BadHttpMessage) -> str:
    if _SAFE_MESSAGE.fullmatch(exc.message):
        return exc.message.rstrip(".")
    # llhttp's errors read "<its reason>:\n\n  <the bytes>": the reason is one of its
    # constant strings, e.g. "Invalid header value char".
    reason, quoted, _ = exc.message.partition(":\n")
    if quoted and not isinstance(exc, InvalidHeader):
        return reason
    for kind, what in _KINDS:
        if isinstance(exc, kind):
            return what
    return "malformed request"


_KINDS: tuple[tuple[type[BadHttpMessage], str], ...] = (
    (InvalidHeader, "a header holds a character HTTP does not allow"),
    (BadHttpMethod, "unknown method"),
    (BadStatusLine, "malformed request line"),
    (InvalidURLError, "malformed request target"),
    (PayloadEncodingError, "malformed body framing"),
)
