"""The spool with an in-memory sink in Kafka's place: when records are spooled, what the
client is told, order, replay, restarts, bounds and a disk that fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from devkit.samples import curl_bodies
from gateway.config import SpoolSettings, TopicSettings
from gateway.errors import KafkaUnavailable, RecordTooLarge, SpoolFull, SpoolUnavailable
from gateway.http.responses import SPOOLED_HEADER
from gateway.metrics import Metrics
from gateway.sink import Delivery, MemorySink, Record, Rejected
from gateway.spool.file import decode
from gateway.spool.sink import SpoolingSink
from tests.support.app import GatewayClient, gateway_settings, produced
from tests.support.keys import KeyFile, json_headers
from tests.support.records import record, rejected
from tests.support.scrape import Samples

SETTINGS = SpoolSettings(after_ms=50)
TOPIC = "cafe.activity"


class StallingSink(MemorySink):
    """A memory sink that, while `stalled`, holds every send until it is let go."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = False
        self.go = asyncio.Event()
        self.sends = 0

    async def send(
        self,
        record_type: str,
        accepted: Sequence[Record],
        rejected: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        self.sends += 1
        if self.stalled:
            await self.go.wait()
        return await super().send(record_type, accepted, rejected)

    def values(self, topic: str = TOPIC) -> list[bytes]:
        """The values Kafka would hold on `topic` (dead letters as they are, uncut)."""
        return [message.value for message in produced(self).get(topic, [])]


def message(n: int, session: str = "s1") -> Record:
    return record(session, b'{"n":%d}' % n)


def dead(n: int, session: str = "s1") -> Rejected:
    return rejected(b'{"n":%d}' % n, session)


def spool_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("spool-*.sqlite3"))


def chunks_in(directory: Path, name: str = "spool-0.sqlite3") -> int:
    with sqlite3.connect(directory / name) as db:
        count: int = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return count


async def spooled_while_kafka_is_down(directory: Path, *sends: list[Record]) -> None:
    """Spool each of `sends` (activity records) with Kafka refusing them, then stop: the
    spool holds them for the next start."""
    down = StallingSink()
    down.is_ready = False
    sink = SpoolingSink(down, SETTINGS, directory)
    await sink.start()
    for messages in sends:
        assert await sink.send("activity", messages) is Delivery.SPOOLED
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
    assert await sink.send("activity", [message(1)], [dead(2)]) is Delivery.STORED
    assert inner.values() == [b'{"n":1}']
    assert inner.values("cafe.deadletter") == [b'{"n":2}']
    assert chunks_in(tmp_path) == 0


