"""Liveness and readiness endpoints; neither needs an API key."""

from aiohttp import web

from gateway.errors import NotReady
from gateway.responses import json_response
from gateway.state import SETTINGS, SINK


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when a produce now would reach Kafka; 503 problem otherwise."""
    if not await request.app[SINK].ready():
        bootstrap = request.app[SETTINGS].kafka.bootstrap
        raise NotReady(f"Kafka at {bootstrap} is not reachable")
    return json_response({"status": "ready"})
