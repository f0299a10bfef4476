"""The Kafka sink with the least rights, over the fake cluster: a topic Kafka refuses the
gateway writes to, or one that does not exist, stops only its own record type."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import KafkaSettings, TopicSettings
from gateway.errors import KafkaForbidden, KafkaTopicMissing
from gateway.kafka import health as kafka_health
from gateway.kafka.sink import KafkaSink
from gateway.metrics import Metrics
from gateway.sink import Delivery, Record
from tests.support.fake_kafka import FakeKafka, Mode
from tests.support.records import record, rejected

TOPICS = TopicSettings(activity="t.activity", log="t.log", profile="t.profile", deadletter="t.dl")


class FakeKafkaSink(KafkaSink):
    """The Kafka sink over the fake cluster, whose topics all exist."""

    def __init__(self, kafka: FakeKafka, registry: CollectorRegistry) -> None:
        super().__init__(KafkaSettings(topics=TOPICS), Metrics(registry, "test"))
        self._kafka = kafka

    def _new_producer(self) -> Any:
        return self._kafka.new_producer()

    async def _ensure_topics(self, producer: Any) -> None:
        for topic in TOPICS.all():
            await producer.partitions_for(topic)


def _messages(n: int = 3) -> list[Record]:
    return [record("session-1", b'{"n":%d}' % i) for i in range(n)]


async def _connected(kafka: FakeKafka, registry: CollectorRegistry) -> FakeKafkaSink:
    sink = FakeKafkaSink(kafka, registry)
    await sink.start()
    for _ in range(500):
        if sink._producer is not None:
            return sink
        await asyncio.sleep(0.01)
    raise AssertionError("the sink did not connect to the fake cluster")


def _stored(kafka: FakeKafka, topic: str) -> int:
    return sum(1 for copy in kafka.log if copy.topic == topic)


async def test_a_topic_kafka_refuses_writes_to_stops_only_its_type_until_allowed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kafka_health, "FORBIDDEN_PROBE_S", 0.3)
    caplog.set_level(logging.INFO)
    kafka = FakeKafka(list(TOPICS.all()))
    registry = CollectorRegistry()
    sink = await _connected(kafka, registry)
    try:
        kafka.modes["t.activity"] = Mode.REFUSING
        with pytest.raises(KafkaForbidden):
            await sink.send("activity", _messages())
        producers = len(kafka.producers)
        # Refused at once, without a batch, and so without another new producer.
        for _ in range(20):
            with pytest.raises(KafkaForbidden):
                await sink.send("activity", _messages())
        assert len(kafka.producers) == producers
        assert sink.degraded() == ["Kafka refuses writes to topic t.activity"]
        # The other types are served meanwhile.
        assert await sink.send("log", _messages()) is Delivery.STORED
        assert _stored(kafka, "t.log") == 3
        refused = registry.get_sample_value(
            "cafe_kafka_records_refused_total", {"topic": "t.activity", "reason": "forbidden"}
        )
        assert refused == 60
        # Past the probe interval one request tries again: still refused, it costs one
        # producer at most.
        await asyncio.sleep(0.35)
        with pytest.raises(KafkaForbidden):
            await sink.send("activity", _messages())
        assert len(kafka.producers) <= producers + 1
        # The right granted: the next request that tries goes through, and the rest follow.
        kafka.modes["t.activity"] = Mode.UP
        await asyncio.sleep(0.35)
        assert await sink.send("activity", _messages()) is Delivery.STORED
        assert await sink.send("activity", _messages()) is Delivery.STORED
        assert _stored(kafka, "t.activity") == 6
        assert sink.degraded() == []
        said = [
            (r.levelname, r.getMessage()) for r in caplog.records if "t.activity" in r.getMessage()
        ]
        errors = [text for level, text in said if level == "ERROR"]
        assert len(errors) == 1, said
        assert "kafka_forbidden" in errors[0]
        assert any(level == "INFO" and "again" in text for level, text in said)
    finally:
        await sink.close()


async def test_a_missing_topic_stops_only_its_type_until_it_exists(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kafka = FakeKafka(list(TOPICS.all()))
    sink = await _connected(kafka, CollectorRegistry())
    try:
        with caplog.at_level(logging.INFO):
            sink.health.note_missing(["t.log"])
            with pytest.raises(KafkaTopicMissing, match=r"t\.log"):
                await sink.send("log", _messages())
            assert await sink.send("activity", _messages()) is Delivery.STORED
            assert sink.degraded() == ["topic t.log does not exist"]
            sink.health.note_missing(["t.log"])  # still missing: said once
            sink.health.note_missing([])
            assert await sink.send("log", _messages()) is Delivery.STORED
        assert _stored(kafka, "t.log") == 3
        said = [r.getMessage() for r in caplog.records if "t.log" in r.getMessage()]
        assert len(said) == 2, said
        assert "503 kafka_topic_missing" in said[0] and "exists now" in said[1]
    finally:
        await sink.close()


async def test_a_forbidden_dead_letter_topic_refuses_the_request_before_any_record_is_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka = FakeKafka(list(TOPICS.all()))
    sink = await _connected(kafka, CollectorRegistry())
    try:
        kafka.modes["t.dl"] = Mode.REFUSING
        with pytest.raises(KafkaForbidden):
            await sink.send("activity", _messages(), [rejected(b'{"n":0}', "session-1")])
        stored = _stored(kafka, "t.activity")  # the request that found out
        # Its retries store nothing more while the dead-letter topic is refused.
        for _ in range(5):
            with pytest.raises(KafkaForbidden, match=r"t\.dl"):
                await sink.send("activity", _messages(), [rejected(b'{"n":0}', "session-1")])
        assert _stored(kafka, "t.activity") == stored
        # A request without rejected records is served.
        assert await sink.send("activity", _messages()) is Delivery.STORED
    finally:
        await sink.close()
