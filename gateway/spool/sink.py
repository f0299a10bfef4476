"""The spool: records Kafka has not acknowledged in time, kept on local disk until it does.

`SpoolingSink` wraps the Kafka sink. A request's records go to Kafka first; if Kafka has
not acknowledged them within CAFE_SPOOL_AFTER_MS (or refuses them at once, being down),
they are written to the spool, and the request is answered once the write is fsynced.

Each record type is a queue of its own, so a topic that is down holds back only its own
type. While the spool holds records of a type, new requests of that type go behind them,
so one session's records reach Kafka in the order they came: at once while Kafka is away,
and while the replayer is catching up, after waiting up to CAFE_SPOOL_AFTER_MS for the
queue to empty (live traffic then leaves the replayer the CPU and the disk). A replayer
per type sends the oldest chunks to Kafka and deletes them only once Kafka has
acknowledged them; when its queue is empty, that type's requests go to Kafka first again.

The store, SQLite written from a thread of its own, is gateway/spool/file.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.backoff import Backoff
from gateway.config import SpoolSettings
from gateway.errors import GatewayError, SinkUnavailable, SpoolFull, SpoolUnavailable
from gateway.metrics import Metrics
from gateway.sink import Delivery, Record, Rejected, Sink
from gateway.spool.file import DISK_ERRORS, Chunk, SpoolFile, Stored, encode
from gateway.spool.metrics import SpoolMetrics

log = logging.getLogger(__name__)

# The replayed windows in flight at once hold chunks up to this many bytes of records (at
# least one chunk each), shared by the types replaying: large enough that Kafka's batches
# fill, small enough beside CAFE_MAX_QUEUED_BYTES.
_WINDOW_BYTES = 4 * 1024 * 1024
# Replay attempts while Kafka is away back off from the first delay to the last. A try
# costs little (the Kafka sink refuses at once while it knows Kafka is away; reading a
# 4 MiB window again, some 16 ms), and the last delay is time lost once Kafka is back:
# with 1 s, a gateway started during an outage began its replay 0.9 s after it connected.
_FIRST_RETRY_S = 0.25
_LAST_RETRY_S = 0.5
# After the disk failed, or the replay did in an unforeseen way.
_DISK_RETRY_S = 5.0
# How often the age of the oldest record is brought up to date, and a broken disk tried.
_GAUGE_EVERY_S = 1.0
_MEND_EVERY_S = 1.0
# The two parts of a chunk, each delivered to a topic of its own.
_RECORDS, _DEAD_LETTERS = "records", "dead letters"


def _spooled_before(window: list[Stored], moment: float) -> list[Stored]:
    """The chunks at the head of `window` spooled before `moment`."""
    return list(itertools.takewhile(lambda stored: stored.spooled_at < moment, window))


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a failure as seen: a write whose request stopped waiting, a read not needed."""
    if not future.cancelled():
        future.exception()


@dataclass
class _Direct:
    """A request whose records are with Kafka, waiting for its acknowledgement."""

    chunk: Chunk
    wait: asyncio.Timeout  # its wait for Kafka, ended early once its records are on disk
    # Set when its records are queued for the spool: done once they are on disk.
    written: asyncio.Future[None] | None = None
    refused: SinkUnavailable | None = None  # the spool could not take them either
    waiting: bool = True  # still within `wait`


@dataclass
class _Pending:
    """A chunk queued for the next group commit, encoded: its messages are let go."""

    spooled_at: float
    record_type: str
    records: int
    payload: bytes
    written: asyncio.Future[None]


@dataclass
class _Unsent:
    """The records (or rejected records) of one part of a replayed window that Kafka has
    not acknowledged: what one send carries. `places` says where they sit in their
    chunks' parts."""

    part: str
    messages: list[Any] = field(default_factory=list)  # Records, or Rejected ones
    places: list[tuple[int, Sequence[int]]] = field(default_factory=list)  # by chunk id


@dataclass
class _Held:
    """What the spool holds, written or about to be: what bounds it and what it reports."""

    chunks: int = 0
    records: int = 0
    bytes: int = 0
    # A chunk was refused for want of room, and none has been replayed since.
    full: bool = False
    pending: list[_Pending] = field(default_factory=list)


