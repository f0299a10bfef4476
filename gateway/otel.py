"""The OpenTelemetry SDK's parts of tracing (gateway/tracing.py), imported only when it is on.

The SDK's batch processor holds ended spans in a queue of `MAX_QUEUE_SPANS` and a thread
of its own sends them; it drops the oldest span when a new one finds the queue full, and
says so only in a log line. `_QueueCounter` and `_CountingExporter` count what is dropped,
through the SDK's public interfaces: the queue is kept as a count of the spans handed in
less those the exporter took out.

May import: nothing of the gateway (gateway/tracing.py imports it, and hands it the
counters of `cafe_trace_spans_dropped_total`).
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter

log = logging.getLogger(__name__)

# Spans held for export; past this the oldest is dropped. At 5,000 sampled requests a
# second, 3 spans each, that is a few tenths of a second of them: a collector that is
# away costs spans, never memory.
MAX_QUEUE_SPANS = 2048
# Spans per export request (the SDK's default).
EXPORT_BATCH_SPANS = 512
# How long one export may take, retries included: the export thread, never a request,
# waits this long on a collector that does not answer.
EXPORT_TIMEOUT_S = 2.0
# The bits of a trace id TraceIdRatioBased compares with its bound.
_LOW_64_BITS = (1 << 64) - 1
# How often the export thread sends what is queued (the SDK's default is 5 s; sooner
# keeps the queue short, and a trace shows up sooner).
EXPORT_EVERY_MS = 1000


class RequestTracer:
    """The provider of one process, its sampler and its export queue and thread."""

    def __init__(
        self,
        ratio: float,
        endpoint: str,
        queue_full: Counter,
        export_failed: Counter,
        exporter: SpanExporter | None = None,
    ) -> None:
        if exporter is None:
            # The other OTEL_EXPORTER_OTLP_TRACES_* variables (headers, certificates,
            # compression) the exporter reads itself; the endpoint is CAFE_OTLP_ENDPOINT.
            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)
        # The SDK logs a warning for every span dropped and every failed export: a
        # collector that is down would flood the logs. They are counted instead.
        for name in ("opentelemetry.sdk._shared_internal", "opentelemetry.exporter"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Whether a request is sampled is decided here, before the SDK is asked for
        # anything: asking it for a span that is then not sampled cost 10 us a request
        # (loadtest/tracebench.py). A request with a trace is sampled by its trace id and
        # the ratio, TraceIdRatioBased's rule, whatever its client's flag says; one
        # without, at random at the same ratio (its trace id is yet to be made). What
        # the SDK is asked for is then sampled, and so are its children.
        self._bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        sampler = ALWAYS_ON
        resource = Resource.create({"service.name": "cafe-gateway", "process.pid": os.getpid()})
        self._provider = TracerProvider(sampler=sampler, resource=resource)
        counting = _CountingExporter(exporter, export_failed)
        batches = BatchSpanProcessor(
            counting,
            max_queue_size=MAX_QUEUE_SPANS,
            max_export_batch_size=EXPORT_BATCH_SPANS,
            schedule_delay_millis=EXPORT_EVERY_MS,
        )
        self._provider.add_span_processor(_QueueCounter(batches, counting, queue_full))
        self._tracer = self._provider.get_tracer("cafe-gateway")

    def request_span(
        self, method: str, parent: tuple[int, int, int] | None, request_id: str
    ) -> RequestSpan | None:
        """A span for a request, if it is sampled."""
        context = None
        if parent is None:
            if random.getrandbits(64) >= self._bound:
                return None
        else:
            trace_id, span_id, flags = parent
            if trace_id & _LOW_64_BITS >= self._bound:
                return None
            remote = trace.SpanContext(
                trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags & 1)
            )
            context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        span = self._tracer.start_span(
            method,
            context,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "cafe.request_id": request_id},
        )
        return RequestSpan(self._tracer, span)

    def shutdown(self) -> None:
        """Send what is queued and stop the export thread (blocks)."""
        self._provider.shutdown()


class RequestSpan:
    """A sampled request's span: its children, and its end."""

    __slots__ = ("_context", "_span", "_tracer", "traceparent")

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self._tracer = tracer
        self._span = span
        self._context = trace.set_span_in_context(span)
        ids = span.get_span_context()
        # What the request's records carry: this span as their parent, sampled.
        self.traceparent = f"00-{ids.trace_id:032x}-{ids.span_id:016x}-01"

    def child(self, name: str, records: int) -> trace.Span:
        """A child span, started now; the caller ends it."""
        return self._tracer.start_span(name, self._context, attributes={"cafe.records": records})

    def end(self, method: str, route: str, status: int, counts: tuple[int, int] | None) -> None:
        """End the span with what became of the request."""
        span = self._span
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if counts is not None:
            span.set_attribute("cafe.records.accepted", counts[0])
            span.set_attribute("cafe.records.rejected", counts[1])
        if status >= 500:
            # A server span is in error for a 5xx only (OpenTelemetry's HTTP conventions).
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class _CountingExporter(SpanExporter):
    """An exporter around another that counts the spans it fails to send, and keeps the
    count of spans in the batch processor's queue."""

    def __init__(self, inner: SpanExporter, failed: Counter) -> None:
        self._inner = inner
        self._failed = failed
        self.lock = threading.Lock()
        # Spans handed to the batch processor and not yet taken out of its queue.
        self.queued = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.lock:
            self.queued = max(self.queued - len(spans), 0)
        try:
            result = self._inner.export(spans)
        except Exception:
            log.debug("span export failed", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._failed.inc(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _QueueCounter(SpanProcessor):
    """In front of the batch processor: counts each span that finds its queue full (the
    processor then drops its oldest span, so one span is lost either way)."""

    def __init__(self, inner: SpanProcessor, exporter: _CountingExporter, full: Counter) -> None:
        self._inner = inner
        self._exporter = exporter
        self._full = full

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        exporter = self._exporter
        with exporter.lock:
            full = exporter.queued >= MAX_QUEUE_SPANS
            if not full:
                exporter.queued += 1
        if full:
            self._full.inc()
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
