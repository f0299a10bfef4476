"""The spool's metrics: what it holds, writes, replays and drops."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.metrics import LATENCY_BUCKETS


class SpoolMetrics:
    """The spool's metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Gauge(
            "cafe_spool_records",
            "Records in the spool (CAFE_SPOOL_DIR), written or being written",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.bytes = Gauge(
            "cafe_spool_bytes",
            "Bytes of records in the spool; at CAFE_SPOOL_MAX_BYTES requests get 503",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.oldest_age = Gauge(
            "cafe_spool_oldest_age_seconds",
            "Age of the oldest record in the spool (0 when empty); past CAFE_SPOOL_MAX_AGE "
            "records are dropped",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.unwritable = Gauge(
            "cafe_spool_unwritable",
            "1 while the spool's disk refuses writes (and the gateway is not ready), else 0",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.records_spooled = Counter(
            "cafe_spool_records_spooled",
            "Records (dead letters included) written to the spool and fsynced",
            registry=registry,
        )
        self.records_replayed = Counter(
            "cafe_spool_records_replayed",
            "Spooled records Kafka has acknowledged, and deleted from the spool",
            registry=registry,
        )
        self.records_dropped = Counter(
            "cafe_spool_records_dropped",
            "Spooled records deleted without reaching Kafka, by reason: expired (older than "
            "CAFE_SPOOL_MAX_AGE), refused (Kafka refuses them for good) or corrupt (their "
            "chunk in the spool file does not decode)",
            ["reason"],
            registry=registry,
        )
        self.replay_rate = Gauge(
            "cafe_spool_replay_records_per_second",
            "Records per second of the last window the spool replayed to Kafka",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.write_seconds = Histogram(
            "cafe_spool_write_seconds",
            "Time to write and fsync one group commit of spooled chunks",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
