"""The private parts of aiohttp and aiokafka the gateway leans on are there, as it uses them.

pyproject.toml keeps both libraries below their next minor version because of these
parts. Before raising a bound, run this file on the new version: a failure names the
part, the code that uses it and what for, and a comment at that use says why no public
API serves. mypy already catches a typed aiohttp attribute or override that goes away;
these tests also catch aiohttp calling or meaning one differently, and any change in
aiokafka, which ships no types. They use the installed libraries and need no Kafka.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
from importlib.metadata import version
from typing import Any

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.test_utils import RawTestServer, TestServer
from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from prometheus_client import CollectorRegistry, Counter, Histogram, values

from gateway.kafka.batcher import adder
from gateway.kafka.messages import Message
from tests.support.wait import holds_within

LISTENER = "gateway/http/listener.py"
KAFKA = "gateway/kafka/sink.py"


def changed(library: str, part: str, user: str, purpose: str) -> str:
    """The failure message: what changed, what relies on it, and where to read why."""
    return (
        f"{library} {version(library)} no longer has {part} as {user} uses it, to "
        f"{purpose}; see the comment there, and keep {library} below this version in "
        "pyproject.toml until that code changes"
    )


def is_coroutine_taking(function: Any, *names: str) -> bool:
    """Whether `function` is a coroutine function whose parameters start with `names`."""
    if not inspect.iscoroutinefunction(function):
        return False
    return list(inspect.signature(function).parameters)[: len(names)] == list(names)


async def answer(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response()


async def test_app_runner_builds_its_server_in_make_server() -> None:
    why = changed("aiohttp", "AppRunner._make_server", LISTENER, "serve our own connections")
    assert is_coroutine_taking(getattr(web.AppRunner, "_make_server", None), "self"), why
    made: list[web.Server] = []

    class Runner(web.AppRunner):
        async def _make_server(self) -> web.Server:
            made.append(await super()._make_server())
            return made[-1]

    runner = Runner(web.Application())
    await runner.setup()
    try:
        assert made and runner.server is made[0], why
    finally:
        await runner.cleanup()


def test_app_runner_keeps_the_server_settings_in_kwargs() -> None:
    why = changed("aiohttp", "BaseRunner._kwargs", LISTENER, "rebuild its Server as ours")
    runner = web.AppRunner(web.Application(), keepalive_timeout=7.5)
    settings = getattr(runner, "_kwargs", None)
    assert isinstance(settings, dict) and settings.get("keepalive_timeout") == 7.5, why
    assert "access_log_class" in settings, why  # AppRunner completes them


async def test_server_keeps_the_connection_settings_in_kwargs() -> None:
    server = web.Server(answer, handler_cancellation=True, keepalive_timeout=7.5)
    # Exactly the connection settings: Server keeps handler_cancellation for itself.
    assert getattr(server, "_kwargs", None) == {"keepalive_timeout": 7.5}, changed(
        "aiohttp", "Server._kwargs", LISTENER, "make each connection with its settings"
    )


async def test_a_connection_awaits_its_next_request_on_waiter() -> None:
    why = changed("aiohttp", "RequestHandler._waiter", LISTENER, "close idle connections")
    answering = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        answering.set()
        await release.wait()
        return web.Response()

    async with RawTestServer(slow) as server:
        assert server.runner is not None and server.runner.server is not None
        web_server = server.runner.server

        def waiter() -> Any:
            return getattr(web_server.connections[0], "_waiter", "gone")

        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            assert await holds_within(lambda: len(web_server.connections) == 1, 1, every=0.01)
            # Idle: a future, pending until a request arrives.
            assert await holds_within(
                lambda: isinstance(waiter(), asyncio.Future), 1, every=0.01
            ), why
            assert not waiter().done(), why
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            await answering.wait()
            assert waiter() is None, why  # answering a request
        finally:
            release.set()
            writer.close()
            await writer.wait_closed()


async def test_producer_sender_closes_on_its_own() -> None:
    # Not idempotent, so the sender starts without asking a broker for a producer id.
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
    why = changed("aiokafka", "AIOKafkaProducer._sender", KAFKA, "stop a producer stuck in stop()")
    try:
        sender: Any = getattr(producer, "_sender", None)
        assert is_coroutine_taking(getattr(sender, "close", None)), why
        await sender.start()
        await asyncio.sleep(0)  # the sender's task runs up to its first wait
        await sender.close()
        assert sender.sender_task.done(), why
    finally:
        await producer.stop()


async def test_producer_client_answers_from_the_metadata_it_holds() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
    why = changed(
        "aiokafka", "AIOKafkaProducer.client", KAFKA, "read partitions, brokers and readiness"
    )
    try:
        client = getattr(producer, "client", None)
        cluster = getattr(client, "cluster", None)
        # None for a topic it knows nothing of: the gateway then asks partitions_for().
        assert cluster is not None and cluster.partitions_for_topic("unknown") is None, why
        assert isinstance(cluster.brokers(), set), why
        assert is_coroutine_taking(getattr(client, "ready", None), "node_id"), why
        assert is_coroutine_taking(getattr(client, "close", None)), why
    finally:
        await producer.stop()


async def test_record_builder_weighs_a_record_as_a_batch_holds_it() -> None:
    why = changed(
        "aiokafka",
        "DefaultRecordBatchBuilder.estimate_size_in_bytes",
        KAFKA,
        "refuse a record the producer would refuse",
    )
    estimate = getattr(DefaultRecordBatchBuilder, "estimate_size_in_bytes", None)
    assert callable(estimate), why
    key, value, headers = b"session", b"x" * 1000, [("schema", b"log")]
    size = estimate(key, value, headers)
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
    try:
        batch = producer.create_batch()
        batch.append(key=key, value=value, timestamp=None, headers=headers)
        batch.close()
        # An upper bound on a batch of that one record, as the producer's own check uses it.
        assert isinstance(size, int) and len(value) < batch.size() <= size, why
    finally:
        await producer.stop()


async def test_a_batch_built_through_its_compiled_builder_is_the_batch_append_builds() -> None:
    why = changed(
        "aiokafka",
        "BatchBuilder._builder and _relative_offset",
        "gateway/kafka/batcher.py",
        "append each record to a batch without the wrapper's Python",
    )
    messages = [Message(None, b"no key and no headers")] + [
        Message(b"s%d" % n, b"v" * (n * 997 % 5000), [("cafe-request-id", b"r%d" % n)])
        for n in range(400)
    ]
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
    try:
        direct, public = producer.create_batch(), producer.create_batch()
        assert type(direct) is BatchBuilder, why
        add = adder(direct)
        taken = 0
        while add(messages[taken]):  # as the Batcher appends: until the batch is full
            taken += 1
        for message in messages:
            metadata = public.append(
                key=message.key, value=message.value, timestamp=None, headers=message.headers
            )
            if metadata is None:
                break
        assert 0 < taken < len(messages), "the test's records should overfill a batch"
        # Both are full at the same record, and count what they hold alike.
        assert taken == direct.record_count() == public.record_count(), why
        records = [
            [(r.offset, r.key, r.value, r.headers) for r in DefaultRecordBatch(b._build())]
            for b in (direct, public)
        ]
        assert records[0] == records[1] and len(records[0]) == public.record_count(), why
    finally:
        await producer.stop()


async def test_test_server_makes_its_runner_in_make_runner() -> None:
    why = changed(
        "aiohttp", "TestServer._make_runner", "tests/conftest.py", "serve tests via GatewayRunner"
    )
    asked: list[dict[str, Any]] = []

    class Server(TestServer):
        async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
            asked.append(kwargs)
            return web.AppRunner(self.app, **kwargs)

    async with Server(web.Application()) as server:
        assert asked, why
        # conftest drops it, so that a request runs on after its client has gone.
        assert asked[0].get("handler_cancellation") is True, why
        assert isinstance(server.runner, web.AppRunner), why


def test_prometheus_client_takes_its_value_class_from_values() -> None:
    why = changed(
        "prometheus-client",
        "values.ValueClass and values.MultiProcessValue",
        "gateway/metrics.py",
        "keep the workers' values in the directory given to Metrics",
    )
    assert callable(getattr(values, "MultiProcessValue", None)), why
    assert hasattr(values, "ValueClass"), why
    # Every metric makes its values through the module attribute, read when it is made.
    assert "values.ValueClass(" in inspect.getsource(Counter), why


def test_a_histogram_keeps_its_bounds_buckets_and_sum_as_values() -> None:
    why = changed(
        "prometheus-client",
        "Histogram._upper_bounds, _buckets and _sum",
        "gateway/metrics.py (Tally)",
        "add a second's observations to a histogram's series at once",
    )
    histogram = Histogram("h", "h", buckets=(1, 2), registry=CollectorRegistry())
    assert histogram._upper_bounds == [1.0, 2.0, math.inf], why
    assert len(histogram._buckets) == 3, why
    # The buckets are kept each on its own (the exposition adds them up), as is the sum.
    histogram._buckets[1].inc(2)
    histogram._sum.inc(3.5)
    samples = {
        (s.name, s.labels.get("le")): s.value for s in next(iter(histogram.collect())).samples
    }
    assert samples[("h_bucket", "1.0")] == 0 and samples[("h_bucket", "2.0")] == 2, why
    assert samples[("h_bucket", "+Inf")] == 2 and samples[("h_sum", None)] == 3.5, why


def test_aiohttp_formats_the_date_header_with_rfc822_formatted_time() -> None:
    why = changed(
        "aiohttp",
        "helpers.rfc822_formatted_time",
        "gateway/http/fastlane.py",
        "write the Date header of a pre-built answer as aiohttp writes it",
    )
    assert "rfc822_formatted_time()" in inspect.getsource(web.StreamResponse._prepare_headers), why
    # An HTTP-date (RFC 9110 section 5.6.7), as the fast lane writes it after "Date: ".
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", rfc822_formatted_time()), why
