"""POST /v1/activity|log|profile: read, parse, validate, produce, await acks, respond."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, NamedTuple

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.config import Settings
from gateway.errors import (
    BadRequest,
    BodyTimeout,
    ClientAborted,
    InvalidEncoding,
    InvalidEnvelope,
    InvalidJson,
    InvalidUtf8,
    PayloadTooLarge,
    SinkUnavailable,
    UnsupportedMediaType,
)
from gateway.http.clientip import kept_client_ip
from gateway.http.context import RequestContext
from gateway.http.metrics import HttpMetrics
from gateway.http.responses import SPOOLED_HEADER, json_response
from gateway.http.state import CONTEXT
from gateway.http.tracecontext import trace_of
from gateway.logs import utc_timestamp
from gateway.schemas import RecordType, records_of
from gateway.sink import Context, Delivery, Record, Rejected, Sink

# An eventId longer than any schema allows is not echoed back: the index names the record.
_MAX_ECHOED_ID = 128


def ingest_handler(
    record_type: RecordType, settings: Settings, sink: Sink, metrics: HttpMetrics
) -> Handler:
    """The handler of POST /v1/<record_type> on the general path."""

    async def handle(request: web.Request) -> web.Response:
        outcome = await ingest(request, request[CONTEXT], record_type, settings, sink, metrics)
        return answer(outcome)

    return handle


class Outcome(NamedTuple):
    """What became of a request's records: how many Kafka (or the spool) took, why each
    of the others was rejected, and where the taken ones are."""

    accepted: int
    rejections: list[dict[str, Any]]
    delivery: Delivery


def answer(outcome: Outcome) -> web.Response:
    """The answer to a request whose records were taken: 200, 207 or 422."""
    accepted, rejections = outcome.accepted, outcome.rejections
    if not rejections:
        response = json_response({"accepted": accepted})
    else:
        body = {"accepted": accepted, "rejected": len(rejections), "rejections": rejections}
        response = json_response(body, status=207 if accepted else 422)
    if outcome.delivery is Delivery.SPOOLED:
        # On this gateway's disk, fsynced; in Kafka later (gateway/spool/sink.py).
        response.headers[SPOOLED_HEADER] = "true"
    return response


async def ingest(
    request: web.Request,
    context: RequestContext,
    record_type: RecordType,
    settings: Settings,
    sink: Sink,
    metrics: HttpMetrics,
) -> Outcome:
    """Take a batch of records of `record_type`: what the steps before decided about the
    request (its key, its limits, its admitted body) is in its context."""
    key = context.key
    if key is None:  # the route is keyed: auth admits none of its requests without one
        raise RuntimeError("an ingest request without a key")

    records = records_of(await _read_json(request, context, settings))
    if context.take_records is not None:
        await context.take_records(len(records))
    metrics.tally.observe(metrics.batch_size(record_type.name), len(records))

    span = context.span  # an OpenTelemetry span, if tracing sampled the request
    checking = None if span is None else span.child("validate records", len(records))
    # The records before `valid` are valid under the version numbered `first`.
    valid, first = record_type.valid_prefix(records)
    # Where the records came from, stored beside each of them: one context per format
    # version among them.
    trace = trace_of(request, context)
    origin = Context(
        key.id,
        kept_client_ip(request, settings, key),
        context.id,
        utc_timestamp(time.time()),
        first,
        trace.traceparent,
        trace.tracestate,
    )
    origins = {first: origin}
    accepted: list[Record] = []
    rejected: list[Rejected] = []
    rejections: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        if index < valid:
            error = None
        else:
            version, error = record_type.judge(record)
            known = origins.get(version)
            if known is None:
                known = origins[version] = origins[first]._replace(schema_version=version)
            origin = known
        if error is None:
            platform = record["productPlatform"]
            if key.may_write(platform):
                accepted.append(Record(record["sessionId"], orjson.dumps(record), origin))
                continue
            error = {
                "pointer": "/productPlatform",
                "message": f"this API key may not write platform {platform!r}",
            }
            reason = "forbidden"
        elif origin.schema_version is None:
            reason = "unknown_format_version"
        else:
            reason = "invalid"
        rejection = {"index": index, "reason": reason, "errors": [error]}
        event_id = record.get("eventId") if isinstance(record, dict) else None
        if isinstance(event_id, str) and len(event_id) <= _MAX_ECHOED_ID:
            rejection["eventId"] = event_id
        rejections.append(rejection)
        rejected.append(_rejected(index, record, reason, error, origin))
    if checking is not None:
        checking.end()
    # One request gives the sink at most CAFE_MAX_BODY_BYTES of records, which its queue
    # is held to take (Settings): re-encoded, a number can come out longer than it was
    # sent (1e15 as 1000000000000000.0), and a request past what the queue takes would
    # get 503 on every try, or hold up the spool's replay. (The Kafka sink may keep less
    # of a large dead letter.) Summing costs 19 us at W500.
    queued = sum(len(r.value) for r in accepted) + sum(len(r.value) for r in rejected)
    if queued > settings.max_body_bytes:
        raise PayloadTooLarge(
            f"the records come to {queued} bytes as stored; the limit is {settings.max_body_bytes}"
        )
    # Counted once the whole batch is known to be answerable: a record that cannot be
    # dead-lettered turns the request into a 400, and one too large as stored into a
    # 413, which count no record.
    for rejection in rejections:
        metrics.records.labels(record_type.name, rejection["reason"]).inc()
    # The parsed records are encoded now: let them go while their memory is still in
    # the CPU's caches, not after Kafka's acknowledgement (at W500, 15-19 us of CPU per
    # record against 16-24 us when they were held; the cycle collector's time was the
    # same either way, about 3 ms a second).
    del records, record

    waiting = None if span is None else span.child("await kafka acknowledgement", len(accepted))
    try:
        # Valid records and dead letters go out together; the answer waits for both.
        delivery = await sink.send(record_type.name, accepted, rejected)
    except SinkUnavailable:
        # Counted, and answered 503 as every error is (problems.answer_error).
        metrics.records.labels(record_type.name, "unavailable").inc(len(accepted))
        raise
    finally:
        if waiting is not None:
            waiting.end()
    metrics.tally.add(metrics.accepted(record_type.name), len(accepted))
    for rejection in rejections:
        metrics.dead_letters.labels(record_type.name, rejection["reason"]).inc()
    if any(rejection["reason"] == "forbidden" for rejection in rejections):
        metrics.auth_failures.labels("platform").inc()
    context.record_counts = (len(accepted), len(rejections))
    return Outcome(len(accepted), rejections, delivery)


_MEDIA_TYPES = frozenset({"application/json", "text/plain"})


async def _read_json(request: web.Request, context: RequestContext, settings: Settings) -> Any:
    """The body parsed as JSON, once its headers say it may be read."""
    _check_body_headers(request, settings.max_body_bytes)
    body = await _receive(request, context, settings)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson words a leading byte order mark as a UTF-8 error, but a BOM is valid
        # UTF-8: it is the JSON that is wrong (RFC 8259 section 8.1 forbids sending one).
        if "UTF-8" in str(exc) and "byte order mark" not in str(exc):
            raise InvalidUtf8(f"the body is not valid UTF-8: {exc}") from None
        raise InvalidJson(f"the body is not JSON: {exc}") from None


def _check_body_headers(request: web.Request, limit: int) -> None:
    """Refuse, before reading it, a body of the wrong media type, charset or size.

    text/plain is what navigator.sendBeacon sends a string as; the body is the same
    JSON.
    """
    media_type = request.content_type
    if media_type not in _MEDIA_TYPES and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"send Content-Type: application/json, not {media_type!r}")
    if request.charset is not None and request.charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"the body must be UTF-8, not {request.charset!r}")
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")


async def _receive(request: web.Request, context: RequestContext, settings: Settings) -> bytearray:
    """The body, decoded, within the body timeout and the limits on size and ratio."""
    limit = settings.max_body_bytes
    reader = context.body
    if reader is None:  # admission admits every POST whose body may be read
        raise RuntimeError("an ingest request's body was not admitted")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding == "identity":
        encoding = ""
    # A body all here already (a small one comes with its headers) needs no timer.
    timer = (
        contextlib.nullcontext()
        if request.content.is_eof()
        else asyncio.timeout(settings.body_timeout_seconds)
    )
    try:
        async with timer:
            body = await reader.read(request.content, limit)
    except TimeoutError:
        raise BodyTimeout(
            f"the body did not arrive within {settings.body_timeout_seconds:g}s"
        ) from None
    except ConnectionResetError:
        raise ClientAborted("the client closed the connection before its body arrived") from None
    except web.RequestPayloadError as exc:
        # aiohttp decodes Content-Encoding as it reads: a body that is not the gzip,
        # deflate, br or zstd it claims to be (or whose chunking breaks off) is the
        # client's fault.
        reason = getattr(exc.__cause__, "message", None) or str(exc)
        if encoding:
            raise InvalidEncoding(f"the body is not valid {encoding}: {reason}") from None
        raise BadRequest(f"the body could not be read: {reason}") from None
    if encoding:
        ratio = len(body) / max(request.content.total_raw_bytes, 1)
        if ratio > settings.max_compression_ratio:
            raise PayloadTooLarge(
                f"the body decompresses {ratio:.0f} times its size; the limit is "
                f"{settings.max_compression_ratio}"
            )
    return body


def _rejected(
    index: int, record: Any, reason: str, error: dict[str, str], origin: Context
) -> Rejected:
    """A rejected record as sent, and why: what the sink keeps as a dead letter."""
    try:
        value = orjson.dumps(record)
    except orjson.JSONEncodeError:
        # orjson parses 1024 levels of nesting but writes only 254. Such a record is
        # garbage (no schema nests past 3), but it cannot be kept as a dead letter, so
        # the whole request is refused rather than the record dropped without trace.
        raise InvalidEnvelope(
            f"records[{index}] is nested too deeply to be stored (orjson writes 254 levels)"
        ) from None
    session = record.get("sessionId") if isinstance(record, dict) else None
    return Rejected(
        value, index, reason, [error], session if isinstance(session, str) else None, origin
    )
