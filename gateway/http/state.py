"""Every typed key for state shared through aiohttp: the app's objects, which `create_app`
sets for handlers and middlewares, and the per-request values middlewares pass down.

The ground floor: nothing here imports another gateway module at run time (the types
are for mypy alone), so every module may import its keys from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.http.context import RequestContext
    from gateway.http.metrics import HttpMetrics
    from gateway.keys.store import KeyStore
    from gateway.limits.local import RateLimiter
    from gateway.metrics import Metrics
    from gateway.schemas import RecordType
    from gateway.sink import Sink

# The app's objects.
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
SINK: web.AppKey[Sink] = web.AppKey("sink")
KEYS: web.AppKey[KeyStore] = web.AppKey("keys")
METRICS: web.AppKey[HttpMetrics] = web.AppKey("metrics")
# Where every metric lives, and the /metrics page.
EXPOSITION: web.AppKey[Metrics] = web.AppKey("exposition")
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter")
# By the name used in routes: activity, log, profile.
RECORD_TYPES: web.AppKey[dict[str, RecordType]] = web.AppKey("record_types")
# The OpenAPI document, built once at start-up.
OPENAPI: web.AppKey[bytes] = web.AppKey("openapi")
# Set on SIGTERM: /readyz answers 503 while the requests still arriving are served.
DRAINING: web.AppKey[asyncio.Event] = web.AppKey("draining")
# A request handler as aiohttp's connections call it.
RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Puts the record POSTs' path in one function in front of the app's own request handler,
# when CAFE_FAST_LANE is on (gateway/http/fastlane.py: FastLane.in_front_of).
FAST_LANE: web.AppKey[Callable[[RequestHandler], RequestHandler]] = web.AppKey("fast_lane")

# Per request: what the middlewares decided, for those inside them and the handler.
CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("context")
