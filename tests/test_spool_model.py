"""A model-based test of the spool (gateway/spool/) over the Kafka sink (gateway/kafka/).

Hypothesis drives a real `SpoolingSink(KafkaSink(...))` whose aiokafka producer is a
fake (tests/support/fake_kafka.py), on an event loop with a virtual clock
(tests/support/virtual_time.py), with steps of these kinds: send a request (a task of its
own, not awaited), set a topic up, slow, down or refusing, make the spool's disk full,
failing, slow or well again, ask for readiness, let time pass, and kill the process and
start another on the same spool.

After every step the records are checked against what the requests were answered
(`SpoolModel`'s invariants, each saying what it checks); at the end every topic comes
back up and the disk heals, the spool drains, and the checks run once more.

`make test` runs a fixed set of 300 examples of up to 30 steps (derandomized: the same
every run; about 10 s when nothing fails, minutes when Hypothesis shrinks a failure).
More, and other random choices each run:

    CAFE_MODEL_EXAMPLES=5000 CAFE_MODEL_STEPS=50 CAFE_MODEL_RANDOM=1 \
        .venv/bin/pytest tests/test_spool_model.py

Time is virtual (tests/support/virtual_time.py): a step "wait 3 s" takes milliseconds. To
see what one failing example does, call the steps Hypothesis printed on a `SpoolModel()`
(with SpoolFile._call patched as the test does) and read `state.kafka.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import itertools
import os
import shutil
import sqlite3
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from prometheus_client import CollectorRegistry

from gateway.config import KafkaSettings, SpoolSettings, TopicSettings
from gateway.errors import GatewayError
from gateway.kafka.sink import KafkaSink
from gateway.metrics import Metrics
from gateway.sink import Delivery, Record, Rejected
from gateway.spool.file import SpoolFile, decode
from gateway.spool.sink import SpoolingSink
from tests.support.fake_kafka import Copy, FakeKafka, Mode
from tests.support.records import record, rejected
from tests.support.virtual_time import Deadlock, VirtualTimeLoop

# -- configuration -------------------------------------------------------------------

PRODUCE_TIMEOUT_S = 1.0
AFTER_S = 0.25
REQUEST_TIMEOUT_S = 2.0
TOPICS = TopicSettings(partitions=2)
KAFKA_SETTINGS = KafkaSettings(
    bootstrap="fake-kafka:9092",
    produce_timeout_ms=int(PRODUCE_TIMEOUT_S * 1000),
    request_timeout_ms=int(REQUEST_TIMEOUT_S * 1000),
    max_queued_bytes=2048,  # about 80 records: reached now and then
    topics=TOPICS,
)
SPOOL_SETTINGS = SpoolSettings(max_bytes=3000, after_ms=int(AFTER_S * 1000))  # ~20 requests
RECORD_TYPES = tuple(TOPICS.by_record_type())
TOPIC_NAMES = TOPICS.all()
SESSIONS = ("s0", "s1", "s2")

# A request is answered within its bound (gateway/spool/sink.py: up to CAFE_SPOOL_AFTER_MS
# waiting for a replay to catch up, then up to CAFE_PRODUCE_TIMEOUT_MS for Kafka or the
# spool's disk); this much more is allowed for a last write on a disk that is not slow.
BOUND_S = AFTER_S + PRODUCE_TIMEOUT_S + 0.05
# Each call of the spool's thread takes this long in virtual time; a slow disk, longer.
FAST_DISK_S = 0.001
SLOW_DISK_S = 0.4
# With every topic up this long, every batch the Kafka sink made has been settled: a
# producer renewal's backoff (5 s at most), a batch's expiry, an old producer's stop.
SETTLE_S = 5.0 + REQUEST_TIMEOUT_S + 2 * PRODUCE_TIMEOUT_S + 1.0 + 1.0
# Requests waiting at once, at most (more are not sent until some are answered).
MAX_PENDING = 6
# The teardown's drain gives up after this long in virtual time.
DRAIN_S = 90.0
_NO_PAGE_LIMIT = 4294967294

# Who appended a record to its Kafka batch: ("direct", process) in a request's own
# SpoolingSink.send, ("replay", process) in a spool replayer task ("spool-replay...").
ORIGIN: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "origin", default=None
)


_V = TypeVar("_V")


def record_id(value: bytes) -> int:
    return int(value.split(b"|", 1)[0])


# -- the spool's disk ----------------------------------------------------------------


class Disk:
    """What the spool's disk does now: `ok`, `slow`, `full` (inserts fail, as does any
    write that needs a new page; reads and deletes work) or `failing` (every call fails).
    SQLite's own "database or disk is full" comes from a page limit on the connection."""

    def __init__(self) -> None:
        self.mode = "ok"

    def run(self, work: Callable[..., Any], db: sqlite3.Connection, *args: Any) -> Any:
        name = getattr(work, "__name__", "")
        mode = self.mode
        limit = db.execute("PRAGMA page_count").fetchone()[0] if mode == "full" else 0
        db.execute(f"PRAGMA max_page_count = {limit or _NO_PAGE_LIMIT}")
        if mode == "failing":
            raise sqlite3.OperationalError("disk I/O error")
        if mode == "full" and name == "_insert":
            raise sqlite3.OperationalError("database or disk is full")
        return work(db, *args)


