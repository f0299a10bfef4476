"""Request errors as data: each class carries its status, code and how it is answered.

    GatewayError                 status + stable machine-readable `code`
    ├── BadRequest               400
    │   ├── MalformedRequest     400 malformed_request  (not HTTP/1.1: refused by the parser)
    │   ├── InvalidJson          400 invalid_json       (not JSON at all)
    │   ├── InvalidUtf8          400 invalid_utf8       (bytes that are not UTF-8)
    │   ├── InvalidEncoding      400 invalid_encoding   (not the Content-Encoding it claims)
    │   └── InvalidEnvelope      400 invalid_envelope   (JSON, but not {"records": [1..500]})
    ├── Unauthorized             401
    │   ├── MissingApiKey        401 missing_api_key
    │   └── InvalidApiKey        401 invalid_api_key    (unknown or disabled)
    ├── Forbidden                403
    │   ├── OriginNotAllowed     403 origin_not_allowed (a web page's origin the key does not list)
    │   ├── NotABrowserKey       403 not_a_browser_key  (?api_key= with a key not marked browser)
    │   └── WriteOnlyKey         403 write_only_key     (a browser key used to read)
    ├── BodyTimeout              408 body_timeout       (the body came too slowly)
    ├── ClientAborted            499 client_aborted     (the client left mid-body; no one hears)
    ├── PayloadTooLarge          413 payload_too_large
    │   └── RecordTooLarge       413 record_too_large   (a record Kafka refuses as too large)
    ├── UriTooLong               414 uri_too_long       (refused by the parser)
    ├── RateLimited              429 rate_limited       (over the key's requests/s or records/s)
    ├── HeaderTooLarge           431 header_too_large   (one header line; refused by the parser)
    ├── TooManyHeaders           431 too_many_headers   (refused by the parser)
    ├── UnsupportedMediaType     415 unsupported_media_type
    ├── Overloaded               503 overloaded         (too much work in progress: shed)
    ├── TooManyConnections       503 too_many_connections (a connection past the cap)
    ├── NotReady                 503 not_ready          (the sink cannot store, draining)
    └── SinkUnavailable          503 sink_unavailable   (the sink did not store the records)
        ├── KafkaUnavailable     503 kafka_unavailable  (not acknowledged by Kafka in time)
        ├── SpoolFull            503 spool_full         (Kafka is away and the spool is full)
        └── SpoolUnavailable     503 spool_unavailable  (Kafka is away and the disk fails)

One middleware renders them (`gateway.http.problems`), and aiohttp's own HTTP errors
(404, 405, 413, ...) the same way, and so are requests its HTTP parser refuses
(gateway/http/listener.py maps them to the parser's classes above): every error a client
sees has one shape, `application/problem+json` with `code` and `detail`, and is counted
by code in `cafe_http_errors_total`. Nothing here knows HTTP beyond the status numbers.
"""

from __future__ import annotations

import logging
from typing import ClassVar


class GatewayError(Exception):
    """An error a client is told about: its HTTP status and stable `code` are class data."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # Seconds a client should wait before retrying; None where retrying does not help.
    retry_after: ClassVar[int | None] = None
    # For errors raised before the body is read: close the connection after answering,
    # rather than read and throw away a body that may be megabytes long.
    close_connection: ClassVar[bool] = False
    # None: WARNING for 5xx (the operator's concern), DEBUG for 4xx (the client's).
    log_level: ClassVar[int | None] = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def headers(self) -> dict[str, str]:
        """Response headers that go with this error."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class MalformedRequest(BadRequest):
    code = "malformed_request"


class InvalidJson(BadRequest):
    code = "invalid_json"


class InvalidUtf8(BadRequest):
    code = "invalid_utf8"


class InvalidEncoding(BadRequest):
    code = "invalid_encoding"
    # The rest of the body cannot be decoded either: do not try to read it.
    close_connection = True


class InvalidEnvelope(BadRequest):
    code = "invalid_envelope"


