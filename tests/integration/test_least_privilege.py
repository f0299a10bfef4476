"""The gateway where it may not create topics: CAFE_KAFKA_CREATE_TOPICS=never, and a topic
that is missing stops only its own record type (on the session's broker)."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.app import create_app
from gateway.config import KafkaSettings, Settings
from gateway.kafka import sink as kafka_sink
from tests.conftest import AiohttpClient
from tests.integration.conftest import Broker, create_topics, delete_topics, eventually
from tests.integration.test_api import unique_topics
from tests.keys import KeyFile
from tests.spec_samples import curl_bodies

pytestmark = pytest.mark.integration


async def test_with_create_topics_never_a_missing_topic_stops_only_its_type(
    aiohttp_client: AiohttpClient,
    kafka: Broker,
    key_file: KeyFile,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka_sink, "_TOPICS_EVERY_S", 0.5)
    topics = dataclasses.replace(unique_topics(), create="never")
    await create_topics(kafka.bootstrap, [t for t in topics.all() if t != topics.log])
    settings = Settings(
        keys_file=key_file.path, kafka=KafkaSettings(bootstrap=kafka.bootstrap, topics=topics)
    )
    client = await aiohttp_client(create_app(settings))
    headers = {"x-api-key": key_file.key, "Content-Type": "application/json"}
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
