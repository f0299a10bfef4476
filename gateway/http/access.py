"""The outermost middleware: a request id, the request metrics, one access-log line."""

from __future__ import annotations

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
from gateway.http.state import CONTEXT, DRAINING

access_log = logging.getLogger("gateway.access")

# Anything else a client sends as a method is counted as "other": labels stay bounded.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def access_middleware(
    settings: Settings, metrics: HttpMetrics, request_ids: RequestIds
) -> Middleware:
    """A middleware that names, times, counts and logs every request."""
    log_requests = settings.access_log
    # The labelled series of each (route, method, status) seen, looked up once: asking
    # prometheus_client for them costs a lock and a few dict lookups per request.
    series: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        context = RequestContext(request_ids.adopt(request.headers.get("X-Request-Id")))
        request[CONTEXT] = context
        metrics.in_flight.inc()
        try:
            response = await handler(request)
        finally:
            metrics.in_flight.dec()
        seconds = time.perf_counter() - started
        response.headers["X-Request-Id"] = context.id
        response.headers.update(SECURITY_HEADERS)
        if request.app[DRAINING].is_set() or over_capacity(request):
            # Shutting down, or a connection past the cap: the client's next request
            # should open a new connection, which may go to another instance.
            response.force_close()

        route = _route(request)
        method = request.method if request.method in _METHODS else "other"
        key = (route, method, response.status)
        if key not in series:
            series[key] = (
                metrics.requests.labels(route, method, str(response.status)),
                metrics.request_seconds.labels(route),
                metrics.body_bytes.labels(route),
            )
        requests, request_seconds, body_bytes = series[key]
        requests.inc()
        request_seconds.observe(seconds)
        if request.content_length is not None:
            body_bytes.observe(request.content_length)
        if log_requests and access_log.isEnabledFor(logging.INFO):
            _log(request, response, route, context, seconds, settings)
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
    response: web.StreamResponse,
    route: str,
    context: RequestContext,
    seconds: float,
    settings: Settings,
) -> None:
    key = context.key
    fields: dict[str, object] = {
        "request_id": context.id,
        "method": request.method,
        "route": route,
        "status": response.status,
        "latency_ms": round(seconds * 1000, 3),
        "bytes_in": request.content_length,
        "bytes_out": response.content_length,
        "client_ip": client_ip(request, settings),
        # The key's id only: the plaintext never reaches a log.
        "key_id": key.id if key is not None else None,
    }
    if route == "unmatched":
        fields["path"] = request.path[:256]
    if context.problem_code is not None:
        fields["code"] = context.problem_code
    if context.record_counts is not None:
        fields["accepted"], fields["rejected"] = context.record_counts
    access_log.info("%s %s %d", request.method, route, response.status, extra={"fields": fields})
