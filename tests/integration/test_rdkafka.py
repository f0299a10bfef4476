"""The librdkafka sink against real brokers, where tests/integration/test_kafka.py (which
runs every sink test on both clients) does not reach: what it stores is what the aiokafka
sink stores, message for message; and on a secured Kafka (`kafka.sh up --secure`) each way
in, a wrong password told in words, a topic whose Write is revoked and a topic missing."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.config import KafkaSecurity, KafkaSettings, Secret, TopicSettings
from gateway.errors import KafkaForbidden, KafkaTopicMissing
from gateway.kafka import health as kafka_health
from gateway.kafka.rdkafka import RdKafkaSink
from gateway.sink import Context
from tests.support.kafka import (
    TOPIC_PARTITIONS,
    Broker,
    SecureBroker,
    consume_all,
    create_topics,
    delete_topics,
    kafka_sink,
)
from tests.support.records import record, rejected
from tests.support.wait import eventually

pytestmark = pytest.mark.integration


def _topics(prefix: str) -> TopicSettings:
    return TopicSettings(
        activity=f"{prefix}.activity",
        log=f"{prefix}.log",
        profile=f"{prefix}.profile",
        deadletter=f"{prefix}.deadletter",
        partitions=TOPIC_PARTITIONS,
    )


async def _connected(sink: Any) -> bool:
    return await sink.unavailable() is None


async def test_both_clients_store_the_same_keys_headers_values_and_partitions(
    kafka: Broker,
) -> None:
    context = Context("key-1", "203.0.113.9", "req-1", "2026-12-07T01:00:00.000Z")
    other = Context("key-2", "2001:db8::1", "req-2", "2026-12-07T01:00:01.000Z")
    accepted = [
        record(f"session-{n % 7}", f'{{"n":{n}}}'.encode(), context if n < 30 else other)
        for n in range(60)
    ]
    dead = [
        rejected(b'{"bad":1}', session="session-1"),
        rejected(b'{"bad":2}', session=None),
        rejected(b'{"bad":3}', session="s" * 200),  # too long for a key: left off
        rejected(b"x" * 600_000, session="session-2"),  # cut to fit
    ]
    stored = {}
    run = uuid.uuid4().hex[:8]
    try:
        for client in ("aiokafka", "librdkafka"):
            topics = _topics(f"test.same.{run}.{client}")
            sink = kafka_sink(
                KafkaSettings(bootstrap=kafka.bootstrap, topics=topics, client=client)
            )
            await sink.start()
            try:
                await eventually(functools.partial(_connected, sink))
                await sink.send("activity", accepted, dead)
            finally:
                await sink.close()
            # By partition, each in its order (partitions are read in no set order).
            stored[client] = [
                sorted(
                    ((m.partition, m.key, m.value, list(m.headers)) for m in messages),
                    key=lambda message: message[0],
                )
                for messages in [
                    await consume_all(kafka.bootstrap, topics.activity),
                    await consume_all(kafka.bootstrap, topics.deadletter),
                ]
            ]
    finally:
        await delete_topics(kafka.bootstrap, lambda t: t.startswith(f"test.same.{run}."))
    records, letters = stored["librdkafka"]
    assert len(records) == 60
    assert len(letters) == 4
    # Keys, values, headers and partitions as the aiokafka sink stores them; within each
    # partition in the same order.
    assert stored["librdkafka"] == stored["aiokafka"]
    assert {key for _, key, _, _ in letters} == {b"session-1", None, b"session-2"}
    assert any(("cafe-truncated", b"true") in headers for *_, headers in letters)


def _secured(broker: SecureBroker, way: str, tmp_path: Path, **fields: Any) -> KafkaSettings:
    """The settings of each way in, as the gateway user; secrets as files."""
    password = tmp_path / "password"
    password.write_text(broker.gateway_password + "\n")
    if way == "mtls":
        security = KafkaSecurity(
            protocol="SSL",
            ca_file=broker.ca_file,
            cert_file=broker.client_cert_file,
            key_file=broker.client_key_file,
        )
        return KafkaSettings(bootstrap=broker.ssl, security=security, **fields)
    protocol, mechanism = way.split(":")
    security = KafkaSecurity(
        protocol=protocol,
        ca_file=broker.ca_file if protocol == "SASL_SSL" else None,
        sasl_mechanism=mechanism,
        sasl_username="gateway",
        sasl_password_file=password,
    )
    bootstrap = broker.sasl_ssl if protocol == "SASL_SSL" else broker.sasl_plaintext
    return KafkaSettings(bootstrap=bootstrap, security=security, **fields)


def _grant(broker: SecureBroker, topics: list[str], *operations: str) -> None:
    args = ["--allow-principal", "User:gateway"]
    for operation in operations:
        args += ["--operation", operation]
    for topic in topics:
        args += ["--topic", topic]
    broker.acls("--add", *args)


@asynccontextmanager
async def _sink(settings: KafkaSettings) -> AsyncIterator[RdKafkaSink]:
    sink = RdKafkaSink(settings)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


async def _made(broker: SecureBroker, *, skip: str | None = None) -> TopicSettings:
    """Topics of the test's own, made by a super user (all but the record type `skip`'s);
    the gateway may Write and Describe each, and create none."""
    topics = _topics(f"rdsec.{uuid.uuid4().hex[:10]}")
    left_out = topics.by_record_type().get(skip or "")
    await create_topics(broker.plaintext, [t for t in topics.all() if t != left_out])
    _grant(broker, list(topics.all()), "Write", "Describe")
    return topics


@pytest.mark.parametrize(
    "way",
    [
        "SASL_SSL:SCRAM-SHA-512",
        "SASL_SSL:SCRAM-SHA-256",
        "SASL_SSL:PLAIN",
        "SASL_PLAINTEXT:SCRAM-SHA-512",
        "SASL_PLAINTEXT:PLAIN",
        "mtls",
    ],
)
async def test_each_way_in_produces_what_was_sent(
    secure_broker: SecureBroker, tmp_path: Path, way: str
) -> None:
    topics = await _made(secure_broker)
    settings = _secured(secure_broker, way, tmp_path, topics=topics, client="librdkafka")
    async with _sink(settings) as sink:
        await eventually(functools.partial(_connected, sink), within=30)
        await sink.send("log", [record("s", f"over {way}".encode())])
    stored = await consume_all(secure_broker.plaintext, topics.log)
    assert [m.value for m in stored] == [f"over {way}".encode()]


async def test_a_wrong_password_is_told_in_words(secure_broker: SecureBroker) -> None:
    security = KafkaSecurity(
        protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="gateway",
        sasl_password=Secret("not the password"),
    )
    settings = KafkaSettings(
        bootstrap=secure_broker.sasl_plaintext, security=security, client="librdkafka"
    )
    async with _sink(settings) as sink:

        async def told() -> bool:
            said = await sink.unavailable()
            return said is not None and "refused the gateway's SCRAM-SHA-512" in said

        await eventually(told, within=30)
        assert sink.health.problem is not None
        assert sink.health.problem.cause == "sasl_authentication"


async def test_write_revoked_on_one_topic_stops_only_its_type_until_granted_again(
    secure_broker: SecureBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka_health, "FORBIDDEN_PROBE_S", 1.0)
    topics = await _made(secure_broker)
    settings = _secured(
        secure_broker, "SASL_PLAINTEXT:SCRAM-SHA-512", tmp_path, topics=topics, client="librdkafka"
    )
    async with _sink(settings) as sink:
        await eventually(functools.partial(_connected, sink), within=30)
        await sink.send("activity", [record("s", b"before")])
        secure_broker.acls(
            "--remove", "--force", "--allow-principal", "User:gateway",
            "--operation", "Write", "--topic", topics.activity,
        )  # fmt: skip

        async def forbidden() -> bool:
            try:
                await sink.send("activity", [record("s", b"revoked")])
            except KafkaForbidden:
                return True
            return False

        await eventually(forbidden, within=30)
        assert sink.degraded() == [f"Kafka refuses writes to topic {topics.activity}"]
        with pytest.raises(KafkaForbidden):  # at once, before the next probe
            await sink.send("activity", [record("s", b"refused")])
        await sink.send("log", [record("s", b"other type")])
        _grant(secure_broker, [topics.activity], "Write")

        async def served() -> bool:
            try:
                await sink.send("activity", [record("s", b"granted")])
            except KafkaForbidden:
                await asyncio.sleep(0.2)
                return False
            return True

        await eventually(served, within=30)
        assert sink.degraded() == []
    values = [m.value for m in await consume_all(secure_broker.plaintext, topics.activity)]
    assert values[0] == b"before"
    assert values[-1] == b"granted"
    assert b"refused" not in values
    assert [m.value for m in await consume_all(secure_broker.plaintext, topics.log)] == [
        b"other type"
    ]


async def test_a_topic_the_gateway_may_not_create_stops_only_its_type(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    topics = await _made(secure_broker, skip="log")
    missing = topics.log
    settings = _secured(
        secure_broker, "SASL_SSL:SCRAM-SHA-512", tmp_path, topics=topics, client="librdkafka"
    )
    async with _sink(settings) as sink:
        await eventually(functools.partial(_connected, sink), within=30)
        assert sink.degraded() == [f"topic {missing} does not exist"]
        with pytest.raises(KafkaTopicMissing):
            await sink.send("log", [record("s", b"nowhere")])
        await sink.send("activity", [record("s", b"served")])
    stored = await consume_all(secure_broker.plaintext, topics.activity)
    assert [m.value for m in stored] == [b"served"]
