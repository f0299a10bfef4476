"""OpenTelemetry tracing, optional: a span per sampled request, exported over OTLP/HTTP.

With CAFE_TRACE_SAMPLE_RATIO above 0 (and the `otel` extra installed), each request may
get a span of its own (`RequestSpan`), with a child for the validation of its records
and one for the wait on Kafka's acknowledgement. Whether it does is decided by the
ratio on its trace id alone (a request without a trace: at random, at the same ratio):
a client's sampled flag does not force it, so the ratio bounds what tracing costs
whatever the clients send. A sampled request's records name its span as their parent
(gateway/http/tracecontext.py).

Ended spans wait in a bounded queue and a thread of the SDK's sends them in batches:
no request waits on the collector. A collector that is down or slow costs dropped spans,
counted by `cafe_trace_spans_dropped_total`. With the ratio at 0 (the default) the SDK
is never imported.

The SDK's parts are in gateway/otel.py, imported by `Tracing.start` only.

May import: the base (config, otel).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

from gateway.config import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from gateway.otel import RequestSpan, RequestTracer

# At exit, time to send what is queued before the process goes without it.
SHUTDOWN_TIMEOUT_S = 1.0


class TracingMetrics:
    """Tracing's metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.spans_dropped = Counter(
            "cafe_trace_spans_dropped",
            "Spans not sent to the collector: queue_full (the export queue was full), "
            "export_failed (the collector refused them or did not answer)",
            ["reason"],
            registry=registry,
        )
        # Both series from the start, so a rate of either is defined before a first drop.
        self.queue_full = self.spans_dropped.labels("queue_full")
        self.export_failed = self.spans_dropped.labels("export_failed")


class Tracing:
    """The tracer of one process: `start` makes the SDK's provider and its export thread
    (in each worker, after the fork: create_app's cleanup context), `stop` sends what is
    queued and ends them."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        exporter: SpanExporter | None = None,
    ) -> None:
        """`exporter` replaces the OTLP exporter in tests."""
        self.ratio = settings.trace_sample_ratio
        self.endpoint = settings.otlp_endpoint
        self.metrics = TracingMetrics(registry)
        self._exporter = exporter
        self._tracer: RequestTracer | None = None

    def start(self) -> None:
        """Make the provider, the sampler, the export queue and its thread."""
        # Imported here: the SDK is an optional extra, loaded only when tracing is on.
        from gateway.otel import RequestTracer

        metrics = self.metrics
        self._tracer = RequestTracer(
            self.ratio, self.endpoint, metrics.queue_full, metrics.export_failed, self._exporter
        )

    async def stop(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Send what is queued, for up to `timeout_s`, then let the rest go."""
        tracer, self._tracer = self._tracer, None
        if tracer is None:
            return
        # The SDK's shutdown waits up to 30 s for its export thread: it runs in a daemon
        # thread of its own, and the process goes on without it after `timeout_s`.
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down() -> None:
            try:
                tracer.shutdown()
            finally:
                # The loop may be closed by now, if the shutdown took too long.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_done, done)

        threading.Thread(target=shut_down, name="trace-shutdown", daemon=True).start()
        await asyncio.wait([done], timeout=timeout_s)

    def request_span(
        self, method: str, parent: tuple[int, int, int] | None, request_id: str
    ) -> RequestSpan | None:
        """A span for a request, if it is sampled (None before `start`); `parent`: the
        trace id, span id and flags of the client's traceparent, if it sent a valid one."""
        tracer = self._tracer
        if tracer is None:
            return None
        return tracer.request_span(method, parent, request_id)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
