"""JSON response bodies, encoded with orjson, and the headers every answer carries."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

# On every answer. The API serves JSON to programs: nothing in it may be sniffed as
# another type, framed, cached by a shared cache, or given a referrer.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

# Says the answer's records are in the gateway's spool, not yet in Kafka.
SPOOLED_HEADER = "X-Cafe-Spooled"


def json_response(
    data: object,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> web.Response:
    """A response whose body is `data` as compact JSON."""
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type=content_type
    )
