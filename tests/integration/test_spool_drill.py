"""The spool drill: a frozen broker and a killed gateway under unpaced clients.

The users' shape of an outage, on a real broker: a `cafe-gateway serve` process with
CAFE_SPOOL_DIR set produces to a spare broker of the test's own. CLIENTS clients, each
one session, send W20 activity batches back to back: each sends its next batch as soon
as the previous one is answered 2xx, and sends the same batch again after a 5xx, a 429,
a timeout or a cut-off connection. After some seconds of healthy traffic the broker is
frozen (SIGSTOP, its sockets left open) for a minute; KILL_AT_S into it the gateway is
SIGKILLed and a second one started on the same spool, the broker still frozen. Then the
broker thaws (SIGCONT), and the clients keep sending while the spool empties.

The books: every record answered 2xx is on the topic, none more than twice, and each
session's first copies are in the order its client sent them. The drill also times how
long the spool takes to empty after the thaw under that load, and watches the gateways'
memory. It takes 3 to 4 minutes, a minute of it reading millions of records back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from devkit.net import free_port
from tests.support.books import Books, clients, read_topic
from tests.support.kafka import broker_pid, frozen
from tests.support.keys import KeyFile, json_headers
from tests.support.scrape import Samples, scrape
from tests.support.served import GATEWAY_PARTITIONS, Served, running, spool_env, watch_rss
from tests.support.summary import summarise
from tests.support.wait import at_work, eventually, holds_within

pytestmark = pytest.mark.integration

# Unpaced: the clients send as fast as the gateway answers, so the load is what the
# machine can carry (on 2 shared cores, some 1,800 requests, 37,000 records, a second
# when healthy), not a chosen rate. More clients would add latency, not load.
CLIENTS = 32
BATCH = 20
HEALTHY_S = 10.0  # traffic before the freeze
FREEZE_S = 60.0
KILL_AT_S = 20.0  # into the freeze: the first gateway is SIGKILLed while it spools
AFTER_EMPTY_S = 5.0  # traffic kept up once the spool is empty
# Generous: a request unanswered this long counts as a hang (and is sent again).
CLIENT_TIMEOUT_S = 30.0
# What a client sends again (after its Retry-After): a batch answered 429 or 5xx.
RETRY = {429, *range(500, 600)}
# After a minute's outage under this load, the spool empties WHILE the clients keep
# sending: the replay outruns the records that keep coming in behind it (the thawed
# broker needs no restart: it still leads its partitions). Before the catch-up rule it
# never did (the issue measured 80 s with 16 clients; this drill, with 32, saw the spool
# not empty 100 s after the thaw). Issue 25's goal is 30 s, and the line says whether it
# was met: 30.1 and 30.6 s on one day, then 20.6 and 23.1 s once deletes stopped zeroing
# pages and a replayed record cost less CPU, some 2.6-2.8 million records replayed at
# 110-130k records/s; in CI 19.5-25.1 s, and 27.1-32.6 s with the faster validator (which
# spools up to 3.2 million records during the freeze). The test fails past
# EMPTY_WITHIN_S, a margin for a noisy machine over that.
GOAL_S = 30.0
EMPTY_WITHIN_S = 45.0
# How long the drill waits for the spool to empty with the clients still sending; past
# it, the clients stop (their records must still land) and the time is reported as such.
# Beyond the 80 s, so that figure would show; no longer, to bound the run.
EMPTY_WAIT_CAP_S = 90.0
# With the clients stopped: time for whatever is left to be replayed (before the fix,
# 38 s after 100 s of traffic behind the thaw; after it, nothing should be left).
DRAIN_AFTER_STOP_S = 60.0
# A batch Kafka took just before the freeze but acknowledged too late is also spooled;
# a request cut off by the SIGKILL after its records were spooled is sent again by its
# client. Either is a second copy; a third would be a replay piling up behind another.
MAX_COPIES = 2
# Peak RSS of each gateway process. The spool keeps records on disk, held in memory only
# until their group commit or while a replay window (4 MiB) is with Kafka. Measured: 86
# MiB for the first gateway, 100 MiB for the second (2.4 million records spooled); the
# bound (test_spool's) leaves room for a slower machine's allocator, not for records
# piling up in memory.
RSS_LIMIT_BYTES = 250 * 2**20
MONITOR_EVERY_S = 0.5
# Room for the whole outage: this load spools some 45,000 records (26 MB) a second, and
# filled CAFE_SPOOL_MAX_BYTES' default, 1 GiB, 37 s into the freeze (measured), after
# which the clients were answered 503 spool_full. That is a matter of capacity; the
# drill is about the replay, so it gives the spool room for the whole minute.
SPOOL_MAX_BYTES = 4 * 2**30
# The spool has caught up when its oldest record is younger than this: what it holds
# then came in behind the replay, not during the outage.
CAUGHT_UP_AGE_S = 5.0


@dataclass
class Sample:
    at: float
    ready: bool | None  # /readyz said 200; None: no answer
    spooled: float | None  # cafe_spool_records; None: no answer
    age: float | None  # cafe_spool_oldest_age_seconds


async def monitor(port: int, samples: list[Sample], stop: asyncio.Event) -> None:
    """Every MONITOR_EVERY_S, ask whichever gateway listens whether it is ready and how
    many records its spool holds; a session of its own, not queued behind the clients."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=timeout) as http:
        while not stop.is_set():
            at = time.monotonic()
            ready: bool | None = None
            spooled: float | None = None
            age: float | None = None
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get("/readyz", headers={"Connection": "close"}) as resp:
                    ready = resp.status == 200
                async with http.get("/metrics") as resp:
                    metrics = Samples(await resp.text())
                    spooled = metrics.value("cafe_spool_records")
                    age = metrics.value("cafe_spool_oldest_age_seconds")
            samples.append(Sample(at, ready, spooled, age))
            await asyncio.sleep(max(0.0, MONITOR_EVERY_S - (time.monotonic() - at)))


