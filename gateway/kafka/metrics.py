"""The Kafka sink's metrics: acknowledgements, refusals, renewals and readiness."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.metrics import LATENCY_BUCKETS


class KafkaMetrics:
    """The Kafka sink's metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dead_letters_truncated = Counter(
            "cafe_dead_letters_truncated",
            "Dead letters stored truncated (the record was over the dead-letter size limit)",
            ["type"],
            registry=registry,
        )
        self.produce_seconds = Histogram(
            "cafe_kafka_produce_seconds",
            "Time from a batch being handed to the producer to its acknowledgement",
            ["topic"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
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
        self.refused = Counter(
            "cafe_kafka_records_refused",
            "Records answered 503 without being queued for Kafka, by topic and reason: "
            "kafka_down (their partition has not acknowledged within the produce timeout), "
            "queue_full (the sink holds CAFE_MAX_QUEUED_BYTES), topic_missing or forbidden "
            "(Kafka refuses the gateway writes to the topic)",
            ["topic", "reason"],
            registry=registry,
        )
        self.partitions_down = Gauge(
            "cafe_kafka_partitions_down",
            "Partitions whose records are refused until Kafka acknowledges them again",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.queued_bytes = Gauge(
            "cafe_kafka_queued_bytes",
            "Bytes of records the sink holds that Kafka has not acknowledged (every 5 s)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.topic_single_copy = Gauge(
            "cafe_kafka_topic_single_copy",
            "1 for a topic of 3 or more replicas whose min.insync.replicas is 1: a 2xx "
            "may rest on one broker's disk (checked when the gateway connects)",
            ["topic"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge(
            "cafe_kafka_ready",
            "1 while the producer is connected and most of the brokers it knows answer, else 0",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.connection_problem = Gauge(
            "cafe_kafka_connection_problem",
            "1 while no producer can be made for this cause (sasl_authentication, "
            "tls_untrusted, tls_client_certificate, unreachable, ...; see /readyz), else 0",
            ["cause"],
            registry=registry,
            multiprocess_mode="livemax",
        )
