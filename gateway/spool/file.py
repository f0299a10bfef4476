"""The spool's store: chunks of records in a SQLite file, written from a thread of its own.

One row (a chunk) per spooled request, its records encoded by `encode`. SQLite runs in
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

import orjson

from gateway.sink import Context, Record, Rejected

log = logging.getLogger(__name__)

# What a SpoolFile call raises when the file or its disk fails (full, read-only, gone).
DISK_ERRORS = (sqlite3.Error, OSError)

# A chunk's payload (see encode): this mark, then its requests' contexts, its records and
# its rejected records. A context is its count of fields, then each as text (or none).
# The payload of an earlier version begins with _MARK_2 (contexts of four texts: all
# records of format version 1), or, spooled before records were given to the sink with
# their context, with its count of header lists, never near either mark as a number; it
# is read by `_decode_messages`.
_MARK = b"\xffCF3"
_MARK_2 = b"\xffCF2"
_COUNT = struct.Struct("<I")
_TEXT = struct.Struct("<H")
_NONE = 0xFFFF  # a text's length that stands for no text (no text is that long)
_RECORD = struct.Struct("<HHI")  # context, session length, value length
# context, position, session length (-1: none), value length, reason length, errors
# length, size before a cut (-1: not cut; its SHA-256 follows, as 64 hex digits)
_REJECTED = struct.Struct("<HIiIHIq")
# The first payloads' messages: their header lists, then each message.
_HEADER = struct.Struct("<HI")  # name length, value length
_MESSAGE = struct.Struct("<BiII")  # dead letter?, key length (-1: none), value length, headers


@dataclass(frozen=True)
class Chunk:
    """One request's records and rejected records, as spooled."""

    record_type: str
    accepted: Sequence[Record]
    rejected: Sequence[Rejected]

    @property
    def records(self) -> int:
        return len(self.accepted) + len(self.rejected)


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
    """A chunk as bytes: each distinct context once (a request's records share one), then
    every record and rejected record, naming its context by its place."""
    places: dict[int, int] = {}
    contexts: list[bytes] = []

    def place_of(context: Context) -> int:
        place = places.get(id(context))
        if place is None:
            place = places[id(context)] = len(contexts)
            contexts.append(_encode_context(context))
        return place

    parts: list[bytes] = [_COUNT.pack(len(chunk.accepted))]
    for record in chunk.accepted:
        session = record.session_id.encode()
        parts += [
            _RECORD.pack(place_of(record.context), len(session), len(record.value)),
            session,
            record.value,
        ]
    parts.append(_COUNT.pack(len(chunk.rejected)))
    for rejected in chunk.rejected:
        key = None if rejected.session_id is None else rejected.session_id.encode()
        reason = rejected.reason.encode()
        errors = orjson.dumps(rejected.errors)
        cut = rejected.cut_from
        parts += [
            _REJECTED.pack(
                place_of(rejected.context),
                rejected.position,
                -1 if key is None else len(key),
                len(rejected.value),
                len(reason),
                len(errors),
                -1 if cut is None else cut[0],
            ),
            key or b"",
            rejected.value,
            reason,
            errors,
            b"" if cut is None else cut[1].encode(),
        ]
    head = [_MARK, _COUNT.pack(len(contexts)), *contexts]
    return b"".join(head + parts)


def _text(text: str | None) -> bytes:
    if text is None:
        return _TEXT.pack(_NONE)
    encoded = text.encode()
    return _TEXT.pack(len(encoded)) + encoded


def _encode_context(context: Context) -> bytes:
    version = context.schema_version
    fields = (
        *context[:4],
        None if version is None else str(version),
        context.traceparent,
        context.tracestate,
    )
    return bytes((len(fields),)) + b"".join(_text(field) for field in fields)


def _decode_context(fields: list[str | None]) -> Context:
    """A context from its fields as spooled; those an earlier version did not write
    take their defaults."""
    key_id, client_ip, request_id, received_at, *rest = fields
    if key_id is None or request_id is None or received_at is None:
        raise ValueError("a spooled context without its key, request or time")
    # Fields written since the first: the format version (else 1), the trace context.
    version = rest[0] if len(rest) > 0 else "1"
    traceparent = rest[1] if len(rest) > 1 else None
    tracestate = rest[2] if len(rest) > 2 else None
    return Context(
        key_id,
        client_ip,
        request_id,
        received_at,
        None if version is None else int(version),
        traceparent,
        tracestate,
    )


