"""POST /v1/activity|log|profile: read, parse, validate, produce, await acks, respond."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

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
from gateway.http.clientip import client_ip
from gateway.http.context import RequestContext
from gateway.http.metrics import HttpMetrics
from gateway.http.responses import SPOOLED_HEADER, json_response
from gateway.http.state import CONTEXT
from gateway.keys.model import ApiKey
from gateway.logs import utc_timestamp
from gateway.schemas import SCHEMA_VERSION, RecordType, records_of
from gateway.sink import Message, Sink

# A dead letter keeps at most this much of its record (and says so in its headers):
# a rejected record may be as large as the body, past what Kafka takes in one message
# (1 MiB by default). The largest record the schemas accept is smaller (354 KB of JSON:
# an activity with every string at its bound, in six-byte escapes), so a record of a
# size they allow is always kept whole.
DEAD_LETTER_MAX_BYTES = 512 * 1024
# Its cafe-errors header keeps at most this many characters of each text of an error: a
# message may quote what the client sent (the names of unknown properties, which may be
# as large as the body). So a dead letter weighs at most its value, a key of 128
# characters (512 bytes), headers of under 1 KiB besides and an error's two texts of at
# most 1,060 characters, 6 bytes each as JSON escapes: under 530 KiB, within the 1 MiB
# Kafka takes in one message (gateway/kafka/sink.py), whatever the client sent.
DEAD_LETTER_MAX_ERROR_CHARS = 1024
# An eventId longer than any schema allows is not echoed back: the index names the record.
_MAX_ECHOED_ID = 128
_TRUNCATED = ("cafe-truncated", b"true")


def ingest_handler(
    record_type: RecordType, settings: Settings, sink: Sink, metrics: HttpMetrics
) -> Handler:
    """The handler of POST /v1/<record_type>."""

    async def handle(request: web.Request) -> web.Response:
        return await ingest(request, record_type, settings, sink, metrics)

    return handle


async def ingest(
    request: web.Request,
    record_type: RecordType,
    settings: Settings,
    sink: Sink,
    metrics: HttpMetrics,
) -> web.Response:
    """Accept a batch of records of `record_type`: what the middlewares decided about
    the request (its key, its limits, its admitted body) is in its context."""
    context = request[CONTEXT]
    key = context.key
    if key is None:  # the route is keyed: auth admits none of its requests without one
        raise RuntimeError("an ingest request without a key")

    records = records_of(await _read_json(request, context, settings))
    if context.take_records is not None:
        await context.take_records(len(records))
    metrics.records_per_request.labels(record_type.name).observe(len(records))

    headers = _kafka_headers(request, record_type, key, context.id, settings)
    accepted: list[Message] = []
    dead: list[Message] = []
    rejections: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        error = record_type.check(record)
        if error is None:
            platform = record["productPlatform"]
            if key.may_write(platform):
                accepted.append(
                    Message(record["sessionId"].encode(), orjson.dumps(record), headers)
                )
                continue
            error = {
                "pointer": "/productPlatform",
                "message": f"this API key may not write platform {platform!r}",
            }
            reason = "forbidden"
        else:
            reason = "invalid"
        rejection = {"index": index, "reason": reason, "errors": [error]}
        event_id = record.get("eventId") if isinstance(record, dict) else None
        if isinstance(event_id, str) and len(event_id) <= _MAX_ECHOED_ID:
            rejection["eventId"] = event_id
        rejections.append(rejection)
        dead.append(_dead_letter(index, record, headers, reason, [error], record_type))
    # One request queues at most CAFE_MAX_BODY_BYTES of records, which the queue is held
    # to take (Settings.from_env): re-encoded, a number can come out longer than it was
    # sent (1e15 as 1000000000000000.0), and a request past what the queue takes would
    # get 503 on every try, or hold up the spool's replay. Summing costs 19 us at W500.
    queued = sum(len(m.value) for m in accepted) + sum(len(m.value) for m in dead)
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

    try:
        # Valid records and dead letters go out together; the answer waits for both.
        spooled = await sink.send(record_type.name, accepted, dead)
    except SinkUnavailable:
        # Counted, and answered 503 by the error middleware.
        metrics.records.labels(record_type.name, "unavailable").inc(len(accepted))
        raise
    metrics.records.labels(record_type.name, "accepted").inc(len(accepted))
    for rejection in rejections:
        metrics.dead_letters.labels(record_type.name, rejection["reason"]).inc()
    truncated = sum(1 for message in dead if message.headers and _TRUNCATED in message.headers)
    if truncated:
        metrics.dead_letters_truncated.labels(record_type.name).inc(truncated)
    if any(rejection["reason"] == "forbidden" for rejection in rejections):
        metrics.auth_failures.labels("platform").inc()
    context.record_counts = (len(accepted), len(rejections))

    if not rejections:
        response = json_response({"accepted": len(accepted)})
    else:
        body = {"accepted": len(accepted), "rejected": len(rejections), "rejections": rejections}
        response = json_response(body, status=207 if accepted else 422)
    if spooled:
        # On this gateway's disk, fsynced; in Kafka later (gateway/spool/sink.py).
        response.headers[SPOOLED_HEADER] = "true"
    return response


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


def _kafka_headers(
    request: web.Request,
    record_type: RecordType,
    key: ApiKey,
    request_id: str,
    settings: Settings,
) -> list[tuple[str, bytes]]:
    """What every message of this request carries besides the record itself."""
    received_at = utc_timestamp(time.time())
    return [
        ("cafe-key-id", key.id.encode()),
        ("cafe-client-ip", client_ip(request, settings).encode()),
        ("cafe-received-at", received_at.encode()),
        ("cafe-request-id", request_id.encode()),
        ("cafe-schema", record_type.name.encode()),
        ("cafe-schema-version", str(SCHEMA_VERSION).encode()),
    ]


def _dead_letter(
    index: int,
    record: Any,
    headers: list[tuple[str, bytes]],
    reason: str,
    errors: list[dict[str, str]],
    record_type: RecordType,
) -> Message:
    """A rejected record as sent, with why it was rejected in its headers."""
    try:
        value = orjson.dumps(record)
    except orjson.JSONEncodeError:
        # orjson parses 1024 levels of nesting but writes only 254. Such a record is
        # garbage (no schema nests past 3), but it cannot be kept as a dead letter, so
        # the whole request is refused rather than the record dropped without trace.
        raise InvalidEnvelope(
            f"records[{index}] is nested too deeply to be stored (orjson writes 254 levels)"
        ) from None
    reject_headers = [
        *headers,
        ("cafe-record-index", str(index).encode()),
        ("cafe-reject-reason", reason.encode()),
        ("cafe-errors", orjson.dumps([_cut_texts(error) for error in errors])),
    ]
    session = record.get("sessionId") if isinstance(record, dict) else None
    key = None
    if isinstance(session, str):
        limit = record_type.max_key_length
        if 0 < len(session) <= limit:
            key = session.encode()
        else:
            why = f"sessionId is {len(session)} characters; a key is 1 to {limit}"
            reject_headers.append(("cafe-key-omitted", why.encode()))
    if len(value) > DEAD_LETTER_MAX_BYTES:
        reject_headers += [
            ("cafe-original-bytes", str(len(value)).encode()),
            ("cafe-original-sha256", hashlib.sha256(value).hexdigest().encode()),
            _TRUNCATED,
        ]
        value = _utf8_prefix(value, DEAD_LETTER_MAX_BYTES)
    return Message(key, value, reject_headers)


def _cut_texts(error: dict[str, str]) -> dict[str, str]:
    """`error` with each text longer than DEAD_LETTER_MAX_ERROR_CHARS cut, saying so."""
    limit = DEAD_LETTER_MAX_ERROR_CHARS
    return {
        name: text if len(text) <= limit else f"{text[:limit]}... (cut from {len(text)} characters)"
        for name, text in error.items()
    }


def _utf8_prefix(text: bytes, size: int) -> bytes:
    """The longest prefix of UTF-8 `text` of at most `size` bytes that ends on a whole character."""
    end = size
    while end > 0 and text[end] & 0xC0 == 0x80:  # a continuation byte starts no character
        end -= 1
    return text[:end]
