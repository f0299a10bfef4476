"""Schema-driven fuzzing on real Kafka: schemathesis from the gateway's own OpenAPI document.

The gateway serves a real socket from the test's loop; schemathesis is synchronous
(requests), so its runs go to a worker thread. What Kafka holds afterwards must be
exactly what the answers acknowledged, and every record on a record topic valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from devkit.net import free_port
from gateway.app import create_app
from gateway.config import KafkaSettings, Settings, TopicSettings
from gateway.schemas import load_record_types
from tests.support.app import VALIDATOR, gateway_settings
from tests.support.kafka import Broker, consume_all, delete_topics, unique_topics
from tests.support.keys import KeyFile, json_headers
from tests.support.records import NAMES
from tests.support.served import gateway_env, ready_in_a_row, running

pytestmark = pytest.mark.integration

PLATFORM = "analytics-portal"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# (operation, generation mode, examples). Negative data exists only where there is a
# body or a parameter to break; GET /v1/openapi.json has neither.
RUNS = [
    *((f"POST /v1/{name}", mode, 25) for name in NAMES for mode in GenerationMode),
    ("GET /v1/ip", GenerationMode.POSITIVE, 5),
    ("GET /v1/ip", GenerationMode.NEGATIVE, 10),
    ("GET /v1/schema/{recordType}", GenerationMode.POSITIVE, 5),
    ("GET /v1/schema/{recordType}", GenerationMode.NEGATIVE, 10),
    ("GET /v1/openapi.json", GenerationMode.POSITIVE, 1),
]


@dataclass
class Answers:
    """What the answers said, to hold Kafka to afterwards."""

    statuses: dict[tuple[str, int], int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    rejected: int = 0


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[str]:
    """The gateway on a free loopback port, ready; yields its base URL."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(base) as http:
            await ready_in_a_row(http, 1)
        yield base
    finally:
        await runner.cleanup()


def _fuzz(base: str, doc: dict[str, Any], key: str) -> Answers:
    """Run every schemathesis run of RUNS against `base`; raise on the first failure."""
    schema = schemathesis.openapi.from_dict(doc)
    answers = Answers()
    headers = {"x-api-key": key}
    for label, mode, examples in RUNS:
        operation = schema.find_operation_by_label(label)
        assert operation is not None, label
        run = _one_run(base, headers, operation.as_strategy(generation_mode=mode), CHECKS, answers)
        settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(run)()
    return answers


def _one_run(
    base: str,
    headers: dict[str, str],
    cases: st.SearchStrategy[Case[Any]],
    checks: list[Any],
    answers: Answers,
) -> Callable[[], None]:
    @given(case=cases)
    def run(case: Case[Any]) -> None:
        body: Any = case.body
        records = body.get("records") if isinstance(body, dict) else None
        if case.meta is not None and case.meta.generation.mode.is_positive and records:
            # Valid records from anywhere would all be 422 `forbidden`: write them
            # from the key's platform, so accepted records reach Kafka too.
            for record in records:
                record["productPlatform"] = PLATFORM
        response = case.call(base_url=base, headers=headers, timeout=30)
        case.validate_response(response, checks=checks, headers=headers)
        label = f"{case.method} {case.path}"
        answers.statuses[(label, response.status_code)] = (
            answers.statuses.get((label, response.status_code), 0) + 1
        )
        if case.method == "POST" and response.status_code in (200, 207, 422):
            body = response.json()
            name = case.path.rsplit("/", 1)[1]
            answers.accepted[name] = answers.accepted.get(name, 0) + body["accepted"]
            answers.rejected += body.get("rejected", 0)

    return run


@pytest.fixture
async def topics(kafka: Broker) -> AsyncIterator[TopicSettings]:
    topics = unique_topics()
    yield topics
    await delete_topics(kafka.bootstrap, lambda t: t in topics.all())


