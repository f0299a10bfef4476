"""One gateway process: listen, serve, and on SIGTERM drain and stop cleanly.

On SIGTERM or SIGINT: /readyz answers 503 at once, so load balancers stop sending; for
CAFE_DRAIN_SECONDS requests are still served as usual (time for them to notice); then
the listener closes, requests in flight get CAFE_SHUTDOWN_GRACE_SECONDS to be answered
(each is answered within the produce timeout: 200 once Kafka has its records, or 503),
and the Kafka producer delivers what it holds and closes. The process then exits 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import resource
import signal
from pathlib import Path

from aiohttp import web

from gateway.app import create_app, create_metrics_app
from gateway.config import Settings
from gateway.http.listener import GatewayRunner
from gateway.http.state import DRAINING
from gateway.limits.local import BucketTable
from gateway.metrics import share_values

log = logging.getLogger(__name__)


async def serve(
    settings: Settings, buckets: BucketTable | None = None, metrics_dir: Path | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return. `metrics_dir`: where the
    workers' metrics meet, with several."""
    if metrics_dir is not None:
        share_values(metrics_dir)  # before the app makes a metric
    app = create_app(settings, buckets=buckets, metrics_dir=metrics_dir)
    _raise_file_limit(settings.max_connections)
    # With several workers each binds the port itself; the kernel shares connections.
    reuse_port = settings.workers > 1
    runners: list[web.AppRunner] = [
        GatewayRunner(
            app,
            access_log=None,
            shutdown_timeout=settings.shutdown_grace_seconds,
            # aiohttp closes a connection that has waited this long for a request.
            keepalive_timeout=settings.idle_timeout_seconds,
        )
    ]
    ports = [settings.port]
    if settings.metrics_port is not None:
        runners.append(web.AppRunner(create_metrics_app(app), access_log=None))
        ports.append(settings.metrics_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        for runner, port in zip(runners, ports, strict=True):
            await runner.setup()
            site = web.TCPSite(runner, settings.host, port, reuse_port=reuse_port)
            await site.start()
            log.info("listening on http://%s:%d", settings.host, port)
        tune_gc()
        tune_malloc()
        await stop.wait()
        app[DRAINING].set()
        log.info("stopping: draining for %gs", settings.drain_seconds)
        await asyncio.sleep(settings.drain_seconds)
    finally:
        # aiohttp closes the listener, waits for requests in flight, then runs the
        # app's cleanup (the producer's flush); the metrics app goes last.
        for runner in runners:
            await runner.cleanup()
    log.info("stopped")


def tune_gc() -> None:
    """Keep CPython's cycle collector off the request path; call once started.

    A batch of 500 records is 500 dicts alive at once, past the default threshold of
    700 net container allocations, so a collection ran about once a request, and each
    full one walked every object the process holds, nearly all made at start-up and
    alive for good: about 20 ms each, 6-8% of the time at 500 records per request
    (measured with gc.callbacks under `make bench`'s load). Records are freed by
    reference counting once answered, and cycles are rare; so what start-up made is
    frozen (never scanned again), and the youngest generation is collected after
    10,000 net allocations.
    """
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])


# mallopt()'s parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers below this come from the heap, and free memory at its top is given back to
# the system only past the trim threshold.
_MMAP_THRESHOLD = 4 * 1024 * 1024
_TRIM_THRESHOLD = 16 * 1024 * 1024


def tune_malloc() -> bool:
    """Keep the buffers of Kafka requests in the heap; True if glibc took the settings.

    aiokafka copies a produce request several times as it encodes it (each copy the size
    of the request, up to a MiB), and glibc serves a buffer that large from a fresh mmap
    unless its adaptive threshold has risen past it, and gives memory back at the heap's
    top soon after. Replaying the spool so took 280,000 page faults per 800,000 records,
    each a page zeroed by the kernel; with these thresholds, 16,000, and 11% less CPU
    (4.4 against 3.9 s), the peak RSS unchanged (79 MiB). Setting either threshold turns
    off the adaptation of both, hence the two. Other C libraries have no mallopt: nothing
    is done.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


# Descriptors besides client connections: Kafka's sockets, the listener, logs, files.
_SPARE_FILES = 256


def _raise_file_limit(max_connections: int) -> None:
    """Let the process open a descriptor for every connection the cap allows.

    The soft limit is often 1024: past it, accept() fails and clients wait in the
    backlog, unanswered. It may be raised up to the hard limit without privileges.
    """
    need = max_connections + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < need:
        log.warning(
            "CAFE_MAX_CONNECTIONS=%d, but this process may open only %d files: "
            "connections past about %d wait unanswered",
            max_connections,
            raised,
            raised - _SPARE_FILES,
        )
