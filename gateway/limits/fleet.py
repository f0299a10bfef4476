"""Fleet-wide rate limits: each limited key's token buckets in one Redis, taken in leases.

With CAFE_RATELIMIT_STORAGE=redis://host:port/db, every gateway process on every host
draws a key's tokens from the same bucket, so a limit of 100 requests/s holds for the
fleet rather than per host. The bucket is the Lua script below, which Redis runs
atomically on its own clock, so the hosts' clocks do not matter.

Why a script of our own rather than the `limits` package: `limits` offers windows, not a
token bucket, and its `hit(cost=n)` takes all n tokens or none, where a lease wants "what
the request needs, and up to this many more"; it also answers no wait for Retry-After
without a second call. Per call they cost the gateway about the same CPU over redis-py
with hiredis (100-190 us each in `loadtest/limitbench.py`'s runs, which order them
differently from run to run); over coredis `limits` cost 380-410 us.

A call costs about as much as serving a request, so tokens are taken in leases. When a
process's lease for a bucket cannot cover a request, it asks Redis for what the request
needs plus LEASE_SECONDS of the key's rate, and serves the following requests from what
it was given. Concurrent requests of one process wait for one renewal, never each their
own; a key refused by Redis is refused locally, without asking again, until its tokens
would be back.

Worst-case overshoot. A process keeps fewer than L = ceil(rate * LEASE_SECONDS) tokens of a
bucket between requests, and tokens leave Redis at most at the bucket's rate once its
burst is spent. So over any T seconds a key is granted at most

    burst + rate * T + P * L      (P: the gateway processes holding a lease for it)

and a key not used before those T seconds at most burst + rate * T, one host's bound.

When Redis fails (refused, timed out, any error), the process falls back at once to the
host's own buckets (`gateway.limits.local`), at the key's full rate: while Redis is away each
host enforces the limit on its own, as with CAFE_RATELIMIT_STORAGE=local. It says so in
an ERROR line, in `cafe_ratelimit_redis_down`, and in /readyz's answer, drops its leases,
and asks Redis once a second until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.limits.local import Bucket
from gateway.limits.metrics import LimitMetrics
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

# A lease holds a tenth of a second of the key's rate: at 1000 requests/s, a call to
# Redis per 100 requests, and at most 100 tokens held per process.
LEASE_SECONDS = 0.1
# Longer than a round trip on a loaded network, short enough that a request waiting
# for a renewal from a Redis gone silent is answered (from local limits) in good time.
CALL_TIMEOUT_S = 0.25
PROBE_INTERVAL_S = 1.0

# Arguments: rate (tokens/s), burst, need (tokens the request needs), want (need plus
# the lease). Grants min(want, whole tokens) if `need` are there, else nothing and the
# milliseconds until they would be. Time in whole milliseconds of Redis's clock, exact
# as a Lua number; the bucket expires once it would have refilled anyway.
_BUCKET_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local need, want = tonumber(ARGV[3]), tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ms')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate / 1000)
local granted, wait_ms = 0, 0
if tokens >= need then
    granted = math.min(want, math.floor(tokens))
    tokens = tokens - granted
else
    wait_ms = math.ceil((need - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ms', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {granted, wait_ms}
"""


@dataclass
class _Lease:
    """The tokens of one bucket this process holds, and when Redis last said none."""

    tokens: int = 0
    # Until time.monotonic() passes refused_until, Redis would refuse `refused_need`
    # tokens again (or more; fewer may be there).
    refused_until: float = 0.0
    refused_need: int = 0
    renewal: asyncio.Lock = field(default_factory=asyncio.Lock)


class FleetBuckets:
    """Token buckets in Redis, shared by every gateway that names the same Redis."""

    def __init__(self, url: str, metrics: Metrics | None = None) -> None:
        self.where = _without_password(url)
        self._metrics = LimitMetrics(metrics.registry) if metrics is not None else None
        self._redis = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=CALL_TIMEOUT_S,
            socket_connect_timeout=CALL_TIMEOUT_S,
            # No retries: a failed call falls back to local limits at once.
            retry=Retry(NoBackoff(), 0),
        )
        self._script = self._redis.register_script(_BUCKET_SCRIPT)
        self._leases: dict[Bucket, _Lease] = {}
        # Why Redis is not used now (None while it is), for /readyz.
        self.down: str | None = None
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Ask Redis once; if it does not answer, start on local limits (and keep asking)."""
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            self._went_down(exc)
            return
        self._set_up(True)
        log.info("rate limits are kept in Redis at %s, for every gateway using it", self.where)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._redis.aclose()

    async def take(self, bucket: Bucket, burst: float, count: int) -> float | None:
        """Take `count` tokens: 0.0 if taken, else the seconds until they would be there;
        None if Redis cannot be asked now (the caller uses local limits)."""
        if self.down is not None:
            return None
        lease = self._leases.get(bucket)
        if lease is None:
            lease = self._leases[bucket] = _Lease()
        if lease.tokens >= count:
            lease.tokens -= count
            return 0.0
        async with lease.renewal:
            # While this request waited, another may have renewed the lease.
            if lease.tokens >= count:
                lease.tokens -= count
                return 0.0
            now = time.monotonic()
            if now < lease.refused_until and count - lease.tokens >= lease.refused_need:
                return lease.refused_until - now
            if self.down is not None:
                return None
            return await self._renew(lease, bucket, burst, count, now)

    async def _renew(
        self, lease: _Lease, bucket: Bucket, burst: float, count: int, now: float
    ) -> float | None:
        rate = bucket[2]
        need = count - lease.tokens
        want = max(need, math.ceil(rate * LEASE_SECONDS))
        try:
            granted, wait_ms = await self._script(
                keys=[_redis_key(bucket)], args=[rate, burst, need, want]
            )
        except (RedisError, OSError) as exc:
            self._went_down(exc)
            return None
        self._count_call("ok")
        if not granted:
            wait_s: float = max(int(wait_ms), 1) / 1000
            lease.refused_until = now + wait_s
            lease.refused_need = need
            return wait_s
        lease.tokens += int(granted) - count
        return 0.0

    def _went_down(self, exc: BaseException) -> None:
        self._count_call("error")
        if self.down is not None:
            return
        self.down = f"Redis at {self.where} does not answer ({exc or type(exc).__name__})"
        # Tokens held would be spent beside the local limits: drop them.
        self._leases.clear()
        self._set_up(False)
        log.error(
            "rate limits fall back to this host's own: %s; asking again every %gs",
            self.down,
            PROBE_INTERVAL_S,
        )
        self._probe = asyncio.create_task(self._probe_until_up(), name="ratelimit-redis-probe")

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self._redis.ping()
            except (RedisError, OSError):
                continue
            self.down = None
            self._set_up(True)
            log.warning("rate limits are kept in Redis at %s again", self.where)
            return

    def _set_up(self, up: bool) -> None:
        if self._metrics is not None:
            self._metrics.redis_down.set(0 if up else 1)

    def _count_call(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.redis_calls.labels(result).inc()


def _redis_key(bucket: Bucket) -> str:
    key_id, what, rate = bucket
    # The rate is part of the name, so a limit changed in the keys file starts a new
    # bucket, as it does locally.
    return f"cafe-gateway:ratelimit:{key_id}:{what}:{rate:g}"


def _without_password(url: str) -> str:
    """The URL as logs and /readyz may show it: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
