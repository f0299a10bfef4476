"""Servers that bound what the gateway can reach, for `make bench`.

    python -m loadtest.ceilings no-sink PORT   the gateway itself, Kafka replaced by a sink
                                               that acknowledges at once (parse, validate,
                                               encode, respond)
    python -m loadtest.ceilings bare PORT      aiohttp reading the body and answering

Both need CAFE_KEYS_FILE like the gateway (bare ignores it). Benchmark seams only.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web

from gateway.app import create_app
from gateway.cli import new_event_loop
from gateway.config import Settings
from gateway.http.listener import GatewayRunner
from gateway.server import tune_gc
from gateway.sink import DiscardSink


async def _bare(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"accepted": 1})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _serve(runner: web.AppRunner, port: int) -> None:
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    if isinstance(runner, GatewayRunner):
        tune_gc()  # as `cafe-gateway serve` does
    await asyncio.Event().wait()  # until killed


def main(argv: list[str]) -> None:
    """Serve the named ceiling on 127.0.0.1:PORT until killed."""
    mode, port = argv[0], int(argv[1])
    if mode == "no-sink":
        app = create_app(Settings.from_env(os.environ), sink=DiscardSink())
        # Served as `cafe-gateway serve` serves it, connection handling included.
        runner: web.AppRunner = GatewayRunner(app, access_log=None)
    elif mode == "bare":
        app = web.Application(client_max_size=10 * 1024 * 1024)
        app.router.add_post("/v1/activity", _bare)
        app.router.add_get("/healthz", _healthz)
        runner = web.AppRunner(app, access_log=None)
    else:
        raise SystemExit(f"unknown ceiling {mode!r}: no-sink or bare")
    # The same event loop as `cafe-gateway serve`, so the comparison is like for like.
    new_event_loop().run_until_complete(_serve(runner, port))


if __name__ == "__main__":
    main(sys.argv[1:])