def first_sample(
    samples: list[Sample], after: float, check: Callable[[Sample], bool | None] | None = None
) -> Sample | None:
    """The first sample taken after `after` with the spool empty (or for which `check`
    is true)."""
    for sample in samples:
        if sample.at >= after and (check(sample) if check else sample.spooled == 0):
            return sample
    return None


def _caught_up(sample: Sample) -> bool:
    return sample.age is not None and sample.spooled is not None and sample.age < CAUGHT_UP_AGE_S


def _outage_replayed(thawed_at: float, sample: Sample) -> bool:
    """The spool holds nothing spooled before the thaw (its gauge of the oldest record's
    age is brought up to date once a second)."""
    if sample.spooled is None or sample.age is None:
        return False
    return sample.spooled == 0 or sample.at - sample.age > thawed_at


def _spool_shape(samples: list[Sample], since: float, every_s: float = 10.0) -> str:
    """The spool every `every_s` from `since`: thousands of records / age of the oldest."""
    marks: list[str] = []
    for sample in samples:
        if sample.at >= since + every_s * len(marks) and sample.spooled is not None:
            marks.append(f"{sample.spooled / 1000:.0f}k/{sample.age or 0:.0f}s")
    return " ".join(marks)


async def test_spool_drill_frozen_broker_killed_gateway_unpaced_clients(
    key_file: KeyFile,
    spare_broker: tuple[str, dict[str, str]],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    bootstrap, broker_env = spare_broker
    broker = broker_pid(broker_env["CAFE_KAFKA_PORT"])
    port = free_port()
    prefix = f"drill.{uuid.uuid4().hex[:8]}"
    env = {
        **spool_env(port, bootstrap, key_file, prefix, tmp_path / "spool"),
        "CAFE_SPOOL_MAX_BYTES": str(SPOOL_MAX_BYTES),
    }
    headers = json_headers(key_file.key)
    books = Books(batch=BATCH)
    samples: list[Sample] = []
    gateways: list[Served] = []
    rss_peaks: list[int] = []
    timings: dict[str, float] = {}
    figures: dict[str, float] = {}
    empty_after_thaw: float | None = None  # with the clients sending
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    started = time.monotonic()

    def spooled_now() -> float:
        return next((s.spooled for s in reversed(samples) if s.spooled is not None), -1.0)

    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=timeout)
        )
        gateways.append(await stack.enter_async_context(running(env)))
        watchers = [
            functools.partial(monitor, port, samples),
            functools.partial(watch_rss, gateways, rss_peaks),
        ]
        await stack.enter_async_context(at_work(watchers))
        await eventually(lambda: _ready(samples), within=30)
        books.began = time.monotonic()
        async with clients(http, headers, books, CLIENTS, retry=RETRY):
            await eventually(lambda: books.acknowledged_at_least(CLIENTS * BATCH), within=30)
            await asyncio.sleep(max(0.0, HEALTHY_S - (time.monotonic() - books.began)))
            figures["rate before"] = books.acknowledged / (time.monotonic() - books.began)

            frozen_at = time.monotonic()
            with frozen(broker):
                await eventually(lambda: _spooling(samples), within=15)
                timings["spooling after freeze"] = time.monotonic() - frozen_at
                await asyncio.sleep(max(0.0, KILL_AT_S - (time.monotonic() - frozen_at)))
                figures["spooled at kill"] = spooled_now()
                await gateways[0].kill()  # SIGKILL, mid-outage, clients still sending
                killed_at = time.monotonic()
                gateways.append(await stack.enter_async_context(running(env)))
                restart_ok = asyncio.create_task(_first_ok_after(books, killed_at, timings))
                await asyncio.sleep(max(0.0, FREEZE_S - (time.monotonic() - frozen_at)))
                figures["spooled at thaw"] = spooled_now()
            thawed_at = time.monotonic()
            timings["frozen"] = thawed_at - frozen_at

            # The clients keep sending while the spool empties (or until the cap).
            if await holds_within(
                lambda: first_sample(samples, thawed_at) is not None, EMPTY_WAIT_CAP_S
            ):
                empty = first_sample(samples, thawed_at)
                assert empty is not None
                empty_after_thaw = empty.at - thawed_at
                await asyncio.sleep(AFTER_EMPTY_S)
            stopping_at = time.monotonic()
            restart_ok.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await restart_ok
        stopped_at = time.monotonic()
        timings["clients stopped after thaw"] = stopped_at - thawed_at
        # What the clients have stopped sending must still land before the books are
        # read; with no clients the spool only drains.
        await holds_within(
            lambda: first_sample(samples, stopped_at) is not None, DRAIN_AFTER_STOP_S
        )
        timings["spool empty after clients stopped"] = time.monotonic() - stopped_at
        final = await scrape(http)
        first_output = await gateways[0].finish()  # killed: its output is all read
        second = gateways[1]
        second.send_signal(signal.SIGTERM)
        second_output = await second.finish()
    timings["traffic"] = stopping_at - books.began

    on_topic = await read_topic(bootstrap, f"{prefix}.activity", books, GATEWAY_PARTITIONS)
    timings["read back"] = on_topic.read_s
    timings["total"] = time.monotonic() - started
    ready = first_sample(samples, killed_at, lambda s: s.ready)
    if ready is not None:
        timings["second ready after kill"] = ready.at - killed_at
    ready_after_thaw = first_sample(samples, thawed_at, lambda s: s.ready)
    if ready_after_thaw is not None:
        timings["ready after thaw"] = ready_after_thaw.at - thawed_at
    replayed = first_sample(samples, thawed_at, functools.partial(_outage_replayed, thawed_at))
    if replayed is not None:
        timings["outage's records replayed after thaw"] = replayed.at - thawed_at
    caught_up = first_sample(samples, thawed_at, _caught_up)
    if caught_up is not None:
        timings[f"spool caught up (<{CAUGHT_UP_AGE_S:.0f}s old) after thaw"] = (
            caught_up.at - thawed_at
        )
    figures["peak spooled"] = max((s.spooled or 0.0 for s in samples), default=0.0)
    figures["dropped"] = final.value("cafe_spool_records_dropped_total")
    figures["left in spool"] = final.value("cafe_spool_records")
    goal_met = "met" if empty_after_thaw is not None and empty_after_thaw <= GOAL_S else "not met"
    empty_text = (
        f"{empty_after_thaw:.1f}s"
        if empty_after_thaw is not None
        else f"not within {EMPTY_WAIT_CAP_S:.0f}s"
    )
    line = (
        f"spool drill: {CLIENTS} unpaced clients W{BATCH}, broker frozen {FREEZE_S:.0f}s, "
        f"gateway SIGKILLed {KILL_AT_S:.0f}s in: {books.sent} records sent, "
        f"{books.acknowledged} answered 2xx ({books.spooled_answers} answers spooled), "
        f"{on_topic.lost} lost, max copies {on_topic.max_copies} "
        f"({on_topic.duplicated} records twice), {len(on_topic.out_of_order)} sessions out "
        f"of order; spool empty {empty_text} after the thaw while sending "
        f"(goal {GOAL_S:.0f}s: {goal_met}, bound {EMPTY_WITHIN_S:.0f}s); peak RSS "
        + "/".join(f"{peak / 2**20:.0f}" for peak in rss_peaks)
        + f" MiB; answers {dict(books.statuses)} {dict(books.codes)}, "
        f"{books.connection_errors} connection errors, {books.hangs} hangs, "
        f"{books.retries} retries, slowest answer {books.slowest_s:.1f}s; "
        + ", ".join(f"{name} {value:.0f}" for name, value in figures.items())
        + "; "
        + ", ".join(f"{name} {s:.1f}s" for name, s in timings.items())
    )
    print("\n" + line)
    print("2xx answers per 5 s: " + _shape(books.ok_by_second))
    print("other answers per 5 s: " + _shape(books.other_by_second))
    print("spool every 10 s from the freeze: " + _spool_shape(samples, frozen_at))
    print("spool every 2 s from the thaw: " + _spool_shape(samples, thawed_at, 2.0))
    for name, output in (("first", first_output), ("second", second_output)):
        print(f"the {name} gateway's warnings and errors:\n" + _notable(output))
    summarise(request.config, line)

    problems = [
        problem
        for failed, problem in (
            (
                on_topic.lost > 0,
                f"{on_topic.lost} of {books.acknowledged} 2xx records not on the topic (lost)",
            ),
            (on_topic.unsent > 0, f"{on_topic.unsent} messages on the topic nobody sent"),
            (
                on_topic.max_copies > MAX_COPIES,
                f"a record is on the topic {on_topic.max_copies} times",
            ),
            (
                bool(on_topic.out_of_order),
                f"{len(on_topic.out_of_order)} sessions out of order",
            ),
            (
                empty_after_thaw is None or empty_after_thaw > EMPTY_WITHIN_S,
                f"spool empty {empty_text} after the thaw (bound {EMPTY_WITHIN_S:.0f}s)",
            ),
            (
                not rss_peaks or not all(0 < peak < RSS_LIMIT_BYTES for peak in rss_peaks),
                "peak RSS "
                + "/".join(f"{peak >> 20}" for peak in rss_peaks)
                + f" MiB (limit {RSS_LIMIT_BYTES >> 20} MiB)",
            ),
            (figures["dropped"] != 0, f"{figures['dropped']:.0f} spooled records dropped"),
            (
                "from before this start" not in second_output,
                "the second gateway found nothing spooled before it started",
            ),
            (second.returncode != 0, f"the second gateway exited {second.returncode}"),
        )
        if failed
    ]
    assert not problems, "; ".join(problems)


