"""Liveness and readiness endpoints; neither needs an API key."""

from aiohttp import web

from gateway.errors import NotReady
from gateway.http.responses import json_response
from gateway.http.state import DRAINING, LIMITER, SINK


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
    # its own meanwhile), or when one record type's topic is missing or forbidden (the
    # others are served), but said, for whoever reads the answer.
    degraded = app[SINK].degraded()
    fleet = app[LIMITER].fleet
    if fleet is not None and fleet.down is not None:
        degraded.append(f"rate limits are per host: {fleet.down}")
    if degraded:
        return json_response({"status": "ready", "degraded": degraded})
    return json_response({"status": "ready"})