async def test_schemathesis_finds_no_5xx_and_every_answer_is_as_documented(
    kafka: Broker, key_file: KeyFile, topics: TopicSettings
) -> None:
    settings_ = gateway_settings(
        keys_file=key_file.path,
        max_body_bytes=256 * 1024,
        kafka=KafkaSettings(bootstrap=kafka.bootstrap, topics=topics),
    )
    async with served(settings_) as base, aiohttp.ClientSession(base) as http:
        async with http.get("/v1/openapi.json") as resp:
            doc = await resp.json()
        answers = await asyncio.to_thread(_fuzz, base, doc, key_file.key)

    assert not [s for (_, s) in answers.statuses if s >= 500], answers.statuses
    # The run reached every kind of answer the POSTs document, not only refusals.
    post_statuses = {s for (label, s) in answers.statuses if label.startswith("POST")}
    assert {200, 400, 422} <= post_statuses, answers.statuses

    # Kafka holds exactly what the answers acknowledged, each record valid.
    record_types = load_record_types(topics.by_record_type(), VALIDATOR)
    for name in NAMES:
        messages = await consume_all(kafka.bootstrap, getattr(topics, name))
        assert len(messages) == answers.accepted.get(name, 0), name
        for message in messages:
            record = orjson.loads(message.value)
            assert record_types[name].check(record) is None
            assert message.key == record["sessionId"].encode()
    assert len(await consume_all(kafka.bootstrap, topics.deadletter)) == answers.rejected


async def test_the_schema_route_is_documented_with_the_type_it_serves(
    kafka: Broker, key_file: KeyFile, topics: TopicSettings
) -> None:
    settings_ = gateway_settings(
        keys_file=key_file.path, kafka=KafkaSettings(bootstrap=kafka.bootstrap, topics=topics)
    )
    async with served(settings_) as base, aiohttp.ClientSession(base) as http:
        async with http.get("/v1/openapi.json") as resp:
            doc = await resp.json()
        async with http.get("/v1/schema/log") as resp:
            served_type = resp.content_type
    documented = doc["paths"]["/v1/schema/{recordType}"]["get"]["responses"]["200"]["content"]
    assert served_type in documented


# ---------------------------------------------------------------------------------------
# Memory: a burst of large hostile bodies leaves the process where it was.
# ---------------------------------------------------------------------------------------

FIVE_MB = 5 * 1024 * 1024
# 500 MB in all: enough to show a leak of a body per request (5 MB each), in ~15 s.
BURST = 100
# Each is refused at a different stage: after the parse fails at once, after a full parse
# (a 5 MB string), and on bytes that are not UTF-8 deep inside.
HOSTILE_5MB = [
    b"{" + b"x" * (FIVE_MB - 1),
    b'{"records": "' + b"a" * (FIVE_MB - 15) + b'"}',
    b'{"records": ["' + b"a" * (FIVE_MB - 20) + b'\xff"]}',
    b'{"records": [' + b"[1]," * ((FIVE_MB - 20) // 4) + b"300]}",
]


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def test_rss_returns_to_baseline_after_100_hostile_5mb_bodies(
    kafka: Broker, key_file: KeyFile
) -> None:
    prefix = f"fuzz.{uuid.uuid4().hex[:8]}"
    port = free_port()
    # Room for four bodies at once, so the burst is worked on, not shed with 503.
    env = gateway_env(
        port, kafka, key_file, prefix, CAFE_MAX_INFLIGHT_BYTES=str(4 * FIVE_MB + 1024)
    )
    headers = json_headers(key_file.key)
    try:
        async with running(env) as proc, aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await ready_in_a_row(http, 1)

            async def send(body: bytes) -> int:
                async with http.post("/v1/log", data=io.BytesIO(body), headers=headers) as resp:
                    await resp.read()
                    return resp.status

            started = _rss_mb(proc.pid)
            # Warm up with one batch of each body, four at once: the allocator keeps the
            # arenas its high-water mark needed (a 5 MB body of `[1],` items is 1.3 M
            # lists, ~80 MB), so the baseline is the steady state, and a rise past it
            # after the burst is memory kept per request.
            for body in HOSTILE_5MB:
                assert await asyncio.gather(*(send(body) for _ in range(4))) == [400] * 4
            baseline = _rss_mb(proc.pid)
            peak = baseline
            for start in range(0, BURST, 4):
                batch = [HOSTILE_5MB[(start + i) % len(HOSTILE_5MB)] for i in range(4)]
                statuses = await asyncio.gather(*(send(body) for body in batch))
                assert set(statuses) == {400}, statuses
                peak = max(peak, _rss_mb(proc.pid))
            # Freed memory goes back to the OS as the allocator decides; give it a moment.
            after = _rss_mb(proc.pid)
            for _ in range(20):
                if after - baseline < 50:
                    break
                await asyncio.sleep(0.1)
                after = _rss_mb(proc.pid)
            rss = {"started": started, "baseline": baseline, "peak": peak, "after": after}
            print("RSS MB:", {k: round(v) for k, v in rss.items()})
            assert after - baseline < 50, rss
            await proc.stop()
    finally:
        await delete_topics(kafka.bootstrap, lambda t: t.startswith(prefix + "."))
