"""The spool under a Kafka outage: clients see no error, and every 2xx record lands.

A `cafe-gateway serve` process with CAFE_SPOOL_DIR set produces to a spare broker of the
test's own. 64 clients, each one session, send W20 activity batches one after another;
the test stops the broker (`kafka.sh down`) for 60 s, then starts it again. Then it
reads the topic: every record answered 2xx is there, at most twice, and each session's
records are in the order its client sent them.

The crash test SIGKILLs the gateway mid-outage, while it spools, and starts a second on
the same spool; once Kafka is back it SIGKILLs that one while it replays, and starts a
third. What each had spooled (and answered 2xx for) still lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from devkit.net import free_port
from tests.support.books import Books, OnTopic, clients, read_topic
from tests.support.kafka import KAFKA_CLIENTS, kafka_sh_took
from tests.support.keys import KeyFile, json_headers
from tests.support.scrape import scrape
from tests.support.served import GATEWAY_PARTITIONS, ready_in_a_row, running, spool_env, watch_rss
from tests.support.summary import summarise
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

CLIENTS = 64
BATCH = 20
# Between one client's batches: 64 clients then send about 60 batches (1,200 records)
# a second, enough to spool for a minute without a topic too long to read back.
PACE_S = 1.0
OUTAGE_S = 60.0
# A request with no answer by then counts as a hang.
CLIENT_TIMEOUT_S = 15.0
# After `kafka.sh up` returns, the spool is empty within this time: the broker takes a
# few seconds to lead its partitions again, the replayer backs off at most 5 s between
# tries, and replaying a minute of this load takes a few seconds more.
EMPTY_WITHIN_S = 60.0
# Peak RSS of the gateway over the whole run. Spooled records are held only until their
# group commit, so the outage should cost little memory; the bound leaves room for a
# slower machine, not for records piling up in memory.
RSS_LIMIT_BYTES = 250 * 2**20


async def spool_records(http: aiohttp.ClientSession) -> float:
    return (await scrape(http)).value("cafe_spool_records")


def problems_with(books: Books, on_topic: OnTopic, rss_peak: int | None) -> list[str]:
    """Every broken promise of the spool, at once (the RSS one only if it was watched)."""
    return [
        problem
        for failed, problem in (
            (on_topic.lost > 0, f"{on_topic.lost} of {books.acknowledged} 2xx records lost"),
            (on_topic.unsent > 0, f"{on_topic.unsent} messages on the topic nobody sent"),
            (on_topic.max_copies > 2, f"a record is on the topic {on_topic.max_copies} times"),
            (bool(on_topic.out_of_order), f"{len(on_topic.out_of_order)} sessions out of order"),
            (set(books.statuses) != {200}, f"answers {dict(books.statuses)}"),
            (books.hangs > 0, f"{books.hangs} requests unanswered in {CLIENT_TIMEOUT_S:g}s"),
            (
                rss_peak is not None and not 0 < rss_peak < RSS_LIMIT_BYTES,
                f"peak RSS {(rss_peak or 0) >> 20} MiB (limit {RSS_LIMIT_BYTES >> 20} MiB)",
            ),
        )
        if failed
    ]


def report(books: Books, on_topic: OnTopic, rss_peak: int | None, timings: dict[str, float]) -> str:
    rss = "" if rss_peak is None else f"peak RSS {rss_peak / 2**20:.0f} MiB; "
    return (
        f"{CLIENTS} clients, W{BATCH}, broker stopped {OUTAGE_S:.0f}s: "
        f"{books.sent} records sent, {books.acknowledged} "
        f"answered 2xx ({books.spooled_answers} answers spooled), {on_topic.messages} "
        f"messages on the topic, {on_topic.duplicated} records twice; "
        f"answers {dict(books.statuses)}, "
        f"{books.connection_errors} connection errors; {rss}"
        + ", ".join(f"{name} {s:.1f}s" for name, s in timings.items())
    )


@pytest.mark.parametrize("kafka_client", KAFKA_CLIENTS)
async def test_kafka_stopped_for_a_minute_costs_clients_nothing_with_the_spool_on(
    key_file: KeyFile,
    spare_broker: tuple[str, dict[str, str]],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    kafka_client: str,
) -> None:
    bootstrap, broker_env = spare_broker
    port = free_port()
    prefix = f"spool.{uuid.uuid4().hex[:8]}"
    env = spool_env(port, bootstrap, key_file, prefix, tmp_path / "spool")
    env["CAFE_KAFKA_CLIENT"] = kafka_client
    headers = json_headers(key_file.key)
    books = Books(batch=BATCH)
    rss_peak = [0]
    timings: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)

    async with (
        running(env) as gateway,
        aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=timeout) as http,
    ):
        await ready_in_a_row(http, 1)
        rss_stop = asyncio.Event()
        rss = asyncio.create_task(watch_rss([gateway], rss_peak, rss_stop))
        async with clients(http, headers, books, CLIENTS, pace_s=PACE_S):
            await eventually(lambda: books.acknowledged_at_least(5 * CLIENTS * BATCH), within=60)
            down_at = time.monotonic()
            timings["kafka.sh down"] = await kafka_sh_took("down", broker_env)
            # Ready all along: the gateway takes records safely.
            await eventually(lambda: _spooling(http), within=15)
            assert (await http.get("/readyz")).status == 200
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            held = await spool_records(http)
            await kafka_returns(http, broker_env, books, timings)
        metrics = await scrape(http)
        rss_stop.set()
        await rss
        await gateway.stop()

    on_topic = await read_topic(bootstrap, f"{prefix}.activity", books, GATEWAY_PARTITIONS)
    line = report(books, on_topic, rss_peak[0], timings) + f"; {held:.0f} records spooled at up"
    print("\n" + line)
    summarise(request.config, f"spool ({kafka_client}): " + line)
    problems = problems_with(books, on_topic, rss_peak[0])
    if timings["spool empty after up"] > EMPTY_WITHIN_S:
        problems.append(f"spool empty only {timings['spool empty after up']:.0f}s after up")
    if books.spooled_answers == 0 or held == 0:
        problems.append("nothing was spooled: the outage was not one")
    if metrics.value("cafe_spool_records_dropped_total") != 0:
        problems.append("spooled records dropped")
    assert not problems, "; ".join(problems)


async def kafka_returns(
    http: aiohttp.ClientSession,
    broker_env: dict[str, str],
    books: Books,
    timings: dict[str, float],
) -> None:
    """Start the broker; wait for the spool to empty, then for every client to have had
    a batch through."""
    timings["kafka.sh up"] = await kafka_sh_took("up", broker_env)
    up_at = time.monotonic()
    await eventually(lambda: _spool_is_empty(http), within=EMPTY_WITHIN_S + timings["kafka.sh up"])
    timings["spool empty after up"] = time.monotonic() - up_at
    after = books.acknowledged
    await eventually(lambda: books.acknowledged_at_least(after + CLIENTS * BATCH))


async def _spooling(http: aiohttp.ClientSession) -> bool:
    return await spool_records(http) > 0


async def _spool_is_empty(http: aiohttp.ClientSession) -> bool:
    return await spool_records(http) == 0


async def test_gateways_killed_while_spooling_and_while_replaying_lose_nothing_answered_2xx(
    key_file: KeyFile,
    spare_broker: tuple[str, dict[str, str]],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL mid-outage, while spooling; a second process on the same spool takes over
    and is SIGKILLed once Kafka is back, while replaying; a third finishes the replay."""
    bootstrap, broker_env = spare_broker
    port = free_port()
    prefix = f"spoolkill.{uuid.uuid4().hex[:8]}"
    env = spool_env(port, bootstrap, key_file, prefix, tmp_path / "spool")
    headers = json_headers(key_file.key)
    books = Books(batch=BATCH)
    timings: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    held: dict[str, float] = {}  # records in the spool at each kill

    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=timeout)
        )
        first = await stack.enter_async_context(running(env))
        await ready_in_a_row(http, 1)
        async with clients(http, headers, books, CLIENTS, pace_s=PACE_S):
            await eventually(lambda: books.acknowledged_at_least(3 * CLIENTS * BATCH), within=60)
            down_at = time.monotonic()
            timings["kafka.sh down"] = await kafka_sh_took("down", broker_env)
            await eventually(lambda: _spooling(http), within=15)
            await asyncio.sleep(OUTAGE_S / 3)
            held["spooling"] = await spool_records(http)
            await first.kill()  # SIGKILL, mid-outage, clients still sending
            killed_at = time.monotonic()
            timings["first killed after down"] = killed_at - down_at

            second = await stack.enter_async_context(running(env))
            await ready_in_a_row(http, 1)
            timings["ready again after kill"] = time.monotonic() - killed_at
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            timings["kafka.sh up"] = await kafka_sh_took("up", broker_env)
            up_at = time.monotonic()
            await eventually(lambda: _replaying(http), within=EMPTY_WITHIN_S)
            held["replaying"] = await spool_records(http)
            await second.kill()  # SIGKILL, mid-replay
            timings["second killed after up"] = time.monotonic() - up_at

            third = await stack.enter_async_context(running(env))
            await ready_in_a_row(http, 1)
            await eventually(lambda: _spool_is_empty(http), within=EMPTY_WITHIN_S)
            timings["spool empty after up"] = time.monotonic() - up_at
            after = books.acknowledged
            await eventually(lambda: books.acknowledged_at_least(after + CLIENTS * BATCH))
        metrics = await scrape(http)
        third_output = await third.stop()
    second_output = await second.finish()

    on_topic = await read_topic(bootstrap, f"{prefix}.activity", books, GATEWAY_PARTITIONS)
    line = (
        report(books, on_topic, None, timings)
        + f"; records in the spool at the kill while spooling {held['spooling']:.0f}, "
        f"while replaying {held['replaying']:.0f}"
    )
    print("\n" + line)
    summarise(request.config, "spool, SIGKILL: " + line)
    # A client whose request a kill cut off, or that found the port closed, sent its
    # batch again; no answer was an error.
    problems = problems_with(books, on_topic, None)
    if not held["spooling"] or not held["replaying"]:
        problems.append(f"a kill found the spool empty: {held}")
    for name, output in (("second", second_output), ("third", third_output)):
        if "from before this start" not in output:
            problems.append(f"the {name} gateway found nothing spooled before it started")
    if metrics.value("cafe_spool_records_dropped_total") != 0:
        problems.append("spooled records dropped")
    assert not problems, "; ".join(problems)


async def _replaying(http: aiohttp.ClientSession) -> bool:
    """Kafka has acknowledged some of the spool, and it still holds more."""
    metrics = await scrape(http)
    return (
        metrics.value("cafe_spool_records_replayed_total") > 0
        and metrics.value("cafe_spool_records") > 0
    )
