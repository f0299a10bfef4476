"""Per-key rate limits under load, for `make bench`: what a limited key costs a request.

At W1 (one record a request, where per-request costs show most), gateway-rs on one core
serves a key without limits, then a key limited to LIMIT requests/s and records/s (more
than it can serve, so every request takes tokens and none is refused), once with the
buckets kept on this host (CAFE_RATELIMIT_STORAGE=local) and once in Redis. Each limited
run is given as a ratio to the unlimited run of the same gateway just before it: only
ratios within a run mean anything on a noisy machine.

Then the limit checks alone, in-process, by kind of key: the figure the W1 runs blur on a
noisy machine. Then one call to each candidate store, over the same Redis: the Lua token
bucket of gateway/limits/fleet.py (redis-py with hiredis) and the `limits` package's
strategies over redis-py, the CPU each call costs this process.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import shutil
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.keys.file import write_keys_file
from gateway.keys.model import ApiKey, mint_key
from gateway.limits.fleet import _BUCKET_SCRIPT, LEASE_SECONDS, FleetBuckets
from gateway.limits.local import RateLimiter
from loadtest.benchlib import RS, Result, delete_topics, parse_args, run_wrk, server, server_env

TARGET = "gateway" + RS
TOPICS = ("activity", "log", "profile", "deadletter")
# Above what one core serves at W1, so every request takes tokens and none is refused.
LIMIT = 20_000
WARM_UP_S = 2
STORE_CALLS = 3000
# Enough W1 requests for leases to be renewed many times (a lease is 2,000 tokens).
CHECKS = 200_000


@dataclass
class LimitRun:
    """One gateway at W1: a key without limits, then a limited key, on one storage."""

    storage: str  # "local" or "redis"
    unlimited: Result
    limited: Result
    redis_calls: int  # cafe_ratelimit_redis_calls_total{result="ok"} over the limited run


@dataclass
class Limits:
    """What the limits run found."""

    runs: list[LimitRun]
    check_us: dict[str, float]  # CPU of the two limit checks of a W1 request, by key
    store_us: dict[str, float]  # CPU per call to each candidate store

    def markdown(self) -> str:
        lines = [
            f"{TARGET}, one process per storage, W1: a key without limits, then a key "
            f"limited to {LIMIT:,} requests/s and records/s (never reached: every request "
            "takes tokens), its buckets on this host (local) or in Redis, taken in leases "
            f"of {LEASE_SECONDS:g} s of the rate. Each limited run is compared with the "
            "unlimited run of the same gateway, just before it.",
            "",
            "| storage | unlimited requests/s | limited requests/s | limited vs unlimited "
            "| limited p50 ms | limited p99 ms | calls to Redis | requests per call |",
            "|---|" + "---:|" * 7,
        ]
        for run in self.runs:
            free, limited = run.unlimited, run.limited
            per_call = f"{limited.requests / run.redis_calls:,.0f}" if run.redis_calls else ""
            ratio = limited.requests_per_s / free.requests_per_s if free.requests_per_s else 0
            lines.append(
                f"| {run.storage} | {free.requests_per_s:,} | {limited.requests_per_s:,} "
                f"| {ratio:.0%} | {limited.p50_ms:.2f} | {limited.p99_ms:.2f} "
                f"| {run.redis_calls:,} | {per_call} |"
            )
        lines += [
            "",
            "The two checks of a W1 request (its request and its one record), in-process, "
            f"{CHECKS:,} requests under a limit they never reach (Redis: served from leases; "
            "a renewal adds a store call, below, per tenth of a second of the rate):",
            "",
        ]
        lines += [f"- {name}: {us:.1f} us" for name, us in self.check_us.items()]
        lines += ["", "One call to the store, CPU of the calling process (sequential calls):", ""]
        lines += [f"- {name}: {us:.0f} us" for name, us in self.store_us.items()]
        return "\n".join(lines)

    def as_report(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, out: Path) -> None:
        """docs/bench/limits.md, which docs/keys-and-limits.md points to."""
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out.mkdir(parents=True, exist_ok=True)
        (out / "limits.md").write_text(f"# Rate limits, {when}\n\n{self.markdown()}\n")


def run(args: argparse.Namespace) -> Limits:
    """The W1 runs on topics of their own (deleted afterwards), then the store calls."""
    run_id = uuid.uuid4().hex[:8]
    topics = {name: f"bench.{run_id}.{name}" for name in TOPICS}
    workdir = Path(tempfile.mkdtemp(prefix="cafe-limits-"))
    free, free_record = mint_key(("analytics-portal",))
    key, limited_record = mint_key(
        ("analytics-portal",), requests_per_second=LIMIT, records_per_second=LIMIT
    )
    write_keys_file(workdir / "keys.json", [free_record, limited_record])
    env = {**server_env(args, workdir / "keys.json", topics), "CAFE_WORKERS": "1"}
    runs = []
    try:
        for storage in (args.redis, "local"):
            label = "local" if storage == "local" else "redis"
            with server(TARGET, {**env, "CAFE_RATELIMIT_STORAGE": storage}) as (port, proc):
                wrk = functools.partial(
                    run_wrk, port, proc, target=TARGET, batch=1, run_id=f"{run_id}{label}"
                )
                # The first run after a start is the slowest: a warm-up, then the
                # unlimited key, then the limited one.
                wrk(key=free, seconds=WARM_UP_S, load="warm")
                unlimited = wrk(key=free, seconds=args.seconds, load="unlimited")
                before = redis_calls(port)
                limited = wrk(key=key, seconds=args.seconds, load=label)
                runs.append(LimitRun(label, unlimited, limited, redis_calls(port) - before))
                print(
                    f"{label:10} W1 {unlimited.requests_per_s:>7,} requests/s unlimited, "
                    f"{limited.requests_per_s:>7,} limited",
                    flush=True,
                )
    finally:
        asyncio.run(delete_topics(args.bootstrap, list(topics.values())))
        shutil.rmtree(workdir, ignore_errors=True)
    return Limits(runs, asyncio.run(check_costs(args.redis)), asyncio.run(store_costs(args.redis)))


async def check_costs(url: str) -> dict[str, float]:
    """CPU microseconds of RateLimiter's two checks per W1 request, by kind of key."""
    free = mint_key(("analytics-portal",))[1]
    # In-process checks run far faster than LIMIT: a rate they never reach.
    fast = 100 * CHECKS
    limited = mint_key(("analytics-portal",), requests_per_second=fast, records_per_second=fast)[1]
    fleet = FleetBuckets(url)
    await fleet.start()
    costs = {}
    try:
        for name, key, limiter in (
            ("no limits", free, RateLimiter(1)),
            ("limited, local", limited, RateLimiter(1)),
            ("limited, Redis", limited, RateLimiter(1, fleet=fleet)),
        ):

            async def check(key: ApiKey = key, limiter: RateLimiter = limiter) -> None:
                await limiter.check_request(key)
                await limiter.check_records(key, 1)

            costs[name] = await cpu_per_call(check, CHECKS)
    finally:
        await fleet.close()
    return costs


