"""Kafka goes away under load: nothing acknowledged is lost, nothing hangs.

A `cafe-gateway serve` process produces to a spare broker of the test's own, while
clients send batches of activity records, each retrying its batch on 503 or a broken
connection until it gets a 2xx. Two outages:

- stopped: the test stops the broker (`kafka.sh down`), keeps it down until the
  gateway has said so, and starts it again (`kafka.sh up`);
- frozen: the test stops the broker process with SIGSTOP for a minute, so its sockets
  stay open and nothing answers, then lets it go on (SIGCONT). Retries must not pile
  up behind the stuck batch to be delivered, many times over, when it thaws.

The same gateway process must recover by itself, and every record it answered 2xx for
must be on the topic: a 2xx for a record Kafka did not acknowledge would show up as a
loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest

from tests.integration.conftest import KAFKA_SH, Broker, consume_all, eventually, summarise
from tests.integration.tcp_proxy import free_port
from tests.integration.test_serve import gateway_env, serving
from tests.keys import KeyFile
from tests.scrape import Samples
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

# The frozen broker: long enough for every client to resend its batch many times over.
FREEZE_S = 60.0
FREEZE_PRODUCE_TIMEOUT_MS = 2000
FREEZE_ANSWER_WITHIN_S = FREEZE_PRODUCE_TIMEOUT_MS / 1000 + 2.5
FREEZE_SENDERS = 16
FREEZE_BATCH = 20
# What the sink may hold unacknowledged (CAFE_MAX_QUEUED_BYTES): 8 MiB is some 16,000
# activity records of ~0.5 KiB, several seconds of this test's load.
MAX_QUEUED_BYTES = 8 * 2**20
# A batch queued just before the freeze is answered 503 when its produce timeout passes,
# yet lands when the broker thaws; its first retry the gateway takes after that lands
# too. Any further copy is a retry that was queued behind the stuck batch.
MAX_COPIES = 2
# Measured peaks of the gateway over the whole run: 59 MiB with retries queued behind
# the stuck batch (6,400 extra records, ~3 MiB), 52 MiB with them refused. The bound
# leaves room for a slower machine's allocator, not for a queue that grows unchecked.
FREEZE_RSS_LIMIT_BYTES = 150 * 2**20


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
    # The most POSTs one batch took to be answered 2xx.
    most_attempts: int = 0

    async def acknowledged_at_least(self, count: int) -> bool:
        return len(self.acknowledged) >= count

    async def answered_at_least(self, status: int, count: int) -> bool:
        return self.statuses[status] >= count


async def send_until_acknowledged(
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    records: list[dict[str, Any]],
    tally: Tally,
) -> None:
    """POST one batch until it is answered 2xx; give up only on an unexpected status."""
    body = orjson.dumps({"records": records})
    attempts = 0
    while True:
        attempts += 1
        started = time.monotonic()
        try:
            async with http.post("/v1/activity", data=body, headers=headers) as resp:
                problem = await resp.read()
                took = time.monotonic() - started
                tally.statuses[resp.status] += 1
                tally.slowest_s = max(tally.slowest_s, took)
                if 200 <= resp.status < 300:
                    tally.acknowledged.extend(r["eventId"] for r in records)
                    tally.most_attempts = max(tally.most_attempts, attempts)
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
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    tally: Tally,
    stop: asyncio.Event,
    *,
    batch: int = BATCH,
) -> None:
    """One client session: batches of `batch` fresh eventIds until told to stop."""
    base = orjson.loads(curl_bodies()["activity"])["records"][0]
    session_id = str(uuid.uuid4())
    while not stop.is_set():
        records = [
            {**base, "sessionId": session_id, "eventId": str(uuid.uuid4())} for _ in range(batch)
        ]
        tally.sent.update(r["eventId"] for r in records)
        await send_until_acknowledged(http, headers, records, tally)
        await asyncio.sleep(PACE_S)


@contextlib.asynccontextmanager
async def clients(
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    tally: Tally,
    count: int,
    *,
    batch: int = BATCH,
    watchers: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = (),
) -> AsyncIterator[None]:
    """`count` senders, and `watchers`, at work for the block (see `at_work`)."""
    one = functools.partial(sender, http, headers, tally, batch=batch)
    async with at_work([one] * count + list(watchers)):
        yield


@contextlib.asynccontextmanager
async def at_work(
    workers: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]],
) -> AsyncIterator[None]:
    """Each of `workers` running as a task for the block, given an event set when it
    ends. Then each finishes what it has in hand (a sender retries its batch until it
    gets a 2xx), within 60 s; if the block fails, every one is cancelled."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(work(stop)) for work in workers]
    try:
        yield
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)


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


