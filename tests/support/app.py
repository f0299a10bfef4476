"""In-process gateways: the suite's validator and Settings, their test server and client."""

from __future__ import annotations

import io
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import Settings, TopicSettings
from gateway.http.listener import GatewayRunner
from gateway.kafka.messages import Framer, Message
from gateway.logs import JsonFormatter
from gateway.sink import MemorySink
from tests.support.keys import KeyFile, json_headers
from tests.support.scrape import Samples, scrape

# The type of pytest-aiohttp's `aiohttp_client` fixture, for every test's annotations.
AiohttpClient = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]
# The type of the `gateway_client` fixture (tests/conftest.py): Settings, and create_app's
# keyword arguments (sink, registry...) with the test server's `server_kwargs`.
GatewayClient = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]

# The record validator the suite runs with: CAFE_VALIDATOR, read and checked as `serve`
# reads it (.ci/run runs the suite with each). Gateways the integration tests start as
# processes inherit the variable; every gateway app a test serves is built from Settings
# that name it (`gateway_settings` gives it), which the `aiohttp_client` fixture checks.
VALIDATOR = Settings.from_env({"CAFE_VALIDATOR": os.environ.get("CAFE_VALIDATOR", "")}).validator


def gateway_settings(env: Mapping[str, str] | None = None, **fields: Any) -> Settings:
    """Settings for a gateway a test builds, with the suite's VALIDATOR unless they name
    one: read from `env` (CAFE_* variables) as `serve` reads them, or made of `fields`."""
    if env is not None:
        assert not fields, "either the variables or the fields"
        return Settings.from_env({"CAFE_VALIDATOR": VALIDATOR, **env})
    return Settings(**{"validator": VALIDATOR, **fields})


class GatewayTestServer(TestServer):
    """A test server that serves a gateway app as `cafe-gateway serve` does: through
    GatewayRunner, so the connection cap and the answers to unparsable requests hold."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        # aiohttp's test server cancels a handler whose client has gone; `serve` does not
        # (aiohttp's default), so a request keeps running to its answer, as in production.
        kwargs.pop("handler_cancellation", None)
        return GatewayRunner(self.app, **kwargs)


class Answer(NamedTuple):
    """A gateway's answer: its status, its body as JSON, and the response (headers...)."""

    status: int
    body: Any
    response: ClientResponse


class Gateway:
    """A gateway app served by a test client, the key it sends, and its sink if in memory."""

    def __init__(
        self,
        client: TestClient,  # type: ignore[type-arg]
        key_file: KeyFile,
        *,
        key: str | None = None,
        sink: MemorySink | None = None,
    ) -> None:
        self.client = client
        self.key_file = key_file
        self.key = key_file.key if key is None else key
        self._sink = sink

    @property
    def sink(self) -> MemorySink:
        """The in-memory sink the gateway stores records in."""
        assert self._sink is not None, "a gateway on Kafka: read its topics"
        return self._sink

    @property
    def port(self) -> int:
        port = self.client.port
        assert port is not None
        return port

    async def post(
        self, path: str, body: bytes | Any, *, key: str | None = None, **headers: str
    ) -> Answer:
        """POST `body` (bytes as they are, anything else as JSON) as application/json with
        the gateway's key, or `key` ("" for none). `headers` are added or replace these,
        "_" in a name standing for "-"."""
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        key = self.key if key is None else key
        sent = json_headers(key) if key else {"Content-Type": "application/json"}
        sent.update({name.replace("_", "-"): value for name, value in headers.items()})
        # A file-like body: aiohttp warns that a large bytes body blocks the event loop.
        resp = await self.client.post(path, data=io.BytesIO(data), headers=sent)
        return Answer(resp.status, await resp.json(content_type=None), resp)

    def produced(self) -> dict[str, list[Message]]:
        """What the in-memory sink holds, as the Kafka sink would produce it: messages by
        topic (the default topics), of the topics that would hold anything."""
        return produced(self.sink)

    async def metrics(self) -> Samples:
        return await scrape(self.client)


def produced(sink: MemorySink, topics: TopicSettings | None = None) -> dict[str, list[Message]]:
    """What `sink` holds, framed as the Kafka sink frames it (gateway/kafka/messages.py):
    messages by topic, of the topics that would hold anything."""
    names = (topics or TopicSettings()).by_record_type()
    found: dict[str, list[Message]] = {}
    for record_type, records in sink.records.items():
        framer = Framer(record_type)
        found.setdefault(names[record_type], []).extend(framer.record(r) for r in records)
    for record_type, rejected in sink.rejected.items():
        framer = Framer(record_type)
        dead = found.setdefault((topics or TopicSettings()).deadletter, [])
        dead.extend(framer.dead_letter(r) for r in rejected)
    return {topic: messages for topic, messages in found.items() if messages}


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access-log lines captured, as the JSON formatter writes them."""
    formatter = JsonFormatter()
    return [orjson.loads(formatter.format(r)) for r in caplog.records if r.name == "gateway.access"]
