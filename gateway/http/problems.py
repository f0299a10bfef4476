"""The one middleware that renders every error as an RFC 9457 problem, counts and logs it."""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import ClientAborted, GatewayError
from gateway.http.context import RequestContext
from gateway.http.metrics import HttpMetrics
from gateway.http.responses import json_response
from gateway.http.state import CONTEXT

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


# Codes for aiohttp's own HTTP errors, raised by the router and the body reader.
# Every error a client may be answered with is a class here that sets its own `code`, or
# one of these (tests/test_errors.py holds the error table of docs/api.md and the OpenAPI
# document to that).
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


# Statuses outside the IANA registry that HTTPStatus knows.
_TITLES = {ClientAborted.status: "Client Closed Request"}


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An RFC 9457 problem response; `code` is the machine-readable reason.

    `requestId` (the X-Request-Id) is what to quote to an operator: the body never
    carries internals, the log line with that id does.
    """
    body: dict[str, object] = {
        "type": "about:blank",
        "title": _TITLES.get(status) or HTTPStatus(status).phrase,
        "status": status,
        "code": code,
        "detail": detail,
    }
    if request_id is not None:
        body["requestId"] = request_id
    return json_response(body, status=status, headers=headers, content_type=PROBLEM_JSON)


_BODY_HEADERS = {"content-type", "content-length"}


def problem_middleware(metrics: HttpMetrics) -> Middleware:
    """A middleware that turns every error below it into a problem+json response,
    a count by code and a log line."""

    @web.middleware
    async def render_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            # The context is made by the access middleware, outside this one.
            response = answer_error(exc, request, request[CONTEXT], metrics)
            if response is None:
                raise
            return response

    return render_problems


def answer_error(
    exc: Exception, request: web.BaseRequest, context: RequestContext, metrics: HttpMetrics
) -> web.Response | None:
    """The problem+json answer to an error raised while handling `request`, counted and
    logged; None for an HTTPException that is not an error (a redirect), to be raised on."""
    if isinstance(exc, GatewayError):
        level = exc.log_level
        if level is None:
            level = logging.WARNING if exc.status >= 500 else logging.DEBUG
        log.log(
            level,
            "%s %s -> %d %s: %s",
            request.method,
            request.path,
            exc.status,
            exc.code,
            exc.detail,
            extra={"fields": {"request_id": context.id}},
        )
        response = _answer(context, metrics, exc.status, exc.code, exc.detail, exc.headers())
        if exc.close_connection:
            response.force_close()
        return response
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None
        code = HTTP_CODES.get(exc.status, HTTPStatus(exc.status).name.lower())
        # Keep what the error says beside its body, e.g. the Allow header of a 405.
        kept = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
        return _answer(context, metrics, exc.status, code, exc.reason, kept)
    log.error(
        "%s %s failed",
        request.method,
        request.path,
        exc_info=exc,
        extra={"fields": {"request_id": context.id}},
    )
    detail = "the gateway failed to handle this request"
    return _answer(context, metrics, 500, GatewayError.code, detail, {})


def _answer(
    context: RequestContext,
    metrics: HttpMetrics,
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str],
) -> web.Response:
    context.problem_code = code
    return render(metrics, status, code, detail, context.id, headers)


def render(
    metrics: HttpMetrics,
    status: int,
    code: str,
    detail: str,
    request_id: str | None,
    headers: dict[str, str],
) -> web.Response:
    """The answer to an error, counted by its code: the middleware above and the
    listener (for what the HTTP parser refuses) both answer through it."""
    metrics.errors.labels(code).inc()
    return problem(status, code, detail, request_id=request_id, headers=headers)