@dataclass
class _Queue:
    """One record type's chunks in the spool, and its replayer's state."""

    record_type: str
    chunks: int = 0
    oldest_at: float | None = None
    # Set while written chunks may wait; the replayer clears it when it finds none.
    has_chunks: asyncio.Event = field(default_factory=asyncio.Event)
    emptied: asyncio.Event = field(default_factory=asyncio.Event)
    # Kafka acknowledged the last window: requests wait for the queue before joining it.
    catching_up: bool = False
    # The messages, by chunk and part, Kafka has acknowledged while others of their window
    # were not: not sent again. Kept in memory only: after a crash, sent once more.
    delivered: dict[tuple[int, str], set[int]] = field(default_factory=dict)
    replayer: asyncio.Task[None] | None = None
    # The next window, read while the last is with Kafka; the last one's deletion.
    prefetched: asyncio.Task[list[Stored]] | None = None
    deleting: asyncio.Task[bool] | None = None


class SpoolingSink:
    """A sink that spools what `inner` (Kafka) does not acknowledge in time, then replays it."""

    def __init__(
        self,
        inner: Sink,
        settings: SpoolSettings,
        directory: Path,
        *,
        workers: int = 1,
        max_window_bytes: int = _WINDOW_BYTES,
        produce_timeout_s: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.inner = inner
        self._window_bytes = min(_WINDOW_BYTES, max_window_bytes)
        self._after_s = settings.after_ms / 1000
        # The longest a request waits: for its queue to empty (CAFE_SPOOL_AFTER_MS), then
        # for Kafka (CAFE_PRODUCE_TIMEOUT_MS). Past it, a write not yet on disk is
        # answered 503 too (a disk that hangs).
        self._bound_s = self._after_s + produce_timeout_s
        self._settings = settings
        self._metrics = SpoolMetrics(metrics.registry) if metrics is not None else None
        self._file = SpoolFile(directory, workers)
        self._held = _Held()
        self._queues: dict[str, _Queue] = {}
        self._direct: dict[int, _Direct] = {}  # by arrival, oldest first
        self._arrivals = 0
        self._writer: asyncio.Task[None] | None = None
        self._mender: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None
        self._counted = False  # what the file held at start is known
        self._running = False
        self.broken: str | None = None  # why the spool cannot write, while it cannot

    async def start(self) -> None:
        """Open the spool (a failure leaves it broken, not the gateway down), start the
        sink and the replayers."""
        self._running = True
        try:
            await self._recount()
        except DISK_ERRORS as exc:
            self._break(exc)
        await self.inner.start()
        self._gauges = asyncio.create_task(self._keep_gauges(), name="spool-gauges")
        self._update_gauges()

    async def _recount(self) -> None:
        """Learn what the file holds: at start, or once a disk that failed at start works.
        Nothing is written meanwhile: the spool is new, or broken."""
        by_type = await self._file.totals_by_type()
        held = self._held
        for record_type, totals in by_type.items():
            queue = self._queue(record_type)
            queue.chunks = totals.chunks
            queue.oldest_at = totals.oldest_at
            queue.emptied.clear()
            queue.has_chunks.set()
            held.chunks += totals.chunks
            held.records += totals.records
            held.bytes += totals.bytes
        self._counted = True
        if held.chunks:
            log.warning(
                "the spool at %s holds %d records from before this start; they go to Kafka first",
                self._file.path,
                held.records,
            )

    def _queue(self, record_type: str) -> _Queue:
        """The queue of a record type, made (with its replayer) when first needed."""
        queue = self._queues.get(record_type)
        if queue is None:
            queue = self._queues[record_type] = _Queue(record_type)
            queue.emptied.set()
            if self._running:
                queue.replayer = asyncio.create_task(
                    self._replay(queue), name=f"spool-replay-{record_type}"
                )
        return queue

    async def close(self) -> None:
        """Stop replaying and close Kafka; what the spool holds stays for the next start."""
        self._running = False
        tasks = [queue.replayer for queue in self._queues.values()]
        for task in (*tasks, self._gauges, self._mender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for queue in self._queues.values():
            self._drop_prefetched(queue)
            if queue.deleting is not None:  # delivered: deleted, not sent again next time
                await queue.deleting
        if self._writer is not None:
            await self._writer
        await self.inner.close()
        await self._file.close()
        if self._held.chunks:
            log.warning(
                "closed with %d records in the spool at %s; they are sent at the next start",
                self._held.records,
                self._file.path,
            )

    async def unavailable(self) -> str | None:
        """Ready while Kafka or the spool can take records: a broken or full spool is not
        ready. Only a question: a task of its own tries a broken disk again (_mend)."""
        if self.broken is not None:
            return f"the spool at {self._file.path} cannot be written: {self.broken}"
        if self._held.full:
            return f"the spool at {self._file.path} is full ({self._held.bytes} bytes)"
        return None

    def degraded(self) -> list[str]:
        return self.inner.degraded()

    async def send(
        self,
        record_type: str,
        accepted: Sequence[Record],
        rejected: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        """Store the records in Kafka, or in the spool; say which."""
        chunk = Chunk(record_type, accepted, rejected)
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        queue = self._queues.get(record_type)
        # Behind what the spool holds of this type; unless its disk refuses writes: then
        # to Kafka, ahead of it, rather than a 503 while Kafka takes records.
        if (
            queue is not None
            and queue.chunks
            and self.broken is None
            and not await self._turn_comes(queue, arrived + self._after_s)
        ):
            return await self._on_disk(self._append(chunk), arrived)
        # Waits in this task: another task per request cost 15 us (measured with a sink
        # that acknowledges at once), a timer and a timeout about a third of that. Its
        # time for Kafka starts now, not on arrival: one let go by a queue that emptied at
        # the end of its wait would be spooled at once, and stored twice.
        arrival = self._arrivals = self._arrivals + 1
        direct = self._direct[arrival] = _Direct(chunk, asyncio.timeout(None))
        late = loop.call_later(self._after_s, self._spool_waiting, direct)
        acknowledged = False
        try:
            async with direct.wait:
                await self.inner.send(record_type, accepted, rejected)
            acknowledged = True
        except TimeoutError:
            pass  # on disk (_on_written ended the wait)
        except SinkUnavailable as exc:
            # Refused at once, or Kafka's own wait ran out while the spool refused them.
            self._spool_waiting(direct)
            if direct.written is None:
                raise direct.refused or exc from None
        finally:
            direct.waiting = False
            late.cancel()
            del self._direct[arrival]
        if acknowledged:
            # Kafka acknowledged it just as it was spooled: the spooled copy is a
            # duplicate, and its write need not be awaited.
            return Delivery.STORED
        if direct.written is None:  # never: a wait is ended only once its chunk is queued
            raise SpoolUnavailable("the records could not be spooled")
        return await self._on_disk(direct.written, arrived)

    async def _turn_comes(self, queue: _Queue, deadline: float) -> bool:
        """Whether a request may go to Kafka, ahead of nothing of its type: at once if the
        queue is empty; while the replayer is catching up, once it empties before
        `deadline`. False: it goes behind the queue (Kafka is away, or the wait is over)."""
        while queue.chunks:
            if not queue.catching_up:
                return False
            try:
                async with asyncio.timeout_at(deadline):
                    await queue.emptied.wait()
            except TimeoutError:
                return False
        return True

    async def _on_disk(self, written: asyncio.Future[None], arrived: float) -> Delivery:
        """Wait for a spooled chunk's write, within the request's bound."""
        try:
            async with asyncio.timeout_at(arrived + self._bound_s):
                await asyncio.shield(written)
        except TimeoutError:
            # Written later, it is replayed: a duplicate of the client's retry, not a loss.
            raise SpoolUnavailable(
                f"the spool's disk did not take the records within {self._bound_s:g}s"
            ) from None
        return Delivery.SPOOLED

    def _spool_waiting(self, over: _Direct) -> None:
        """Kafka has not acknowledged a request in time, or refused it: spool it and every
        request of its type still waiting, in the order they came, so none is overtaken by
        one spooled after it. Their waits for Kafka end once their records are on disk
        (_on_written). Their records may still reach Kafka from the batches they are in,
        and again from the spool: at most two copies.

        A request the spool cannot take (full, or its disk fails) keeps waiting for Kafka,
        to its own produce timeout: Kafka may yet store it, and a 503 now would only bring
        a retry and a second copy."""
        record_type = over.chunk.record_type
        for direct in self._direct.values():
            if direct.written is not None or direct.chunk.record_type != record_type:
                continue
            try:
                direct.written = self._append(direct.chunk)
            except SinkUnavailable as exc:
                direct.refused = exc
                continue
            direct.written.add_done_callback(functools.partial(self._on_written, direct))

    @staticmethod
    def _on_written(direct: _Direct, written: asyncio.Future[None]) -> None:
        """A waiting request's records are on disk: its wait for Kafka is over. If the
        write failed, it goes on waiting for Kafka."""
        on_disk = not written.cancelled() and written.exception() is None
        if on_disk and direct.waiting and not direct.wait.expired():
            direct.wait.reschedule(asyncio.get_running_loop().time())

    def _append(self, chunk: Chunk) -> asyncio.Future[None]:
        """Queue a chunk for the next group commit; the future is done once it is on disk."""
        if self.broken is not None:
            raise SpoolUnavailable(f"the spool cannot be written: {self.broken}")
        payload = encode(chunk)
        held = self._held
        if held.bytes + len(payload) > self._settings.max_bytes:
            held.full = True
            raise SpoolFull(
                f"Kafka is not acknowledging records and the spool holds {held.bytes} bytes; "
                f"the limit is {self._settings.max_bytes}"
            )
        now = time.time()
        written = asyncio.get_running_loop().create_future()
        written.add_done_callback(_retrieve)
        held.pending.append(_Pending(now, chunk.record_type, chunk.records, payload, written))
        held.chunks += 1
        held.records += chunk.records
        held.bytes += len(payload)
        queue = self._queue(chunk.record_type)
        queue.chunks += 1
        queue.emptied.clear()
        if queue.oldest_at is None:
            queue.oldest_at = now
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="spool-write")
        return written

    async def _write(self) -> None:
        """Write what is queued, in group commits, until nothing is."""
        held = self._held
        while held.pending:
            batch, held.pending = held.pending, []
            rows = [(p.spooled_at, p.record_type, p.records, p.payload) for p in batch]
            started = time.perf_counter()
            try:
                await self._file.insert(rows)
            except DISK_ERRORS as exc:
                self._break(exc)
                for pending in batch:
                    self._take_away(
                        self._queues[pending.record_type], 1, pending.records, len(pending.payload)
                    )
                    if not pending.written.done():
                        pending.written.set_exception(
                            SpoolUnavailable(f"the spool could not be written: {exc}")
                        )
                continue
            records = sum(p.records for p in batch)
            if self._metrics is not None:
                self._metrics.write_seconds.observe(time.perf_counter() - started)
                self._metrics.records_spooled.inc(records)
            for pending in batch:
                if not pending.written.done():
                    pending.written.set_result(None)
                self._queues[pending.record_type].has_chunks.set()
        self._writer = None

    def _take_away(self, queue: _Queue, chunks: int, records: int, size: int) -> None:
        """Chunks have left the spool (delivered, dropped, or never written)."""
        held = self._held
        held.chunks -= chunks
        held.records -= records
        held.bytes -= size
        queue.chunks -= chunks
        if not queue.chunks:
            queue.oldest_at = None
            queue.emptied.set()
            # What is spooled next waits for a replay Kafka takes before it holds others up.
            queue.catching_up = False

    def _break(self, exc: BaseException) -> None:
        if self.broken is None:
            log.error(
                "the spool at %s cannot be written (%s): the gateway is not ready, and "
                "requests Kafka does not acknowledge in time get 503",
                self._file.path,
                exc,
            )
        self.broken = str(exc)
        if self._mender is None and self._running:
            self._mender = asyncio.create_task(self._mend(), name="spool-mend")

    async def _mend(self) -> None:
        """Try a broken disk every second, until it takes a write again."""
        while self.broken is not None:
            await asyncio.sleep(_MEND_EVERY_S)
            try:
                await self._file.probe()
                if not self._counted:
                    await self._recount()
            except DISK_ERRORS as exc:
                self.broken = str(exc)
                continue
            log.info("the spool at %s takes writes again", self._file.path)
            self.broken = None
        self._mender = None

    async def _replay(self, queue: _Queue) -> None:
        """Send a type's oldest chunks to Kafka, in order, deleting each window once
        acknowledged; a failure of any kind is logged, and the replayer goes on."""
        backoff = Backoff(_FIRST_RETRY_S, _LAST_RETRY_S)
        while True:
            try:
                await self._replay_window(queue, backoff)
            except Exception:
                log.exception("could not replay the spool's %s; trying again", queue.record_type)
                queue.catching_up = False
                await asyncio.sleep(_DISK_RETRY_S)

    async def _replay_window(self, queue: _Queue, backoff: Backoff) -> None:
        """Replay one window of `queue`; if Kafka does not take it, wait as `backoff` says.

        The file's thread reads the next window, and deletes the last, while this one is
        with Kafka: one after the other, a replay spent a third of its time on them."""
        await queue.has_chunks.wait()
        window = await self._next_window(queue)
        if window is None:
            await asyncio.sleep(_DISK_RETRY_S)
            return
        if not window:
            # Everything held is still being written: the writer sets the event again.
            queue.has_chunks.clear()
            return
        corrupt = [stored for stored in window if stored.corrupt]
        if corrupt:
            await self._forget_or_wait(queue, corrupt, "corrupt")
            return
        # Dropped whether Kafka is back or not, so the age bounds the spool in an
        # outage too. Chunks are in the order they were spooled: the expired lead.
        expired = _spooled_before(window, time.time() - self._settings.max_age_seconds)
        if expired:
            await self._forget_or_wait(queue, expired, "expired")
            return
        queue.oldest_at = window[0].spooled_at
        started = time.perf_counter()
        queue.prefetched = asyncio.create_task(
            self._file.oldest(self._window_size(), queue.record_type, after=window[-1].id)
        )
        queue.prefetched.add_done_callback(_retrieve)
        try:
            refused = await self._deliver(queue, window)
        except SinkUnavailable:
            # Read and sent again, less the parts Kafka took.
            self._drop_prefetched(queue)
            queue.catching_up = False
            await asyncio.sleep(backoff.failed())
            return
        except BaseException:
            self._drop_prefetched(queue)
            raise
        queue.catching_up = True
        if refused:
            await self._forget_or_wait(queue, refused, "refused")
            window = [stored for stored in window if stored not in refused]
        if window:
            if queue.deleting is not None:
                await asyncio.shield(queue.deleting)  # cancelled, the replayer stops it not
            queue.deleting = asyncio.create_task(
                self._forget(queue, window, took=time.perf_counter() - started)
            )
        backoff.succeeded()

    @staticmethod
    def _drop_prefetched(queue: _Queue) -> None:
        if queue.prefetched is not None:
            queue.prefetched.cancel()
            queue.prefetched = None

    def _window_size(self) -> int:
        return self._window_bytes // max(1, len(self._queues))

    async def _next_window(self, queue: _Queue) -> list[Stored] | None:
        """The window read while the last was with Kafka, or else the oldest chunks of the
        queue; None if the disk fails."""
        prefetched, queue.prefetched = queue.prefetched, None
        if prefetched is not None:
            with contextlib.suppress(*DISK_ERRORS):
                window = await prefetched
                if window:
                    return window
        # Not a window read before a write the writer has told of since: read again,
        # once the last window is deleted.
        if queue.deleting is not None:
            deleted = await asyncio.shield(queue.deleting)
            queue.deleting = None
            if not deleted:
                return None
        try:
            return await self._file.oldest(self._window_size(), queue.record_type)
        except DISK_ERRORS as exc:
            self._break(exc)
            return None

    async def _deliver(self, queue: _Queue, window: list[Stored]) -> list[Stored]:
        """Send a window's records and its dead letters, each message Kafka has not yet
        acknowledged, waiting for Kafka's verdict however long it takes (a send given up
        on may still be stored; sent again, it would be stored twice). Return the chunks
        Kafka refuses for good. Raise SinkUnavailable if Kafka did not take every other
        message: the window is sent again later, less the messages it took."""
        sends = [
            unsent
            for part in (_RECORDS, _DEAD_LETTERS)
            if (unsent := self._unsent(queue, window, part)).messages
        ]
        results = await asyncio.gather(
            *(self._send_part(queue.record_type, unsent) for unsent in sends),
            return_exceptions=True,
        )
        if all(result is None for result in results):
            return []
        unavailable: SinkUnavailable | None = None
        refused_parts = []
        for unsent, result in zip(sends, results, strict=True):
            if result is None:
                self._note_taken(queue, unsent)
            elif isinstance(result, SinkUnavailable):
                unavailable = result
                if result.stored is not None:  # else: which it took is not known
                    self._note_taken(queue, unsent, result.stored)
            elif isinstance(result, GatewayError):
                refused_parts.append(unsent.part)
            else:
                raise result
        if unavailable is not None:
            raise unavailable
        # Kafka refused a record for good (a topic whose own size limit is below the
        # gateway's). Sent one chunk at a time, the chunks that hold none are kept.
        refused: list[Stored] = []
        for part in refused_parts:
            for stored in window:
                unsent = self._unsent(queue, [stored], part)
                if not unsent.messages:
                    continue
                try:
                    await self._send_part(queue.record_type, unsent)
                except SinkUnavailable as exc:
                    if exc.stored is not None:
                        self._note_taken(queue, unsent, exc.stored)
                    raise
                except GatewayError as exc:
                    log.error(
                        "Kafka refuses %d spooled %s records for good (%s); they are dropped",
                        stored.records,
                        queue.record_type,
                        exc,
                    )
                    if stored not in refused:
                        refused.append(stored)
                else:
                    self._note_taken(queue, unsent)
        return refused

    @staticmethod
    def _unsent(queue: _Queue, window: list[Stored], part: str) -> _Unsent:
        """The messages of `part` in `window` Kafka has not acknowledged, in order."""
        unsent = _Unsent(part)
        for stored in window:
            messages = stored.chunk.accepted if part == _RECORDS else stored.chunk.rejected
            if not messages:
                continue
            taken = queue.delivered.get((stored.id, part))
            if taken is None:  # as a rule: a whole chunk, without a loop over its messages
                unsent.places.append((stored.id, range(len(messages))))
                unsent.messages += messages
            else:
                places = [place for place in range(len(messages)) if place not in taken]
                unsent.places.append((stored.id, places))
                unsent.messages += [messages[place] for place in places]
        return unsent

    @staticmethod
    def _note_taken(queue: _Queue, sent: _Unsent, stored: Sequence[bool] | None = None) -> None:
        """Note which of the messages `sent` Kafka took: those `stored` flags (one flag
        per message), or else all of them."""
        flags = iter(stored or ())
        for chunk_id, places in sent.places:
            taken = places
            if stored is not None:
                # zip() takes from `places` first, so each chunk takes its own flags.
                taken = [p for p, took in zip(places, flags, strict=False) if took]
            if taken:
                queue.delivered.setdefault((chunk_id, sent.part), set()).update(taken)

    async def _send_part(self, record_type: str, unsent: _Unsent) -> None:
        if unsent.part == _RECORDS:
            await self.inner.send(record_type, unsent.messages, (), patient=True)
        else:
            await self.inner.send(record_type, (), unsent.messages, patient=True)

    async def _forget_or_wait(self, queue: _Queue, chunks: list[Stored], dropped: str) -> None:
        if not await self._forget(queue, chunks, dropped):
            await asyncio.sleep(_DISK_RETRY_S)

    async def _forget(
        self,
        queue: _Queue,
        chunks: list[Stored],
        dropped: str | None = None,
        took: float | None = None,
    ) -> bool:
        """Delete chunks from the spool: delivered, or `dropped` for that reason. False if
        the disk failed: they are kept, and sent again later (less the parts Kafka took)."""
        held = self._held
        empty = held.chunks == len(chunks)
        try:
            await self._file.delete([stored.id for stored in chunks], empty)
        except DISK_ERRORS as exc:
            self._break(exc)
            if dropped is None:  # delivered: read again, they are not sent again
                for part in (_RECORDS, _DEAD_LETTERS):
                    self._note_taken(queue, self._unsent(queue, chunks, part))
            return False
        for stored in chunks:
            queue.delivered.pop((stored.id, _RECORDS), None)
            queue.delivered.pop((stored.id, _DEAD_LETTERS), None)
        records = sum(stored.records for stored in chunks)
        self._take_away(queue, len(chunks), records, sum(stored.size for stored in chunks))
        held.full = False
        if not queue.chunks:
            log.info(
                "the spool holds no %s records: they go to Kafka first again", queue.record_type
            )
        if dropped == "expired":
            log.error(
                "dropped %d spooled records older than CAFE_SPOOL_MAX_AGE (%gs)",
                records,
                self._settings.max_age_seconds,
            )
        elif dropped == "corrupt":
            log.error(
                "dropped %d spooled %s records whose chunks in %s do not decode",
                records,
                queue.record_type,
                self._file.path,
            )
        if self._metrics is not None:
            if dropped is not None:
                self._metrics.records_dropped.labels(dropped).inc(records)
            else:
                self._metrics.records_replayed.inc(records)
            if took is not None:
                self._metrics.replay_rate.set(records / max(took, 1e-6))
        self._update_gauges()
        return True

    async def _keep_gauges(self) -> None:
        while True:
            await asyncio.sleep(_GAUGE_EVERY_S)
            self._update_gauges()

    def _update_gauges(self) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        held = self._held
        metrics.records.set(held.records)
        metrics.bytes.set(held.bytes)
        oldest = min(
            (q.oldest_at for q in self._queues.values() if q.oldest_at is not None), default=None
        )
        metrics.oldest_age.set(0 if oldest is None else max(0.0, time.time() - oldest))
        metrics.unwritable.set(1 if self.broken else 0)
