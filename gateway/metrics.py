"""Prometheus metrics: where they live, and the exposition at /metrics.

Every metric lives on the registry `create_app` is given (a fresh one by default), never
on prometheus_client's global one, so apps built side by side in tests keep their own
counts. Label values are bounded: routes, record types, topics, outcomes and error codes
come from fixed sets, never from request data.

With several workers (CAFE_WORKERS > 1), `cafe-gateway serve` makes a directory before
it forks; each worker calls `share_values` with it before it makes its app, and so
writes its values to files of its own there, and a scrape of any worker adds up the
files of all of them.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import platform
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    generate_latest,
    multiprocess,
    values,
)

# prometheus_client's own setting for where worker files live (it reads it as each
# value is made, and when it checks a gauge's multiprocess_mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: from a cached 1 ms answer to the 5 s produce timeout and beyond.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Where the gateway's metrics live: one registry (and, with `shared_dir`, the files
    of every worker), the build info, and the exposition at /metrics.

    Each package builds its own group of metrics on `registry` (`gateway.http.metrics`,
    `gateway.kafka.metrics`, `gateway.spool.metrics`, `gateway.keys.metrics`,
    `gateway.limits.metrics`), from the `Metrics` it is given.
    """

    def __init__(
        self, registry: CollectorRegistry, version: str, shared_dir: Path | None = None
    ) -> None:
        self.registry = registry
        self.shared_dir = shared_dir
        # Gauges say how the files of several workers combine (ignored in one process):
        # "live" modes leave out workers that have exited.
        build_info = Gauge(
            "cafe_build_info",
            "Always 1; the labels say which gateway and Python are running",
            ["version", "python"],
            registry=registry,
            multiprocess_mode="max",
        )
        build_info.labels(version, platform.python_version()).set(1)
        self.tally = Tally()

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics: the text exposition, summed over workers when there are several."""
        self.tally.flush()
        registry = self.registry
        if self.shared_dir is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, str(self.shared_dir))  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class Tally:
    """Updates of the series every request touches, kept as plain numbers until flushed
    into the series: at each scrape, and every second by `flush_often`.

    A prometheus-client update takes a lock (a file's, with several workers) and costs
    about a microsecond; seven a request were 4% of a small request's CPU. Here an update
    is a dict lookup and an addition. In one process a scrape flushes first, so it is
    exact; with several workers each flushes its own every second, so a scrape sees the
    others' counts up to a second late.
    """

    __slots__ = ("_added", "_observed")

    def __init__(self) -> None:
        # Counter or gauge series: the amount to add (a gauge's may be negative).
        self._added: dict[Any, float] = {}
        # Histogram series: the observations in each bucket, then their sum.
        self._observed: dict[Any, list[float]] = {}

    def add(self, series: Any, amount: float = 1) -> None:
        """Count `amount` more on a counter's or a gauge's series."""
        added = self._added
        added[series] = added.get(series, 0) + amount

    def observe(self, series: Any, value: float) -> None:
        """Observe `value` on a histogram's series."""
        pending = self._observed.get(series)
        # _upper_bounds: the histogram's bounds, +Inf last; private, as is _buckets below
        # (tests/test_private_apis.py checks both). A value goes to the first bucket whose
        # bound it does not pass, as Histogram.observe puts it.
        bounds = series._upper_bounds
        if pending is None:
            pending = self._observed[series] = [0] * (len(bounds) + 1)
        pending[bisect.bisect_left(bounds, value)] += 1
        pending[-1] += value

    def flush(self) -> None:
        """Add what was kept to the series."""
        added, self._added = self._added, {}
        for series, amount in added.items():
            if amount:
                series.inc(amount)
        observed, self._observed = self._observed, {}
        for series, pending in observed.items():
            for bucket, count in zip(series._buckets, pending, strict=False):
                if count:
                    bucket.inc(count)
            series._sum.inc(pending[-1])

    async def flush_often(self, every_s: float = 1.0) -> None:
        """Flush every `every_s` seconds, until cancelled (and then once more)."""
        try:
            while True:
                await asyncio.sleep(every_s)
                self.flush()
        finally:
            self.flush()


def share_values(directory: Path) -> None:
    """Make prometheus_client keep the values of metrics made from now on in files in
    `directory`, whenever it was imported: what a worker does, before it makes its app.

    It picks its value class once, at import, from the environment; setting both here
    makes where values live this call's business alone, not a matter of import order.
    Process-wide, so only the process calls it, never a constructor.
    """
    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
