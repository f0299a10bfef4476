"""Liveness and readiness endpoints; neither needs an API key."""

from aiohttp import web

from gateway.errors import NotReady
from gateway.responses import json_response
from gateway.state import DRAINING, SETTINGS, SINK


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when a produce now would reach Kafka and no shutdown has begun; 503 otherwise."""
    app = request.app
    if app[DRAINING].is_set():
        raise NotReady("the gateway is shutting down")
    if not await app[SINK].ready():
        raise NotReady(f"Kafka at {app[SETTINGS].kafka.bootstrap} is not reachable")
    return json_response({"status": "ready"})
