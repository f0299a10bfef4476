"""Log output: one JSON object per line (CAFE_LOG_FORMAT=json) or plain text, on stderr.

A log call adds structured fields with `extra={"fields": {...}}`; the JSON format puts
them beside the message, the text format appends them as key=value.
"""

from __future__ import annotations

import functools
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

# The LogRecord attribute that `extra={"fields": ...}` sets.
_FIELDS = "fields"


def utc_timestamp(seconds: float) -> str:
    """The one way the gateway writes a time (log lines, the cafe-received-at header):
    RFC 3339 in UTC to the millisecond, e.g. 2026-11-30T13:41:18.123Z."""
    whole, millis = divmod(int(seconds * 1000), 1000)
    return f"{_utc_second(whole)}.{millis:03d}Z"


# Every request stamps its records: formatting a datetime costs a few microseconds, so
# the part that changes once a second is formatted once a second.
@functools.lru_cache(maxsize=4)
def _utc_second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, the record's fields, and a traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, _FIELDS, None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The usual one-line format, with the record's fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, _FIELDS, None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


class MalformedRequests(logging.Filter):
    """Tames aiohttp's line about a request its parser refused (bad header, bad length,
    a body not in its Content-Encoding).

    aiohttp logs those at ERROR with a traceback whose message quotes the offending
    line, which may hold an x-api-key. Like every client error here it becomes one
    DEBUG line naming only the kind of error. (On the API port gateway/http/listener.py
    answers and logs parser refusals itself; this covers the rest: the metrics port,
    and bodies aiohttp drains after the answer.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, web.RequestPayloadError):
            # Raised while aiohttp drains a body the gateway has already answered 400.
            error = error.__cause__
        if not isinstance(error, HttpProcessingError):
            return True
        record.msg = "refused a malformed request: %s"
        record.args = (type(error).__name__,)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class BootstrapFailures(logging.Filter):
    """Demotes aiokafka's ERROR for each bootstrap server it could not connect to, at
    every try, to DEBUG: the Kafka sink says why itself, once per cause
    (gateway/kafka/sink.py, `_cannot_connect`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Its bootstrap's line (a known broker's, "Unable connect to node ...", stays).
        if not (isinstance(record.msg, str) and record.msg.startswith('Unable connect to "')):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def setup_logging(level: str, log_format: str) -> None:
    """Send every logger's records at `level` and above to stderr in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequests())
    # aiokafka's client logs as "aiokafka" itself.
    logging.getLogger("aiokafka").addFilter(BootstrapFailures())