async def _ready(samples: list[Sample]) -> bool:
    return bool(samples) and samples[-1].ready is True


async def _spooling(samples: list[Sample]) -> bool:
    return bool(samples) and (samples[-1].spooled or 0) > 0


async def _first_ok_after(books: Books, moment: float, timings: dict[str, float]) -> None:
    """Record when a client is answered 2xx again after `moment` (the kill: the killed
    gateway answers nothing more)."""
    before = books.acknowledged
    await holds_within(lambda: books.acknowledged > before, 3600)
    timings["first 2xx after kill"] = time.monotonic() - moment


def _notable(output: str, most: int = 20) -> str:
    """A gateway's log lines at WARNING or above (and any that are not its JSON lines, a
    traceback's), each message once with how often it came; at most `most` of them."""
    seen: Counter[str] = Counter()
    for line in output.splitlines():
        try:
            entry = orjson.loads(line)
            level, message = entry["level"], entry["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            level, message = "?", line
        if level not in ("DEBUG", "INFO"):
            seen[f"{level} {message}"[:300]] += 1
    return "\n".join(f"  {n}x {text}" for text, n in seen.most_common(most)) or "  none"


def _shape(by_second: Counter[int]) -> str:
    """Answers in each 5 s of the drill: where the traffic stalled, and for how long."""
    last = max(by_second, default=0)
    return " ".join(
        str(sum(by_second[s] for s in range(start, start + 5))) for start in range(0, last + 1, 5)
    )
