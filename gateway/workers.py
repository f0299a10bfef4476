"""Several gateway processes on one port, for machines with more than one core.

Each worker is a forked copy of `cafe-gateway serve` with its own event loop, Kafka
producer and key watcher, listening with SO_REUSEPORT so the kernel spreads new
connections across them. The parent only forwards SIGTERM/SIGINT and waits. A worker
that dies on its own takes the others down and the parent exits 1: the process
supervisor (systemd, Kubernetes) restarts the whole set, rather than this code
guessing how to heal.

Workers share their Prometheus metrics through files: before the first fork the parent
makes an empty directory, and hands it to every worker (`serve(directory)`), whose
metrics keep their values there (gateway/metrics.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from gateway.metrics import MULTIPROC_ENV

log = logging.getLogger(__name__)


def run_workers(count: int, serve: Callable[[Path], int]) -> int:
    """Fork `count` workers that each run `serve` with the directory their metrics share;
    return 0 if all stopped cleanly."""
    metrics_dir, made_here = _prepare_metrics_dir()
    try:
        return _fork_and_wait(count, serve, metrics_dir)
    finally:
        if made_here:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _fork_and_wait(count: int, serve: Callable[[Path], int], metrics_dir: Path) -> int:
    children: set[int] = set()
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = serve(metrics_dir)
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
        # Its gauges leave the sums; its counters stay.
        multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0:
            status = 1
        if not stopping:
            log.error("worker %d exited on its own (%d); stopping the others", pid, code)
            stop(signal.SIGTERM, None)
            status = 1
    return status


def _prepare_metrics_dir() -> tuple[Path, bool]:
    """An empty directory for the workers' metrics, and whether it was made here.

    A directory the operator named in PROMETHEUS_MULTIPROC_DIR (prometheus_client's own
    setting) is used, emptied: files of a previous run would add to this run's counts.
    Otherwise a fresh one is made in the temp directory.
    """
    named = os.environ.get(MULTIPROC_ENV)
    if named:
        path = Path(named)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    return Path(tempfile.mkdtemp(prefix="cafe-gateway-metrics-")), True
