"""A key's rate limits on the HTTP side: its requests before the body is read, and what
the handler needs to take its records once they are counted."""

from __future__ import annotations

import functools

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.http.context import RequestContext
from gateway.http.state import CONTEXT
from gateway.limits.local import RateLimiter


def rate_limit_middleware(limiter: RateLimiter) -> Middleware:
    """A middleware that refuses a keyed request over its key's request rate, unread, and
    gives the handler the key's records limit (`RequestContext.take_records`)."""

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        await check_limits(limiter, request[CONTEXT])
        return await handler(request)

    return limit


async def check_limits(limiter: RateLimiter, context: RequestContext) -> None:
    """Refuse a keyed request over its key's request rate; give the handler the key's
    records limit."""
    key = context.key
    if key is not None:
        await limiter.check_request(key)
        if key.records_per_second is not None:
            context.take_records = functools.partial(limiter.check_records, key)
