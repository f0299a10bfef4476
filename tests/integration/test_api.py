"""The CAFe API end to end: HTTP in, records on real Kafka topics out."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from devkit.samples import curl_bodies
from gateway.config import KafkaSettings, Settings, TopicSettings
from gateway.kafka.messages import DEAD_LETTER_MAX_BYTES
from tests.support.app import Answer, Gateway, GatewayClient, gateway_settings
from tests.support.kafka import (
    KAFKA_SH,
    Broker,
    broker_pid,
    consume_all,
    delete_topics,
    frozen,
    java_consume,
    unique_topics,
)
from tests.support.keys import KeyFile, json_headers, make_key_file
from tests.support.records import NAMES
from tests.support.wait import eventually

pytestmark = pytest.mark.integration


class KafkaGateway(Gateway):
    """A gateway on real Kafka, with topics and a keys file of its own."""

    def __init__(
        self,
        client: TestClient,  # type: ignore[type-arg]
        bootstrap: str,
        topics: TopicSettings,
        key_file: KeyFile,
    ) -> None:
        super().__init__(client, key_file)
        self.bootstrap = bootstrap
        self.topics = topics

    async def on_topic(self, topic: str) -> list[Any]:
        return await consume_all(self.bootstrap, topic)

    async def counts(self) -> dict[str, int]:
        """How many messages each of the gateway's topics holds."""
        return {t: len(await self.on_topic(t)) for t in self.topics.all()}


async def start_gateway(
    gateway_client: GatewayClient,
    bootstrap: str,
    key_file: KeyFile,
    *,
    max_body_bytes: int = 256 * 1024,
    **kafka: Any,
) -> KafkaGateway:
    topics = unique_topics()
    client = await gateway_client(
        gateway_settings(
            keys_file=key_file.path,
            max_body_bytes=max_body_bytes,
            kafka=KafkaSettings(bootstrap=bootstrap, topics=topics, **kafka),
        )
    )

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await eventually(ready)
    return KafkaGateway(client, bootstrap, topics, key_file)


@pytest.fixture
async def gateway(
    gateway_client: GatewayClient, kafka: Broker, key_file: KeyFile
) -> AsyncIterator[KafkaGateway]:
    gw = await start_gateway(gateway_client, kafka.bootstrap, key_file)
    yield gw
    await delete_topics(kafka.bootstrap, lambda t: t in gw.topics.all())


@pytest.fixture
async def roomy_gateway(
    gateway_client: GatewayClient, kafka: Broker, key_file: KeyFile
) -> AsyncIterator[KafkaGateway]:
    """A gateway with the default body limit (10 MiB), room for records of megabytes."""
    gw = await start_gateway(
        gateway_client, kafka.bootstrap, key_file, max_body_bytes=Settings().max_body_bytes
    )
    yield gw
    await delete_topics(kafka.bootstrap, lambda t: t in gw.topics.all())


@pytest.mark.parametrize("name", NAMES)
async def test_the_spec_curl_sample_lands_on_its_topic(gateway: KafkaGateway, name: str) -> None:
    status, body, _ = await gateway.post(f"/v1/{name}", curl_bodies()[name])
    assert (status, body) == (200, {"accepted": 1})

    (sent,) = orjson.loads(curl_bodies()[name])["records"]
    topic = getattr(gateway.topics, name)
    (message,) = await gateway.on_topic(topic)
    assert message.key == sent["sessionId"].encode()
    stored = orjson.loads(message.value)
    assert stored.keys() == sent.keys()
    for field, value in sent.items():
        assert stored[field] == value, field
    headers = dict(message.headers)
    assert headers["cafe-key-id"] == gateway.key_file.record.id.encode()
    assert headers["cafe-schema"] == name.encode()
    assert {k for k in headers} == {
        "cafe-key-id",
        "cafe-client-ip",
        "cafe-received-at",
        "cafe-request-id",
        "cafe-schema",
        "cafe-schema-version",
        "traceparent",
    }
    # Exactly one message, on this topic only.
    assert await gateway.counts() == {t: int(t == topic) for t in gateway.topics.all()}


