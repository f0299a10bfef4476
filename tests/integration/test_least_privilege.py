"""The gateway where it may not create topics: CAFE_KAFKA_CREATE_TOPICS=never, and a topic
that is missing stops only its own record type (on the session's broker)."""

from __future__ import annotations

import dataclasses

import pytest

from devkit.samples import curl_bodies
from gateway.config import KafkaSettings
from gateway.kafka import health as kafka_health
from tests.support.app import GatewayClient, gateway_settings
from tests.support.kafka import Broker, create_topics, delete_topics, unique_topics
from tests.support.keys import KeyFile, json_headers
from tests.support.wait import eventually

pytestmark = pytest.mark.integration


async def test_with_create_topics_never_a_missing_topic_stops_only_its_type(
    gateway_client: GatewayClient,
    kafka: Broker,
    key_file: KeyFile,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka_health, "TOPICS_EVERY_S", 0.5)
    topics = dataclasses.replace(unique_topics(), create="never")
    await create_topics(kafka.bootstrap, [t for t in topics.all() if t != topics.log])
    client = await gateway_client(
        gateway_settings(
            keys_file=key_file.path, kafka=KafkaSettings(bootstrap=kafka.bootstrap, topics=topics)
        )
    )
    headers = json_headers(key_file.key)
    try:

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready)
        answer = await client.get("/readyz")
        assert await answer.json() == {
            "status": "ready",
            "degraded": [f"topic {topics.log} does not exist"],
        }
        sent = await client.post("/v1/activity", data=curl_bodies()["activity"], headers=headers)
        assert sent.status == 200
        refused = await client.post("/v1/log", data=curl_bodies()["log"], headers=headers)
        assert refused.status == 503
        assert (await refused.json())["code"] == "kafka_topic_missing"

        # Made by an admin: found within the gateway's next look, and produced to.
        await create_topics(kafka.bootstrap, [topics.log])

        async def log_served() -> bool:
            answer = await client.post("/v1/log", data=curl_bodies()["log"], headers=headers)
            return answer.status == 200

        await eventually(log_served)
        assert await (await client.get("/readyz")).json() == {"status": "ready"}
    finally:
        await delete_topics(kafka.bootstrap, lambda t: t in topics.all())
