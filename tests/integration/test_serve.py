"""`cafe-gateway serve` as a user runs it: a process, a socket, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

from devkit.net import free_port, free_ports
from devkit.samples import curl_bodies
from gateway.keys.file import update_keys_file
from gateway.keys.model import mint_key
from tests.support.kafka import Broker, consume_all
from tests.support.keys import KeyFile, json_headers
from tests.support.rawhttp import Connection, connection
from tests.support.scrape import Samples
from tests.support.served import gateway_env, ready_in_a_row, running, serve
from tests.support.wait import eventually

pytestmark = pytest.mark.integration


async def test_serve_becomes_ready_over_http_and_exits_0_on_sigterm(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    port = free_port()
    async with running(gateway_env(port, kafka, key_file, prefix)) as proc:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await ready_in_a_row(http, 1)
            async with http.get("/healthz") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ok"}
            async with http.get("/nope") as resp:
                assert resp.status == 404
                assert (await resp.json(content_type=None))["code"] == "not_found"
            async with http.get("/v1/ip", headers={"x-api-key": key_file.key}) as resp:
                assert await resp.json() == {"ip": "127.0.0.1"}
        await proc.stop()


async def test_serve_refuses_to_start_without_keys() -> None:
    proc = await serve({"CAFE_KEYS_FILE": ""})
    output = await proc.finish()
    assert proc.returncode == 2
    assert "set CAFE_KEYS_FILE" in output


async def test_serve_refuses_a_keys_file_that_does_not_exist(tmp_path: Path) -> None:
    proc = await serve({"CAFE_KEYS_FILE": str(tmp_path / "absent.json"), "CAFE_PORT": "0"})
    output = await proc.finish()
    assert proc.returncode != 0
    assert "absent.json does not exist" in output


async def test_workers_refuse_a_keys_file_that_does_not_exist(tmp_path: Path) -> None:
    env = {"CAFE_KEYS_FILE": str(tmp_path / "absent.json"), "CAFE_WORKERS": "2"}
    proc = await serve({**env, "CAFE_PORT": str(free_port())})
    output = await proc.finish()
    assert proc.returncode == 1
    assert "absent.json does not exist" in output


async def test_serve_refuses_a_bad_setting_naming_the_variable() -> None:
    proc = await serve({"CAFE_PORT": "eighty"})
    output = await proc.finish()
    assert proc.returncode == 2
    assert "CAFE_PORT='eighty' is not an integer" in output


async def test_two_workers_share_one_port_and_stop_together(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    port = free_port()
    async with running(gateway_env(port, kafka, key_file, prefix, CAFE_WORKERS="2")) as proc:
        parent = psutil.Process(proc.pid)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await ready_in_a_row(http, 10)
            workers = parent.children()
            assert len(workers) == 2
            body = curl_bodies()["log"]
            headers = json_headers(key_file.key)
            for _ in range(10):
                async with http.post("/v1/log", data=body, headers=headers) as resp:
                    assert resp.status == 200
        await proc.stop()
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


async def test_two_workers_draw_a_keys_rate_from_one_bucket(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    rate = 5  # requests/s, and a burst of as many
    plaintext, record = mint_key(("analytics-portal",), requests_per_second=rate)
    update_keys_file(key_file.path, lambda keys: [*keys, record])
    get_ip = f"GET /v1/ip HTTP/1.1\r\nHost: t\r\nx-api-key: {plaintext}\r\n\r\n".encode()
    port = free_port()
    async with running(gateway_env(port, kafka, key_file, prefix, CAFE_WORKERS="2")):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await ready_in_a_row(http, 10)
        async with contextlib.AsyncExitStack() as stack:
            # Two keep-alive connections served by different workers (a request id
            # starts with its worker's prefix).
            by_worker: dict[str, Connection] = {}
            for _ in range(40):
                conn = await stack.enter_async_context(connection(port))
                answer = await conn.ask(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                by_worker.setdefault(answer.headers["x-request-id"][:16], conn)
                if len(by_worker) == 2:
                    break
            first, second = by_worker.values()
            started = time.monotonic()
            first_ok = await served_until_refused(first, get_ip)
            second_ok = await served_until_refused(second, get_ip)
            refilled = (time.monotonic() - started) * rate
    # One connection gets the key's whole rate (a bucket per worker would give it half),
    # and what it used is gone for the other worker too (not a full rate per worker).
    assert first_ok >= rate, (first_ok, second_ok)
    assert first_ok + second_ok <= rate + refilled + 1, (first_ok, second_ok, refilled)


async def served_until_refused(conn: Connection, request: bytes) -> int:
    """How many times `request` is answered 200 before a 429 (which closes the connection)."""
    for served in range(100):
        status = (await conn.ask(request)).status
        if status != 200:
            assert status == 429
            return served
    raise AssertionError("never refused")


async def test_two_workers_report_one_set_of_metrics_on_the_metrics_port(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    port, metrics_port = free_ports(2)
    env = gateway_env(
        port, kafka, key_file, prefix, CAFE_WORKERS="2", CAFE_METRICS_PORT=str(metrics_port)
    )
    async with running(env) as proc:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await ready_in_a_row(http, 10)
            body = curl_bodies()["log"]
            # A new connection each time, so the kernel spreads them over both workers.
            headers = {**json_headers(key_file.key), "Connection": "close"}
            served_by: set[str] = set()
            for _ in range(40):
                async with http.post("/v1/log", data=body, headers=headers) as resp:
                    assert resp.status == 200
                    served_by.add(resp.headers["X-Request-Id"][:16])  # a prefix per worker
            for _ in range(10):
                async with http.post("/v1/log", data=b"{", headers=headers) as resp:
                    assert resp.status == 400
            async with http.get("/metrics") as resp:
                assert resp.status == 404  # only on the metrics port
        assert len(served_by) == 2, "both workers should have served requests"

        async with aiohttp.ClientSession(f"http://127.0.0.1:{metrics_port}") as http:

            async def scrape() -> Samples:
                async with http.get("/metrics", headers={"Connection": "close"}) as resp:
                    return Samples(await resp.text())

            # Each worker writes the counts of every request to its files once a second
            # (gateway/metrics.py, Tally): within a second both workers' are there.
            async def all_counted() -> bool:
                samples = await scrape()
                return samples.value("cafe_http_requests_total", route="/v1/log") == 50

            await eventually(all_counted, within=10)
            # Whichever worker answers the scrape, it reports the sum of both.
            for _ in range(6):
                samples = await scrape()
                log_route = {"route": "/v1/log", "method": "POST"}
                assert samples.value("cafe_http_requests_total", **log_route, status="200") == 40
                assert samples.value("cafe_http_requests_total", **log_route, status="400") == 10
                assert samples.value("cafe_records_total", type="log", outcome="accepted") == 40
                assert samples.value("cafe_http_errors_total", code="invalid_json") == 10
                assert samples.value("cafe_kafka_produce_seconds_count") >= 1
                assert samples.value("cafe_api_keys_loaded") == 1
                assert samples.value("cafe_kafka_ready") == 1
                # The metrics port is not the API: its scrapes are not requests in flight.
                assert samples.value("cafe_http_requests_in_flight") == 0
        await proc.stop()


async def test_sigterm_under_load_loses_no_acknowledged_record(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    port = free_port()
    env = gateway_env(port, kafka, key_file, prefix, CAFE_DRAIN_SECONDS="1")
    base = orjson.loads(curl_bodies()["activity"])["records"][0]
    headers = json_headers(key_file.key)
    acknowledged: list[str] = []
    after_sigterm: list[int] = []
    answers: dict[int, int] = {}
    stopping = asyncio.Event()

    async def client(http: aiohttp.ClientSession) -> None:
        while True:
            ids = [str(uuid.uuid4()) for _ in range(50)]
            body = orjson.dumps({"records": [{**base, "eventId": i} for i in ids]})
            try:
                async with http.post("/v1/activity", data=body, headers=headers) as resp:
                    answers[resp.status] = answers.get(resp.status, 0) + 1
                    if resp.status == 200:
                        acknowledged.extend(ids)
                        if stopping.is_set():
                            after_sigterm.append(len(ids))
            except aiohttp.ClientError:
                return  # the listener has closed

    async with running(env) as proc:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await ready_in_a_row(http, 1)
            clients = [asyncio.create_task(client(http)) for _ in range(8)]
            await asyncio.sleep(1.5)
            stopping.set()
            stopped = asyncio.create_task(proc.stop())
            await asyncio.sleep(0.3)
            async with http.get("/readyz", headers={"Connection": "close"}) as resp:
                assert resp.status == 503
                assert (await resp.json(content_type=None))["detail"] == (
                    "the gateway is shutting down"
                )
            await asyncio.wait_for(asyncio.gather(*clients), timeout=30)
        await stopped

    assert after_sigterm, "requests kept being served while draining"
    assert set(answers) <= {200, 503}, answers
    on_topic = {
        orjson.loads(m.value)["eventId"]
        for m in await consume_all(kafka.bootstrap, f"{prefix}.activity", partitions=6)
    }
    missing = set(acknowledged) - on_topic
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged records lost"
    print(
        f"SIGTERM under load: {len(acknowledged)} records acknowledged "
        f"({sum(after_sigterm)} after SIGTERM), all on the topic; answers {answers}"
    )


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (at most 20 s)."""
    return await asyncio.wait_for(reader.read(), timeout=20)


