"""The `keys` commands run while a gateway serves: each change is in force within 2 s.

One real `cafe-gateway serve` process; the CLI runs as users run it, a process of its
own writing the keys file the gateway watches, and the gateway is asked over HTTP until
it answers as the change says, without a restart.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import pytest

from devkit.net import free_port
from devkit.samples import sample_api_key
from gateway.keys.file import read_keys_file, read_last_used
from gateway.keys.model import utc_text
from tests.support.kafka import Broker
from tests.support.keys import KeyFile
from tests.support.scrape import scrape
from tests.support.served import gateway_env, serving

pytestmark = pytest.mark.integration

SPEC_SAMPLE_KEY = sample_api_key()
# How long a change may take to be in force once the command has returned: the gateway
# polls the keys file once a second.
IN_FORCE_S = 2.0


async def cafe_keys(key_file: KeyFile, *args: str, stdin: str | None = None) -> str:
    """Run `cafe-gateway keys ARGS` as a process; returns its stdout, failing on non-zero."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "keys", *args, "--keys-file", str(key_file.path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate(None if stdin is None else stdin.encode())
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def status(http: aiohttp.ClientSession, key: str) -> int:
    """The status of one cheap authenticated request with `key`."""
    async with http.get("/v1/ip", headers={"x-api-key": key}) as resp:
        return resp.status


async def in_force(
    http: aiohttp.ClientSession, key: str, expected: int, *, pairs: bool = False
) -> float:
    """Ask with `key` until the answer is `expected` (with `pairs`, until one of two quick
    requests is); returns the seconds it took, failing past IN_FORCE_S."""
    started = time.monotonic()
    while True:
        answers = [await status(http, key) for _ in range(2 if pairs else 1)]
        took = time.monotonic() - started
        if expected in answers:
            return took
        assert took < IN_FORCE_S, f"still {answers} after {took:.2f}s, not {expected}"
        await asyncio.sleep(0.05)


async def test_key_changes_are_in_force_within_2s_without_a_restart(
    kafka: Broker,
    key_file: KeyFile,
    prefix: str,
) -> None:
    async with serving(gateway_env(free_port(), kafka, key_file, prefix)) as (gateway, http):
        assert await status(http, SPEC_SAMPLE_KEY) == 401

        key_id = await cafe_keys(
            key_file, "import", "--platform", "analytics-portal", stdin=SPEC_SAMPLE_KEY + "\n"
        )
        await in_force(http, SPEC_SAMPLE_KEY, 200)

        await cafe_keys(key_file, "disable", key_id)
        await in_force(http, SPEC_SAMPLE_KEY, 401)
        await cafe_keys(key_file, "enable", key_id)
        await in_force(http, SPEC_SAMPLE_KEY, 200)

        # A limit of 1 request/s (a burst of 1): of two quick requests, one is refused.
        await cafe_keys(key_file, "update", key_id, "--requests-per-second", "1")
        await in_force(http, SPEC_SAMPLE_KEY, 429, pairs=True)
        await cafe_keys(key_file, "update", key_id, "--requests-per-second", "none")
        await asyncio.sleep(IN_FORCE_S)
        assert [await status(http, SPEC_SAMPLE_KEY) for _ in range(5)] == [200] * 5

        successor = await cafe_keys(key_file, "rotate", key_id, "--grace", "2s")
        rotated = time.time()
        await in_force(http, successor, 200)
        (old,) = [k for k in read_keys_file(key_file.path) if k.id == key_id]
        assert old.expires_epoch is not None
        assert rotated - 1 <= old.expires_epoch <= rotated + 2
        # The old key works until its expiry (give or take the clocks' 0.2 s), then not.
        while time.time() < old.expires_epoch - 0.2:
            assert await status(http, SPEC_SAMPLE_KEY) == 200
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, old.expires_epoch - time.time()))
        assert await status(http, SPEC_SAMPLE_KEY) == 401
        assert await status(http, successor) == 200

        samples = await scrape(http)
        assert samples.value("cafe_auth_failures_total", reason="expired") == 1
        await gateway.stop()

    # Saved at shutdown: the keys it admitted, stamped then.
    last_used = read_last_used(key_file.path)
    successor_id = read_keys_file(key_file.path)[-1].id
    assert set(last_used) == {key_id, successor_id}
    assert min(last_used.values()) >= utc_text(rotated)
