"""The librdkafka sink without a broker: its settings as librdkafka's configuration (which
librdkafka itself accepts), what it refuses to start with, its partitioning, and its
bookkeeping of delivery reports over a fake producer: acknowledgement, timeouts that
take a partition down, the byte bound, forbidden topics and the spool's stored flags."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from confluent_kafka import KafkaError, Producer
from confluent_kafka import Message as RdMessage
from prometheus_client import CollectorRegistry

from gateway.config import ConfigError, KafkaSecurity, KafkaSettings, Secret, Settings
from gateway.errors import KafkaForbidden, KafkaUnavailable, RecordTooLarge
from gateway.kafka.auth import SecretUnavailable
from gateway.kafka.messages import Message
from gateway.kafka.rdkafka import RdKafkaSink, _LibrdkafkaLog, rdkafka_config
from gateway.kafka.sink import KafkaSink
from gateway.metrics import Metrics


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    """A CA bundle, a client certificate, its key (apart, and with the certificate), and a
    password file."""
    client = ca.issue_cert("gateway")
    paths = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "client.pem",
        "key": tmp_path / "client.key",
        "both": tmp_path / "both.pem",
        "password": tmp_path / "password",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    client.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    client.private_key_pem.write_to_path(str(paths["key"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(paths["both"]))
    paths["password"].write_text("s3cret\nsecond line\n")
    return paths


def _accepted(config: dict[str, Any]) -> None:
    """librdkafka takes the configuration (it checks names, values and the TLS files when
    a client is made; it connects in the background, so no broker is needed)."""
    producer = Producer(config)
    producer.close()


def test_plaintext_asks_for_acks_from_all_replicas_and_idempotence() -> None:
    settings = KafkaSettings(bootstrap="k1:9092,k2:9092", client_id="gw", linger_ms=7)
    config = rdkafka_config(settings)
    assert config["acks"] == "all"
    assert config["enable.idempotence"] is True
    assert config["bootstrap.servers"] == "k1:9092,k2:9092"
    assert config["client.id"] == "gw"
    assert config["linger.ms"] == 7
    assert config["compression.codec"] == "zstd"
    assert config["partitioner"] == "murmur2_random"
    assert config["security.protocol"] == "PLAINTEXT"
    assert not [name for name in config if name.startswith(("ssl.", "sasl."))]
    _accepted(config)


def test_mutual_tls_maps_the_files_and_the_hostname_check(files: dict[str, Path]) -> None:
    security = KafkaSecurity(
        protocol="SSL", ca_file=files["ca"], cert_file=files["cert"], key_file=files["key"]
    )
    config = rdkafka_config(KafkaSettings(security=security))
    assert config["security.protocol"] == "SSL"
    assert config["ssl.ca.location"] == str(files["ca"])
    assert config["ssl.certificate.location"] == str(files["cert"])
    assert config["ssl.key.location"] == str(files["key"])
    assert config["ssl.endpoint.identification.algorithm"] == "https"
    _accepted(config)


def test_a_key_kept_with_its_certificate_and_no_hostname_check(files: dict[str, Path]) -> None:
    security = KafkaSecurity(
        protocol="SSL",
        ca_file=files["ca"],
        cert_file=files["both"],
        key_password_file=files["password"],
        check_hostname=False,
    )
    config = rdkafka_config(KafkaSettings(security=security))
    assert config["ssl.key.location"] == str(files["both"])
    assert config["ssl.key.password"] == "s3cret"
    assert config["ssl.endpoint.identification.algorithm"] == "none"


def test_without_a_ca_bundle_the_system_s_cas_are_trusted() -> None:
    security = KafkaSecurity(
        protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u", sasl_password=Secret("p")
    )
    config = rdkafka_config(KafkaSettings(security=security))
    assert config["ssl.ca.location"] == "probe"
    _accepted(config)


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_logins_map_the_user_and_the_password_file_s_first_line(
    files: dict[str, Path], protocol: str, mechanism: str
) -> None:
    security = KafkaSecurity(
        protocol=protocol,
        ca_file=files["ca"] if protocol == "SASL_SSL" else None,
        sasl_mechanism=mechanism,
        sasl_username="gateway",
        sasl_password_file=files["password"],
    )
    config = rdkafka_config(KafkaSettings(security=security))
    assert config["security.protocol"] == protocol
    assert config["sasl.mechanism"] == mechanism
    assert config["sasl.username"] == "gateway"
    assert config["sasl.password"] == "s3cret"
    _accepted(config)


def test_a_password_file_that_cannot_be_read_is_a_secret_unavailable(tmp_path: Path) -> None:
    security = KafkaSecurity(
        protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="gateway",
        sasl_password_file=tmp_path / "gone",
    )
    with pytest.raises(SecretUnavailable, match="CAFE_KAFKA_SASL_PASSWORD_FILE"):
        rdkafka_config(KafkaSettings(security=security))


@pytest.mark.parametrize("source", ["OAUTH_TOKEN_FILE", "OAUTH_TOKEN_COMMAND"])
def test_oauthbearer_on_librdkafka_stops_the_start_naming_both_settings(
    tmp_path: Path, source: str
) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    env = {
        "CAFE_KAFKA_CLIENT": "librdkafka",
        "CAFE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CAFE_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
        f"CAFE_KAFKA_{source}": str(token) if source.endswith("FILE") else "true",
    }
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert "CAFE_KAFKA_CLIENT=librdkafka does not support" in str(info.value)
    assert "CAFE_KAFKA_SASL_MECHANISM=OAUTHBEARER" in str(info.value)
    # The same settings on aiokafka start.
    assert Settings.from_env({**env, "CAFE_KAFKA_CLIENT": "aiokafka"}).kafka.client == "aiokafka"


def test_partitions_are_those_of_the_aiokafka_sink() -> None:
    rd = RdKafkaSink(KafkaSettings(client="librdkafka"))
    aio = KafkaSink(KafkaSettings())
    rng = random.Random(3)
    keys = [rng.randbytes(rng.randrange(0, 60)) for _ in range(3000)]
    for partitions in (1, 3, 6, 7, 64):
        assert [rd._partition(k, partitions) for k in keys] == [
            aio._partition(k, partitions) for k in keys
        ]
    assert [rd._partition(None, 3) for _ in range(6)] == [1, 2, 0, 1, 2, 0]


async def test_a_sink_that_has_not_connected_says_which_kafka_it_waits_for() -> None:
    sink = RdKafkaSink(KafkaSettings(bootstrap="kafka.invalid:9092"))
    assert await sink.unavailable() == "Kafka at kafka.invalid:9092 is not reachable"
    with pytest.raises(KafkaUnavailable, match="not connected"):
        await sink.produce("t", [Message(b"k", b"v")])


class FakeProducer:
    """What the sink asks of confluent-kafka's Producer: messages taken with their
    callbacks, reported on when the test says (through poll(), as librdkafka does)."""

    def __init__(self) -> None:
        self.taken: list[tuple[str, int, bytes | None, bytes, Any]] = []
        self.reports: list[tuple[Any, KafkaError | None, RdMessage]] = []

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        partition: int,
        *,
        on_delivery: Any,
        headers: Any,
    ) -> None:
        self.taken.append((topic, partition, key, value, on_delivery))

    def report(self, code: int | None = None, count: int | None = None) -> None:
        """Queue reports for the first `count` (all) messages taken and not reported."""
        taken, self.taken = self.taken[:count], self.taken[len(self.taken[:count]) :]
        for topic, partition, key, value, callback in taken:
            error = KafkaError(code) if code is not None else None
            message = RdMessage(topic=topic, partition=partition, key=key, value=value)
            self.reports.append((callback, error, message))

    def poll(self, timeout: float = -1) -> int:
        reports, self.reports = self.reports, []
        for callback, error, message in reports:
            callback(error, message)
        return len(reports)

    def __len__(self) -> int:
        return len(self.taken) + len(self.reports)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), "test")


@pytest.fixture
def sink(metrics: Metrics) -> Iterator[tuple[RdKafkaSink, FakeProducer]]:
    settings = KafkaSettings(client="librdkafka", produce_timeout_ms=200, max_queued_bytes=1000)
    sink = RdKafkaSink(settings, metrics)
    producer = FakeProducer()
    sink._client = sink._producer = producer  # type: ignore[assignment]
    sink._partitions["t"] = 2
    yield sink, producer
    sink._client = sink._producer = None
    sink._stop_polling()


async def _settle(
    producer: FakeProducer, code: int | None = None, count: int | None = None
) -> None:
    """Let the sink hand its messages over, then report on them (the sink's timer polls)."""
    await asyncio.sleep(0)
    producer.report(code, count)
    await asyncio.sleep(0.02)


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_send_returns_once_every_message_is_acknowledged(
    sink: tuple[RdKafkaSink, FakeProducer], metrics: Metrics
) -> None:
    rd, producer = sink
    messages = [Message(f"s{n % 5}".encode(), b"v" * 10, [("h", b"1")]) for n in range(20)]
    send = asyncio.create_task(rd.produce("t", messages))
    await asyncio.sleep(0.01)
    assert not send.done()
    assert [(key, partition) for _, partition, key, _, _ in producer.taken] == [
        (m.key, rd._partition(m.key, 2)) for m in messages
    ]
    assert rd._held_bytes == 200
    await _settle(producer)
    await send
    assert rd._held_bytes == 0
    count = _sample(metrics, "cafe_kafka_produce_seconds_count", topic="t")
    assert count == 1


async def test_a_timeout_takes_the_partition_down_until_kafka_acknowledges_it(
    sink: tuple[RdKafkaSink, FakeProducer], metrics: Metrics
) -> None:
    rd, producer = sink
    with pytest.raises(KafkaUnavailable, match=r"within 0\.2s"):
        await rd.produce("t", [Message(b"a", b"held")])
    assert _sample(metrics, "cafe_kafka_partitions_down") == 1
    with pytest.raises(KafkaUnavailable, match="not acknowledging"):
        await rd.produce("t", [Message(b"a", b"refused")])
    assert len(producer.taken) == 1  # the refused one never reached librdkafka
    assert _sample(metrics, "cafe_kafka_records_refused_total", topic="t", reason="kafka_down") == 1
    await _settle(producer)  # the held message is acknowledged: the partition is up
    assert _sample(metrics, "cafe_kafka_partitions_down") == 0
    send = asyncio.create_task(rd.produce("t", [Message(b"a", b"after")]))
    await _settle(producer)
    await send


async def test_records_past_the_byte_bound_are_refused_before_librdkafka(
    sink: tuple[RdKafkaSink, FakeProducer], metrics: Metrics
) -> None:
    rd, producer = sink
    first = asyncio.create_task(rd.produce("t", [Message(b"a", b"x" * 600)]))
    await asyncio.sleep(0)
    with pytest.raises(KafkaUnavailable, match="the limit is 1000"):
        await rd.produce("t", [Message(b"b", b"y" * 600)])
    assert _sample(metrics, "cafe_kafka_records_refused_total", topic="t", reason="queue_full") == 1
    await _settle(producer)
    await first
    second = asyncio.create_task(rd.produce("t", [Message(b"b", b"y" * 600)]))
    await _settle(producer)
    await second


async def test_a_forbidden_topic_is_refused_then_probed(
    sink: tuple[RdKafkaSink, FakeProducer], metrics: Metrics
) -> None:
    rd, producer = sink
    send = asyncio.create_task(rd.produce("t", [Message(b"a", b"v")]))
    await _settle(producer, KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaForbidden):
        await send
    assert rd.degraded() == ["Kafka refuses writes to topic t"]
    assert _sample(metrics, "cafe_kafka_errors_total", kind="TOPIC_AUTHORIZATION_FAILED") == 1
    rd.health.forbidden["t"] = 0.0  # the probe's time has come
    probe = asyncio.create_task(rd.produce("t", [Message(b"a", b"v")]))
    await _settle(producer)
    await probe
    assert rd.degraded() == []


async def test_a_record_kafka_finds_too_large_is_record_too_large(
    sink: tuple[RdKafkaSink, FakeProducer],
) -> None:
    rd, producer = sink
    send = asyncio.create_task(rd.produce("t", [Message(b"a", b"v")]))
    await _settle(producer, KafkaError.MSG_SIZE_TOO_LARGE)
    with pytest.raises(RecordTooLarge):
        await send


async def test_a_patient_send_says_which_messages_kafka_took(
    sink: tuple[RdKafkaSink, FakeProducer],
) -> None:
    rd, producer = sink
    messages = [Message(b"a", b"1"), Message(b"a", b"2"), Message(b"a", b"3")]
    send = asyncio.create_task(rd.produce("t", messages, patient=True))
    await asyncio.sleep(0.3)  # past the produce timeout: a patient send waits on
    assert not send.done()
    await _settle(producer, None, 1)
    await _settle(producer, KafkaError._PURGE_QUEUE)
    with pytest.raises(KafkaUnavailable) as info:
        await send
    assert info.value.stored == (True, False, False)


def _stats(*brokers: tuple[int, str]) -> str:
    """librdkafka's statistics, as much of them as readiness reads: its broker handles,
    the bootstrap ones (node id -1) among them."""
    handles = {"127.0.0.1:9092/bootstrap": {"nodeid": -1, "state": "UP"}}
    for node, state in brokers:
        handles[f"127.0.0.1:909{node}/{node}"] = {"nodeid": node, "state": state}
    return orjson.dumps({"brokers": handles}).decode()


@pytest.mark.parametrize(
    ("brokers", "said"),
    [
        (((1, "UP"),), None),
        (((1, "UP"), (2, "UP"), (3, "TRY_CONNECT")), None),
        (((1, "UP"), (2, "DOWN"), (3, "CONNECT")), "only 1 of the 3 Kafka brokers"),
        (((1, "DOWN"),), "is not reachable"),
        ((), "is not reachable"),  # none learned yet: the bootstrap handle does not count
    ],
)
async def test_readiness_counts_the_brokers_librdkafka_reports_up(
    sink: tuple[RdKafkaSink, FakeProducer], brokers: tuple[tuple[int, str], ...], said: str | None
) -> None:
    rd, _ = sink
    rd._statistics(_stats(*brokers))
    answer = await rd.unavailable()
    if said is None:
        assert answer is None
    else:
        assert answer is not None
        assert said in answer


def test_librdkafka_s_log_lines_are_at_most_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "gateway.kafka.librdkafka")
    lines = _LibrdkafkaLog()
    lines.log(logging.ERROR, "%s", "Connect to ipv4#127.0.0.1:1 failed")
    lines.log(logging.INFO, "%s", "an INFO line")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "Connect to ipv4#127.0.0.1:1 failed"),
        (logging.INFO, "an INFO line"),
    ]