async def test_kafka_down_spools_and_replays_in_order_once_it_is_back(
    spooled: tuple[SpoolingSink, StallingSink, Metrics], tmp_path: Path
) -> None:
    sink, inner, metrics = spooled
    inner.is_ready = False  # refuses at once, as Kafka does a partition known to be down
    assert await sink.send("activity", [message(1), message(2)], [dead(3)]) is Delivery.SPOOLED
    # Written and fsynced before send returned.
    assert chunks_in(tmp_path) == 1
    assert await sink.unavailable() is None  # still taking records: ready
    inner.is_ready = True
    # Kafka is back, but the spool holds records: later ones go behind them.
    assert await sink.send("activity", [message(4)]) is Delivery.SPOOLED
    await until(lambda: chunks_in(tmp_path) == 0)
    assert inner.values() == [b'{"n":%d}' % n for n in (1, 2, 4)]
    assert inner.values("cafe.deadletter") == [b'{"n":3}']
    # Empty again: Kafka first.
    await until(lambda: sink._held.chunks == 0)
    assert await sink.send("activity", [message(5)]) is Delivery.STORED
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
    assert await first is Delivery.SPOOLED
    assert await second is Delivery.SPOOLED
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
        assert await sink.send("activity", [message(2)]) is Delivery.SPOOLED
        assert await asyncio.wait_for(first, timeout=5) is Delivery.SPOOLED
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
    sink = SpoolingSink(inner, SpoolSettings(max_bytes=400), tmp_path)
    await sink.start()
    try:
        big = record("s1", b"x" * 200)
        assert await sink.send("activity", [big]) is Delivery.SPOOLED
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
    await first.send("log", [record("s1", b"line")])
    await first.close()
    assert chunks_in(tmp_path) == 2

    up = StallingSink()
    second = SpoolingSink(up, SETTINGS, tmp_path)
    await second.start()
    try:
        # Behind what was there before the restart.
        assert await second.send("activity", [message(2)]) is Delivery.SPOOLED
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
    with caplog.at_level(logging.ERROR, logger="gateway.spool.sink"):
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
    with caplog.at_level(logging.ERROR, logger="gateway.spool.sink"):
        await sink.start()
    try:
        assert "cannot be written" in caplog.text
        assert "cannot be written" in (await sink.unavailable() or "")
        # Kafka still takes records directly...
        assert await sink.send("activity", [message(1)]) is Delivery.STORED
        # ...but what it does not take cannot be spooled.
        inner.is_ready = False
        with pytest.raises(SpoolUnavailable):
            await sink.send("activity", [message(2)])
        # The disk is fixed: the spool tries it every second, and finds it so.
        blocked.unlink()
        deadline = time.monotonic() + 5
        while await sink.unavailable() is not None:
            assert time.monotonic() < deadline, "the mended disk was not found so"
            await asyncio.sleep(0.05)
        assert await sink.send("activity", [message(3)]) is Delivery.SPOOLED
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
    gateway_client: GatewayClient, key_file: KeyFile, tmp_path: Path
) -> None:
    inner = StallingSink()
    settings = gateway_settings(keys_file=key_file.path, spool=SpoolSettings(dir=tmp_path))
    client = await gateway_client(settings, sink=inner)
    headers = json_headers(key_file.key)
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
    poison = record("s1", b"poison")
    for messages in ([message(1)], [poison], [message(2)]):
        await sink.send("activity", messages)
    send = inner.send

    async def refuse_poison(
        record_type: str,
        accepted: Sequence[Record],
        dead: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        if poison in accepted:
            raise RecordTooLarge("Kafka refused a record as too large for cafe.activity")
        return await send(record_type, accepted, dead, patient=patient)

    inner.send = refuse_poison  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.ERROR, logger="gateway.spool.sink"):
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
        assert await sink.send("activity", [message(1)]) is Delivery.SPOOLED
        sink.broken = "disk I/O error"  # as _write would set it
        inner.is_ready = True
        assert await sink.send("activity", [message(2)]) is Delivery.STORED
        assert b'{"n":2}' in inner.values()
    finally:
        await sink.close()


class PartialSink(MemorySink):
    """A memory sink with faults per topic: `down` topics refuse at once (the others of the
    send store theirs); on `slow` ones a
    send is stored only after `ack_after_s`, and one that will not wait so long gives up
    at `timeout_s` (as the Kafka sink does at the produce timeout), though it is stored."""

    def __init__(self, *, timeout_s: float = 0.05, ack_after_s: float = 0.2) -> None:
        super().__init__()
        self.down: set[str] = set()
        self.slow: set[str] = set()
        self.timeout_s = timeout_s
        self.ack_after_s = ack_after_s
        self.late: set[asyncio.Task[None]] = set()
        self.stored: dict[str, list[bytes]] = {}  # the values of each topic

    async def send(
        self,
        record_type: str,
        accepted: Sequence[Record],
        rejected: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        names = TopicSettings()
        parts: list[tuple[str, Sequence[Record | Rejected]]] = [
            (names.by_record_type()[record_type], accepted),
            (names.deadletter, rejected),
        ]
        sends = [(topic, messages) for topic, messages in parts if messages]
        if not self.is_ready:
            raise KafkaUnavailable("Kafka is down")
        # As the Kafka sink does, each topic's messages are stored or not on their own.
        down = [(topic, messages) for topic, messages in sends if topic in self.down]
        if down:
            for topic, messages in sends:
                if topic not in self.down:
                    self.store(topic, messages)
            raise KafkaUnavailable(f"{down[0][0]} is down")
        if any(topic in self.slow for topic, _ in sends):
            stored = asyncio.create_task(self._store_late(sends))
            self.late.add(stored)
            stored.add_done_callback(self.late.discard)
            if not patient:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.timeout_s):
                        await asyncio.shield(stored)
                if not stored.done():
                    raise KafkaUnavailable("not acknowledged within the produce timeout")
            await stored
            return Delivery.STORED
        for topic, messages in sends:
            self.store(topic, messages)
        return Delivery.STORED

    def store(self, topic: str, items: Sequence[Record | Rejected]) -> None:
        self.stored.setdefault(topic, []).extend(item.value for item in items)

    async def _store_late(self, sends: list[tuple[str, Sequence[Record | Rejected]]]) -> None:
        await asyncio.sleep(self.ack_after_s)
        for topic, messages in sends:
            self.store(topic, messages)

    def copies(self, topic: str) -> Counter[bytes]:
        return Counter(self.stored.get(topic, []))


