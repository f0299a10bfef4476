"""Several gateway processes on one port, for machines with more than one core.

Each worker is a forked copy of `cafe-gateway serve` with its own event loop, Kafka
producer and key watcher, listening with SO_REUSEPORT so the kernel spreads new
connections across them. The parent only forwards SIGTERM/SIGINT and waits. A worker
that dies on its own takes the others down and the parent exits 1: the process
supervisor (systemd, Kubernetes) restarts the whole set, rather than this code
guessing how to heal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


def run_workers(count: int, serve: Callable[[], int]) -> int:
    """Fork `count` workers that each run `serve`; return 0 if all stopped cleanly."""
    children: set[int] = set()
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = serve()
            except Exception:
                # The parent sees only the exit status: say here what went wrong.
                log.exception("worker %d failed", os.getpid())
            finally:
                # Leave without running the parent's exit handlers and buffers twice.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.add(pid)
    log.info("started %d workers: %s", count, ", ".join(map(str, sorted(children))))

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    status = 0
    while children:
        pid, wait_status = os.wait()
        children.discard(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0:
            status = 1
        if not stopping:
            log.error("worker %d exited on its own (%d); stopping the others", pid, code)
            stop(signal.SIGTERM, None)
            status = 1
    return status
