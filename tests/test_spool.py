"""The spool with an in-memory sink in Kafka's place: when records are spooled, what the
client is told, order, replay, restarts, bounds and a disk that fails."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.app import create_app
from gateway.config import Settings, SpoolSettings
from gateway.errors import RecordTooLarge, SpoolFull, SpoolUnavailable
from gateway.ingest import SPOOLED_HEADER
from gateway.metrics import Metrics
from gateway.sink import MemorySink, Message
from gateway.spool import SpoolingSink
from gateway.spoolfile import decode
from tests.conftest import AiohttpClient
from tests.keys import KeyFile
from tests.scrape import Samples
from tests.spec_samples import curl_bodies

SETTINGS = SpoolSettings(after_ms=50)
TOPIC = "cafe.activity"
HEADERS = [("cafe-key-id", b"k1"), ("cafe-schema", b"activity")]


class StallingSink(MemorySink):
    """A memory sink that, while `stalled`, holds every send until it is let go."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = False
        self.go = asyncio.Event()
        self.sends = 0

    async def send(
        self, record_type: str, accepted: Sequence[Message], dead_letters: Sequence[Message] = ()
    ) -> bool:
        self.sends += 1
        if self.stalled:
            await self.go.wait()
        return await super().send(record_type, accepted, dead_letters)

    def values(self, topic: str = TOPIC) -> list[bytes]:
        return [message.value for message in self.topics.get(topic, [])]


def message(n: int, session: str = "s1") -> Message:
    return Message(session.encode(), b'{"n":%d}' % n, HEADERS)


def spool_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("spool-*.sqlite3"))


def chunks_in(directory: Path, name: str = "spool-0.sqlite3") -> int:
    with sqlite3.connect(directory / name) as db:
        count: int = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return count


async def spooled_while_kafka_is_down(directory: Path, *sends: list[Message]) -> None:
    """Spool each of `sends` (activity records) with Kafka refusing them, then stop: the
    spool holds them for the next start."""
    down = StallingSink()
    down.is_ready = False
    sink = SpoolingSink(down, SETTINGS, directory)
    await sink.start()
    for messages in sends:
        assert await sink.send("activity", messages) is True
    await sink.close()


@pytest.fixture
async def spooled(tmp_path: Path) -> AsyncIterator[tuple[SpoolingSink, StallingSink, Metrics]]:
    inner = StallingSink()
    metrics = Metrics(CollectorRegistry(), "test")
    sink = SpoolingSink(inner, SETTINGS, tmp_path, metrics=metrics)
    await sink.start()
    yield sink, inner, metrics
    inner.go.set()
    await sink.close()


