"""`cafe-gateway serve` as a user runs it: a process, a socket, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.conftest import Broker
from tests.integration.tcp_proxy import free_port
from tests.keys import KeyFile
from tests.spec_samples import curl_bodies

pytestmark = pytest.mark.integration


async def serve(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def ready_in_a_row(http: aiohttp.ClientSession, times: int) -> None:
    """Wait until /readyz answers 200 `times` times in a row, each on a new connection
    (so that, with several workers, every one of them is asked); fail after 30 s."""
    deadline = time.monotonic() + 30
    good = 0
    while good < times:
        assert time.monotonic() < deadline, f"not ready {times} times in a row within 30s"
        try:
            async with http.get("/readyz", headers={"Connection": "close"}) as resp:
                good = good + 1 if resp.status == 200 else 0
        except aiohttp.ClientConnectionError:
            good = 0
        await asyncio.sleep(0.1)


@pytest.fixture
async def prefix(kafka: Broker) -> AsyncIterator[str]:
    """A topic prefix for one test; its topics are deleted afterwards."""
    prefix = f"serve.{uuid.uuid4().hex[:8]}"
    yield prefix
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix + ".")]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


def gateway_env(
    port: int, kafka: Broker, key_file: KeyFile, prefix: str, **more: str
) -> dict[str, str]:
    """A serve environment on `port` whose topics all start with `prefix`."""
    return {
        "CAFE_PORT": str(port),
        "CAFE_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "CAFE_KEYS_FILE": str(key_file.path),
        **{f"CAFE_TOPIC_{t.upper()}": f"{prefix}.{t}" for t in ("activity", "log", "profile")},
        "CAFE_TOPIC_DEADLETTER": f"{prefix}.deadletter",
        **more,
    }


async def test_serve_becomes_ready_over_http_and_exits_0_on_sigterm(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    port = free_port()
    proc = await serve(gateway_env(port, kafka, key_file, prefix))
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await ready_in_a_row(http, 1)
            async with http.get("/healthz") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ok"}
            async with http.get("/nope") as resp:
                assert resp.status == 404
                assert (await resp.json(content_type=None))["code"] == "not_found"
            async with http.get("/v1/ip", headers={"x-api-key": key_file.key}) as resp:
                assert await resp.json() == {"ip": "127.0.0.1"}
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, output.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_refuses_to_start_without_keys() -> None:
    proc = await serve({"CAFE_KEYS_FILE": ""})
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2
    assert "set CAFE_KEYS_FILE" in output.decode()


async def test_serve_refuses_a_keys_file_that_does_not_exist(tmp_path: Path) -> None:
    proc = await serve({"CAFE_KEYS_FILE": str(tmp_path / "absent.json"), "CAFE_PORT": "0"})
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode != 0
    assert "absent.json does not exist" in output.decode()


async def test_workers_refuse_a_keys_file_that_does_not_exist(tmp_path: Path) -> None:
    env = {"CAFE_KEYS_FILE": str(tmp_path / "absent.json"), "CAFE_WORKERS": "2"}
    proc = await serve({**env, "CAFE_PORT": str(free_port())})
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 1
    assert "absent.json does not exist" in output.decode()


async def test_serve_refuses_a_bad_setting_naming_the_variable() -> None:
    proc = await serve({"CAFE_PORT": "eighty"})
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2
    assert "CAFE_PORT='eighty' is not an integer" in output.decode()


async def test_two_workers_share_one_port_and_stop_together(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    port = free_port()
    proc = await serve(gateway_env(port, kafka, key_file, prefix, CAFE_WORKERS="2"))
    try:
        parent = psutil.Process(proc.pid)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await ready_in_a_row(http, 10)
            workers = parent.children()
            assert len(workers) == 2
            body = curl_bodies()["log"]
            headers = {"x-api-key": key_file.key, "Content-Type": "application/json"}
            for _ in range(10):
                async with http.post("/v1/log", data=body, headers=headers) as resp:
                    assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, output.decode(errors="replace")
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
