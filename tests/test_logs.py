"""Log formats: a JSON object per line, or text with the fields appended."""

from __future__ import annotations

import logging
import sys

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, ContentEncodingError

from gateway.logs import JsonFormatter, MalformedRequests, TextFormatter, utc_timestamp


def make_record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "gateway.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None
    )
    if fields:
        record.fields = fields
    return record


def test_json_lines_hold_the_message_and_the_fields() -> None:
    line = JsonFormatter().format(make_record(status=503, route="/v1/log"))
    assert "\n" not in line
    parsed = orjson.loads(line)
    assert parsed.pop("time").endswith("Z")
    assert parsed == {
        "level": "WARNING",
        "logger": "gateway.x",
        "message": "hello you",
        "status": 503,
        "route": "/v1/log",
    }


def fail() -> None:
    raise ValueError("boom")


def test_json_lines_carry_a_traceback_as_one_field() -> None:
    try:
        fail()
    except ValueError:
        record = logging.LogRecord(
            "gateway.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    parsed = orjson.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in parsed["exception"]


def test_text_lines_append_the_fields() -> None:
    line = TextFormatter().format(make_record(status=503))
    assert line.endswith("WARNING gateway.x: hello you status=503")
    assert TextFormatter().format(make_record()).endswith("gateway.x: hello you")


def parser_error_record(key: str) -> logging.LogRecord:
    """What aiohttp logs when its parser refuses a header line holding `key`."""
    error = BadHttpMessage(f"Invalid header value char: b'x-api-key: {key}\\x01'")
    return logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
        ("10.0.0.1",), (type(error), error, None),
    )  # fmt: skip


def test_parser_errors_become_one_debug_line_without_the_header() -> None:
    logging.getLogger("aiohttp.server").setLevel(logging.DEBUG)
    try:
        record = parser_error_record("cafe_secret")
        assert MalformedRequests().filter(record)
        line = JsonFormatter().format(record)
        assert orjson.loads(line)["message"] == "refused a malformed request: BadHttpMessage"
        assert record.levelno == logging.DEBUG
        assert "cafe_secret" not in line
    finally:
        logging.getLogger("aiohttp.server").setLevel(logging.NOTSET)


def test_undecodable_bodies_drained_after_the_answer_are_tamed_too() -> None:
    cause = ContentEncodingError("Can not decode content-encoding: gzip")
    error = web.RequestPayloadError("Can not decode content-encoding: gzip")
    error.__cause__ = cause
    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Unhandled exception", (),
        (type(error), error, None),
    )  # fmt: skip
    assert not MalformedRequests().filter(record)
    assert record.levelno == logging.DEBUG
    assert record.getMessage() == "refused a malformed request: ContentEncodingError"


def test_parser_errors_are_dropped_below_debug() -> None:
    assert not MalformedRequests().filter(parser_error_record("cafe_secret"))


def test_other_aiohttp_errors_pass_untouched() -> None:
    record = make_record()
    assert MalformedRequests().filter(record)
    assert record.levelno == logging.WARNING


def test_times_are_written_in_utc_to_the_millisecond() -> None:
    assert utc_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert utc_timestamp(1_796_046_078.1239) == "2026-11-30T13:41:18.123Z"
    # Across a second's end, and back to an earlier second: the cached part follows.
    assert utc_timestamp(1_796_046_078.9996) == "2026-11-30T13:41:18.999Z"
    assert utc_timestamp(1_796_046_079.0004) == "2026-11-30T13:41:19.000Z"
    assert utc_timestamp(1_796_046_018.5) == "2026-11-30T13:40:18.500Z"
    assert utc_timestamp(951_782_400.25) == "2000-02-29T00:00:00.250Z"
