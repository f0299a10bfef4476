"""Liveness and readiness endpoints; neither needs an API key."""

from aiohttp import web

from gateway.errors import NotReady
from gateway.responses import json_response
from gateway.state import DRAINING, LIMITER, SINK


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when a send now would be stored and no shutdown has begun; 503 otherwise."""
    app = request.app
    if app[DRAINING].is_set():
        raise NotReady("the gateway is shutting down")
    reason = await app[SINK].unavailable()
    if reason is not None:
        raise NotReady(reason)
    # Still ready when the rate limits' Redis is away (each host enforces the limits on
    # its own meanwhile), but said, for whoever reads the answer.
    fleet = app[LIMITER].fleet
    if fleet is not None and fleet.down is not None:
        return json_response(
            {"status": "ready", "degraded": [f"rate limits are per host: {fleet.down}"]}
        )
    return json_response({"status": "ready"})
