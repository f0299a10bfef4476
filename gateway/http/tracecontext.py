"""W3C Trace Context: a request's trace, carried into the Kafka headers of its records.

A request's `traceparent` header, if valid, names its trace and the span the client sent
it from. It is written, with the request's `tracestate`, beside each of the request's
records (the `traceparent` and `tracestate` Kafka headers, as OpenTelemetry's Kafka
instrumentations name them), so a consumer continues the trace. A request without a
valid one gets a new trace, so that every record carries one; the access log names the
trace of every request.

With OpenTelemetry tracing on (CAFE_TRACE_SAMPLE_RATIO), `begin_span` gives a sampled
request a span of the gateway's, whose parent is the client's traceparent, if valid;
its records then carry a traceparent naming that span, sampled, so a consumer's span is
a child of the gateway's. An unsampled request's records carry what they would without
tracing.
"""

from __future__ import annotations

import random
import re

from aiohttp import web

from gateway.http.context import RequestContext, TraceContext
from gateway.tracing import Tracing

# version-traceid-parentid-flags, lowercase hex; a later version may add fields after
# them (https://www.w3.org/TR/trace-context/#versioning-of-traceparent).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_INVALID_TRACE = "0" * 32
_INVALID_SPAN = "0" * 16
# A tracestate longer than this is dropped, not cut: the standard lets a vendor drop
# list members past 512 characters, and a cut member would be garbage.
MAX_TRACESTATE_CHARS = 512
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def trace_of(request: web.BaseRequest, context: RequestContext) -> TraceContext:
    """The request's trace, read from its headers once and kept in its context."""
    trace = context.trace
    if trace is None:
        trace = context.trace = _read(request) or new_trace()
    return trace


def begin_span(tracing: Tracing, request: web.BaseRequest, context: RequestContext) -> None:
    """Start the request's span if it is sampled, and set the trace its records carry."""
    received = _read(request)
    parent = None
    if received is not None:
        # As _read wrote it: 00-<trace id>-<span id>-<flags>, lowercase hex.
        text = received.traceparent
        parent = (int(text[3:35], 16), int(text[36:52], 16), int(text[53:55], 16))
    span = tracing.request_span(request.method, parent, context.id)
    if span is None:
        context.trace = received or new_trace()
        return
    context.span = span
    context.trace = TraceContext(span.traceparent, received.tracestate if received else None)


def _read(request: web.BaseRequest) -> TraceContext | None:
    """The request's trace, if it sent a valid traceparent."""
    parent = request.headers.get("traceparent")
    if parent is not None:
        match = _TRACEPARENT.fullmatch(parent.strip(" \t"))
        if match is not None:
            version, trace_id, span_id, flags, more = match.groups()
            # Version ff is forbidden, and version 00 has nothing after the flags.
            if (
                version != "ff"
                and (version != "00" or more is None)
                and trace_id != _INVALID_TRACE
                and span_id != _INVALID_SPAN
            ):
                state = ",".join(request.headers.getall("tracestate", ()))
                keep = 0 < len(state) <= MAX_TRACESTATE_CHARS and _PRINTABLE.fullmatch(state)
                return TraceContext(f"00-{trace_id}-{span_id}-{flags}", state if keep else None)
    return None


def new_trace() -> TraceContext:
    """A trace of its own, for a request that came without one: random ids (never the
    invalid all-zero ones), not sampled."""
    ids = f"{random.getrandbits(192):048x}"
    trace_id, span_id = ids[:32], ids[32:]
    if trace_id == _INVALID_TRACE or span_id == _INVALID_SPAN:
        return new_trace()
    return TraceContext(f"00-{trace_id}-{span_id}-00")
