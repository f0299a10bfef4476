"""Typed application keys: the objects `create_app` shares with handlers."""

from aiohttp import web

from gateway.config import Settings
from gateway.sink import Sink

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
SINK: web.AppKey[Sink] = web.AppKey("sink")
