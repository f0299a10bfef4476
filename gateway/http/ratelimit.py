"""The request-rate check of a key, before its request's body is read."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.http.state import API_KEY
from gateway.limits.local import RateLimiter


def rate_limit_middleware(limiter: RateLimiter) -> Middleware:
    """A middleware that refuses a keyed request over its key's request rate, unread."""

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        key = request.get(API_KEY)
        if key is not None:
            await limiter.check_request(key)
        return await handler(request)

    return limit