async def test_a_mixed_batch_puts_valid_records_on_the_topic_and_the_rest_in_dead_letters(
    gateway: KafkaGateway,
) -> None:
    (good,) = orjson.loads(curl_bodies()["activity"])["records"]
    batch = [
        {**good, "eventId": "ok-1"},
        {**good, "eventId": "late", "eventTime": "2019-01-21T11: 54: 37.805-08: 00"},
        {**good, "eventId": "ok-2"},
        {**good, "eventId": "elsewhere", "productPlatform": "billing"},
    ]
    status, body, _ = await gateway.post("/v1/activity", orjson.dumps({"records": batch}))
    assert status == 207
    assert (body["accepted"], body["rejected"]) == (2, 2)
    assert [(r["index"], r["eventId"], r["reason"]) for r in body["rejections"]] == [
        (1, "late", "invalid"),
        (3, "elsewhere", "forbidden"),
    ]

    accepted = await gateway.on_topic(gateway.topics.activity)
    assert sorted(orjson.loads(m.value)["eventId"] for m in accepted) == ["ok-1", "ok-2"]
    dead = await gateway.on_topic(gateway.topics.deadletter)
    assert sorted(orjson.loads(m.value)["eventId"] for m in dead) == ["elsewhere", "late"]
    reasons = {orjson.loads(m.value)["eventId"]: dict(m.headers) for m in dead}
    assert reasons["late"]["cafe-reject-reason"] == b"invalid"
    assert orjson.loads(reasons["late"]["cafe-errors"])[0]["pointer"] == "/eventTime"
    assert reasons["elsewhere"]["cafe-reject-reason"] == b"forbidden"


async def test_format_versions_1_and_2_in_one_request_are_read_by_python_and_java(
    gateway: KafkaGateway,
) -> None:
    (v1,) = orjson.loads(curl_bodies()["activity"])["records"]
    v2 = {**v1, "messageFormatVersion": 2, "eventValue": 9.75, "referrer": "https://a.example/"}
    batch = [
        {**v1, "eventId": "v1-a"},
        {**v2, "eventId": "v2-a"},
        {**v1, "eventId": "v1-b", "sessionId": "another-session"},
        {**v2, "eventId": "v3", "messageFormatVersion": 3},
        {**v2, "eventId": "v2-b", "sessionId": "another-session"},
    ]
    status, body, _ = await gateway.post("/v1/activity", orjson.dumps({"records": batch}))
    assert (status, body["accepted"]) == (207, 4), body
    assert [(r["eventId"], r["reason"]) for r in body["rejections"]] == [
        ("v3", "unknown_format_version")
    ]
    expected = {r["eventId"]: r for r in batch if r["eventId"] != "v3"}

    python = {}
    for message in await gateway.on_topic(gateway.topics.activity):
        record = orjson.loads(message.value)
        version = dict(message.headers)["cafe-schema-version"]
        python[record["eventId"]] = (record, version)
    assert python == {
        event: (record, str(record["messageFormatVersion"]).encode())
        for event, record in expected.items()
    }
    java = {}
    for read in await java_consume(gateway.bootstrap, gateway.topics.activity, len(expected)):
        record = orjson.loads(read.value)
        assert read.key == record["sessionId"]
        java[record["eventId"]] = (record, read.headers["cafe-schema-version"])
    assert java == {
        event: (record, str(record["messageFormatVersion"])) for event, record in expected.items()
    }
    (dead,) = await gateway.on_topic(gateway.topics.deadletter)
    headers = dict(dead.headers)
    assert headers["cafe-reject-reason"] == b"unknown_format_version"
    assert "cafe-schema-version" not in headers