async def test_a_topic_down_beside_one_up_neither_repeats_nor_holds_back_the_other(
    tmp_path: Path,
) -> None:
    """Replay sends each part of a window once: the records Kafka took are not sent again
    while the dead letters of their chunks wait for their topic; and a record type whose
    topic is up is not held back by one whose topic is down."""
    inner = PartialSink()
    sink = SpoolingSink(inner, SETTINGS, tmp_path)
    await sink.start()
    try:
        inner.is_ready = False
        for n in range(5):
            assert await sink.send("activity", [message(n)], [dead(100 + n)]) is Delivery.SPOOLED
            assert await sink.send("log", [message(200 + n)]) is Delivery.SPOOLED
        assert chunks_in(tmp_path) == 10
        inner.is_ready = True
        inner.down = {"cafe.deadletter", "cafe.log"}
        # The activity records are delivered; their chunks stay for their dead letters,
        # through several tries (0.25 s, then 0.5 s apart).
        await asyncio.sleep(2)
        assert inner.copies("cafe.activity") == Counter(b'{"n":%d}' % n for n in range(5))
        assert chunks_in(tmp_path) == 10
        # The log topic comes back while the dead-letter topic stays down: log is replayed
        # (it waits for no other type), and its requests go to Kafka first again.
        inner.down = {"cafe.deadletter"}
        await until(lambda: sink._queues["log"].chunks == 0)
        assert await sink.send("log", [message(300)]) is Delivery.STORED
        inner.down = set()
        await until(lambda: chunks_in(tmp_path) == 0)
    finally:
        await sink.close()
    assert inner.copies("cafe.activity") == Counter(b'{"n":%d}' % n for n in range(5))
    assert inner.copies("cafe.deadletter") == Counter(b'{"n":%d}' % n for n in range(100, 105))
    assert inner.copies("cafe.log") == Counter(b'{"n":%d}' % n for n in (*range(200, 205), 300))


async def test_a_replay_kafka_acknowledges_after_the_produce_timeout_is_not_sent_again(
    tmp_path: Path,
) -> None:
    """Acknowledgements slower than the produce timeout: each replayed record is stored
    once, as the replay waits for Kafka's verdict rather than sending again."""
    inner = PartialSink(timeout_s=0.05, ack_after_s=0.3)
    sink = SpoolingSink(inner, SETTINGS, tmp_path)
    await sink.start()
    try:
        inner.is_ready = False
        for n in range(3):
            assert await sink.send("activity", [message(n)]) is Delivery.SPOOLED
        inner.is_ready = True
        inner.slow = {"cafe.activity"}
        await until(lambda: chunks_in(tmp_path) == 0)
        await asyncio.gather(*inner.late)
    finally:
        await sink.close()
    assert inner.copies("cafe.activity") == Counter(b'{"n":%d}' % n for n in range(3))


async def test_with_the_spool_full_a_request_waits_for_kafka_to_its_own_timeout(
    tmp_path: Path,
) -> None:
    """The spool cannot take a request Kafka is slow to acknowledge: it is not answered 503
    at CAFE_SPOOL_AFTER_MS while Kafka may still store it, but waits for Kafka."""
    inner = PartialSink(timeout_s=1.0, ack_after_s=0.2)
    inner.slow = {"cafe.activity"}
    sink = SpoolingSink(inner, SpoolSettings(after_ms=50, max_bytes=1), tmp_path)
    await sink.start()
    try:
        assert await sink.send("activity", [message(1)]) is Delivery.STORED
        assert inner.copies("cafe.activity") == Counter([b'{"n":1}'])
        # Past Kafka's own wait, the answer is the spool's refusal.
        inner.ack_after_s = 5
        with pytest.raises(SpoolFull):
            await sink.send("activity", [message(2)])
    finally:
        await sink.close()


