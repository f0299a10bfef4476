"""Per-key rate limits under load, for `make bench`: what a limited key costs a request.

At W1 (one record a request, where per-request costs show most), gateway-rs on one core
serves a key without limits, then a key limited to LIMIT requests/s and records/s (more
than it can serve, so every request takes tokens and none is refused) with the buckets
kept on this host (CAFE_RATELIMIT_STORAGE=local) and in Redis. Each limited run is given
as a ratio to the unlimited runs of the same bench: only ratios within a run mean
anything on a noisy machine.

Then one call to each candidate store, over the same Redis: gateway/fleetlimit.py's Lua
token bucket (redis-py with hiredis) and the `limits` package's strategies over redis-py,
the CPU each call costs this process. That measurement chose the Lua bucket.
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

from gateway.fleetlimit import _BUCKET_SCRIPT, LEASE_SECONDS
from gateway.keys import mint_key, write_keys_file
from loadtest.bench import RS, Result, delete_topics, parse_args, run_wrk, server, server_env

TARGET = "gateway" + RS
TOPICS = ("activity", "log", "profile", "deadletter")
# Above what one core serves at W1, so every request takes tokens and none is refused.
LIMIT = 20_000
WARM_UP_S = 2
STORE_CALLS = 3000


@dataclass
class LimitRun:
    """wrk at W1 with one kind of key and storage."""

    label: str  # "unlimited", "local" or "redis"
    result: Result
    redis_calls: int  # cafe_ratelimit_redis_calls_total{result="ok"} over the run


@dataclass
class Limits:
    """What the limits run found."""

    runs: list[LimitRun]
    store_us: dict[str, float]  # CPU per call to each candidate store

    @property
    def baseline(self) -> float:
        """Requests/s of the unlimited runs, on average."""
        unlimited = [r.result.requests_per_s for r in self.runs if r.label == "unlimited"]
        return sum(unlimited) / len(unlimited)

    def markdown(self) -> str:
        lines = [
            f"{TARGET}, one process, W1: a key without limits, and a key limited to "
            f"{LIMIT:,} requests/s and records/s (never reached: every request takes tokens) "
            f"with its buckets on this host (local) and in Redis, taken in leases of "
            f"{LEASE_SECONDS:g} s of the rate.",
            "",
            "| key | requests/s | vs unlimited | p50 ms | p99 ms | CPU % "
            "| calls to Redis | requests per call |",
            "|---|" + "---:|" * 7,
        ]
        for run in self.runs:
            r = run.result
            per_call = f"{r.requests / run.redis_calls:,.0f}" if run.redis_calls else ""
            lines.append(
                f"| {run.label} | {r.requests_per_s:,} | {r.requests_per_s / self.baseline:.0%} "
                f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.cpu_percent} | {run.redis_calls:,} "
                f"| {per_call} |"
            )
        lines += ["", "One call to the store, CPU of the calling process (sequential calls):", ""]
        lines += [f"- {name}: {us:.0f} us" for name, us in self.store_us.items()]
        return "\n".join(lines)

    def as_report(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, out: Path) -> None:
        """docs/bench/limits.md, which the README points to."""
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out.mkdir(parents=True, exist_ok=True)
        (out / "limits.md").write_text(f"# Rate limits, {when}\n\n{self.markdown()}\n")


def run(args: argparse.Namespace) -> Limits:
    """The W1 runs on topics of their own (deleted afterwards), then the store calls."""
    run_id = uuid.uuid4().hex[:8]
    topics = {name: f"bench.{run_id}.{name}" for name in TOPICS}
    workdir = Path(tempfile.mkdtemp(prefix="cafe-limits-"))
    free, free_record = mint_key(("analytics-portal",))
    limited, limited_record = mint_key(
        ("analytics-portal",), requests_per_second=LIMIT, records_per_second=LIMIT
    )
    write_keys_file(workdir / "keys.json", [free_record, limited_record])
    env = {**server_env(args, workdir / "keys.json", topics), "CAFE_WORKERS": "1"}
    runs = []
    try:
        # Each gateway serves the unlimited key too: the baseline brackets the limited runs.
        for storage in (args.redis, "local"):
            label = "local" if storage == "local" else "redis"
            with server(TARGET, {**env, "CAFE_RATELIMIT_STORAGE": storage}) as (port, proc):
                wrk = functools.partial(
                    run_wrk, port, proc, target=TARGET, batch=1, run_id=f"{run_id}{label}"
                )
                order = [(label, limited), ("unlimited", free)]
                for name, key in order if label == "redis" else order[::-1]:
                    wrk(key=key, seconds=WARM_UP_S, load="warm")
                    before = redis_calls(port)
                    result = wrk(key=key, seconds=args.seconds, load=name)
                    runs.append(LimitRun(name, result, redis_calls(port) - before))
                    print(f"{name:10} W1 {result.requests_per_s:>9,} requests/s", flush=True)
    finally:
        asyncio.run(delete_topics(args.bootstrap, list(topics.values())))
        shutil.rmtree(workdir, ignore_errors=True)
    return Limits(runs, asyncio.run(store_costs(args.redis)))


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
    costs["Lua token bucket (gateway/fleetlimit.py), redis-py"] = await cpu_per_call(
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


async def cpu_per_call(call: Callable[[], Awaitable[Any]]) -> float:
    for _ in range(200):  # connections made, scripts loaded
        await call()
    started = time.process_time()
    for _ in range(STORE_CALLS):
        await call()
    return (time.process_time() - started) / STORE_CALLS * 1e6


def main() -> None:
    """Only this run, without the rest of bench (`python -m loadtest.limitbench`); its
    figures go to --out/limits.md as well as to `make bench`'s report."""
    args = parse_args()
    limits = run(args)
    print(limits.markdown())
    limits.write(args.out)


if __name__ == "__main__":
    main()
