"""The access middleware: X-Request-Id on every answer, and one log line per request."""

from __future__ import annotations

import logging

import pytest
from aiohttp.test_utils import TestClient

from devkit.samples import curl_bodies
from gateway.sink import MemorySink
from tests.support.app import GatewayClient, access_lines, gateway_settings
from tests.support.keys import KeyFile, json_headers


@pytest.fixture
async def client(gateway_client: GatewayClient, key_file: KeyFile) -> TestClient:  # type: ignore[type-arg]
    return await gateway_client(gateway_settings(keys_file=key_file.path), sink=MemorySink())


@pytest.mark.parametrize("path", ["/healthz", "/nowhere", "/v1/ip"])
async def test_every_answer_carries_a_fresh_request_id(client: TestClient, path: str) -> None:  # type: ignore[type-arg]
    first = (await client.get(path)).headers["X-Request-Id"]
    second = (await client.get(path)).headers["X-Request-Id"]
    assert first != second
    assert len(first) == 32


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("trace:4bf92f3577b34da6/00f067aa0ba902b7", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("has space", False),
        ('quote"d', False),
        ("", False),
    ],
)
async def test_a_sane_request_id_from_the_client_is_kept(
    client: TestClient,  # type: ignore[type-arg]
    sent: str,
    kept: bool,
) -> None:
    echoed = (await client.get("/healthz", headers={"X-Request-Id": sent})).headers["X-Request-Id"]
    assert (echoed == sent) is kept
    assert echoed


async def test_one_json_line_per_request_without_the_key(
    client: TestClient,  # type: ignore[type-arg]
    key_file: KeyFile,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    body = curl_bodies()["log"]
    headers = json_headers(key_file.key)
    resp = await client.post("/v1/log", data=body, headers=headers)
    assert resp.status == 200
    resp_401 = await client.post("/v1/log", data=body, headers={"x-api-key": "wrong"})
    assert resp_401.status == 401

    ok, refused = access_lines(caplog)
    assert ok["request_id"] == resp.headers["X-Request-Id"]
    assert ok["message"] == "POST /v1/log 200"
    assert (ok["route"], ok["status"], ok["accepted"], ok["rejected"]) == ("/v1/log", 200, 1, 0)
    assert (ok["bytes_in"], ok["key_id"], ok["client_ip"]) == (
        len(body),
        key_file.record.id,
        "127.0.0.1",
    )
    assert ok["latency_ms"] > 0
    assert ok["level"] == "INFO"
    assert ok["logger"] == "gateway.access"
    assert (refused["status"], refused["code"], refused["key_id"]) == (401, "invalid_api_key", None)
    everything = " ".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert key_file.key not in everything


async def test_the_access_log_can_be_switched_off(
    gateway_client: GatewayClient, key_file: KeyFile, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    settings = gateway_settings(keys_file=key_file.path, access_log=False)
    client = await gateway_client(settings, sink=MemorySink())
    assert (await client.get("/healthz")).status == 200
    assert access_lines(caplog) == []
