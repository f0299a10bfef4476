"""CAFE_KAFKA_COMPRESSION end to end: with each codec, the records a client sent are read
back whole by a Python consumer (aiokafka) and by the Java client."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from devkit.samples import curl_bodies
from gateway.config import KafkaSettings
from tests.support.app import GatewayClient, gateway_settings
from tests.support.kafka import Broker, consume_all, delete_topics, java_consume, unique_topics
from tests.support.keys import KeyFile, json_headers
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

RECORDS = 200


def _batches() -> list[bytes]:
    """RECORDS activity records, the spec's sample each with an eventId of its own, in
    batches of 50."""
    (sample,) = orjson.loads(curl_bodies()["activity"])["records"]
    records = [{**sample, "eventId": str(uuid.uuid4())} for _ in range(RECORDS)]
    return [orjson.dumps({"records": records[i : i + 50]}) for i in range(0, RECORDS, 50)]


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_each_codec_is_read_back_by_python_and_java_consumers(
    gateway_client: GatewayClient, kafka: Broker, key_file: KeyFile, codec: str
) -> None:
    topics = unique_topics()
    client = await gateway_client(
        gateway_settings(
            keys_file=key_file.path,
            kafka=KafkaSettings(bootstrap=kafka.bootstrap, topics=topics, compression=codec),
        )
    )
    headers = json_headers(key_file.key)
    try:

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready)
        batches = _batches()
        answers = await asyncio.gather(
            *(client.post("/v1/activity", data=body, headers=headers) for body in batches)
        )
        assert [answer.status for answer in answers] == [200] * len(batches)
        sent = {r["eventId"]: r for body in batches for r in orjson.loads(body)["records"]}

        python = {}
        for message in await consume_all(kafka.bootstrap, topics.activity):
            record = orjson.loads(message.value)
            python[record["eventId"]] = record
        assert python == sent

        java = {}
        for read in await java_consume(kafka.bootstrap, topics.activity, RECORDS):
            record = orjson.loads(read.value)
            assert read.key == record["sessionId"]
            java[record["eventId"]] = record
        assert java == sent
    finally:
        await delete_topics(kafka.bootstrap, lambda t: t in topics.all())