async def until(check: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


async def test_records_kafka_acknowledges_are_not_spooled(
    spooled: tuple[SpoolingSink, StallingSink, Metrics], tmp_path: Path
) -> None:
    sink, inner, _ = spooled
    assert await sink.send("activity", [message(1)], [message(2)]) is False
    assert inner.values() == [b'{"n":1}']
    assert inner.values("cafe.deadletter") == [b'{"n":2}']
    assert chunks_in(tmp_path) == 0


async def test_kafka_down_spools_and_replays_in_order_once_it_is_back(
    spooled: tuple[SpoolingSink, StallingSink, Metrics], tmp_path: Path
) -> None:
    sink, inner, metrics = spooled
    inner.is_ready = False  # refuses at once, as Kafka does a partition known to be down
    assert await sink.send("activity", [message(1), message(2)], [message(3)]) is True
    # Written and fsynced before send returned.
    assert chunks_in(tmp_path) == 1
    assert await sink.unavailable() is None  # still taking records: ready
    inner.is_ready = True
    # Kafka is back, but the spool holds records: later ones go behind them.
    assert await sink.send("activity", [message(4)]) is True
    await until(lambda: chunks_in(tmp_path) == 0)
    assert inner.values() == [b'{"n":%d}' % n for n in (1, 2, 4)]
    assert inner.values("cafe.deadletter") == [b'{"n":3}']
    # Empty again: Kafka first.
    await until(lambda: sink._held.chunks == 0)
    assert await sink.send("activity", [message(5)]) is False
    samples = Samples(generate_latest(metrics.registry).decode())
    assert samples.value("cafe_spool_records_spooled_total") == 4
    assert samples.value("cafe_spool_records_replayed_total") == 4
    assert samples.value("cafe_spool_records") == 0


async def test_records_not_acknowledged_in_time_are_spooled_with_those_waiting_beside_them(
    spooled: tuple[SpoolingSink, StallingSink, Metrics], tmp_path: Path
) -> None:
    sink, inner, _ = spooled
    inner.stalled = True
    started = time.monotonic()
    first = asyncio.create_task(sink.send("activity", [message(1)]))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(sink.send("activity", [message(2)]))
    # The first's budget (50 ms) passes: both are spooled, in the order they came.
    assert await first is True
    assert await second is True
    assert 0.05 <= time.monotonic() - started < 2
    assert chunks_in(tmp_path) == 2
    # Kafka takes records again; the stalled attempts were given up, so only the
    # replay delivers them.
    inner.stalled = False
    inner.go.set()
    await until(lambda: chunks_in(tmp_path) == 0)
    assert inner.values() == [b'{"n":1}', b'{"n":2}']


async def test_a_request_refused_at_once_is_spooled_behind_those_still_waiting(
    tmp_path: Path,
) -> None:
    inner = StallingSink()
    inner.stalled = True
    # A wait for Kafka far longer than the test: the first request ends only if the
    # second's refusal ends it.
    sink = SpoolingSink(inner, SpoolSettings(after_ms=60_000), tmp_path)
    await sink.start()
    try:
        first = asyncio.create_task(sink.send("activity", [message(1)]))
        await until(lambda: inner.sends == 1)  # waiting for Kafka
        inner.stalled, inner.is_ready = False, False  # the next is refused at once
        assert await sink.send("activity", [message(2)]) is True
        assert await asyncio.wait_for(first, timeout=5) is True
        with sqlite3.connect(tmp_path / "spool-0.sqlite3") as db:
            payloads = [row[0] for row in db.execute("SELECT payload FROM chunks ORDER BY id")]
        # In the order they came.
        assert [decode("activity", p).accepted[0].value for p in payloads] == [
            b'{"n":1}',
            b'{"n":2}',
        ]
    finally:
        inner.go.set()
        await sink.close()


async def test_a_record_kafka_refuses_for_good_is_not_spooled(
    spooled: tuple[SpoolingSink, StallingSink, Metrics], tmp_path: Path
) -> None:
    sink, inner, _ = spooled

    async def refuse(*args: object) -> bool:
        raise RecordTooLarge("too large for the topic")

    inner.send = refuse  # type: ignore[method-assign,assignment]
    with pytest.raises(RecordTooLarge):
        await sink.send("activity", [message(1)])
    assert chunks_in(tmp_path) == 0


async def test_a_full_spool_refuses_with_503_and_says_it_is_not_ready(tmp_path: Path) -> None:
    inner = StallingSink()
    inner.is_ready = False
    sink = SpoolingSink(inner, SpoolSettings(max_bytes=300), tmp_path)
    await sink.start()
    try:
        big = Message(b"s1", b"x" * 200, HEADERS)
        assert await sink.send("activity", [big]) is True
        with pytest.raises(SpoolFull):
            await sink.send("activity", [big])
        assert chunks_in(tmp_path) == 1
        assert "full" in (await sink.unavailable() or "")
    finally:
        await sink.close()


async def test_what_the_spool_holds_is_sent_after_a_restart(tmp_path: Path) -> None:
    down = StallingSink()
    down.is_ready = False
    first = SpoolingSink(down, SETTINGS, tmp_path)
    await first.start()
    await first.send("activity", [message(1)])
    await first.send("log", [Message(b"s1", b"line", HEADERS)])
    await first.close()
    assert chunks_in(tmp_path) == 2

    up = StallingSink()
    second = SpoolingSink(up, SETTINGS, tmp_path)
    await second.start()
    try:
        # Behind what was there before the restart.
        assert await second.send("activity", [message(2)]) is True
        await until(lambda: chunks_in(tmp_path) == 0)
        assert up.values() == [b'{"n":1}', b'{"n":2}']
        assert up.values("cafe.log") == [b"line"]
    finally:
        await second.close()


async def test_records_older_than_the_max_age_are_dropped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await spooled_while_kafka_is_down(tmp_path, [message(1), message(2)])
    with sqlite3.connect(tmp_path / "spool-0.sqlite3") as db:
        db.execute("UPDATE chunks SET spooled_at = spooled_at - 7200")

    up = StallingSink()
    metrics = Metrics(CollectorRegistry(), "test")
    second = SpoolingSink(up, SpoolSettings(max_age_seconds=3600), tmp_path, metrics=metrics)
    with caplog.at_level(logging.ERROR, logger="gateway.spool"):
        await second.start()
        try:
            await until(lambda: chunks_in(tmp_path) == 0)
        finally:
            await second.close()
    assert up.values() == []
    assert (
        Samples(generate_latest(metrics.registry).decode()).value(
            "cafe_spool_records_dropped_total", reason="expired"
        )
        == 2
    )
    assert "dropped 2 spooled records older than CAFE_SPOOL_MAX_AGE (3600s)" in caplog.text


async def test_a_spool_that_cannot_write_makes_the_gateway_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the spool directory should be")
    inner = StallingSink()
    sink = SpoolingSink(inner, SETTINGS, blocked)
    with caplog.at_level(logging.ERROR, logger="gateway.spool"):
        await sink.start()
    try:
        assert "cannot be written" in caplog.text
        assert "cannot be written" in (await sink.unavailable() or "")
        # Kafka still takes records directly...
        assert await sink.send("activity", [message(1)]) is False
        # ...but what it does not take cannot be spooled.
        inner.is_ready = False
        with pytest.raises(SpoolUnavailable):
            await sink.send("activity", [message(2)])
        # The disk is fixed: the next readiness probe finds it so.
        blocked.unlink()
        assert await sink.unavailable() is None
        assert await sink.send("activity", [message(3)]) is True
    finally:
        await sink.close()


async def test_each_worker_takes_a_spool_file_of_its_own(tmp_path: Path) -> None:
    sinks = [SpoolingSink(StallingSink(), SETTINGS, tmp_path, workers=2) for _ in range(3)]
    for sink in sinks:
        await sink.start()
    try:
        assert spool_files(tmp_path) == ["spool-0.sqlite3", "spool-1.sqlite3"]
        # A third process finds both files held: it cannot spool, and says so.
        assert sinks[0].broken is None and sinks[1].broken is None
        assert "in use by another process" in (await sinks[2].unavailable() or "")
    finally:
        for sink in sinks:
            await sink.close()


async def test_a_spooled_answer_says_so_in_a_header_and_keeps_its_body(
    aiohttp_client: AiohttpClient, key_file: KeyFile, tmp_path: Path
) -> None:
    inner = StallingSink()
    settings = Settings(keys_file=key_file.path, spool=SpoolSettings(dir=tmp_path))
    client = await aiohttp_client(create_app(settings, sink=inner))
    headers = {"x-api-key": key_file.key, "Content-Type": "application/json"}
    body = curl_bodies()["activity"]

    resp = await client.post("/v1/activity", data=body, headers=headers)
    assert resp.status == 200
    assert SPOOLED_HEADER not in resp.headers

    inner.is_ready = False
    resp = await client.post("/v1/activity", data=body, headers=headers)
    assert resp.status == 200
    assert resp.headers[SPOOLED_HEADER] == "true"
    assert await resp.json() == {"accepted": len(orjson.loads(body)["records"])}
    # Taking records safely: still ready.
    assert (await client.get("/readyz")).status == 200
    assert chunks_in(tmp_path) == 1


async def test_a_replay_kafka_has_not_acknowledged_keeps_its_chunks_through_a_stop(
    tmp_path: Path,
) -> None:
    await spooled_while_kafka_is_down(tmp_path, [message(1)])

    stalled = StallingSink()
    stalled.stalled = True
    second = SpoolingSink(stalled, SETTINGS, tmp_path)
    await second.start()
    await until(lambda: stalled.sends == 1)  # the replay is with Kafka
    await second.close()  # as a crash would, before Kafka acknowledged it
    assert chunks_in(tmp_path) == 1
    assert stalled.values() == []


async def test_records_kafka_refuses_for_good_on_replay_are_dropped_and_the_rest_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inner = StallingSink()
    inner.is_ready = False
    metrics = Metrics(CollectorRegistry(), "test")
    sink = SpoolingSink(inner, SETTINGS, tmp_path, metrics=metrics)
    await sink.start()
    poison = Message(b"s1", b"poison", HEADERS)
    for messages in ([message(1)], [poison], [message(2)]):
        await sink.send("activity", messages)
    send = inner.send

    async def refuse_poison(
        record_type: str, accepted: Sequence[Message], dead: Sequence[Message] = ()
    ) -> bool:
        if poison in accepted:
            raise RecordTooLarge("Kafka refused a record as too large for cafe.activity")
        return await send(record_type, accepted, dead)

    inner.send = refuse_poison  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.ERROR, logger="gateway.spool"):
        inner.is_ready = True
        try:
            await until(lambda: chunks_in(tmp_path) == 0)
        finally:
            await sink.close()
    assert inner.values() == [b'{"n":1}', b'{"n":2}']
    samples = Samples(generate_latest(metrics.registry).decode())
    assert samples.value("cafe_spool_records_dropped_total", reason="refused") == 1
    assert samples.value("cafe_spool_records_replayed_total") == 2
    assert "Kafka refuses 1 spooled activity records for good" in caplog.text


async def test_expired_records_are_dropped_while_kafka_is_still_away(tmp_path: Path) -> None:
    inner = StallingSink()
    inner.is_ready = False
    sink = SpoolingSink(inner, SpoolSettings(max_age_seconds=60), tmp_path)
    await sink.start()
    try:
        await sink.send("activity", [message(1)])
        with sqlite3.connect(tmp_path / "spool-0.sqlite3") as db:
            db.execute("UPDATE chunks SET spooled_at = spooled_at - 120")
        await until(lambda: chunks_in(tmp_path) == 0, within=10)
        assert inner.values() == []
    finally:
        await sink.close()


async def test_with_its_disk_failing_the_spool_lets_requests_go_to_kafka_ahead_of_it(
    tmp_path: Path,
) -> None:
    inner = StallingSink()
    inner.is_ready = False
    sink = SpoolingSink(inner, SETTINGS, tmp_path)
    await sink.start()
    try:
        assert await sink.send("activity", [message(1)]) is True
        sink.broken = "disk I/O error"  # as _write would set it
        inner.is_ready = True
        assert await sink.send("activity", [message(2)]) is False
        assert b'{"n":2}' in inner.values()
    finally:
        await sink.close()
