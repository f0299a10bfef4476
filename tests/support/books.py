"""Clients that send activity batches to a served gateway, and the books of what came of them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tests.support.kafka import consume
from tests.support.records import sample
from tests.support.wait import at_work

# Records a request carries unless the books say otherwise.
BATCH = 50
# Retry-After is honoured, within these bounds; no answer at all is retried after the least.
RETRY_MIN_S, RETRY_MAX_S = 0.2, 1.0


@dataclass
class Session:
    """One client's session: eventIds `{id}-{n:07d}`, n counting from 0 in sending order."""

    id: str
    sent: int = 0  # records sent so far
    acknowledged: bytearray = field(default_factory=bytearray)  # per batch: 1 if 2xx


@dataclass
class Books:
    """What the clients sent and were answered."""

    batch: int = BATCH  # records per request
    sessions: dict[str, Session] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    # Answers not 2xx by status and problem code ("503 kafka_unavailable").
    codes: Counter[str] = field(default_factory=Counter)
    spooled_answers: int = 0  # 2xx with X-Cafe-Spooled: true
    connection_errors: int = 0
    hangs: int = 0  # requests unanswered within the client session's timeout
    retries: int = 0
    most_attempts: int = 0  # the most POSTs one batch took to be answered 2xx
    slowest_s: float = 0.0
    slowest_503_s: float = 0.0
    # 2xx and other answers by whole second since `began`: the traffic's shape.
    ok_by_second: Counter[int] = field(default_factory=Counter)
    other_by_second: Counter[int] = field(default_factory=Counter)
    began: float = field(default_factory=time.monotonic)

    @property
    def acknowledged(self) -> int:
        """Records answered 2xx."""
        return sum(s.acknowledged.count(1) for s in self.sessions.values()) * self.batch

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.sessions.values())

    async def acknowledged_at_least(self, count: int) -> bool:
        return self.acknowledged >= count

    async def answered_at_least(self, status: int, count: int) -> bool:
        return self.statuses[status] >= count


async def client(
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    books: Books,
    stop: asyncio.Event,
    *,
    retry: Collection[int] = (),
    pace_s: float = 0.0,
) -> None:
    """One session sending batches of `books.batch` activity records until told to stop,
    `pace_s` apart. A batch is sent again after no answer (a timeout or a broken
    connection) and after an answer whose status is in `retry`; any other answer is final,
    so what it says shows in the books rather than being retried away."""
    base = sample("activity")
    session = Session(str(uuid.uuid4()))
    books.sessions[session.id] = session
    while not stop.is_set():
        records = [
            {**base, "sessionId": session.id, "eventId": f"{session.id}-{session.sent + n:07d}"}
            for n in range(books.batch)
        ]
        session.sent += books.batch
        session.acknowledged.append(0)
        body = orjson.dumps({"records": records})
        attempts = 0
        while True:
            attempts += 1
            started = time.monotonic()
            delay = RETRY_MIN_S
            try:
                async with http.post("/v1/activity", data=body, headers=headers) as resp:
                    answer = await resp.read()
                    took = time.monotonic() - started
                    books.statuses[resp.status] += 1
                    books.slowest_s = max(books.slowest_s, took)
                    second = int(time.monotonic() - books.began)
                    if 200 <= resp.status < 300:
                        session.acknowledged[-1] = 1
                        books.spooled_answers += resp.headers.get("X-Cafe-Spooled") == "true"
                        books.most_attempts = max(books.most_attempts, attempts)
                        books.ok_by_second[second] += 1
                        break
                    books.other_by_second[second] += 1
                    books.codes[f"{resp.status} {_code(answer)}"] += 1
                    if resp.status == 503:
                        books.slowest_503_s = max(books.slowest_503_s, took)
                    if resp.status not in retry:
                        break
                    retry_after = float(resp.headers.get("Retry-After", RETRY_MAX_S))
                    delay = min(max(retry_after, RETRY_MIN_S), RETRY_MAX_S)
            except TimeoutError:
                books.hangs += 1
            except aiohttp.ClientError:
                books.connection_errors += 1
            books.retries += 1
            await asyncio.sleep(delay)
        await asyncio.sleep(pace_s)


def _code(answer: bytes) -> str:
    """The problem code of an answer's body; what is not a problem, said as such."""
    try:
        problem = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return "(not JSON)"
    return str(problem.get("code")) if isinstance(problem, dict) else "(not a problem)"


def clients(
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    books: Books,
    count: int,
    *,
    retry: Collection[int] = (),
    pace_s: float = 0.0,
    watchers: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = (),
) -> contextlib.AbstractAsyncContextManager[None]:
    """`count` clients (see `client`), and `watchers`, at work for the block (see `at_work`)."""
    one = functools.partial(client, http, headers, books, retry=retry, pace_s=pace_s)
    return at_work([one] * count + list(watchers))


@dataclass
class OnTopic:
    """What the topic holds of the clients' records, against the books."""

    messages: int = 0
    distinct: int = 0  # records on the topic at least once
    lost: int = 0  # records answered 2xx and not on the topic
    max_copies: int = 0
    duplicated: int = 0  # records on the topic more than once
    extra_copies: int = 0  # copies past each record's first
    unsent: int = 0  # messages carrying an eventId nobody sent
    out_of_order: set[str] = field(default_factory=set)  # sessions
    read_s: float = 0.0


async def read_topic(bootstrap: str, topic: str, books: Books, partitions: int) -> OnTopic:
    """Read the topic to its end offsets, streaming (it may hold millions of records):
    count each record's copies, and check that each session's first copies come in
    sending order (a session is one key, so one partition, read in offset order)."""
    started = time.monotonic()
    on_topic = OnTopic()
    copies = {sid: bytearray(s.sent) for sid, s in books.sessions.items()}
    last_first = dict.fromkeys(books.sessions, -1)
    async for message in consume(bootstrap, topic, partitions):
        on_topic.messages += 1
        value = orjson.loads(message.value)
        session, _, n = str(value.get("eventId")).rpartition("-")
        counts = copies.get(session)
        if counts is None or value.get("sessionId") != session or not n.isdigit():
            on_topic.unsent += 1
            continue
        seq = int(n)
        if seq >= len(counts):
            on_topic.unsent += 1
            continue
        if counts[seq] == 0:
            if seq < last_first[session]:
                on_topic.out_of_order.add(session)
            last_first[session] = seq
        counts[seq] = min(255, counts[seq] + 1)
    for sid, sent in books.sessions.items():
        counts = copies[sid]
        on_topic.max_copies = max(on_topic.max_copies, max(counts, default=0))
        on_topic.distinct += sum(1 for c in counts if c)
        on_topic.duplicated += sum(1 for c in counts if c > 1)
        on_topic.extra_copies += sum(c - 1 for c in counts if c > 1)
        for batch, acknowledged in enumerate(sent.acknowledged):
            if acknowledged:
                start = batch * books.batch
                on_topic.lost += counts[start : start + books.batch].count(0)
    on_topic.read_s = time.monotonic() - started
    return on_topic