async def test_request_errors_produce_nothing(gateway: KafkaGateway) -> None:
    sample = curl_bodies()["log"]
    (record,) = orjson.loads(sample)["records"]
    disabled_key, disabled = gateway.key_file.add("analytics-portal")
    gateway.key_file.disable(disabled.id)

    async def key_disabled() -> bool:
        return (await gateway.post("/v1/log", sample, key=disabled_key))[0] == 401

    await eventually(key_disabled, within=10)

    cases = [
        (await gateway.post("/v1/log", b'{"records": [{"messageType": '), 400, "invalid_json"),
        (await gateway.post("/v1/log", b'{"records": []}'), 400, "invalid_envelope"),
        (
            await gateway.post("/v1/log", orjson.dumps({"records": [record] * 501})),
            400,
            "invalid_envelope",
        ),
        (
            await gateway.post("/v1/log", orjson.dumps({"records": [record], "batch": 1})),
            400,
            "invalid_envelope",
        ),
        (
            await gateway.post("/v1/log", sample, Content_Type="text/html"),
            415,
            "unsupported_media_type",
        ),
        (
            await gateway.post(
                "/v1/log", orjson.dumps({"records": [record] * 500, "pad": "x" * 300_000})
            ),
            413,
            "payload_too_large",
        ),
        (await gateway.post("/v1/log", sample, key=""), 401, "missing_api_key"),
        (await gateway.post("/v1/log", sample, key="cafe_not_a_key"), 401, "invalid_api_key"),
        (await gateway.post("/v1/log", sample, key=disabled_key), 401, "invalid_api_key"),
    ]
    for (status, body, _), want_status, want_code in cases:
        assert (status, body["code"]) == (want_status, want_code), body
    assert await gateway.counts() == dict.fromkeys(gateway.topics.all(), 0)


async def test_a_platform_the_key_may_not_write_is_rejected_into_dead_letters(
    gateway: KafkaGateway,
) -> None:
    web_key, _ = gateway.key_file.add("web-shop")

    async def key_loaded() -> bool:
        return (await gateway.post("/v1/log", curl_bodies()["log"], key=web_key))[0] != 401

    await eventually(key_loaded, within=5)
    status, body, _ = await gateway.post("/v1/log", curl_bodies()["log"], key=web_key)
    assert status == 422
    assert body["rejections"][0]["reason"] == "forbidden"
    counts = await gateway.counts()
    assert counts[gateway.topics.log] == 0
    # One dead letter per attempt: the poll above and the request checked here.
    assert counts[gateway.topics.deadletter] == 2


async def test_key_file_edits_apply_while_the_gateway_runs(gateway: KafkaGateway) -> None:
    sample = curl_bodies()["log"]
    new_key, new_record = gateway.key_file.add("analytics-portal")

    async def new_key_works() -> bool:
        return (await gateway.post("/v1/log", sample, key=new_key))[0] == 200

    await eventually(new_key_works, within=5)

    gateway.key_file.disable(new_record.id)

    async def new_key_refused() -> bool:
        return (await gateway.post("/v1/log", sample, key=new_key))[0] == 401

    await eventually(new_key_refused, within=5)
    # The original key kept working throughout.
    assert (await gateway.post("/v1/log", sample))[0] == 200


async def test_kafka_frozen_or_down_is_503_and_the_gateway_recovers_when_it_returns(
    gateway_client: GatewayClient, tmp_path: Path, spare_broker: tuple[str, dict[str, str]]
) -> None:
    bootstrap, env = spare_broker
    gw = await start_gateway(
        gateway_client, bootstrap, make_key_file(tmp_path), produce_timeout_ms=1500
    )
    sample = curl_bodies()["log"]
    assert (await gw.post("/v1/log", sample))[:2] == (200, {"accepted": 1})

    # A broker that takes no requests (frozen) never acknowledges: 503, not a hang.
    with frozen(broker_pid(env["CAFE_KAFKA_PORT"])):
        resp = await gw.client.post(
            "/v1/log",
            data=sample,
            headers=json_headers(gw.key),
        )
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json(content_type=None))["code"] == "kafka_unavailable"

    # A broker that is gone: 503 again, and readiness says so.
    await asyncio.to_thread(
        subprocess.run, [str(KAFKA_SH), "down"], env=env, check=True, capture_output=True
    )
    status, body, _ = await gw.post("/v1/log", sample)
    assert (status, body["code"]) == (503, "kafka_unavailable")

    async def not_ready() -> bool:
        return (await gw.client.get("/readyz")).status == 503

    await eventually(not_ready, within=10)

    async def ready_gauge_is(value: int) -> bool:
        # The gauge follows the sink's own health check, every 5 s.
        return (await gw.metrics()).value("cafe_kafka_ready") == value

    await eventually(functools.partial(ready_gauge_is, 0), within=10)
    down = await gw.metrics()
    assert down.value("cafe_kafka_ready") == 0
    assert down.value("cafe_kafka_errors_total") >= 2
    assert down.value("cafe_records_total", type="log", outcome="unavailable") == 2

    # The broker comes back: the same gateway, not restarted, is ready and takes records.
    await asyncio.to_thread(
        subprocess.run, [str(KAFKA_SH), "up"], env=env, check=True, capture_output=True
    )

    async def ready() -> bool:
        return (await gw.client.get("/readyz")).status == 200

    await eventually(ready)
    assert (await gw.post("/v1/log", sample))[:2] == (200, {"accepted": 1})
    await eventually(functools.partial(ready_gauge_is, 1), within=10)
    back = await gw.metrics()
    assert back.value("cafe_kafka_ready") == 1
    assert back.value("cafe_records_total", type="log", outcome="accepted") == 2


