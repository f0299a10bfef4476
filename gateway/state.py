"""Typed application keys: the objects `create_app` shares with handlers."""

import asyncio

from aiohttp import web

from gateway.config import Settings
from gateway.keys import KeyStore
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.schemas import RecordType
from gateway.sink import Sink

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
SINK: web.AppKey[Sink] = web.AppKey("sink")
KEYS: web.AppKey[KeyStore] = web.AppKey("keys")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter")
# By the name used in routes: activity, log, profile.
RECORD_TYPES: web.AppKey[dict[str, RecordType]] = web.AppKey("record_types")
# The OpenAPI document, built once at start-up.
OPENAPI: web.AppKey[bytes] = web.AppKey("openapi")
# Set on SIGTERM: /readyz answers 503 while the requests still arriving are served.
DRAINING: web.AppKey[asyncio.Event] = web.AppKey("draining")