def decode(record_type: str, payload: bytes) -> Chunk:
    """The chunk `encode` made `payload` from (or an earlier version's encoding did).
    (The replay reads every record through this loop: slices of `payload` cost a quarter
    less than a memoryview's, and building each Record as the tuple it is skips the 0.1
    us of NamedTuple's own __new__.)"""
    marked = payload.startswith(_MARK)
    if not marked and not payload.startswith(_MARK_2):
        return _decode_messages(record_type, payload)
    at = len(_MARK)
    (count,), at = _COUNT.unpack_from(payload, at), at + _COUNT.size
    contexts = []
    for _ in range(count):
        fields: list[str | None] = []
        if marked:
            width, at = payload[at], at + 1
        else:
            width = 4
        for _ in range(width):
            (size,), at = _TEXT.unpack_from(payload, at), at + _TEXT.size
            if size == _NONE:
                fields.append(None)
                continue
            fields.append(payload[at : at + size].decode())
            at += size
        contexts.append(_decode_context(fields))
    new = tuple.__new__
    (count,), at = _COUNT.unpack_from(payload, at), at + _COUNT.size
    accepted: list[Record] = []
    unpack, size = _RECORD.unpack_from, _RECORD.size
    for _ in range(count):
        place, session_size, value_size = unpack(payload, at)
        at += size
        session = payload[at : at + session_size].decode()
        at += session_size
        accepted.append(new(Record, (session, payload[at : at + value_size], contexts[place])))
        at += value_size
    (count,), at = _COUNT.unpack_from(payload, at), at + _COUNT.size
    rejected: list[Rejected] = []
    for _ in range(count):
        place, position, session_size, value_size, reason_size, errors_size, cut_size = (
            _REJECTED.unpack_from(payload, at)
        )
        at += _REJECTED.size
        session_id = None
        if session_size >= 0:
            session_id = payload[at : at + session_size].decode()
            at += session_size
        value = payload[at : at + value_size]
        at += value_size
        reason = payload[at : at + reason_size].decode()
        at += reason_size
        errors = orjson.loads(payload[at : at + errors_size])
        at += errors_size
        cut_from = None
        if cut_size >= 0:
            cut_from = (cut_size, payload[at : at + 64].decode())
            at += 64
        rejected.append(
            Rejected(value, position, reason, errors, session_id, contexts[place], cut_from)
        )
    if at != len(payload):
        raise ValueError(f"{len(payload) - at} bytes past the chunk's end")
    return Chunk(record_type, accepted, rejected)


def _decode_messages(record_type: str, payload: bytes) -> Chunk:
    """A chunk spooled as Kafka messages, by a version that framed records before the
    sink: its records and rejected records again, their contexts read from the headers
    every message carried (a dead letter cut then keeps its cut)."""
    (count,), at = _COUNT.unpack_from(payload), _COUNT.size
    lists: list[dict[str, bytes]] = []
    for _ in range(count):
        (headers,), at = _COUNT.unpack_from(payload, at), at + _COUNT.size
        pairs = {}
        for _ in range(headers):
            name_size, value_size = _HEADER.unpack_from(payload, at)
            at += _HEADER.size
            name = payload[at : at + name_size].decode()
            at += name_size
            pairs[name] = payload[at : at + value_size]
            at += value_size
        lists.append(pairs)
    contexts: dict[tuple[str | None, ...], Context] = {}
    accepted: list[Record] = []
    rejected: list[Rejected] = []
    while at < len(payload):
        dead, key_size, value_size, place = _MESSAGE.unpack_from(payload, at)
        at += _MESSAGE.size
        key = None
        if key_size >= 0:
            key = payload[at : at + key_size].decode()
            at += key_size
        value = payload[at : at + value_size]
        at += value_size
        headers = lists[place]
        fields = tuple(
            headers[name].decode() if name in headers else None
            for name in (
                "cafe-key-id",
                "cafe-client-ip",
                "cafe-request-id",
                "cafe-received-at",
                "cafe-schema-version",
                "traceparent",
                "tracestate",
            )
        )
        context = contexts.get(fields)
        if context is None:
            context = contexts[fields] = _decode_context(list(fields))
        if not dead:
            if key is None:
                raise ValueError("a spooled record without a key")
            accepted.append(Record(key, value, context))
            continue
        cut_from = None
        if "cafe-truncated" in headers:
            original = int(headers["cafe-original-bytes"])
            cut_from = (original, headers["cafe-original-sha256"].decode())
        rejected.append(
            Rejected(
                value,
                int(headers["cafe-record-index"]),
                headers["cafe-reject-reason"].decode(),
                orjson.loads(headers["cafe-errors"]),
                key if key is not None else _session_in(value),
                context,
                cut_from,
            )
        )
    return Chunk(record_type, accepted, rejected)


def _session_in(value: bytes) -> str | None:
    """The sessionId of a record's JSON, if it is whole and has a string there."""
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    session = record.get("sessionId") if isinstance(record, dict) else None
    return session if isinstance(session, str) else None


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
        except (struct.error, ValueError, IndexError, KeyError):  # ValueError: bad UTF-8 too
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
