"""The spool: records Kafka has not acknowledged in time, kept on local disk until it does.

`SpoolingSink` wraps the Kafka sink. A request's records go to Kafka first; if Kafka has
not acknowledged them within CAFE_SPOOL_AFTER_MS (or refuses them at once, being down),
they are written to the spool, and the request is answered once the write is fsynced.
While the spool holds anything, new requests are spooled behind it, so one session's
records reach Kafka in the order they came. A replayer sends the oldest chunks to Kafka
and deletes them only once Kafka has acknowledged them; when the spool is empty, requests
go to Kafka first again.

The store, SQLite written from a thread of its own, is gateway/spoolfile.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import SpoolSettings
from gateway.errors import GatewayError, SinkUnavailable, SpoolFull, SpoolUnavailable
from gateway.metrics import Metrics
from gateway.sink import Message, Sink
from gateway.spoolfile import DISK_ERRORS, Chunk, SpoolFile, Stored, encode

log = logging.getLogger(__name__)

# A replayed window holds chunks up to this many bytes of records (at least one chunk):
# large enough that Kafka's batches fill, small enough beside CAFE_MAX_QUEUED_BYTES.
_WINDOW_BYTES = 4 * 1024 * 1024
# Replay attempts while Kafka is away back off from the first delay to the last.
_FIRST_RETRY_S = 0.25
_LAST_RETRY_S = 5.0
# How often the age of the oldest record is brought up to date.
_GAUGE_EVERY_S = 1.0


def _spooled_before(window: list[Stored], moment: float) -> list[Stored]:
    """The chunks at the head of `window` spooled before `moment`."""
    return list(itertools.takewhile(lambda stored: stored.spooled_at < moment, window))


@dataclass
class _Direct:
    """A request whose records are with Kafka, waiting for its acknowledgement."""

    chunk: Chunk
    wait: asyncio.Timeout  # its wait for Kafka
    # Set when its records are queued for the spool: done once they are on disk.
    written: asyncio.Future[None] | None = None
    refused: SinkUnavailable | None = None  # the spool could not take them either


@dataclass
class _Pending:
    """A chunk queued for the next group commit, encoded: its messages are let go."""

    spooled_at: float
    record_type: str
    records: int
    payload: bytes
    written: asyncio.Future[None]


@dataclass
class _Held:
    """What the spool holds, written or about to be: what bounds it and what it reports."""

    chunks: int = 0
    records: int = 0
    bytes: int = 0
    oldest_at: float | None = None
    # A chunk was refused for want of room, and none has been replayed since.
    full: bool = False
    pending: list[_Pending] = field(default_factory=list)

    def take_away(self, chunks: int, records: int, size: int) -> None:
        """Chunks have left the spool (delivered, dropped, or never written)."""
        self.chunks -= chunks
        self.records -= records
        self.bytes -= size
        if not self.chunks:
            self.oldest_at = None


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
        metrics: Metrics | None = None,
    ) -> None:
        self.inner = inner
        self._window_bytes = min(_WINDOW_BYTES, max_window_bytes)
        self._after_s = settings.after_ms / 1000
        self._settings = settings
        self._metrics = metrics
        self._file = SpoolFile(directory, workers)
        self._held = _Held()
        self._direct: dict[int, _Direct] = {}  # by arrival, oldest first
        self._arrivals = 0
        self._writer: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None
        self._has_chunks = asyncio.Event()
        self.broken: str | None = None  # why the spool cannot write, while it cannot

    async def start(self) -> None:
        """Open the spool (a failure leaves it broken, not the gateway down), start the
        sink and the replayer."""
        try:
            await self._recount()
        except DISK_ERRORS as exc:
            self._break(exc)
        await self.inner.start()
        self._replayer = asyncio.create_task(self._replay(), name="spool-replay")
        self._gauges = asyncio.create_task(self._keep_gauges(), name="spool-gauges")
        self._update_gauges()

    async def _recount(self) -> None:
        """Learn what the file holds: at start, or once a disk that failed at start works."""
        chunks, records, size, oldest = await self._file.totals()
        self._held = _Held(chunks, records, size, oldest)
        if chunks:
            log.warning(
                "the spool at %s holds %d records from before this start; they go to Kafka first",
                self._file.path,
                records,
            )
            self._has_chunks.set()

    async def close(self) -> None:
        """Stop replaying and close Kafka; what the spool holds stays for the next start."""
        for task in (self._replayer, self._gauges):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
        """Ready while Kafka or the spool can take records: a broken spool is not ready."""
        if self.broken is not None:
            try:
                await self._file.probe()
            except DISK_ERRORS:
                return f"the spool at {self._file.path} cannot be written: {self.broken}"
            log.info("the spool at %s takes writes again", self._file.path)
            self.broken = None
            if not self._held.chunks:
                await self._recount()
        if self._held.full:
            return f"the spool at {self._file.path} is full ({self._held.bytes} bytes)"
        return None

    async def send(
        self, record_type: str, accepted: Sequence[Message], dead_letters: Sequence[Message] = ()
    ) -> bool:
        """Store the records in Kafka, or in the spool; True if they were spooled."""
        chunk = Chunk(record_type, accepted, dead_letters)
        # Behind what the spool holds; unless its disk refuses writes: then to Kafka,
        # ahead of it, rather than a 503 while Kafka takes records.
        if self._held.chunks and self.broken is None:
            await self._append(chunk)
            return True
        # Waits in this task, under a timeout: another task per request cost 15 us
        # (measured with a sink that acknowledges at once), this about a third of that.
        arrival = self._arrivals = self._arrivals + 1
        direct = self._direct[arrival] = _Direct(chunk, asyncio.timeout(self._after_s))
        acknowledged = False
        try:
            async with direct.wait:
                await self.inner.send(record_type, accepted, dead_letters)
            acknowledged = True
        except (TimeoutError, SinkUnavailable):
            # Not acknowledged in time, or refused at once: spool it, with every other
            # request still waiting (unless that already happened).
            self._spool_direct(direct)
        finally:
            del self._direct[arrival]
        if acknowledged:
            if direct.written is not None:
                # Kafka acknowledged it just as another request spooled it: a duplicate.
                with contextlib.suppress(SinkUnavailable):
                    await direct.written
            return False
        if direct.written is None:
            # _spool_direct could not queue it: the spool is full or its disk fails.
            raise direct.refused or SpoolUnavailable("the records could not be spooled")
        await direct.written
        return True

    def _spool_direct(self, over: _Direct) -> None:
        """Kafka has not acknowledged a request in time: spool every request still waiting
        for it, in the order they came, so none is overtaken by one spooled after it, and
        end their waits. Their records may still reach Kafka from the batches they are in,
        and again from the spool: at most two copies. `over` is the request whose wait
        is over."""
        now = asyncio.get_running_loop().time()
        for direct in self._direct.values():
            if direct.written is not None or direct.refused is not None:
                continue
            try:
                direct.written = self._append(direct.chunk)
            except SinkUnavailable as exc:
                direct.refused = exc
            # The others are still waiting, unless their own time is up this instant.
            if direct is not over and not direct.wait.expired():
                direct.wait.reschedule(now)

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
        held.pending.append(_Pending(now, chunk.record_type, chunk.records, payload, written))
        held.chunks += 1
        held.records += chunk.records
        held.bytes += len(payload)
        if held.oldest_at is None:
            held.oldest_at = now
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
                    held.take_away(1, pending.records, len(pending.payload))
                    pending.written.set_exception(
                        SpoolUnavailable(f"the spool could not be written: {exc}")
                    )
                continue
            records = sum(p.records for p in batch)
            if self._metrics is not None:
                self._metrics.spool_write_seconds.observe(time.perf_counter() - started)
                self._metrics.spool_records_spooled.inc(records)
            for pending in batch:
                pending.written.set_result(None)
            self._has_chunks.set()
        self._writer = None

    def _break(self, exc: BaseException) -> None:
        if self.broken is None:
            log.error(
                "the spool at %s cannot be written (%s): the gateway is not ready, and "
                "requests Kafka does not acknowledge in time get 503",
                self._file.path,
                exc,
            )
        self.broken = str(exc)

    async def _replay(self) -> None:
        """Send the oldest chunks to Kafka, in order, deleting each window once acknowledged."""
        delay = _FIRST_RETRY_S
        while True:
            await self._has_chunks.wait()
            try:
                window: list[Stored] = await self._file.oldest(self._window_bytes)
            except DISK_ERRORS as exc:
                self._break(exc)
                await asyncio.sleep(_LAST_RETRY_S)
                continue
            if not window:
                # Everything held is still being written: the writer sets the event again.
                self._has_chunks.clear()
                continue
            # Dropped whether Kafka is back or not, so the age bounds the spool in an
            # outage too. Chunks are in the order they were spooled: the expired lead.
            expired = _spooled_before(window, time.time() - self._settings.max_age_seconds)
            if expired:
                await self._forget(expired, "expired")
                continue
            self._held.oldest_at = window[0].spooled_at
            started = time.perf_counter()
            try:
                refused = await self._deliver(window)
            except SinkUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LAST_RETRY_S)
                continue
            except Exception:
                log.exception("could not replay the spool; trying again")
                await asyncio.sleep(_LAST_RETRY_S)
                continue
            delay = _FIRST_RETRY_S
            if refused:
                await self._forget(refused, "refused")
                window = [stored for stored in window if stored not in refused]
            if window:
                await self._forget(window, took=time.perf_counter() - started)

    async def _deliver(self, window: list[Stored]) -> list[Stored]:
        """Send a window of chunks, each record type's records together; return the
        chunks Kafka refuses for good. Raise SinkUnavailable if Kafka did not acknowledge
        everything else: the whole window is sent again later."""
        by_type: dict[str, tuple[list[Message], list[Message]]] = {}
        for stored in window:
            accepted, dead = by_type.setdefault(stored.chunk.record_type, ([], []))
            accepted.extend(stored.chunk.accepted)
            dead.extend(stored.chunk.dead_letters)
        results = await asyncio.gather(
            *(self.inner.send(t, a, d) for t, (a, d) in by_type.items()), return_exceptions=True
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        for failure in failures:
            if not isinstance(failure, GatewayError):
                raise failure
            if isinstance(failure, SinkUnavailable):
                raise failure
        if not failures:
            return []
        # Kafka refused a record for good (a topic whose own size limit is below the
        # gateway's). Sent one chunk at a time, the chunks that hold none are kept.
        refused = []
        for stored in window:
            chunk = stored.chunk
            try:
                await self.inner.send(chunk.record_type, chunk.accepted, chunk.dead_letters)
            except SinkUnavailable:
                raise
            except GatewayError as exc:
                log.error(
                    "Kafka refuses %d spooled %s records for good (%s); they are dropped",
                    chunk.records,
                    chunk.record_type,
                    exc,
                )
                refused.append(stored)
        return refused

    async def _forget(
        self, chunks: list[Stored], dropped: str | None = None, took: float | None = None
    ) -> None:
        """Delete chunks from the spool: delivered, or `dropped` for that reason."""
        held = self._held
        empty = held.chunks == len(chunks)
        try:
            await self._file.delete([stored.id for stored in chunks], empty)
        except DISK_ERRORS as exc:
            # Kept: sent again later, a duplicate rather than a loss.
            self._break(exc)
            await asyncio.sleep(_LAST_RETRY_S)
            return
        records = sum(stored.chunk.records for stored in chunks)
        held.take_away(len(chunks), records, sum(stored.size for stored in chunks))
        held.full = False
        if not held.chunks:
            log.info("the spool is empty: requests go to Kafka first again")
        if dropped == "expired":
            log.error(
                "dropped %d spooled records older than CAFE_SPOOL_MAX_AGE (%gs)",
                records,
                self._settings.max_age_seconds,
            )
        if self._metrics is not None:
            if dropped is not None:
                self._metrics.spool_records_dropped.labels(dropped).inc(records)
            else:
                self._metrics.spool_records_replayed.inc(records)
            if took is not None:
                self._metrics.spool_replay_rate.set(records / max(took, 1e-6))
        self._update_gauges()

    async def _keep_gauges(self) -> None:
        while True:
            await asyncio.sleep(_GAUGE_EVERY_S)
            self._update_gauges()

    def _update_gauges(self) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        held = self._held
        metrics.spool_records.set(held.records)
        metrics.spool_bytes.set(held.bytes)
        oldest = held.oldest_at
        metrics.spool_oldest_age.set(0 if oldest is None else max(0.0, time.time() - oldest))
        metrics.spool_unwritable.set(1 if self.broken else 0)
