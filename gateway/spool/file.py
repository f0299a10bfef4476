"""The spool's store: chunks of records in a SQLite file, written from a thread of its own.

One row (a chunk) per spooled request, its messages encoded by `encode`. SQLite runs in
WAL mode with an fsync at every commit, and many chunks share one commit (a group
commit, `SpoolFile.insert`). Every call runs on the file's own thread, so no disk I/O
runs on the event loop; gateway/spool/sink.py decides what is spooled and when it is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gateway.sink import Message

log = logging.getLogger(__name__)

# What a SpoolFile call raises when the file or its disk fails (full, read-only, gone).
DISK_ERRORS = (sqlite3.Error, OSError)

# A chunk's payload: its header lists, then its messages (see encode).
_COUNT = struct.Struct("<I")
_HEADER = struct.Struct("<HI")  # name length, value length
_MESSAGE = struct.Struct("<BiII")  # dead letter?, key length (-1: none), value length, headers


@dataclass(frozen=True)
class Chunk:
    """One request's records and dead letters, as spooled."""

    record_type: str
    accepted: Sequence[Message]
    dead_letters: Sequence[Message]

    @property
    def records(self) -> int:
        return len(self.accepted) + len(self.dead_letters)


@dataclass
class Stored:
    """A chunk read back from the spool file."""

    id: int
    spooled_at: float
    size: int
    chunk: Chunk
    records: int
    # Its payload does not decode (the file was damaged): it can only be dropped.
    corrupt: bool = False


@dataclass
class Totals:
    """What the file holds of one record type."""

    chunks: int
    records: int
    bytes: int
    oldest_at: float


def encode(chunk: Chunk) -> bytes:
    """A chunk's messages as bytes: each distinct header list once, then every message.

    Every accepted record of a request carries the same header list, so each list is
    written once and messages name it by its place.
    """
    header_lists: dict[int, int] = {}
    lists: list[bytes] = []
    parts: list[bytes] = [b""]  # the header lists go here, once all are known
    for dead, messages in ((0, chunk.accepted), (1, chunk.dead_letters)):
        for message in messages:
            headers = message.headers or []
            place = header_lists.get(id(headers))
            if place is None:
                place = header_lists[id(headers)] = len(lists)
                lists.append(_encode_headers(headers))
            key = message.key
            parts.append(
                _MESSAGE.pack(dead, -1 if key is None else len(key), len(message.value), place)
            )
            if key:
                parts.append(key)
            parts.append(message.value)
    parts[0] = _COUNT.pack(len(lists)) + b"".join(lists)
    return b"".join(parts)


def _encode_headers(headers: Sequence[tuple[str, bytes]]) -> bytes:
    parts = [_COUNT.pack(len(headers))]
    for name, value in headers:
        encoded = name.encode()
        parts += [_HEADER.pack(len(encoded), len(value)), encoded, value]
    return b"".join(parts)


def decode(record_type: str, payload: bytes) -> Chunk:
    """The chunk `encode` made `payload` from. (The replay reads every record through
    this loop: slices of `payload` cost a quarter less than a memoryview's, and building
    each Message as the tuple it is skips the 0.1 us of NamedTuple's own __new__.)"""
    (count,), at = _COUNT.unpack_from(payload), _COUNT.size
    lists: list[list[tuple[str, bytes]] | None] = []
    for _ in range(count):
        (headers,), at = _COUNT.unpack_from(payload, at), at + _COUNT.size
        pairs = []
        for _ in range(headers):
            name_size, value_size = _HEADER.unpack_from(payload, at)
            at += _HEADER.size
            name = payload[at : at + name_size].decode()
            at += name_size
            pairs.append((name, payload[at : at + value_size]))
            at += value_size
        lists.append(pairs or None)
    accepted: list[Message] = []
    dead_letters: list[Message] = []
    unpack, size, end, new = _MESSAGE.unpack_from, _MESSAGE.size, len(payload), tuple.__new__
    while at < end:
        dead, key_size, value_size, place = unpack(payload, at)
        at += size
        key = None
        if key_size >= 0:
            key = payload[at : at + key_size]
            at += key_size
        value = payload[at : at + value_size]
        at += value_size
        (dead_letters if dead else accepted).append(new(Message, (key, value, lists[place])))
    return Chunk(record_type, accepted, dead_letters)


class SpoolFile:
    """Chunks in a SQLite file, oldest first; every call runs on one thread of its own.

    A directory holds one file per worker, `spool-<n>.sqlite3`. A process takes the first
    whose lock (an exclusive flock on the file beside it) it can hold, and holds it while
    the file is open, so two processes never write one file.
    """

    def __init__(self, directory: Path, workers: int) -> None:
        self.directory = directory
        self.path = directory / "spool-0.sqlite3"  # until opened: the first it will try
        self._workers = workers
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._lock: IO[bytes] | None = None

    async def totals(self) -> tuple[int, int, int, float | None]:
        """Chunks, records and bytes held, and when the oldest was spooled (None: empty)."""
        by_type = await self.totals_by_type()
        if not by_type:
            return 0, 0, 0, None
        return (
            sum(t.chunks for t in by_type.values()),
            sum(t.records for t in by_type.values()),
            sum(t.bytes for t in by_type.values()),
            min(t.oldest_at for t in by_type.values()),
        )

    async def totals_by_type(self) -> dict[str, Totals]:
        """What the file holds, by record type."""
        result: dict[str, Totals] = await self._run(_totals)
        return result

    async def insert(self, rows: list[tuple[float, str, int, bytes]]) -> None:
        """Write chunks as (spooled_at, record_type, records, payload), in one commit."""
        await self._run(_insert, rows)

    async def oldest(
        self, max_bytes: int, record_type: str | None = None, after: int = 0
    ) -> list[Stored]:
        """The oldest chunks (of `record_type`, if given; past chunk `after`), up to
        `max_bytes` of payload (at least one, if any)."""
        window: list[Stored] = await self._run(_oldest, max_bytes, record_type, after)
        return window

    async def delete(self, ids: list[int], empty: bool) -> None:
        """Delete chunks; `empty`: nothing is left, so give the space back."""
        await self._run(_delete, ids, empty)

    async def probe(self) -> None:
        """A write and its undoing, committed: raises if the disk does not take writes."""
        await self._run(_probe)

    async def _run(self, work: Any, *args: Any) -> Any:
        """Run `work(db, *args)` on the file's thread, opening the file first if need be."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._call, work, args
        )

    def _call(self, work: Any, args: tuple[Any, ...]) -> Any:
        if self._db is None:
            self._db = self._open()
        return work(self._db, *args)

    def _open(self) -> sqlite3.Connection:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._take_a_file()
        # No implicit transactions: each write is one explicit transaction.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # Set before the first table exists, or it has no effect: the space replayed
        # chunks leave is given back to the file system when the spool empties.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        # WAL: a commit appends to the log, and reading does not block writing. FULL:
        # the log is fsynced at every commit, so a chunk is on disk before its request
        # is answered (NORMAL survives a crash of the process, not of the machine).
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        # Debian's SQLite (and others') is built to zero every page a DELETE frees, so
        # deleting a replayed window wrote as much as spooling it had: 0.26 s against
        # 0.04 s for 120,000 records, and the replay's deletes took a fifth of the spool
        # thread's time. FAST zeroes only what is written anyway. A deleted record may so
        # stay in a free page until the page is reused or the spool empties (the file
        # then shrinks); the WAL held it as long in either mode.
        db.execute("PRAGMA secure_delete=FAST")
        db.execute(
            "CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "spooled_at REAL NOT NULL, record_type TEXT NOT NULL, records INTEGER NOT NULL, "
            "payload BLOB NOT NULL)"
        )
        # Each record type is replayed on its own, oldest first (gateway/spool/sink.py).
        db.execute("CREATE INDEX IF NOT EXISTS chunks_by_type ON chunks (record_type, id)")
        return db

    def _take_a_file(self) -> None:
        """Lock the first spool file no other process holds, and use it."""
        for index in range(self._workers):
            path = self.directory / f"spool-{index}.sqlite3"
            lock = path.with_name(f"{path.name}.lock").open("ab")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self.path, self._lock = path, lock
            if index == 0:
                self._warn_of_orphans()
            return
        raise sqlite3.OperationalError(
            f"every spool file in {self.directory} is in use by another process"
        )

    def _warn_of_orphans(self) -> None:
        """Files of workers beyond CAFE_WORKERS are replayed by no one: say so."""
        for path in sorted(self.directory.glob("spool-*.sqlite3")):
            index = path.name.removeprefix("spool-").removesuffix(".sqlite3")
            if index.isdigit() and int(index) >= self._workers:
                log.error(
                    "%s belongs to worker %s, and CAFE_WORKERS is %d: no worker sends what "
                    "it holds; run with CAFE_WORKERS=%d until it is empty",
                    path,
                    index,
                    self._workers,
                    int(index) + 1,
                )

    async def close(self) -> None:
        def close(db: sqlite3.Connection) -> None:
            db.close()

        with contextlib.suppress(sqlite3.Error):
            if self._db is not None:
                await self._run(close)
        self._db = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self._executor.shutdown(wait=True)


def _totals(db: sqlite3.Connection) -> dict[str, Totals]:
    """Chunks, records and bytes held by record type, and when the oldest was spooled."""
    rows = db.execute(
        "SELECT record_type, count(*), sum(records), sum(length(payload)), min(spooled_at) "
        "FROM chunks GROUP BY record_type"
    )
    return {row[0]: Totals(row[1], row[2], row[3], row[4]) for row in rows}


def _insert(db: sqlite3.Connection, rows: list[tuple[float, str, int, bytes]]) -> None:
    """One transaction for many chunks: one fsync for them all (a group commit)."""
    with _transaction(db):
        db.executemany(
            "INSERT INTO chunks (spooled_at, record_type, records, payload) VALUES (?, ?, ?, ?)",
            rows,
        )


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One explicit write transaction: committed (one fsync) or rolled back."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        # SQLite has rolled back already after some errors (a full disk among them).
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _oldest(
    db: sqlite3.Connection, max_bytes: int, record_type: str | None, after: int
) -> list[Stored]:
    """The oldest chunks past chunk `after`, up to `max_bytes` of payload (at least one)."""
    window: list[Stored] = []
    size = 0
    query = "SELECT id, spooled_at, record_type, records, payload FROM chunks WHERE id > ?"
    if record_type is None:
        rows = db.execute(f"{query} ORDER BY id LIMIT 1000", (after,))
    else:
        rows = db.execute(
            f"{query} AND record_type = ? ORDER BY id LIMIT 1000", (after, record_type)
        )
    for ident, spooled_at, kind, records, payload in rows:
        if window and size + len(payload) > max_bytes:
            break
        size += len(payload)
        try:
            chunk, corrupt = decode(kind, payload), False
        except (struct.error, UnicodeDecodeError, IndexError):
            chunk, corrupt = Chunk(kind, [], []), True
        window.append(Stored(ident, spooled_at, len(payload), chunk, records, corrupt))
    return window


def _delete(db: sqlite3.Connection, ids: list[int], empty: bool) -> None:
    """Delete chunks by id, in one transaction; give the space back once the spool is empty.

    In autocommit, every row deleted was a commit of its own, with its fsync: 500 chunks
    took 1.26 s against 8 ms in one transaction."""
    with _transaction(db):
        db.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in ids])
    if empty:
        db.execute("PRAGMA incremental_vacuum")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _probe(db: sqlite3.Connection) -> None:
    """Write a row and delete it, committed. A DELETE of nothing writes no page, so it
    passes on a full disk where inserts fail."""
    with _transaction(db):
        db.execute(
            "INSERT INTO chunks (spooled_at, record_type, records, payload) "
            "VALUES (0, '', 0, zeroblob(65536))"
        )
        db.execute("DELETE FROM chunks WHERE id = last_insert_rowid()")
