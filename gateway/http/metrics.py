"""The HTTP side's metrics: requests, connections, errors and what became of records."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.metrics import LATENCY_BUCKETS, Tally

_RECORD_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
_BYTE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


class HttpMetrics:
    """The HTTP side's metrics, registered on `registry`. What every request updates is
    updated through `tally` (gateway/metrics.py), which a scrape flushes first."""

    def __init__(self, registry: CollectorRegistry, tally: Tally | None = None) -> None:
        self.tally = tally if tally is not None else Tally()
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
            buckets=LATENCY_BUCKETS,
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
        self.records_per_request = Histogram(
            "cafe_records_per_request",
            "Records in each well-formed batch",
            ["type"],
            buckets=_RECORD_BUCKETS,
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
        # Per record type, the series every request updates, looked up once: asking
        # prometheus_client for a labelled series costs a lock and a few dict lookups.
        self._batch_sizes: dict[str, Any] = {}
        self._accepted: dict[str, Any] = {}

    def batch_size(self, record_type: str) -> Any:
        """`records_per_request` of `record_type`."""
        series = self._batch_sizes.get(record_type)
        if series is None:
            series = self._batch_sizes[record_type] = self.records_per_request.labels(record_type)
        return series

    def accepted(self, record_type: str) -> Any:
        """`records` of `record_type` with the outcome "accepted"."""
        series = self._accepted.get(record_type)
        if series is None:
            series = self._accepted[record_type] = self.records.labels(record_type, "accepted")
        return series
