"""The app's health endpoints and error rendering, with an in-memory sink."""

from __future__ import annotations

import dataclasses
import os

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.config import KafkaSettings, Settings
from gateway.http import state
from gateway.http.responses import SECURITY_HEADERS
from gateway.http.state import DRAINING
from gateway.sink import MemorySink
from tests.support.app import VALIDATOR, AiohttpClient, GatewayClient, gateway_settings

SETTINGS = gateway_settings(kafka=KafkaSettings(bootstrap="kafka.invalid:9092"))


async def test_the_gateways_the_suite_serves_validate_with_cafe_validator(
    gateway_client: GatewayClient,
) -> None:
    """.ci/run runs the suite once per validator: CAFE_VALIDATOR must reach the apps."""
    assert (os.environ.get("CAFE_VALIDATOR") or Settings().validator) == VALIDATOR
    client = await gateway_client(SETTINGS, sink=MemorySink())
    assert client.app is not None
    assert client.app[state.SETTINGS].validator == VALIDATOR


async def test_a_gateway_validating_with_another_validator_is_not_served(
    aiohttp_client: AiohttpClient,
) -> None:
    other = "jsonschema-rs" if VALIDATOR == "fastjsonschema" else "fastjsonschema"
    app = create_app(dataclasses.replace(SETTINGS, validator=other), sink=MemorySink())
    with pytest.raises(AssertionError, match="not the suite's"):
        await aiohttp_client(app)


async def test_healthz_answers_even_when_the_sink_is_not_ready(
    gateway_client: GatewayClient,
) -> None:
    client = await gateway_client(SETTINGS, sink=MemorySink(ready=False))
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_readyz_follows_the_sink(gateway_client: GatewayClient) -> None:
    sink = MemorySink(ready=False)
    client = await gateway_client(SETTINGS, sink=sink)

    resp = await client.get("/readyz")
    assert resp.status == 503
    assert resp.content_type == "application/problem+json"
    assert resp.headers["Retry-After"] == "1"
    assert await resp.json(content_type=None) == {
        "type": "about:blank",
        "title": "Service Unavailable",
        "status": 503,
        "code": "not_ready",
        # The sink says why it is not ready, in its own words.
        "detail": await sink.unavailable(),
        # What to quote to an operator: the id of the log lines about this request.
        "requestId": resp.headers["X-Request-Id"],
    }

    sink.is_ready = True
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready"}


async def test_readyz_is_503_once_draining_begins(aiohttp_client: AiohttpClient) -> None:
    app = create_app(SETTINGS, sink=MemorySink())
    client = await aiohttp_client(app)
    assert (await client.get("/readyz")).status == 200
    app[DRAINING].set()
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json(content_type=None)
    assert (body["code"], body["detail"]) == ("not_ready", "the gateway is shutting down")
    # Still alive, and still serving while it drains, each answer closing its connection.
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert resp.headers["Connection"] == "close"


async def test_unknown_route_is_a_404_problem(gateway_client: GatewayClient) -> None:
    client = await gateway_client(SETTINGS, sink=MemorySink())
    resp = await client.get("/nothing-here")
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    body = await resp.json(content_type=None)
    assert (body["status"], body["code"], body["title"]) == (404, "not_found", "Not Found")


async def test_wrong_method_is_a_405_problem_that_keeps_allow(
    gateway_client: GatewayClient,
) -> None:
    client = await gateway_client(SETTINGS, sink=MemorySink())
    resp = await client.post("/healthz")
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET,HEAD"
    assert (await resp.json(content_type=None))["code"] == "method_not_allowed"


async def test_an_unexpected_error_is_a_500_problem_without_internals(
    aiohttp_client: AiohttpClient,
) -> None:
    app = create_app(SETTINGS, sink=MemorySink())

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app.router.add_get("/broken", broken)
    client = await aiohttp_client(app)
    resp = await client.get("/broken")
    assert resp.status == 500
    body = await resp.json(content_type=None)
    assert body["code"] == "internal_error"
    assert "secret" not in body["detail"]


async def test_the_sink_is_started_and_closed_with_the_app(gateway_client: GatewayClient) -> None:
    sink = MemorySink()
    client = await gateway_client(SETTINGS, sink=sink)
    assert sink.started and not sink.closed
    await client.close()
    assert sink.closed


async def test_unknown_v1_routes_need_a_key_too(gateway_client: GatewayClient) -> None:
    # Without a key, the caller learns nothing about which /v1 routes exist.
    client = await gateway_client(SETTINGS, sink=MemorySink())
    resp = await client.get("/v1/nothing-here")
    assert resp.status == 401
    assert (await resp.json(content_type=None))["code"] == "missing_api_key"


@pytest.mark.parametrize("path", ["/healthz", "/nothing-here", "/v1/ip"])
async def test_every_answer_carries_the_security_headers(
    gateway_client: GatewayClient, path: str
) -> None:
    client = await gateway_client(SETTINGS, sink=MemorySink())
    resp = await client.get(path)
    assert {k: resp.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS
