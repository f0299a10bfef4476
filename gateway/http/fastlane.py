"""The fast lane: POST /v1/<type> in one straight function.

On the general path a request goes through aiohttp's Application: the router, six
middleware frames, the handler, and an answer built as a `web.Response`. For a small
batch that costs about as much as the work itself. The fast lane takes the same steps in
one function, calling the very functions the middlewares are made of, in their order:

    access.begin -> check_key -> check_limits -> admission.admit -> ingest
      -> answer_error (on any error) -> access.stamp -> mark_readable -> access.account

A plain success (200, kept alive, no CORS or spool header to add) is written as one
pre-built run of bytes, with the headers the general path would send.

It takes a POST whose target is exactly an ingest path and that does not ask to
`Expect: 100-continue`. Everything else (other routes, `?api_key=` beacons, preflights)
goes to the Application. tests/test_fastlane.py sends one corpus of requests down both
paths and compares everything a client, an operator and a consumer can see.

`GatewayRunner` (gateway/http/listener.py) puts it in front of the Application when
CAFE_FAST_LANE is on (the default).
"""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from multidict import CIMultiDict

from gateway.config import Settings
from gateway.http.access import Access
from gateway.http.admission import Admission
from gateway.http.auth import check_key
from gateway.http.context import RequestContext
from gateway.http.cors import mark_readable
from gateway.http.ingest import answer, ingest
from gateway.http.problems import answer_error
from gateway.http.ratelimit import check_limits
from gateway.http.responses import SECURITY_HEADERS
from gateway.http.state import RequestHandler
from gateway.keys.store import KeyStore
from gateway.limits.local import RateLimiter
from gateway.schemas import RecordType
from gateway.sink import Delivery, Sink


class FastLane:
    """The ingest routes' one-function path, in front of the general one."""

    def __init__(
        self,
        record_types: dict[str, RecordType],
        settings: Settings,
        access: Access,
        keys: KeyStore,
        limiter: RateLimiter,
        admission: Admission,
        sink: Sink,
    ) -> None:
        self._routes = {f"/v1/{name}": record_type for name, record_type in record_types.items()}
        self._settings = settings
        self._access = access
        self._metrics = access.metrics
        self._keys = keys
        self._limiter = limiter
        self._admission = admission
        self._sink = sink
        self._accepted = _PrebuiltAccepted()

    def in_front_of(self, general: RequestHandler) -> RequestHandler:
        """The request handler that serves the fast lane's requests, and passes every
        other to `general` (the Application's)."""
        routes = self._routes
        take = self._take

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            # raw_path is the request target as sent: an ingest path exactly, with no
            # query, no escapes and no trailing slash, so the router would find the
            # same route.
            record_type = routes.get(request.raw_path)
            if (
                record_type is None
                or request.method != "POST"
                or "Expect" in request.headers
                or not isinstance(request, web.Request)
            ):
                return await general(request)
            return await take(request, record_type)

        return handle

    async def _take(self, request: web.Request, record_type: RecordType) -> web.StreamResponse:
        started = time.perf_counter()
        access, in_flight, tally = self._access, self._metrics.in_flight, self._metrics.tally
        context = access.begin(request)
        tally.add(in_flight, 1)
        try:
            response = await self._answer(request, context, record_type)
        finally:
            tally.add(in_flight, -1)
        seconds = time.perf_counter() - started
        if isinstance(response, _Written):
            access.account(request, request.path, 200, response.body_size, context, seconds)
            return response
        access.stamp(request, response, context)
        origin = request.headers.get("Origin")
        if origin is not None:
            mark_readable(response, origin, context.key, self._keys)
        access.account(
            request, request.path, response.status, response.content_length, context, seconds
        )
        return response

    async def _answer(
        self, request: web.Request, context: RequestContext, record_type: RecordType
    ) -> web.StreamResponse:
        metrics = self._metrics
        try:
            check_key(request, context, self._keys, metrics, sends_records=True)
            await check_limits(self._limiter, context)
            reservation = self._admission.admit(request, context)
            try:
                outcome = await ingest(
                    request, context, record_type, self._settings, self._sink, metrics
                )
            finally:
                self._admission.release(reservation)
        except Exception as exc:
            error = answer_error(exc, request, context, metrics)
            if error is None:
                raise
            return error
        if (
            not outcome.rejections
            and outcome.delivery is Delivery.STORED
            and request.version == HttpVersion11
            and request.keep_alive
            and "Origin" not in request.headers
            and not self._access.closes(request)
        ):
            return self._accepted.answer(context.id, outcome.accepted)
        return answer(outcome)


class _PrebuiltAccepted:
    """The bytes of a 200 `{"accepted": n}` as the general path would write them, but for
    the order of the headers, assembled without building a Response."""

    def __init__(self) -> None:
        fixed = {"Content-Type": "application/json", **SECURITY_HEADERS, "Server": SERVER_SOFTWARE}
        self._head = b"HTTP/1.1 200 OK\r\n" + b"".join(
            f"{name}: {value}\r\n".encode("latin-1") for name, value in fixed.items()
        )
        self._date = ""
        self._date_line = b""

    def answer(self, request_id: str, accepted: int) -> _Written:
        date = rfc822_formatted_time()  # aiohttp's, which it renews once a second
        if date is not self._date:
            self._date = date
            self._date_line = f"Date: {date}\r\n".encode("latin-1")
        body = b'{"accepted":%d}' % accepted
        head = b"%sX-Request-Id: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            self._head,
            request_id.encode("latin-1"),
            len(body),
            self._date_line,
        )
        return _Written(head + body, len(body))


class _Written(web.StreamResponse):
    """An answer already in bytes, status line to body: what aiohttp's connection does
    with a response (prepare, write_eof, keep_alive) done with those bytes. Its headers
    and length are read back from the bytes only if asked (aiohttp's own access log, when
    a runner has it on, asks; `cafe-gateway serve` turns it off)."""

    def __init__(self, data: bytes, body_size: int) -> None:
        super().__init__(status=200)
        self._data = data
        self.body_size = body_size
        self._parsed: CIMultiDict[str] | None = None

    @property
    def keep_alive(self) -> bool:
        return True

    @property
    def headers(self) -> CIMultiDict[str]:
        if self._parsed is None:
            head = self._data[: len(self._data) - self.body_size].decode("latin-1")
            lines = head.split("\r\n")[1:]
            self._parsed = CIMultiDict(line.partition(": ")[::2] for line in lines if line)
        return self._parsed

    @property
    def body_length(self) -> int:
        # As aiohttp counts it once written: every byte of the answer.
        return len(self._data)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter:
        self._out = request.writer
        return self._out

    async def write_eof(self, data: bytes = b"") -> None:
        await self._out.write_eof(self._data)
