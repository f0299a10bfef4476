"""The listener: the connection cap, and the answers to requests aiohttp's parser refuses.

Over raw sockets, since these are about connections and bytes no HTTP client sends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from devkit.samples import curl_bodies
from gateway.http import access, listener
from gateway.http.responses import SECURITY_HEADERS
from gateway.sink import MemorySink
from tests.support.app import GatewayClient, gateway_settings
from tests.support.keys import KeyFile
from tests.support.rawhttp import connection
from tests.support.scrape import Samples


def post_log(key: str) -> bytes:
    body = curl_bodies()["log"]
    head = (
        f"POST /v1/log HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"x-api-key: {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"


async def serve(gateway_client: GatewayClient, key_file: KeyFile, **settings: Any) -> int:
    settings_ = gateway_settings(keys_file=key_file.path, **settings)
    client = await gateway_client(settings_, sink=MemorySink())
    assert client.port is not None
    return client.port


async def test_connections_past_the_cap_are_refused_and_closed_the_rest_served(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    port = await serve(gateway_client, key_file, max_connections=2)
    async with connection(port) as first, connection(port) as second:
        for conn in (first, second):
            assert (await conn.ask(post_log(key_file.key))).status == 200
        async with connection(port) as third:
            refused = await third.ask(post_log(key_file.key))
            assert refused.status == 503
            assert refused.json()["code"] == "too_many_connections"
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close"
            assert await third.closed_by_server()
        async with connection(port) as probe:
            # A probe past the cap is answered, and its connection closed after.
            healthz = await probe.ask(GET_HEALTHZ)
            assert (healthz.status, healthz.headers["connection"]) == (200, "close")
            assert await probe.closed_by_server()
        # The connections opened first keep being served, kept alive.
        again = await first.ask(post_log(key_file.key))
        assert again.status == 200
        assert "connection" not in again.headers
        first.close()
        await asyncio.sleep(0.1)  # the server sees the close
        async with connection(port) as fresh:
            # Back under the cap: a new connection is served as usual.
            assert (await fresh.ask(post_log(key_file.key))).status == 200
            samples = Samples((await fresh.ask(GET_METRICS)).body.decode())
    assert samples.value("cafe_http_connections_open") == 2  # second, fresh
    assert samples.value("cafe_http_errors_total", code="too_many_connections") == 1


async def test_an_idle_connection_past_the_cap_is_closed_within_a_grace_period(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    # The idle timeout (15 s) would keep it open long past the 5 s wait below.
    port = await serve(gateway_client, key_file, max_connections=1)
    async with connection(port) as first, connection(port) as idle:
        assert await idle.closed_by_server()
        await asyncio.sleep(listener.OVER_CAP_GRACE_SECONDS)
        # The connection within the cap is left alone.
        assert (await first.ask(post_log(key_file.key))).status == 200


async def test_a_refused_request_line_is_a_problem_with_the_usual_headers_and_counts(
    gateway_client: GatewayClient, key_file: KeyFile, caplog: pytest.LogCaptureFixture
) -> None:
    port = await serve(gateway_client, key_file)
    header = f"x-api-key: {key_file.key}\x01\r\n"
    with caplog.at_level(logging.DEBUG, logger="gateway.http.listener"):
        async with connection(port) as conn:
            answer = await conn.ask(
                b"GET /v1/ip HTTP/1.1\r\nHost: t\r\n" + header.encode() + b"\r\n"
            )
            assert await conn.closed_by_server()
    assert answer.status == 400
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["code"] == "malformed_request"
    assert answer.headers["x-request-id"] == problem["requestId"]
    assert {k.lower(): v for k, v in SECURITY_HEADERS.items()}.items() <= answer.headers.items()
    (line,) = [r for r in caplog.records if r.name == "gateway.http.listener"]
    assert line.levelno == logging.DEBUG
    assert line.getMessage() == "refused a malformed request: BadHttpMessage"
    assert line.fields["request_id"] == problem["requestId"]  # type: ignore[attr-defined]
    assert key_file.key not in caplog.text
    async with connection(port) as conn:
        samples = Samples((await conn.ask(GET_METRICS)).body.decode())
    assert samples.value("cafe_http_errors_total", code="malformed_request") == 1
    assert samples.value("cafe_http_requests_total", route="unmatched", status="400") == 1


async def test_an_error_escaping_every_middleware_is_a_500_problem_and_logged(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("a bug in the access middleware")

    # The access middleware is outermost: what it raises, no middleware answers.
    monkeypatch.setattr(access, "_route", broken)
    port = await serve(gateway_client, key_file)
    with caplog.at_level(logging.ERROR, logger="gateway.http.listener"):
        async with connection(port) as conn:
            answer = await conn.ask(GET_HEALTHZ)
    assert answer.status == 500
    problem = answer.json()
    assert problem["code"] == "internal_error"
    assert "access" not in answer.body.decode()  # no internals to the client
    (line,) = [r for r in caplog.records if r.name == "gateway.http.listener"]
    assert line.exc_info is not None and "a bug in the access middleware" in str(line.exc_info[1])
