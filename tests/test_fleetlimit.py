"""Fleet-wide limits without their Redis: the gateway serves on local limits, and says so.

The limits against a real Redis are in tests/integration/test_fleetlimit.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from devkit.net import free_port
from devkit.samples import curl_bodies
from gateway.config import ConfigError, Settings
from gateway.keys.file import write_keys_file
from gateway.keys.model import mint_key
from gateway.limits.fleet import _without_password
from gateway.sink import MemorySink
from tests.support.app import GatewayClient, gateway_settings
from tests.support.keys import json_headers
from tests.support.scrape import scrape


async def test_without_redis_limits_are_local_and_readyz_metrics_and_log_say_so(
    gateway_client: GatewayClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plaintext, record = mint_key(("analytics-portal",), requests_per_second=2)
    keys_file = tmp_path / "keys.json"
    write_keys_file(keys_file, [record])
    where = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = gateway_settings(keys_file=keys_file, ratelimit_storage=where)
    with caplog.at_level(logging.ERROR, logger="gateway.limits.fleet"):
        client = await gateway_client(settings, sink=MemorySink())
    assert f"rate limits fall back to this host's own: Redis at {where}" in caplog.text

    headers = json_headers(plaintext)
    statuses = []
    for _ in range(3):
        resp = await client.post("/v1/log", data=curl_bodies()["log"], headers=headers)
        statuses.append(resp.status)
    assert statuses == [200, 200, 429]  # the key's 2/s, kept by this host

    ready = await client.get("/readyz")
    assert ready.status == 200
    body = await ready.json()
    assert body["status"] == "ready"
    (degraded,) = body["degraded"]
    assert degraded.startswith(f"rate limits are per host: Redis at {where} does not answer (")
    metrics = await scrape(client)
    assert metrics.value("cafe_ratelimit_redis_down") == 1


async def test_with_local_limits_readyz_names_nothing_degraded(
    gateway_client: GatewayClient, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.json"
    write_keys_file(keys_file, [mint_key(("analytics-portal",))[1]])
    client = await gateway_client(gateway_settings(keys_file=keys_file), sink=MemorySink())
    assert await (await client.get("/readyz")).json() == {"status": "ready"}
    metrics = await scrape(client)
    assert metrics.value("cafe_ratelimit_redis_down") == 0


@pytest.mark.parametrize("value", ["local", "LOCAL", "redis://r:6379/0", "rediss://u:p@r:6380"])
def test_ratelimit_storage_is_local_or_a_redis_url(value: str) -> None:
    settings = Settings.from_env({"CAFE_RATELIMIT_STORAGE": value})
    assert settings.ratelimit_storage == (value if "://" in value else "local")


@pytest.mark.parametrize("value", ["redis", "http://r:6379", "redis://", "memcached://m"])
def test_a_ratelimit_storage_neither_local_nor_redis_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"CAFE_RATELIMIT_STORAGE=.* is neither local nor"):
        Settings.from_env({"CAFE_RATELIMIT_STORAGE": value})


def test_logs_and_readyz_show_a_redis_url_without_its_password() -> None:
    assert _without_password("redis://app:s3cret@r:6379/0") == "redis://app:***@r:6379/0"
    assert _without_password("redis://:s3cret@r:6379") == "redis://:***@r:6379"
    assert _without_password("redis://r:6379/0") == "redis://r:6379/0"
