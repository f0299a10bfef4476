"""CORS for web pages that send records: preflights, and which answers a page may read.

A page on another origin that POSTs JSON with an `x-api-key` header first asks with an
OPTIONS preflight, which carries no key: it is allowed if any enabled key lists the
page's origin. The answer to the request itself is readable by the page only if the
key it used lists the origin (the auth middleware refuses other origins outright).
A disallowed origin gets no CORS headers at all, so the browser blocks it.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.http.responses import SPOOLED_HEADER
from gateway.http.state import CONTEXT
from gateway.keys.model import ApiKey
from gateway.keys.store import KeyStore

# Browsers may cache a preflight answer this long (seconds), sparing one per request.
PREFLIGHT_MAX_AGE_S = 600
_ALLOW_HEADERS = "content-type, content-encoding, x-api-key, traceparent, tracestate"
# Response headers a page's script may read besides the basic ones.
_EXPOSE_HEADERS = f"X-Request-Id, Retry-After, {SPOOLED_HEADER}"


def cors_middleware(keys: KeyStore, ingest_paths: frozenset[str]) -> Middleware:
    """A middleware that answers preflights on `ingest_paths` and marks readable answers."""

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and request.path in ingest_paths:
            return _preflight(origin, keys)
        response = await handler(request)
        if origin is not None:
            mark_readable(response, origin, request[CONTEXT].key, keys)
        return response

    return cors


def mark_readable(
    response: web.StreamResponse, origin: str, key: ApiKey | None, keys: KeyStore
) -> None:
    """Say to the browser whether the page at `origin` may read `response`."""
    # Before a key is known (a 401, say), any origin some key lists may read why.
    allowed = key.origins if key is not None else keys.origins
    if origin in allowed:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _EXPOSE_HEADERS
    response.headers.add("Vary", "Origin")


def _preflight(origin: str | None, keys: KeyStore) -> web.Response:
    response = web.Response(status=204, headers={"Vary": "Origin"})
    if origin is not None and origin in keys.origins:
        response.headers.update(
            {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": _ALLOW_HEADERS,
                "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            }
        )
    return response