async def test_idle_connections_slow_headers_and_slow_bodies_are_cut_off(
    kafka: Broker, key_file: KeyFile, prefix: str
) -> None:
    port = free_port()
    env = gateway_env(
        port, kafka, key_file, prefix, CAFE_IDLE_TIMEOUT_SECONDS="1", CAFE_BODY_TIMEOUT_SECONDS="1"
    )
    async with running(env) as proc:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await ready_in_a_row(http, 1)

        # Slow-loris: headers trickling in a byte at a time are cut off, unanswered.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"POST /v1/log HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        with contextlib.suppress(ConnectionError):
            while time.monotonic() - started < 10 and not reader.at_eof():
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.2)
        assert time.monotonic() - started < 10, "slow headers were not cut off"
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

        # A connection that sends nothing is closed, unanswered, after the idle timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        assert await read_until_closed(reader) == b""
        assert time.monotonic() - started < 10
        writer.close()
        await writer.wait_closed()

        # A body that stops arriving: 408 with a problem, and the connection closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            "POST /v1/log HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            f"x-api-key: {key_file.key}\r\nContent-Length: 1000\r\n\r\n"
        )
        writer.write(head.encode() + b'{"records": [')
        await writer.drain()
        answer = await read_until_closed(reader)
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"code":"body_timeout"' in answer

        # Still serving.
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http,
            http.get("/healthz") as resp,
        ):
            assert resp.status == 200
        await proc.stop()