class Unauthorized(GatewayError):
    """A family: what is raised is one of its kinds, each with a code of its own."""

    status = 401

    def headers(self) -> dict[str, str]:
        # RFC 9110 asks every 401 to name how to authenticate.
        return {"WWW-Authenticate": 'ApiKey header="x-api-key"'}


class MissingApiKey(Unauthorized):
    code = "missing_api_key"


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"


class BodyTimeout(GatewayError):
    status = 408
    code = "body_timeout"
    close_connection = True


class ClientAborted(GatewayError):
    """The client closed the connection while sending its body: its fault, not ours.

    No one is left to read the answer; 499 is what nginx logs for this ("client closed
    request"), kept apart from 4xx answers a client sees and from 5xx, so that clients
    leaving a page do not set off server-error alerts.
    """

    status = 499
    code = "client_aborted"


class Forbidden(GatewayError):
    """A family: what is raised is one of its kinds, each with a code of its own."""

    status = 403


class OriginNotAllowed(Forbidden):
    code = "origin_not_allowed"


class NotABrowserKey(Forbidden):
    code = "not_a_browser_key"


class WriteOnlyKey(Forbidden):
    code = "write_only_key"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"
    close_connection = True


class RecordTooLarge(PayloadTooLarge):
    """A record larger than Kafka takes: the producer's request limit, or the topic's."""

    code = "record_too_large"
    # Raised once the body has been read: the connection can serve the next request.
    close_connection = False


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "unsupported_media_type"


class UriTooLong(GatewayError):
    status = 414
    code = "uri_too_long"


class HeaderTooLarge(GatewayError):
    status = 431
    code = "header_too_large"


class TooManyHeaders(GatewayError):
    status = 431
    code = "too_many_headers"


class RateLimited(GatewayError):
    """The key is over one of its rate limits; Retry-After says when there is room."""

    status = 429
    code = "rate_limited"
    # Refused unread: reading the body would spend what the limit is there to save.
    close_connection = True

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.wait_s = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.wait_s)}


class NotReady(GatewayError):
    """The gateway cannot accept records now (the sink cannot store them, or shutting down)."""

    status = 503
    code = "not_ready"
    retry_after = 1
    # Asked by every readiness probe while Kafka is away; the sink logs the cause.
    log_level = logging.INFO


class Overloaded(GatewayError):
    """Too many request bytes are in progress; this one is shed unread."""

    status = 503
    code = "overloaded"
    retry_after = 1
    close_connection = True
    # Shedding is the gateway working as meant, thousands of times a second in a flood:
    # a line each would cost more than the shedding itself.
    log_level = logging.DEBUG


class TooManyConnections(Overloaded):
    """A POST on a connection opened past CAFE_MAX_CONNECTIONS; shed unread."""

    code = "too_many_connections"


class SinkUnavailable(GatewayError):
    """A family: the sink did not store the records; each sink raises a kind of its own,
    so a client (and the error counter) can tell which store failed. Raised as it is by
    a sink with no kind of its own (a test's `MemorySink`)."""

    status = 503
    code = "sink_unavailable"
    retry_after = 1
    # Where known, which of the messages sent the store did take (the spool's replay
    # sends only the others again).
    stored: tuple[bool, ...] | None = None


class KafkaUnavailable(SinkUnavailable):
    """Records could not be handed to Kafka or were not acknowledged in time."""

    code = "kafka_unavailable"


class KafkaTopicMissing(KafkaUnavailable):
    """The record type's topic does not exist, and the gateway may not (or is told not
    to) create it."""

    code = "kafka_topic_missing"


class KafkaForbidden(KafkaUnavailable):
    """Kafka refuses the gateway's principal the right to write to the type's topic."""

    code = "kafka_forbidden"


class SpoolFull(SinkUnavailable):
    """Kafka did not acknowledge in time, and the spool holds CAFE_SPOOL_MAX_BYTES."""

    code = "spool_full"


class SpoolUnavailable(SinkUnavailable):
    """Kafka did not acknowledge in time, and the spool could not write to its disk."""

    code = "spool_unavailable"