_DISK = Disk()  # the disk of the example running; SpoolFile._call is patched to use it
_ROOT: str | None = None  # where the examples' spools go (None: the system's temp dir)


def _call_through_disk(call: Callable[..., Any]) -> Callable[..., Any]:
    """SpoolFile._call (run on the spool's thread), with every call going through _DISK."""

    def faulty_call(self: SpoolFile, work: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if getattr(work, "__name__", "") == "close":
            return call(self, work, args)
        disk = _DISK

        def through_disk(db: sqlite3.Connection, *args: Any) -> Any:
            return disk.run(work, db, *args)

        through_disk.__name__ = getattr(work, "__name__", "work")
        return call(self, through_disk, args)

    return faulty_call


def _file_rows(path: Path) -> list[tuple[int, str, int, bytes]]:
    """Every chunk in a spool file, read with a connection of the test's own."""
    if not path.exists():
        return []
    db = sqlite3.connect(path, isolation_level=None)
    try:
        return db.execute(
            "SELECT id, record_type, records, payload FROM chunks WHERE record_type != ''"
        ).fetchall()
    finally:
        db.close()


# -- the gateway's process -------------------------------------------------------------


class ModelKafkaSink(KafkaSink):
    """The Kafka sink, with the fake cluster's producers and its topics always there."""

    def __init__(self, settings: KafkaSettings, metrics: Metrics, kafka: FakeKafka) -> None:
        super().__init__(settings, metrics)
        self._kafka = kafka

    def _new_producer(self) -> Any:
        return self._kafka.new_producer()

    async def _ensure_topics(self, producer: Any) -> None:
        for topic in self._settings.topics.all():
            await producer.partitions_for(topic)


@dataclass(eq=False)
class Request:
    number: int
    process: int
    session: str
    record_type: str
    records: dict[str, list[int]]  # record ids by topic, in the order sent
    sent_at: float
    sent_event: int
    spool_broken: bool  # the spool could not be written when it was sent
    status: str = "pending"  # then: kafka, spooled, refused (503), crashed, error
    answered_at: float | None = None
    answered_event: int | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("kafka", "spooled")

    def ids(self) -> list[int]:
        return [rid for ids in self.records.values() for rid in ids]

    def __str__(self) -> str:
        answered = "" if self.answered_at is None else f", answered at {self.answered_at:.3f}s"
        return (
            f"request {self.number} ({self.session} {self.record_type}, process "
            f"{self.process}, sent at {self.sent_at:.3f}s{answered}: {self.status}"
            f"{' ' + self.error if self.error else ''})"
        )


def _path(copy: Copy) -> str:
    kind, process, task = copy.origin
    where = "SpoolingSink.send" if kind == "direct" else f"replay task {task!r}"
    return f"{where} of process {process} at {copy.at:.3f}s"


class SpoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        global _DISK
        _DISK = self.disk = Disk()
        self.directory = Path(tempfile.mkdtemp(prefix="spool-", dir=_ROOT))
        self.loop = VirtualTimeLoop(FAST_DISK_S)
        # In the order made (a set's order would differ from run to run).
        self.tasks: dict[asyncio.Task[Any], None] = {}
        self.loop.set_task_factory(self._task_factory)  # type: ignore[arg-type]
        self.kafka = FakeKafka(
            list(TOPIC_NAMES),
            partitions=2,
            request_timeout=REQUEST_TIMEOUT_S,
            slow_delay=PRODUCE_TIMEOUT_S * 1.5,
            origin=self._origin,
            clock=self.loop.time,
        )
        self.process = 0
        self.requests: list[Request] = []
        self.by_record: dict[int, Request] = {}
        self.record_ids = itertools.count()
        self.events = itertools.count()
        self.all_up_since: float | None = 0.0
        self.probes: list[asyncio.Task[str | None]] = []
        self.failed = False
        self.sink, self.kafka_sink = self._start_process()

    # -- plumbing -------------------------------------------------------------------

    def _task_factory(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        """Tasks as usual; a spool replayer's, wherever it is made, marked as one."""
        if getattr(coro, "__qualname__", "").startswith("SpoolingSink._replay"):
            context = (context or contextvars.copy_context()).copy()
            context.run(ORIGIN.set, ("replay", self.process))
        task = asyncio.Task(coro, loop=loop, context=context)
        parent = asyncio.current_task(loop)
        if parent is not None and parent.get_name().startswith("spool-replay"):
            # gather()'s tasks, named after the replayer that made them
            task.set_name(f"{parent.get_name()}>{getattr(coro, '__qualname__', '?')}")
        # Known here, as asyncio.all_tasks() walks every task of every loop not yet freed.
        self.tasks[task] = None
        task.add_done_callback(self._forget_task)
        return task

    def _forget_task(self, task: asyncio.Task[Any]) -> None:
        self.tasks.pop(task, None)

    def _origin(self) -> tuple[str, int, str]:
        task = asyncio.current_task()
        name = task.get_name() if task is not None else ""
        kind, process = ORIGIN.get() or ("unknown", self.process)
        return kind, process, name

    def _start_process(self) -> tuple[SpoolingSink, ModelKafkaSink]:
        metrics = Metrics(CollectorRegistry(), "model")
        kafka_sink = ModelKafkaSink(KAFKA_SETTINGS, metrics, self.kafka)
        extra: dict[str, Any] = {}
        if "produce_timeout_s" in inspect.signature(SpoolingSink).parameters:
            extra["produce_timeout_s"] = PRODUCE_TIMEOUT_S
        sink = SpoolingSink(kafka_sink, SPOOL_SETTINGS, self.directory, metrics=metrics, **extra)
        self.started_at = self.loop.time()
        self.loop.run_until_complete(sink.start())
        self.loop.run_until_idle()
        return sink, kafka_sink

    async def _request(
        self, sink: SpoolingSink, request: Request, accepted: list[Record], dead: list[Rejected]
    ) -> None:
        ORIGIN.set(("direct", request.process))
        try:
            spooled = await sink.send(request.record_type, accepted, dead)
        except asyncio.CancelledError:
            request.status = "crashed"
            raise
        except GatewayError as exc:
            self._answer(request, "refused", f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            self._answer(request, "error", repr(exc))
        else:
            self._answer(request, "spooled" if spooled is Delivery.SPOOLED else "kafka")

    def _answer(self, request: Request, status: str, error: str = "") -> None:
        request.status, request.error = status, error
        request.answered_at = self.loop.time()
        request.answered_event = next(self.events)

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.failed = True
            raise

    def _kill(self) -> None:
        """End the process as a kill would: every task stops where it is; the spool's
        connection and lock go; what SQLite committed stays."""
        for _ in range(100):
            tasks = [task for task in self.tasks if not task.done()]
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        spool_file = self.sink._file
        spool_file._executor.shutdown(wait=True)
        if spool_file._db is not None:
            spool_file._db.close()
            spool_file._db = None
        if spool_file._lock is not None:
            spool_file._lock.close()
            spool_file._lock = None

    # -- steps ----------------------------------------------------------------------

    @rule(
        record_type=st.sampled_from(RECORD_TYPES),
        session=st.sampled_from(SESSIONS),
        accepted=st.integers(1, 5),
        dead=st.integers(0, 2),
    )
    def send(self, record_type: str, session: str, accepted: int, dead: int) -> None:
        """A request, sent as a task of its own; it runs until it waits. (Not sent while
        MAX_PENDING wait: a step that only piles up more of the same. Not a
        precondition: what Hypothesis draws must not depend on what the gateway did.)"""
        with self._step():
            if sum(request.status == "pending" for request in self.requests) >= MAX_PENDING:
                return
            topic = TOPICS.by_record_type()[record_type]
            records = {topic: [next(self.record_ids) for _ in range(accepted)]}
            if dead:
                records[TOPICS.deadletter] = [next(self.record_ids) for _ in range(dead)]
            request = Request(
                len(self.requests),
                self.process,
                session,
                record_type,
                records,
                self.loop.time(),
                next(self.events),
                self.sink.broken is not None,
            )
            self.requests.append(request)
            for rid in request.ids():
                self.by_record[rid] = request
            values = {
                name: [f"{rid}|{session}|{name}".encode() for rid in ids]
                for name, ids in records.items()
            }
            coroutine = self._request(
                self.sink,
                request,
                [record(session, value) for value in values[topic]],
                [rejected(value, session) for value in values.get(TOPICS.deadletter, [])],
            )
            self.loop.create_task(coroutine, name=f"request-{request.number}")
            self.loop.run_until_idle()

    @initialize(
        modes=st.tuples(*(st.sampled_from([Mode.UP, *Mode]) for _ in TOPIC_NAMES)),
        disk=st.sampled_from(["ok", "ok", "slow", "full", "failing"]),
    )
    def begin_with(self, modes: tuple[Mode, ...], disk: str) -> None:
        """Each example starts with some topics (and the disk) not well: the faults the
        steps then combine are there from the start, not a few steps in."""
        with self._step():
            for topic, mode in zip(TOPIC_NAMES, modes, strict=True):
                self.set_topic(topic, mode)
            self.set_disk(disk)

    @rule(topic=st.sampled_from(TOPIC_NAMES), mode=st.sampled_from(Mode))
    def set_topic(self, topic: str, mode: Mode) -> None:
        with self._step():
            self.kafka.modes[topic] = mode
            if any(mode is not Mode.UP for mode in self.kafka.modes.values()):
                self.all_up_since = None
            elif self.all_up_since is None:
                self.all_up_since = self.loop.time()
            self.loop.run_until_idle()

    @rule(mode=st.sampled_from(["ok", "slow", "full", "failing"]))
    def set_disk(self, mode: str) -> None:
        with self._step():
            self.disk.mode = mode
            self.loop.executor_latency = SLOW_DISK_S if mode == "slow" else FAST_DISK_S
            self.loop.run_until_idle()

    @rule()
    def ask_ready(self) -> None:
        """A readiness probe, as a task of its own (on a slow disk it takes a while);
        not while one is still waiting."""
        with self._step():
            if not all(probe.done() for probe in self.probes):
                return
            probe = self.loop.create_task(self.sink.unavailable(), name="readiness-probe")
            self.probes.append(probe)
            self.loop.run_until_idle()

    @rule(seconds=st.sampled_from([0.001, 0.01, 0.1, 0.3, 1.0, 3.0]))
    def wait(self, seconds: float) -> None:
        with self._step():
            self.loop.run_for(seconds)

    @rule(land=st.booleans())
    def crash_and_restart(self, land: bool) -> None:
        """Kill the process, then start another on the same spool. Requests not yet
        answered are gone; with `land`, batches Kafka was about to store are stored.
        (Not again before time has passed.)"""
        with self._step():
            if self.loop.time() == self.started_at:
                return
            self.kafka.crash(land)
            self._kill()
            self.process += 1
            self.sink, self.kafka_sink = self._start_process()

    # -- what is checked after every step ---------------------------------------------

    def _copies(self) -> defaultdict[int, list[Copy]]:
        copies: defaultdict[int, list[Copy]] = defaultdict(list)
        for copy in self.kafka.log:
            copies[record_id(copy.value)].append(copy)
        return copies

    def _spooled_ids(self) -> set[int]:
        ids: set[int] = set()
        for _, record_type, _, payload in _file_rows(self.sink._file.path):
            chunk = decode(record_type, payload)
            ids.update(record_id(r.value) for r in chunk.accepted)
            ids.update(record_id(r.value) for r in chunk.rejected)
        return ids

    def _lost(self, *, spool_counts: bool) -> list[str]:
        copies = self._copies()
        spooled = self._spooled_ids() if spool_counts else set()
        problems = []
        for request in self.requests:
            if not request.ok:
                continue
            for rid in request.ids():
                if rid in copies:
                    continue
                if request.status == "kafka":
                    problems.append(f"r{rid} of {request}: answered as in Kafka, is not")
                elif rid not in spooled:
                    where = "Kafka or the spool" if spool_counts else "Kafka"
                    problems.append(f"r{rid} of {request}: answered as stored, not in {where}")
        return problems

    @invariant()
    def check(self) -> None:
        """Every check below, each failing with an assertion of its own (so Hypothesis
        tells the bugs apart)."""
        for check in self._checks():
            check()

    def _checks(self) -> list[Callable[[], None]]:
        return [
            self.answered_records_are_in_kafka_or_the_spool,
            self.no_record_is_stored_too_often,
            self.sessions_keep_their_order,
            self.no_request_waits_past_its_bound,
            self.no_503_for_records_kafka_stored_in_time,
            self.spool_counts_match_its_file,
            self.kafka_sink_lets_settled_bytes_go,
            self.readiness_probe_answers,
        ]

    def answered_records_are_in_kafka_or_the_spool(self) -> None:
        """Every record of a request answered as stored is in Kafka, or in the spool's
        file (as Kafka's answer "stored": in Kafka)."""
        problems = self._lost(spool_counts=True)
        self.failed |= bool(problems)
        assert not problems, _report("records lost", problems)

    def no_record_is_stored_too_often(self) -> None:
        """Each process stores a record at most once from SpoolingSink.send (the request's
        own send) and at most once from its spool replayer (a chunk whose delete failed
        is kept, and its parts Kafka took are not sent again). A record may so be stored
        more than twice only across a crash: a new process replays what the old one sent
        before it could delete it."""
        problems = []
        for rid, copies in self._copies().items():
            paths = Counter(copy.origin[:2] for copy in copies)
            allowed = {"direct": 1, "replay": 1}
            too_many = [
                path
                for path, count in paths.items()
                if path[0] not in allowed or count > allowed[path[0]]
            ]
            if too_many:
                stored = "; ".join(_path(copy) for copy in copies)
                request = self.by_record.get(rid)
                problems.append(f"r{rid} of {request} stored {len(copies)} times: {stored}")
        self.failed |= bool(problems)
        assert not problems, _report("records stored too often", problems)

    def sessions_keep_their_order(self) -> None:
        """Per session and topic, the first copies of the records of requests answered as
        stored are in Kafka in the order they were sent: within a request, and for two
        requests where the second was sent after the first was answered, unless the
        spool could not be written when the second was sent (it then goes to Kafka, ahead
        of what the spool holds, by design). Each record type is a queue of its own, so
        dead letters keep the order of requests of one record type, not across types."""
        first: dict[int, int] = {}
        for place, copy in enumerate(self.kafka.log):
            first.setdefault(record_id(copy.value), place)
        problems = []
        by_session: defaultdict[str, list[Request]] = defaultdict(list)
        for request in self.requests:
            if request.ok:
                by_session[request.session].append(request)
        for requests in by_session.values():
            for request in requests:
                for topic, ids in request.records.items():
                    places = _all_known(first, ids)
                    if places is not None and places != sorted(places):
                        problems.append(f"{topic}: the records of {request} out of order")
            for earlier, later in itertools.permutations(requests, 2):
                assert earlier.answered_event is not None
                if later.sent_event < earlier.answered_event or later.spool_broken:
                    continue
                if earlier.record_type != later.record_type:
                    continue  # their only topic in common is the dead letters
                for topic in earlier.records.keys() & later.records.keys():
                    before = _all_known(first, earlier.records[topic])
                    after = _all_known(first, later.records[topic])
                    if before and after and max(before) > min(after):
                        problems.append(f"{topic}: {later} is in Kafka ahead of {earlier}")
        self.failed |= bool(problems)
        assert not problems, _report("order broken", problems)

    def no_request_waits_past_its_bound(self) -> None:
        """A request is answered within BOUND_S of being sent."""
        now = self.loop.time()
        problems = []
        for request in self.requests:
            if request.status == "pending" and now - request.sent_at > BOUND_S:
                problems.append(f"{request} unanswered after {now - request.sent_at:.3f}s")
            elif request.answered_at and request.answered_at - request.sent_at > BOUND_S:
                waited = request.answered_at - request.sent_at
                problems.append(f"{request} answered after {waited:.3f}s")
        self.failed |= bool(problems)
        assert not problems, _report(f"requests waiting past {BOUND_S}s", problems)

    def no_503_for_records_kafka_stored_in_time(self) -> None:
        """A request answered 503 does not have all its records stored and acknowledged
        by Kafka, from its own send, within its produce timeout: it would have been
        answered stored, had it waited as long as docs/reliability.md says it does."""
        copies = self._copies()
        problems = []
        for request in self.requests:
            if request.status != "refused":
                continue
            by = request.sent_at + PRODUCE_TIMEOUT_S - 1e-6
            acked = {
                rid: min(c.at for c in copies[rid] if c.origin[0] == "direct" and c.acked)
                for rid in request.ids()
                if any(c.origin[0] == "direct" and c.acked for c in copies[rid])
            }
            stored = _all_known(acked, request.ids())
            if stored and max(stored) < by:
                when = max(stored) - request.sent_at
                problems.append(f"{request}, though Kafka had stored all of it {when:.3f}s in")
        self.failed |= bool(problems)
        assert not problems, _report("503 for records Kafka stored in time", problems)

    def spool_counts_match_its_file(self) -> None:
        """What SpoolingSink._held counts is never negative, and is what its file holds
        whenever no write is pending, no disk call is out and the spool is not broken."""
        held = self.sink._held
        problems = []
        if min(held.chunks, held.records, held.bytes) < 0:
            problems.append(
                f"negative: {held.chunks} chunks, {held.records} records, {held.bytes} bytes"
            )
        if (
            self.loop.jobs == 0
            and self.sink._writer is None
            and not held.pending
            and self.sink.broken is None
        ):
            rows = _file_rows(self.sink._file.path)
            in_file = (len(rows), sum(row[2] for row in rows), sum(len(row[3]) for row in rows))
            if (held.chunks, held.records, held.bytes) != in_file:
                problems.append(
                    f"held (chunks, records, bytes) {(held.chunks, held.records, held.bytes)}, "
                    f"the file {in_file}"
                )
        self.failed |= bool(problems)
        assert not problems, _report("spool counts", problems)

    def kafka_sink_lets_settled_bytes_go(self) -> None:
        """KafkaSink._held_bytes is the bytes of its unsettled batches; once every topic
        has been up for SETTLE_S, every batch made before has been settled."""
        sink = self.kafka_sink
        batches = [(b, batch) for b in sink._batchers.values() for batch in b.unsettled]
        problems = []
        unsettled = sum(batch.size for _, batch in batches)
        if sink._held_bytes != unsettled:
            problems.append(f"{sink._held_bytes} bytes held, unsettled batches hold {unsettled}")
        if self.all_up_since is not None:
            now = self.loop.time()
            for batcher, batch in batches:
                since = max(batch.builder.created_at, self.all_up_since)
                if now - since > SETTLE_S:
                    problems.append(
                        f"a batch of {batch.records} records for {batcher.topic}-"
                        f"{batcher.partition} made at {batch.builder.created_at:.3f}s is not "
                        f"settled {now - since:.1f}s after every topic was up "
                        f"({sink._held_bytes} bytes held)"
                    )
        self.failed |= bool(problems)
        assert not problems, _report("Kafka sink holds bytes", problems)

    def readiness_probe_answers(self) -> None:
        """SpoolingSink.unavailable() answers (None or why), and does not raise."""
        problems = [
            f"unavailable() raised {probe.exception()!r}"
            for probe in self.probes
            if probe.done() and not probe.cancelled() and probe.exception() is not None
        ]
        self.failed |= bool(problems)
        assert not problems, _report("readiness probe", problems)

    # -- the end ----------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if not self.failed:
                self._drain_and_check()
        finally:
            self._shut_down()

    def _drain_and_check(self) -> None:
        """Every topic up and the disk well, time passes (a readiness probe every second,
        as Kubernetes asks) until the spool is empty; then every check again, and
        every record answered as stored must be in Kafka."""
        for topic in self.kafka.modes:
            self.kafka.modes[topic] = Mode.UP
        if self.all_up_since is None:
            self.all_up_since = self.loop.time()
        self.disk.mode = "ok"
        self.loop.executor_latency = FAST_DISK_S
        deadline = self.loop.time() + DRAIN_S
        while self.loop.time() < deadline and not self._drained():
            self.probes.append(self.loop.create_task(self.sink.unavailable()))
            self.loop.run_for(1.0)
        for check in self._checks():
            check()
        problems = self._lost(spool_counts=False)
        if self.sink._held.chunks or _file_rows(self.sink._file.path):
            problems.append(
                f"the spool still holds {self.sink._held.records} records "
                f"({len(_file_rows(self.sink._file.path))} chunks in its file) "
                f"{DRAIN_S:g}s after Kafka and the disk were well"
            )
        if self.kafka_sink._held_bytes:
            problems.append(f"the Kafka sink still holds {self.kafka_sink._held_bytes} bytes")
        self.failed |= bool(problems)
        assert not problems, _report("after the drain", problems)

    def _drained(self) -> bool:
        return (
            not any(request.status == "pending" for request in self.requests)
            and self.sink._held.chunks == 0
            and not _file_rows(self.sink._file.path)
            and self.kafka_sink._held_bytes == 0
        )

    def _shut_down(self) -> None:
        try:
            if not self.failed:
                self.loop.run_until_complete(asyncio.wait_for(self.sink.close(), 60))
        finally:
            self._kill()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)


def _all_known(values: dict[int, _V], ids: list[int]) -> list[_V] | None:
    """The value of each of `ids`, or None if any has none."""
    known = [values[rid] for rid in ids if rid in values]
    return known if len(known) == len(ids) else None


def _report(what: str, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:8])
    more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    return f"{what}:\n  {shown}{more}"


def _model_settings() -> settings:
    return settings(
        max_examples=int(os.environ.get("CAFE_MODEL_EXAMPLES", "300")),
        stateful_step_count=int(os.environ.get("CAFE_MODEL_STEPS", "30")),
        derandomize=not os.environ.get("CAFE_MODEL_RANDOM"),
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def test_spool_and_kafka_sink_against_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    global _ROOT
    monkeypatch.setattr(SpoolFile, "_call", _call_through_disk(SpoolFile._call))
    shm = Path("/dev/shm")  # noqa: S108 (a directory of its own in it; fsync costs nothing)
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    # Every example's spool is in here, removed at the end whatever happened.
    with tempfile.TemporaryDirectory(prefix="spool-model-", dir=where) as root:
        _ROOT = root
        try:
            run_state_machine_as_test(SpoolModel, settings=_model_settings())
        finally:
            _ROOT = None


# -- the virtual loop itself ------------------------------------------------------------


def test_virtual_loop_skips_idle_time() -> None:
    loop = VirtualTimeLoop()
    try:
        started = time.monotonic()
        loop.run_until_complete(asyncio.sleep(3600))
        assert loop.time() == 3600
        assert time.monotonic() - started < 1
    finally:
        loop.close()


def test_virtual_loop_gives_thread_work_its_virtual_time() -> None:
    """Thread work is handed back at its virtual time, in order with timers, however
    long it really takes; run_until_idle waits for threads without moving the clock."""
    loop = VirtualTimeLoop(executor_latency=0.5)
    executor = ThreadPoolExecutor(1)
    seen: list[str] = []

    def fail() -> None:
        raise OSError("disk")

    async def main() -> None:
        loop.call_later(0.2, seen.append, "timer at 0.2")
        loop.call_later(0.7, seen.append, "timer at 0.7")
        slow = loop.run_in_executor(executor, time.sleep, 0.05)  # 50 ms, really
        quick = loop.run_in_executor(executor, str, 42)
        failing = loop.run_in_executor(executor, fail)
        await slow
        seen.append(f"slow at {loop.time():g}")
        seen.append(f"{await quick} at {loop.time():g}")
        with pytest.raises(OSError, match="disk"):
            await failing
        seen.append(f"failing at {loop.time():g}")

    try:
        loop.run_until_complete(main())
        assert seen == ["timer at 0.2", "slow at 0.5", "timer at 0.7", "42 at 1", "failing at 1.5"]
        written: list[int] = []
        loop.run_in_executor(executor, written.append, 1)
        loop.run_until_idle()
        assert written == [1]  # done on its thread
        assert loop.time() == 1.5  # but not handed back: that is at 2.0
        assert loop.jobs == 1
        loop.run_for(0.5)
        assert (loop.time(), loop.jobs) == (2.0, 0)
        with pytest.raises(Deadlock):
            loop.run_until_complete(loop.create_future())
    finally:
        executor.shutdown()
        loop.close()
