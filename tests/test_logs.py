"""Log formats: a JSON object per line, or text with the fields appended."""

from __future__ import annotations

import logging
import sys

import orjson

from gateway.logs import JsonFormatter, TextFormatter


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
