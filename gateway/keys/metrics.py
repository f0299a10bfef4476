"""The API keys' metrics: reloads of the keys file and the keys loaded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class KeyMetrics:
    """The API keys' metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "cafe_api_key_reloads",
            "Reloads of the API keys file after it changed, by result (ok, failed)",
            ["result"],
            registry=registry,
        )
        self.loaded = Gauge(
            "cafe_api_keys_loaded",
            "Enabled API keys in memory",
            registry=registry,
            multiprocess_mode="livemax",
        )
