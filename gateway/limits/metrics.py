"""The rate limits' metrics: the fleet's Redis, as this host sees it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class LimitMetrics:
    """The rate limits' metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.redis_down = Gauge(
            "cafe_ratelimit_redis_down",
            "1 while the Redis of CAFE_RATELIMIT_STORAGE does not answer and this host "
            "enforces rate limits on its own, else 0",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.redis_calls = Counter(
            "cafe_ratelimit_redis_calls",
            "Calls to Redis for rate-limit tokens (a lease renewal each), by result: ok or error",
            ["result"],
            registry=registry,
        )
