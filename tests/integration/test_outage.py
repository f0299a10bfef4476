"""Kafka stops and comes back under load: nothing acknowledged is lost, nothing hangs.

A `cafe-gateway serve` process produces to a spare broker of the test's own. While
clients send batches of activity records, each retrying its batch on 503 or a broken
connection until it gets a 2xx, the test stops the broker (`kafka.sh down`), keeps it
down until the gateway has said so, and starts it again (`kafka.sh up`). The same
gateway process must recover by itself, and every record it answered 2xx for must be
on the topic: a 2xx for a record Kafka did not acknowledge would show up as a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import psutil
import pytest

from tests.integration.conftest import KAFKA_SH, Broker, consume_all, eventually
from tests.integration.tcp_proxy import free_port
from tests.integration.test_serve import gateway_env, ready_in_a_row, running
from tests.keys import KeyFile
from tests.spec_samples import curl_bodies

pytestmark = pytest.mark.integration

PRODUCE_TIMEOUT_MS = 1500
# Every answer, 503 or not, comes within the produce timeout plus a margin: no hangs.
ANSWER_WITHIN_S = 4.0
# A request with no answer by then is counted as a hang (and retried).
CLIENT_TIMEOUT_S = 15.0
RSS_LIMIT_BYTES = 400 * 2**20
SENDERS = 8
BATCH = 50
# Between one sender's batches: a steady load, not a flood to read back afterwards.
PACE_S = 0.05
# Retry-After is honoured, within these bounds.
RETRY_MIN_S, RETRY_MAX_S = 0.2, 1.0
GATEWAY_PARTITIONS = 6  # CAFE_TOPIC_PARTITIONS' default: the gateway creates the topic


@dataclass
class Tally:
    """What the clients sent and were answered."""

    sent: set[str] = field(default_factory=set)
    acknowledged: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    codes_503: Counter[str] = field(default_factory=Counter)
    slowest_503_s: float = 0.0
    slowest_s: float = 0.0
    connection_errors: int = 0
    hangs: int = 0


async def send_until_acknowledged(
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    records: list[dict[str, Any]],
    tally: Tally,
) -> None:
    """POST one batch until it is answered 2xx; give up only on an unexpected status."""
    body = orjson.dumps({"records": records})
    while True:
        started = time.monotonic()
        try:
            async with http.post("/v1/activity", data=body, headers=headers) as resp:
                problem = await resp.read()
                took = time.monotonic() - started
                tally.statuses[resp.status] += 1
                tally.slowest_s = max(tally.slowest_s, took)
                if 200 <= resp.status < 300:
                    tally.acknowledged.extend(r["eventId"] for r in records)
                    return
                if resp.status != 503:
                    return  # asserted against afterwards; retrying would not help
                tally.codes_503[orjson.loads(problem).get("code", "")] += 1
                tally.slowest_503_s = max(tally.slowest_503_s, took)
                retry_after = float(resp.headers.get("Retry-After", RETRY_MAX_S))
                delay = min(max(retry_after, RETRY_MIN_S), RETRY_MAX_S)
        except TimeoutError:
            tally.hangs += 1
            delay = RETRY_MIN_S
        except aiohttp.ClientError:
            tally.connection_errors += 1
            delay = RETRY_MIN_S
        await asyncio.sleep(delay)


async def sender(
    http: aiohttp.ClientSession, headers: dict[str, str], tally: Tally, stop: asyncio.Event
) -> None:
    """One client session: batches of fresh eventIds until told to stop."""
    base = orjson.loads(curl_bodies()["activity"])["records"][0]
    session_id = str(uuid.uuid4())
    while not stop.is_set():
        records = [
            {**base, "sessionId": session_id, "eventId": str(uuid.uuid4())} for _ in range(BATCH)
        ]
        tally.sent.update(r["eventId"] for r in records)
        await send_until_acknowledged(http, headers, records, tally)
        await asyncio.sleep(PACE_S)


async def watch_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    """Keep in `peak[0]` the largest RSS seen of the gateway and its workers."""
    gateway = psutil.Process(pid)
    while not stop.is_set():
        rss = 0
        for proc in [gateway, *gateway.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                rss += proc.memory_info().rss
        peak[0] = max(peak[0], rss)
        await asyncio.sleep(0.2)


async def readyz_is(http: aiohttp.ClientSession, status: int) -> bool:
    """True if /readyz answers `status`; a refused or timed-out probe is neither."""
    try:
        async with http.get("/readyz", headers={"Connection": "close"}) as resp:
            return resp.status == status
    except (aiohttp.ClientError, TimeoutError):
        return False


async def kafka_sh(command: str, env: dict[str, str]) -> float:
    """`kafka.sh up` or `down` on the spare broker; returns how long it took."""
    started = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run,
        [str(KAFKA_SH), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kafka.sh {command} failed:\n{done.stderr}"
    return time.monotonic() - started


async def test_kafka_stopped_and_restarted_under_load_loses_no_acknowledged_record(
    key_file: KeyFile, spare_broker: tuple[str, dict[str, str]]
) -> None:
    bootstrap, broker_env = spare_broker
    port = free_port()
    prefix = f"outage.{uuid.uuid4().hex[:8]}"
    env = gateway_env(
        port,
        Broker(bootstrap, "spare broker"),
        key_file,
        prefix,
        CAFE_PRODUCE_TIMEOUT_MS=str(PRODUCE_TIMEOUT_MS),
    )
    headers = {"x-api-key": key_file.key, "Content-Type": "application/json"}
    tally = Tally()
    rss_peak = [0]
    stop = asyncio.Event()
    timings: dict[str, float] = {}
    started = time.monotonic()

    async def acknowledged_at_least(count: int) -> bool:
        return len(tally.acknowledged) >= count

    async def answered_503_at_least(count: int) -> bool:
        return tally.statuses[503] >= count

    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with (
        running(env) as gateway,
        aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=timeout) as http,
    ):
        await ready_in_a_row(http, 1)
        watching = asyncio.create_task(watch_rss(gateway.pid, rss_peak, stop))
        senders = [asyncio.create_task(sender(http, headers, tally, stop)) for _ in range(SENDERS)]
        try:
            await eventually(lambda: acknowledged_at_least(20 * BATCH), within=15)

            timings["kafka.sh down"] = await kafka_sh("down", broker_env)
            down_at = time.monotonic()
            before = tally.statuses[503]
            await eventually(lambda: answered_503_at_least(before + 2 * SENDERS), within=15)
            await eventually(lambda: readyz_is(http, 503), within=15)
            timings["outage until 503s and not ready"] = time.monotonic() - down_at

            timings["kafka.sh up"] = await kafka_sh("up", broker_env)
            up_at = time.monotonic()
            await eventually(lambda: readyz_is(http, 200), within=30)
            timings["ready again after up"] = time.monotonic() - up_at
            after = len(tally.acknowledged)
            await eventually(lambda: acknowledged_at_least(after + 20 * BATCH), within=30)
            timings["taking records again after up"] = time.monotonic() - up_at
        except BaseException:
            for task in (*senders, watching):
                task.cancel()
            await asyncio.gather(*senders, watching, return_exceptions=True)
            raise
        finally:
            stop.set()
        # Each sender finishes the batch in hand: it retries until that gets a 2xx.
        await asyncio.wait_for(asyncio.gather(*senders, watching), timeout=30)
        await gateway.stop()

    records = await consume_all(bootstrap, f"{prefix}.activity", partitions=GATEWAY_PARTITIONS)
    timings["total"] = time.monotonic() - started
    on_topic = Counter(orjson.loads(r.value)["eventId"] for r in records)
    acknowledged = set(tally.acknowledged)
    missing = acknowledged - on_topic.keys()
    duplicated = [n for n in on_topic.values() if n > 1]
    print(
        f"\nKafka outage: {len(tally.sent)} records sent, {len(acknowledged)} acknowledged, "
        f"{len(on_topic)} distinct on the topic ({len(records)} messages), "
        f"{len(missing)} lost, {len(duplicated)} duplicated ({sum(duplicated) - len(duplicated)} "
        f"extra copies); answers {dict(tally.statuses)}, 503 codes {dict(tally.codes_503)}, "
        f"slowest 503 {tally.slowest_503_s:.2f}s, slowest answer {tally.slowest_s:.2f}s, "
        f"{tally.connection_errors} connection errors, {tally.hangs} hangs; "
        f"peak RSS {rss_peak[0] / 2**20:.0f} MiB; "
        + ", ".join(f"{name} {s:.1f}s" for name, s in timings.items())
    )

    # A 2xx promises the records are on the topic: none may be missing.
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged records lost"
    # Nothing reached the topic that the clients did not send.
    assert on_topic.keys() <= tally.sent
    assert set(tally.statuses) <= {200, 503}, tally.statuses
    assert set(tally.codes_503) == {"kafka_unavailable"}, tally.codes_503
    assert tally.hangs == 0
    assert tally.slowest_503_s < ANSWER_WITHIN_S
    assert tally.slowest_s < ANSWER_WITHIN_S
    assert 0 < rss_peak[0] < RSS_LIMIT_BYTES
