"""Typed application keys: the objects `create_app` shares with handlers."""

from aiohttp import web

from gateway.auth import KeyStore
from gateway.config import Settings
from gateway.requestid import RequestIds
from gateway.schemas import RecordType
from gateway.sink import Sink

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
SINK: web.AppKey[Sink] = web.AppKey("sink")
KEYS: web.AppKey[KeyStore] = web.AppKey("keys")
# By the name used in routes: activity, log, profile.
RECORD_TYPES: web.AppKey[dict[str, RecordType]] = web.AppKey("record_types")
# The OpenAPI document, built once at start-up.
OPENAPI: web.AppKey[bytes] = web.AppKey("openapi")
REQUEST_IDS: web.AppKey[RequestIds] = web.AppKey("request_ids")
