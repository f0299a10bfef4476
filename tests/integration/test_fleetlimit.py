"""Fleet-wide limits against a real Redis: leases, their bound, and Redis going away.

The bound tested is the one gateway/limits/fleet.py states: over T seconds a key not used
before gets at most burst + rate * T, however many processes serve it; a process holds
fewer than ceil(rate * LEASE_SECONDS) tokens between requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from devkit.net import free_port, free_ports
from gateway.keys.file import update_keys_file
from gateway.keys.model import mint_key
from gateway.limits.fleet import LEASE_SECONDS, FleetBuckets
from gateway.metrics import Metrics
from tests.support.kafka import Broker
from tests.support.keys import KeyFile
from tests.support.served import gateway_env, ready_in_a_row, running
from tests.support.summary import summarise

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def fleet(
    url: str, processes: int, registries: list[CollectorRegistry] | None = None
) -> AsyncIterator[list[FleetBuckets]]:
    """`processes` FleetBuckets on one Redis, as that many gateway processes hold them;
    each counts its calls on a registry of its own, added to `registries`."""
    buckets = []
    for _ in range(processes):
        registry = CollectorRegistry()
        if registries is not None:
            registries.append(registry)
        buckets.append(FleetBuckets(url, Metrics(registry, "test")))
    for each in buckets:
        await each.start()
        assert each.down is None, each.down
    try:
        yield buckets
    finally:
        for each in buckets:
            await each.close()


def new_bucket(rate: float) -> tuple[str, str, float]:
    return (mint_key(("web",))[1].id, "requests", rate)


async def hammer(seconds: float, clients: list[Callable[[], Awaitable[object]]]) -> float:
    """Call each of `clients` over and over, all at once, for `seconds`; the time taken."""
    started = time.monotonic()

    async def repeat(call: Callable[[], Awaitable[object]]) -> None:
        while time.monotonic() < started + seconds:
            await call()
            await asyncio.sleep(0)  # a lease taken without waiting yields nothing

    async with asyncio.TaskGroup() as tasks:
        for call in clients:
            tasks.create_task(repeat(call))
    return time.monotonic() - started


async def test_processes_sharing_a_bucket_get_no_more_than_one_bucket_gives(
    redis_url: str, pytestconfig: pytest.Config
) -> None:
    rate, burst = 50.0, 50.0
    bucket = new_bucket(rate)
    answers: collections.Counter[bool] = collections.Counter()
    registries: list[CollectorRegistry] = []
    async with fleet(redis_url, 3, registries) as processes:

        async def client(limits: FleetBuckets) -> None:
            answers[await limits.take(bucket, burst, 1) == 0.0] += 1

        elapsed = await hammer(2, [functools.partial(client, p) for p in processes for _ in "abcd"])
    calls = sum(
        registry.get_sample_value("cafe_ratelimit_redis_calls_total", {"result": "ok"}) or 0
        for registry in registries
    )
    bound = burst + rate * elapsed
    granted = answers[True]
    summarise(
        pytestconfig,
        f"fleet limits, 3 processes on one Redis, {rate:g}/s: {granted} granted in "
        f"{elapsed:.2f}s (bound {bound:.0f}); {sum(answers.values())} asked, "
        f"{calls:g} calls to Redis",
    )
    assert burst <= granted <= bound
    # Leases cover several requests, and a refused key is refused without asking Redis
    # until its tokens would be back: Redis sees a small share of the requests.
    assert calls < sum(answers.values()) / 10


async def test_a_batch_of_records_takes_what_it_needs_and_waits_for_the_rest(
    redis_url: str,
) -> None:
    records = (mint_key(("web",))[1].id, "records", 100.0)
    async with fleet(redis_url, 1) as (limits,):
        assert await limits.take(records, 500.0, 300) == 0.0
        # 200 left of the burst: 300 more need another second's 100.
        wait_s = await limits.take(records, 500.0, 300)
        assert wait_s == pytest.approx(1.0, abs=0.05)
        assert await limits.take(records, 500.0, 150) == 0.0


def redis_server(port: int) -> subprocess.Popen[bytes]:
    """A Redis of the test's own (one the test may stop), on loopback, keeping nothing."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: apt-get install redis-server"
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def stopped_at_exit(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def until(condition: object, what: str, timeout_s: float = 15) -> None:
    """Wait until `condition()` is true; fail after `timeout_s` (a liveness bound)."""
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not {what} within {timeout_s}s"
        await asyncio.sleep(0.05)


async def test_redis_stopped_means_local_limits_until_it_answers_again() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    metrics = Metrics(CollectorRegistry(), "test")
    down = functools.partial(metrics.registry.get_sample_value, "cafe_ratelimit_redis_down")
    bucket = new_bucket(1000.0)  # a lease of 100
    with stopped_at_exit(redis_server(port)) as server:
        limits = FleetBuckets(url, metrics)
        ping = ["redis-cli", "-p", str(port), "ping"]
        await until(lambda: subprocess.run(ping, capture_output=True).stdout == b"PONG\n", "up")
        await limits.start()
        try:
            assert await limits.take(bucket, 1000.0, 1) == 0.0
            server.kill()
            server.wait()
            # What it holds of the lease it spends; then the renewal fails.
            answers = [await limits.take(bucket, 1000.0, 1) for _ in range(100)]
            assert answers[:99] == [0.0] * 99 and answers[99] is None
            assert limits.down is not None
            assert f"Redis at {url} does not answer" in limits.down
            assert down() == 1
            assert await limits.take(bucket, 1000.0, 1) is None  # not asked while down

            with stopped_at_exit(redis_server(port)):
                await until(lambda: limits.down is None, "back on Redis")
                assert down() == 0
                assert await limits.take(bucket, 1000.0, 1) == 0.0
        finally:
            await limits.close()


async def test_two_gateways_on_one_redis_hold_one_limit_between_them(
    kafka: Broker, key_file: KeyFile, redis_url: str, pytestconfig: pytest.Config
) -> None:
    rate = 20  # requests/s, and a burst of as many
    plaintext, record = mint_key(("analytics-portal",), requests_per_second=rate)
    update_keys_file(key_file.path, lambda keys: [*keys, record])

    async def granted(storage: str) -> tuple[int, float]:
        """2xx answers from two gateways hammered for 3 s with `storage`, and the time."""
        ports = free_ports(2)
        env = {"CAFE_RATELIMIT_STORAGE": storage}
        async with contextlib.AsyncExitStack() as stack:
            sessions = []
            for port in ports:
                await stack.enter_async_context(
                    running(gateway_env(port, kafka, key_file, "fleet", **env))
                )
                http = aiohttp.ClientSession(f"http://127.0.0.1:{port}")
                sessions.append(await stack.enter_async_context(http))
                await ready_in_a_row(http, 1)
            statuses: collections.Counter[int] = collections.Counter()

            async def client(http: aiohttp.ClientSession) -> None:
                async with http.get("/v1/ip", headers={"x-api-key": plaintext}) as resp:
                    statuses[resp.status] += 1

            elapsed = await hammer(3, [functools.partial(client, h) for h in sessions * 4])
        assert set(statuses) == {200, 429}, statuses
        return statuses[200], elapsed

    on_redis, elapsed = await granted(redis_url)
    # The stated bound, leases included (2 processes, each holding < L tokens).
    lease = math.ceil(rate * LEASE_SECONDS)
    bound = rate + rate * elapsed + 2 * lease
    assert rate <= on_redis <= bound
    # Local buckets are per host: the two gateways give the key about twice as much.
    on_local, local_s = await granted("local")
    summarise(
        pytestconfig,
        f"fleet limits, two gateways, a key of {rate}/s: {on_redis} answered 200 in "
        f"{elapsed:.2f}s on Redis (bound {bound:.0f}), {on_local} in {local_s:.2f}s on local",
    )
    assert on_local > rate + rate * local_s + 2 * lease
