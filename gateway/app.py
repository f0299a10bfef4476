"""The app factory: the one place where settings, sink, middlewares and routes are wired."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import health
from gateway.config import Settings
from gateway.errors import problem_middleware
from gateway.kafka import KafkaSink
from gateway.sink import Sink
from gateway.state import SETTINGS, SINK


def create_app(settings: Settings, *, sink: Sink | None = None) -> web.Application:
    """Build the gateway; `sink` replaces Kafka in unit tests and ceiling benchmarks."""
    app = web.Application(middlewares=[problem_middleware])
    app[SETTINGS] = settings
    app[SINK] = sink if sink is not None else KafkaSink(settings.kafka)
    app.cleanup_ctx.append(_sink_lifetime)

    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    return app


async def _sink_lifetime(app: web.Application) -> AsyncIterator[None]:
    """Connect the sink at start-up; deliver what it holds and close it at shutdown."""
    sink = app[SINK]
    await sink.start()
    yield
    await sink.close()
