"""W3C Trace Context: a request's trace, carried into the Kafka headers of its records.

A request's `traceparent` header, if valid, names its trace and the span the client sent
it from. It is written, with the request's `tracestate`, beside each of the request's
records (the `traceparent` and `tracestate` Kafka headers, as OpenTelemetry's Kafka
instrumentations name them), so a consumer continues the trace. A request without a
valid one gets a new trace, so that every record carries one; the access log names the
trace of every request.
"""

from __future__ import annotations

import random
import re

from aiohttp import web

from gateway.http.context import RequestContext, TraceContext

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
        trace = context.trace = _read(request)
    return trace


def _read(request: web.BaseRequest) -> TraceContext:
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
    return new_trace()


def new_trace() -> TraceContext:
    """A trace of its own, for a request that came without one: random ids (never the
    invalid all-zero ones), not sampled."""
    trace_id = random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    return TraceContext(f"00-{trace_id:032x}-{span_id:016x}-00")
