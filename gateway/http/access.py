"""The outermost middleware: a request id, the request metrics, one access-log line."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.config import Settings
from gateway.http.clientip import client_ip
from gateway.http.context import RequestContext
from gateway.http.listener import over_capacity
from gateway.http.metrics import HttpMetrics
from gateway.http.requestid import RequestIds
from gateway.http.responses import SECURITY_HEADERS
from gateway.http.state import CONTEXT
from gateway.http.tracecontext import begin_span, trace_of
from gateway.tracing import Tracing

access_log = logging.getLogger("gateway.access")

# Anything else a client sends as a method is counted as "other": labels stay bounded.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Access:
    """What happens to every request at its start and its end: its id, the headers every
    answer carries, the request metrics and one access-log line. The middleware below
    wraps the general path in it; the fast lane (gateway/http/fastlane.py) calls it inline."""

    def __init__(
        self,
        settings: Settings,
        metrics: HttpMetrics,
        request_ids: RequestIds,
        draining: asyncio.Event,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        # None with CAFE_TRACE_SAMPLE_RATIO=0: no request gets a span (context.span).
        self.tracing = tracing
        self.metrics = metrics
        self.request_ids = request_ids
        self.draining = draining
        self._log_requests = settings.access_log
        # The labelled series of each (route, method, status) seen, looked up once: asking
        # prometheus_client for them costs a lock and a few dict lookups per request.
        self._series: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def begin(self, request: web.Request) -> RequestContext:
        """The request's context, with its id: the client's, if usable, else a new one."""
        context = RequestContext(self.request_ids.adopt(request.headers.get("X-Request-Id")))
        request[CONTEXT] = context
        if self.tracing is not None:
            begin_span(self.tracing, request, context)
        return context

    def closes(self, request: web.BaseRequest) -> bool:
        """Whether the answer closes the connection: shutting down, or a connection past
        the cap. The client's next request should open a new connection, which may go to
        another instance."""
        return self.draining.is_set() or over_capacity(request)

    def stamp(
        self, request: web.BaseRequest, response: web.StreamResponse, context: RequestContext
    ) -> None:
        """Add the headers every answer carries."""
        response.headers["X-Request-Id"] = context.id
        response.headers.update(SECURITY_HEADERS)
        if self.closes(request):
            response.force_close()

    def account(
        self,
        request: web.Request,
        route: str,
        status: int,
        bytes_out: int | None,
        context: RequestContext,
        seconds: float,
    ) -> None:
        """Count the answered request, end its span and write its access-log line."""
        method = request.method if request.method in _METHODS else "other"
        span = context.span
        if span is not None:
            span.end(method, route, status, context.record_counts)
        key = (route, method, status)
        series = self._series.get(key)
        if series is None:
            metrics = self.metrics
            series = self._series[key] = (
                metrics.requests.labels(route, method, str(status)),
                metrics.request_seconds.labels(route),
                metrics.body_bytes.labels(route),
            )
        requests, request_seconds, body_bytes = series
        tally = self.metrics.tally
        tally.add(requests)
        tally.observe(request_seconds, seconds)
        declared = request.content_length
        if declared is not None:
            tally.observe(body_bytes, declared)
        if self._log_requests and access_log.isEnabledFor(logging.INFO):
            _log(request, route, status, bytes_out, context, seconds, self.settings)


def access_middleware(access: Access) -> Middleware:
    """A middleware that names, times, counts and logs every request."""
    in_flight, tally = access.metrics.in_flight, access.metrics.tally

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        context = access.begin(request)
        tally.add(in_flight, 1)
        try:
            response = await handler(request)
        finally:
            tally.add(in_flight, -1)
        seconds = time.perf_counter() - started
        access.stamp(request, response, context)
        access.account(
            request, _route(request), response.status, response.content_length, context, seconds
        )
        return response

    return observe


def _route(request: web.Request) -> str:
    """The path of a matched route, else "unmatched".

    Paths are bounded label values here because every variable part of our routes is a
    fixed alternation (e.g. activity|log|profile).
    """
    error = request.match_info.http_exception
    if error is not None and not isinstance(error, web.HTTPMethodNotAllowed):
        return "unmatched"
    # A 405 (or a CORS preflight, answered before routing) is on a known path.
    return request.path


def _log(
    request: web.Request,
    route: str,
    status: int,
    bytes_out: int | None,
    context: RequestContext,
    seconds: float,
    settings: Settings,
) -> None:
    key = context.key
    fields: dict[str, object] = {
        "request_id": context.id,
        "method": request.method,
        "route": route,
        "status": status,
        "latency_ms": round(seconds * 1000, 3),
        "bytes_in": request.content_length,
        "bytes_out": bytes_out,
        "client_ip": client_ip(request, settings),
        # The key's id only: the plaintext never reaches a log.
        "key_id": key.id if key is not None else None,
        "trace_id": trace_of(request, context).trace_id,
    }
    if route == "unmatched":
        fields["path"] = request.path[:256]
    if context.problem_code is not None:
        fields["code"] = context.problem_code
    if context.record_counts is not None:
        fields["accepted"], fields["rejected"] = context.record_counts
    access_log.info("%s %s %d", request.method, route, status, extra={"fields": fields})