def broker_pid(port: str) -> int:
    """The pid of the kafka.sh broker on `port`: the one java process whose command line
    ends `kafka.Kafka <run dir>/server.properties`, the run dir being `run-<port>`."""
    pids: list[int] = [
        proc.pid
        for proc in psutil.process_iter(["cmdline"])
        if (cmdline := proc.info["cmdline"] or [])[-2:-1] == ["kafka.Kafka"]
        and cmdline[-1].endswith(f"/run-{port}/server.properties")
    ]
    assert len(pids) == 1, f"not one kafka.sh broker on port {port}: pids {pids}"
    return pids[0]


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Stop the process `pid` (SIGSTOP) for the block; it goes on (SIGCONT) however the
    block ends, or the spare broker would be left frozen for its teardown to kill.

    kill() returns before every thread has stopped: on a busy machine a broker thread
    could still answer a request sent at once. So wait until each thread shows stopped.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait_until_stopped(pid)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone: nothing left to thaw
            os.kill(pid, signal.SIGCONT)


def _wait_until_stopped(pid: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not all(state in ("T", "t") for state in _thread_states(pid)):
        assert time.monotonic() < deadline, f"process {pid} did not stop within {within_s}s"
        time.sleep(0.01)


def _thread_states(pid: int) -> Iterator[str]:
    """The state letter of each thread of `pid`, from /proc (R running, S sleeping, T
    stopped...); the name before it is in parentheses and may hold spaces."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
            yield stat.read_text().rsplit(")", 1)[1].split()[0]


@dataclass
class OnTopic:
    """What the activity topic holds, compared with what the clients were told."""

    copies: Counter[str]  # eventId -> how many messages carry it
    messages: int
    missing: set[str]  # acknowledged, yet not on the topic

    @property
    def duplicated(self) -> list[int]:
        return [n for n in self.copies.values() if n > 1]

    @property
    def extra_copies(self) -> int:
        return sum(n - 1 for n in self.copies.values())

    @property
    def max_copies(self) -> int:
        return max(self.copies.values(), default=0)


async def read_topic(bootstrap: str, topic: str, tally: Tally) -> OnTopic:
    """Read `topic` to its end offsets and count each eventId's copies."""
    records = await consume_all(bootstrap, topic, partitions=GATEWAY_PARTITIONS)
    copies = Counter(orjson.loads(r.value)["eventId"] for r in records)
    return OnTopic(copies, len(records), set(tally.acknowledged) - copies.keys())


async def scrape(http: aiohttp.ClientSession) -> Samples:
    """The gateway's /metrics (served on its main port unless CAFE_METRICS_PORT is set)."""
    async with http.get("/metrics") as resp:
        assert resp.status == 200
        return Samples(await resp.text())


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
    timings: dict[str, float] = {}
    started = time.monotonic()

    async with serving(env, CLIENT_TIMEOUT_S) as (gateway, http):
        rss = functools.partial(watch_rss, gateway.pid, rss_peak)
        async with clients(http, headers, tally, SENDERS, watchers=[rss]):
            await eventually(lambda: tally.acknowledged_at_least(20 * BATCH), within=15)

            timings["kafka.sh down"] = await kafka_sh("down", broker_env)
            down_at = time.monotonic()
            before = tally.statuses[503]
            await eventually(lambda: tally.answered_at_least(503, before + 2 * SENDERS), within=15)
            await eventually(lambda: readyz_is(http, 503), within=15)
            timings["outage until 503s and not ready"] = time.monotonic() - down_at

            timings["kafka.sh up"] = await kafka_sh("up", broker_env)
            up_at = time.monotonic()
            await eventually(lambda: readyz_is(http, 200), within=30)
            timings["ready again after up"] = time.monotonic() - up_at
            after = len(tally.acknowledged)
            await eventually(lambda: tally.acknowledged_at_least(after + 20 * BATCH), within=30)
            timings["taking records again after up"] = time.monotonic() - up_at
        await gateway.stop()

    on_topic = await read_topic(bootstrap, f"{prefix}.activity", tally)
    timings["total"] = time.monotonic() - started
    acknowledged = set(tally.acknowledged)
    missing = on_topic.missing
    duplicated = on_topic.duplicated
    print(
        f"\nKafka outage: {len(tally.sent)} records sent, {len(acknowledged)} acknowledged, "
        f"{len(on_topic.copies)} distinct on the topic ({on_topic.messages} messages), "
        f"{len(missing)} lost, {len(duplicated)} duplicated ({on_topic.extra_copies} "
        f"extra copies); answers {dict(tally.statuses)}, 503 codes {dict(tally.codes_503)}, "
        f"slowest 503 {tally.slowest_503_s:.2f}s, slowest answer {tally.slowest_s:.2f}s, "
        f"{tally.connection_errors} connection errors, {tally.hangs} hangs; "
        f"peak RSS {rss_peak[0] / 2**20:.0f} MiB; "
        + ", ".join(f"{name} {s:.1f}s" for name, s in timings.items())
    )

    # A 2xx promises the records are on the topic: none may be missing.
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged records lost"
    # Nothing reached the topic that the clients did not send.
    assert on_topic.copies.keys() <= tally.sent
    assert set(tally.statuses) <= {200, 503}, tally.statuses
    assert set(tally.codes_503) == {"kafka_unavailable"}, tally.codes_503
    assert tally.hangs == 0
    assert tally.slowest_503_s < ANSWER_WITHIN_S
    assert tally.slowest_s < ANSWER_WITHIN_S
    assert 0 < rss_peak[0] < RSS_LIMIT_BYTES


async def test_kafka_frozen_for_a_minute_under_retrying_clients_duplicates_no_record_thrice(
    key_file: KeyFile, spare_broker: tuple[str, dict[str, str]], request: pytest.FixtureRequest
) -> None:
    """While a produce request is stuck, retries are refused (503) rather than queued
    behind it, so none lands twice over; memory stays bounded; refusals are counted."""
    bootstrap, broker_env = spare_broker
    broker = broker_pid(broker_env["CAFE_KAFKA_PORT"])
    port = free_port()
    prefix = f"freeze.{uuid.uuid4().hex[:8]}"
    env = gateway_env(
        port,
        Broker(bootstrap, "spare broker"),
        key_file,
        prefix,
        CAFE_PRODUCE_TIMEOUT_MS=str(FREEZE_PRODUCE_TIMEOUT_MS),
        CAFE_MAX_QUEUED_BYTES=str(MAX_QUEUED_BYTES),
        # Held to at most the queue's bound (Settings.from_env); the batches are ~10 KiB.
        CAFE_MAX_BODY_BYTES=str(MAX_QUEUED_BYTES),
    )
    headers = {"x-api-key": key_file.key, "Content-Type": "application/json"}
    tally = Tally()
    rss_peak = [0]
    timings: dict[str, float] = {}
    started = time.monotonic()

    async with serving(env, CLIENT_TIMEOUT_S) as (gateway, http):
        rss = functools.partial(watch_rss, gateway.pid, rss_peak)
        async with clients(
            http, headers, tally, FREEZE_SENDERS, batch=FREEZE_BATCH, watchers=[rss]
        ):
            # A steady start: every client has had batches through, on average.
            steady = 10 * FREEZE_SENDERS * FREEZE_BATCH
            await eventually(lambda: tally.acknowledged_at_least(steady), within=30)
            timings["steady after start"] = time.monotonic() - started

            frozen_at = time.monotonic()
            with frozen(broker):
                before = tally.statuses[503]
                await eventually(
                    lambda: tally.answered_at_least(503, before + FREEZE_SENDERS), within=FREEZE_S
                )
                timings["503s after freeze"] = time.monotonic() - frozen_at
                await asyncio.sleep(max(0.0, FREEZE_S - (time.monotonic() - frozen_at)))
            thawed_at = time.monotonic()
            timings["frozen"] = thawed_at - frozen_at

            after = len(tally.acknowledged)
            await eventually(lambda: tally.acknowledged_at_least(after + 1), within=60)
            timings["first 2xx after thaw"] = time.monotonic() - thawed_at
            # Taking records again for a while: each client has had several batches
            # through, and whatever the gateway held has had time to reach the broker.
            await eventually(lambda: tally.acknowledged_at_least(after + steady), within=60)
            await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - thawed_at)))
            timings["sending after thaw"] = time.monotonic() - thawed_at
        metrics = await scrape(http)
        await gateway.stop()

    on_topic = await read_topic(bootstrap, f"{prefix}.activity", tally)
    timings["total"] = time.monotonic() - started
    acknowledged = set(tally.acknowledged)
    refused = metrics.value("cafe_kafka_records_refused_total")
    line = (
        f"Kafka frozen {FREEZE_S:.0f}s, {FREEZE_SENDERS} clients retrying: "
        f"{len(tally.sent)} records sent, {len(acknowledged)} acknowledged, "
        f"{len(on_topic.missing)} lost, {on_topic.messages} messages on the topic, "
        f"max copies {on_topic.max_copies}, {on_topic.extra_copies} extra copies "
        f"({len(on_topic.duplicated)} records duplicated); answers {dict(tally.statuses)}, "
        f"503 codes {dict(tally.codes_503)}, slowest answer {tally.slowest_s:.2f}s, "
        f"{tally.connection_errors} connection errors, {tally.hangs} hangs, "
        f"most POSTs of one batch {tally.most_attempts}; cafe_kafka_records_refused_total "
        f"{refused:.0f}; peak RSS {rss_peak[0] / 2**20:.0f} MiB; "
        + ", ".join(f"{name} {s:.1f}s" for name, s in timings.items())
    )
    print("\n" + line)
    summarise(request.config, line)

    # Every unmet promise is reported at once: a gateway mid-fix sees what is left.
    refused_names = sorted(name for name in metrics.names() if "refused" in name)
    problems = [
        problem
        for failed, problem in (
            # A 2xx promises the records are on the topic: none may be missing.
            (bool(on_topic.missing), f"{len(on_topic.missing)} acknowledged records lost"),
            (not on_topic.copies.keys() <= tally.sent, "records on the topic nobody sent"),
            # Retries refused while the broker is stuck are never queued, so never land.
            (
                on_topic.max_copies > MAX_COPIES,
                f"a record is on the topic {on_topic.max_copies} times "
                f"({on_topic.extra_copies} extra copies in all)",
            ),
            (not set(tally.statuses) <= {200, 503}, f"answers {dict(tally.statuses)}"),
            (
                set(tally.codes_503) != {"kafka_unavailable"},
                f"503 codes {dict(tally.codes_503)}",
            ),
            (tally.hangs > 0, f"{tally.hangs} requests unanswered in {CLIENT_TIMEOUT_S:g}s"),
            (
                tally.slowest_s >= FREEZE_ANSWER_WITHIN_S,
                f"an answer took {tally.slowest_s:.2f}s (limit {FREEZE_ANSWER_WITHIN_S:g}s)",
            ),
            (
                not 0 < rss_peak[0] < FREEZE_RSS_LIMIT_BYTES,
                f"peak RSS {rss_peak[0] >> 20} MiB (limit {FREEZE_RSS_LIMIT_BYTES >> 20} MiB)",
            ),
            (
                refused <= 0,
                "cafe_kafka_records_refused_total counted no refused records "
                f"(metrics named *refused*: {refused_names})",
            ),
        )
        if failed
    ]
    assert not problems, "; ".join(problems)