def page_count(db: sqlite3.Connection) -> int:
    count: int = db.execute("PRAGMA page_count").fetchone()[0]
    return count


async def test_readiness_probes_racing_requests_on_a_full_disk_change_nothing(
    tmp_path: Path,
) -> None:
    """A full disk (SQLite's max_page_count reached: a DELETE of nothing still works, an
    insert does not): /readyz says not ready for as long as it is full, asking changes
    nothing, and every request racing the probes is answered, 503, within its bound."""
    inner = PartialSink()
    inner.is_ready = False
    sink = SpoolingSink(inner, SETTINGS, tmp_path)
    await sink.start()
    try:
        limit = await sink._file._run(page_count)
        await sink._file._run(lambda db: db.execute(f"PRAGMA max_page_count={limit}"))
        for _ in range(30):
            results = await asyncio.wait_for(
                asyncio.gather(
                    sink.unavailable(),
                    # Larger than a page: it needs pages the file cannot have.
                    sink.send("activity", [record("s", b"x" * 20_000)]),
                    sink.unavailable(),
                    return_exceptions=True,
                ),
                timeout=2,
            )
            assert isinstance(results[1], SpoolUnavailable), results[1]
            assert await sink.unavailable() is not None
            await asyncio.sleep(0.05)
        assert "cannot be written" in (await sink.unavailable() or "")
        assert sink._held.chunks == 0 == chunks_in(tmp_path)
        # Room again: the spool finds it so by itself, and takes the next request.
        await sink._file._run(lambda db: db.execute("PRAGMA max_page_count=1073741823"))
        deadline = time.monotonic() + 5
        while await sink.unavailable() is not None:
            assert time.monotonic() < deadline, "the disk with room again was not found so"
            await asyncio.sleep(0.05)
        assert await sink.send("activity", [message(99)]) is Delivery.SPOOLED
        assert sink._held.chunks == 1 == chunks_in(tmp_path)
    finally:
        await sink.close()


async def test_after_one_spooled_request_requests_soon_go_to_kafka_first_again(
    tmp_path: Path,
) -> None:
    """One client sending one request after another, behind one spooled request once Kafka
    is back: the replayer catches up, rather than chase the client's appends."""
    inner = PartialSink()
    sink = SpoolingSink(inner, SETTINGS, tmp_path)
    await sink.start()
    try:
        inner.is_ready = False
        assert await sink.send("activity", [message(0)]) is Delivery.SPOOLED
        inner.is_ready = True
        back = time.monotonic()
        n = 1
        while await sink.send("activity", [message(n)]) is Delivery.SPOOLED:
            assert time.monotonic() - back < 3, f"{n} requests spooled since Kafka came back"
            n += 1
    finally:
        await sink.close()
    assert inner.copies("cafe.activity") == Counter(b'{"n":%d}' % i for i in range(n + 1))


async def test_a_chunk_that_does_not_decode_is_dropped_and_the_replay_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await spooled_while_kafka_is_down(tmp_path, [message(1)], [message(2)])
    with sqlite3.connect(tmp_path / "spool-0.sqlite3") as db:
        first = db.execute("SELECT min(id) FROM chunks").fetchone()[0]
        db.execute("UPDATE chunks SET payload = ? WHERE id = ?", (b"\xff" * 7, first))
    inner = PartialSink()
    metrics = Metrics(CollectorRegistry(), "test")
    sink = SpoolingSink(inner, SETTINGS, tmp_path, metrics=metrics)
    with caplog.at_level(logging.ERROR, logger="gateway.spool.sink"):
        await sink.start()
        try:
            await until(lambda: chunks_in(tmp_path) == 0)
        finally:
            await sink.close()
    assert inner.copies("cafe.activity") == Counter([b'{"n":2}'])
    samples = Samples(generate_latest(metrics.registry).decode())
    assert samples.value("cafe_spool_records_dropped_total", reason="corrupt") == 1
    assert "do not decode" in caplog.text