def redis_calls(port: int) -> int:
    """cafe_ratelimit_redis_calls_total{result="ok"}, 0 before the first call."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith('cafe_ratelimit_redis_calls_total{result="ok"}'):
                return round(float(line.rpartition(" ")[2]))
    return 0


async def store_costs(url: str) -> dict[str, float]:
    """CPU microseconds per call: the Lua bucket, and `limits`' strategies taking 10."""
    import redis.asyncio
    from limits import RateLimitItemPerSecond
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import (
        FixedWindowRateLimiter,
        MovingWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
    )

    tag = uuid.uuid4().hex[:8]
    costs = {}
    client = redis.asyncio.Redis.from_url(url)
    script = client.register_script(_BUCKET_SCRIPT)
    costs["Lua token bucket (gateway/limits/fleet.py), redis-py"] = await cpu_per_call(
        lambda: script(keys=[f"bench:{tag}:lua"], args=[1e9, 1e9, 10, 10])
    )
    await client.delete(f"bench:{tag}:lua")
    await client.aclose()
    item = RateLimitItemPerSecond(10**9)
    storage = RedisStorage(f"async+{url}", implementation="redispy", key_prefix=f"bench{tag}")
    for strategy in (
        FixedWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
        MovingWindowRateLimiter,
    ):
        limiter = strategy(storage)
        name = f"limits {strategy.__name__}.hit(cost=10), redis-py"
        costs[name] = await cpu_per_call(
            functools.partial(limiter.hit, item, strategy.__name__, cost=10)
        )
    await storage.reset()
    return costs


async def cpu_per_call(call: Callable[[], Awaitable[Any]], calls: int = STORE_CALLS) -> float:
    for _ in range(200):  # connections made, scripts loaded
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


def main() -> None:
    """Only this run, without the rest of bench (`python -m loadtest.limitbench`); its
    figures go to --out/limits.md as well as to `make bench`'s report."""
    args = parse_args()
    limits = run(args)
    print(limits.markdown())
    limits.write(args.out)


if __name__ == "__main__":
    main()
