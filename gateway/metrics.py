"""Prometheus metrics: the gateway's metric objects, and the exposition at /metrics.

Every metric lives on the registry `create_app` is given (a fresh one by default), never
on prometheus_client's global one, so apps built side by side in tests keep their own
counts. Label values are bounded: routes, record types, topics, outcomes and error codes
come from fixed sets, never from request data.

With several workers (CAFE_WORKERS > 1), `cafe-gateway serve` makes a directory before
it forks and gives it to each worker's `Metrics`: every worker then writes its values to
files of its own there, and a scrape of any worker adds up the files of all of them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

# prometheus_client's own setting for where worker files live (it reads it as each
# value is made, and when it checks a gauge's multiprocess_mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: from a cached 1 ms answer to the 5 s produce timeout and beyond.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_RECORD_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
_BYTE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


class Metrics:
    """The gateway's metrics, registered on one registry; with `shared_dir`, kept in files
    there that every worker's scrape adds up."""

    def __init__(
        self, registry: CollectorRegistry, version: str, shared_dir: Path | None = None
    ) -> None:
        if shared_dir is not None:
            _share_values(shared_dir)
        self.registry = registry
        self.shared_dir = shared_dir
        # Gauges say how the files of several workers combine (ignored in one process):
        # "live" modes leave out workers that have exited.
        build_info = Gauge(
            "cafe_build_info",
            "Always 1; the labels say which gateway and Python are running",
            ["version", "python"],
            registry=registry,
            multiprocess_mode="max",
        )
        build_info.labels(version, platform.python_version()).set(1)
        self.requests = Counter(
            "cafe_http_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "cafe_http_request_duration_seconds",
            "Time from the request's arrival to its answer",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "cafe_http_requests_in_flight",
            "Requests being worked on",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.connections = Gauge(
            "cafe_http_connections_open",
            "Client connections open (the cap, CAFE_MAX_CONNECTIONS, is per process)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.body_bytes = Histogram(
            "cafe_http_request_body_bytes",
            "Declared size of request bodies (Content-Length)",
            ["route"],
            buckets=_BYTE_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "cafe_http_errors",
            "Error answers by their machine-readable code",
            ["code"],
            registry=registry,
        )
        self.records = Counter(
            "cafe_records",
            "Records by type and outcome: accepted (acknowledged by Kafka, or spooled), invalid, "
            "forbidden (platform not allowed for the key), unavailable (Kafka did not "
            "acknowledge in time; the client got a 503)",
            ["type", "outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "cafe_dead_letters",
            "Rejected records acknowledged on the dead-letter topic, by type and reason",
            ["type", "reason"],
            registry=registry,
        )
        self.dead_letters_truncated = Counter(
            "cafe_dead_letters_truncated",
            "Dead letters stored truncated (the record was over the dead-letter size limit)",
            ["type"],
            registry=registry,
        )
        self.records_per_request = Histogram(
            "cafe_records_per_request",
            "Records in each well-formed batch",
            ["type"],
            buckets=_RECORD_BUCKETS,
            registry=registry,
        )
        self.produce_seconds = Histogram(
            "cafe_kafka_produce_seconds",
            "Time from a batch being handed to the producer to its acknowledgement",
            ["topic"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.kafka_errors = Counter(
            "cafe_kafka_errors",
            "Produce failures by kind (timeout, not_connected, or the Kafka error's name)",
            ["kind"],
            registry=registry,
        )
        self.producer_renewals = Counter(
            "cafe_kafka_producer_renewals",
            "Producers replaced after Kafka refused a batch for good, by the error's name",
            ["error"],
            registry=registry,
        )
        self.kafka_refused = Counter(
            "cafe_kafka_records_refused",
            "Records answered 503 without being queued for Kafka, by topic and reason: "
            "kafka_down (their partition has not acknowledged within the produce timeout), "
            "queue_full (the sink holds CAFE_MAX_QUEUED_BYTES), topic_missing or forbidden "
            "(Kafka refuses the gateway writes to the topic)",
            ["topic", "reason"],
            registry=registry,
        )
        self.kafka_partitions_down = Gauge(
            "cafe_kafka_partitions_down",
            "Partitions whose records are refused until Kafka acknowledges them again",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.kafka_queued_bytes = Gauge(
            "cafe_kafka_queued_bytes",
            "Bytes of records the sink holds that Kafka has not acknowledged (every 5 s)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.kafka_topic_single_copy = Gauge(
            "cafe_kafka_topic_single_copy",
            "1 for a topic of 3 or more replicas whose min.insync.replicas is 1: a 2xx "
            "may rest on one broker's disk (checked when the gateway connects)",
            ["topic"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.kafka_ready = Gauge(
            "cafe_kafka_ready",
            "1 while the producer is connected and most of the brokers it knows answer, else 0",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.kafka_connection_problem = Gauge(
            "cafe_kafka_connection_problem",
            "1 while no producer can be made for this cause (sasl_authentication, "
            "tls_untrusted, tls_client_certificate, unreachable, ...; see /readyz), else 0",
            ["cause"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.ratelimit_redis_down = Gauge(
            "cafe_ratelimit_redis_down",
            "1 while the Redis of CAFE_RATELIMIT_STORAGE does not answer and this host "
            "enforces rate limits on its own, else 0",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.ratelimit_redis_calls = Counter(
            "cafe_ratelimit_redis_calls",
            "Calls to Redis for rate-limit tokens (a lease renewal each), by result: ok or error",
            ["result"],
            registry=registry,
        )
        self.spool_records = Gauge(
            "cafe_spool_records",
            "Records in the spool (CAFE_SPOOL_DIR), written or being written",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.spool_bytes = Gauge(
            "cafe_spool_bytes",
            "Bytes of records in the spool; at CAFE_SPOOL_MAX_BYTES requests get 503",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.spool_oldest_age = Gauge(
            "cafe_spool_oldest_age_seconds",
            "Age of the oldest record in the spool (0 when empty); past CAFE_SPOOL_MAX_AGE "
            "records are dropped",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.spool_unwritable = Gauge(
            "cafe_spool_unwritable",
            "1 while the spool's disk refuses writes (and the gateway is not ready), else 0",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.spool_records_spooled = Counter(
            "cafe_spool_records_spooled",
            "Records (dead letters included) written to the spool and fsynced",
            registry=registry,
        )
        self.spool_records_replayed = Counter(
            "cafe_spool_records_replayed",
            "Spooled records Kafka has acknowledged, and deleted from the spool",
            registry=registry,
        )
        self.spool_records_dropped = Counter(
            "cafe_spool_records_dropped",
            "Spooled records deleted without reaching Kafka, by reason: expired (older than "
            "CAFE_SPOOL_MAX_AGE), refused (Kafka refuses them for good) or corrupt (their "
            "chunk in the spool file does not decode)",
            ["reason"],
            registry=registry,
        )
        self.spool_replay_rate = Gauge(
            "cafe_spool_replay_records_per_second",
            "Records per second of the last window the spool replayed to Kafka",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.spool_write_seconds = Histogram(
            "cafe_spool_write_seconds",
            "Time to write and fsync one group commit of spooled chunks",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.auth_failures = Counter(
            "cafe_auth_failures",
            "Requests refused for their API key, by reason: missing, unknown, disabled, "
            "expired (past the key's expires_at), origin (a web origin the key does not "
            "list), not_browser_key (?api_key= with a key not marked browser), browser_read "
            "(a browser key used to read), or platform (records for a platform the key may "
            "not write; once per request)",
            ["reason"],
            registry=registry,
        )
        self.key_reloads = Counter(
            "cafe_api_key_reloads",
            "Reloads of the API keys file after it changed, by result (ok, failed)",
            ["result"],
            registry=registry,
        )
        self.keys_loaded = Gauge(
            "cafe_api_keys_loaded",
            "Enabled API keys in memory",
            registry=registry,
            multiprocess_mode="livemax",
        )

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics: the text exposition, summed over workers when there are several."""
        registry = self.registry
        if self.shared_dir is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, str(self.shared_dir))  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _share_values(directory: Path) -> None:
    """Make prometheus_client keep the values of metrics made from now on in files in
    `directory`, whenever it was imported.

    It picks its value class once, at import, from the environment; setting both here
    makes where values live this call's business alone, not a matter of import order.
    """
    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
