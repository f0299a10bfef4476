"""JSON response bodies, encoded with orjson."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web


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