def activity(event_id: str, **changes: Any) -> dict[str, Any]:
    (record,) = orjson.loads(curl_bodies()["activity"])["records"]
    return {**record, "eventId": event_id, **changes}


async def send_activity(gw: KafkaGateway, *records: dict[str, Any]) -> Answer:
    """POST these activity records as one batch."""
    return await gw.post("/v1/activity", orjson.dumps({"records": records}))


async def test_a_record_of_megabytes_is_rejected_and_kept_truncated_without_wedging(
    roomy_gateway: KafkaGateway,
) -> None:
    gw = roomy_gateway
    # 2 MB of a character that takes two bytes in UTF-8: the cut must not split one.
    huge = activity("huge", eventCategory="é" * 1_000_000)
    status, body, _ = await send_activity(gw, huge)
    assert status == 422, body
    assert [(r["index"], r["reason"]) for r in body["rejections"]] == [(0, "invalid")]

    # The same session's next rejected records are stored as usual: nothing is wedged.
    for n in range(3):
        small = activity(f"small-{n}", eventTime="yesterday")
        assert (await send_activity(gw, small))[0] == 422
    # A valid record beside a huge invalid one: 207, and the valid one stored once.
    both = [activity("valid"), activity("huge-2", eventCategory="x" * 2_000_000)]
    status, body, _ = await send_activity(gw, *both)
    assert (status, body["accepted"], body["rejected"]) == (207, 1, 1)

    (valid,) = await gw.on_topic(gw.topics.activity)
    assert orjson.loads(valid.value)["eventId"] == "valid"
    dead = await gw.on_topic(gw.topics.deadletter)
    assert len(dead) == 5
    for message, sent in ((truncated_at(dead, 0), huge), (truncated_at(dead, 1), both[1])):
        whole = orjson.dumps(sent)
        headers = dict(message.headers)
        assert headers["cafe-truncated"] == b"true"
        assert headers["cafe-original-bytes"] == str(len(whole)).encode()
        assert headers["cafe-original-sha256"] == hashlib.sha256(whole).hexdigest().encode()
        assert headers["cafe-reject-reason"] == b"invalid"
        assert orjson.loads(headers["cafe-errors"])[0]["pointer"] == "/eventCategory"
        assert DEAD_LETTER_MAX_BYTES - 4 < len(message.value) <= DEAD_LETTER_MAX_BYTES
        assert whole.startswith(message.value)
        message.value.decode()  # whole characters only
        assert message.key == sent["sessionId"].encode()
    untouched = [m for m in dead if "cafe-truncated" not in dict(m.headers)]
    assert sorted(orjson.loads(m.value)["eventId"] for m in untouched) == [
        "small-0", "small-1", "small-2",
    ]  # fmt: skip


def truncated_at(dead: list[Any], index: int) -> Any:
    """The one truncated dead letter that was record `index` of its request."""
    (found,) = [
        m
        for m in dead
        if dict(m.headers).get("cafe-record-index") == str(index).encode()
        and "cafe-truncated" in dict(m.headers)
    ]
    return found


async def test_a_session_id_too_long_for_a_key_leaves_its_dead_letter_keyless(
    roomy_gateway: KafkaGateway,
) -> None:
    gw = roomy_gateway
    record = activity("long-session", sessionId="s" * 900_000)
    status, body, _ = await send_activity(gw, record)
    assert status == 422, body
    assert body["rejections"][0]["errors"][0]["pointer"] == "/sessionId"
    (message,) = await gw.on_topic(gw.topics.deadletter)
    assert message.key is None
    assert dict(message.headers)["cafe-key-omitted"] == (
        b"sessionId is 900000 characters; a key is 1 to 128"
    )
    assert dict(message.headers)["cafe-record-index"] == b"0"
