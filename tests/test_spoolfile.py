"""The spool's store: chunks encoded and read back, windows, deletes, files and locks."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import struct
from pathlib import Path

import orjson
import pytest

from gateway.kafka.messages import Framer
from gateway.sink import Context, Record, Rejected
from gateway.spool.file import Chunk, SpoolFile, decode, encode
from tests.support.records import record

_HEADER = struct.Struct("<HI")
_MESSAGE = struct.Struct("<BiII")


def chunk(n: int, size: int = 10) -> Chunk:
    return Chunk("activity", [record("s1", b"%d" % n + b"x" * size)], [])


def test_a_chunk_reads_back_as_it_was_written() -> None:
    first = Context(
        "k_0123456789ab",
        "2001:db8::1",
        "req-1",
        "2026-12-01T00:00:00.000Z",
        2,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "vendor=\u00e9",
    )
    # No address kept (CAFE_CLIENT_IP=off), and a version the gateway did not know.
    other = Context("k_ba9876543210", None, "r\u00e9q", "2026-12-01T00:00:01.000Z", None)
    errors = [{"pointer": "/\u00e9", "message": "x" * 2000}]
    written = Chunk(
        "log",
        [
            Record("s1", b"{}", first),
            Record("", b"\x00\xff binary", first),
            Record("s", b"", other),
        ],
        [
            Rejected(b"rejected", 3, "invalid", errors, "s2", first),
            Rejected(b"", 499, "forbidden", [], None, other, (9_000_000, "ab" * 32)),
        ],
    )
    payload = encode(written)
    back = decode("log", payload)
    assert back == written
    assert back.records == 5
    # A request's context is written once, however many records share it.
    assert payload.count(b"2001:db8::1") == 1
    assert back.accepted[0].context is back.accepted[1].context


def test_a_chunk_spooled_before_format_versions_is_read_as_version_1() -> None:
    # As the version before format versions encoded it: mark CF2, contexts of four texts.
    def text(value: str) -> bytes:
        return struct.pack("<H", len(value.encode())) + value.encode()

    context = ("k_0123456789ab", "203.0.113.9", "req-1", "2026-12-01T00:00:00.000Z")
    errors = orjson.dumps([{"pointer": "", "message": "m"}])
    payload = b"".join(
        [
            b"\xffCF2",
            struct.pack("<I", 1),
            *(text(field) for field in context),
            struct.pack("<I", 1),
            struct.pack("<HHI", 0, 2, 7),
            b"s1",
            b'{"n":1}',
            struct.pack("<I", 1),
            struct.pack("<HIiIHIq", 0, 3, -1, 1, 7, len(errors), -1),
            b"x",
            b"invalid",
            errors,
            b"",
        ]
    )
    back = decode("activity", payload)
    old = Context(*context, schema_version=1)
    assert back == Chunk(
        "activity",
        [Record("s1", b'{"n":1}', old)],
        [Rejected(b"x", 3, "invalid", [{"pointer": "", "message": "m"}], None, old)],
    )


def _first_format(
    messages: list[tuple[bool, bytes | None, bytes, list[tuple[str, bytes]]]],
) -> bytes:
    """A chunk as the spool wrote it before sinks were given records: its header lists,
    then each message (dead letter?, key, value, its list's place)."""
    lists: list[bytes] = []
    body: list[bytes] = []
    for dead, key, value, headers in messages:
        encoded = [struct.pack("<I", len(headers))]
        for name, header in headers:
            encoded += [_HEADER.pack(len(name), len(header)), name.encode(), header]
        body.append(_MESSAGE.pack(dead, -1 if key is None else len(key), len(value), len(lists)))
        lists.append(b"".join(encoded))
        body += [key or b"", value]
    return struct.pack("<I", len(lists)) + b"".join(lists) + b"".join(body)


def test_a_chunk_spooled_as_kafka_messages_by_an_earlier_version_is_read_as_records() -> None:
    # Spooled before an upgrade, replayed after it: the same messages reach Kafka.
    context = Context("k_0123456789ab", "127.0.0.1", "req-1", "2026-12-01T00:00:00.000Z")
    framer = Framer("activity")
    kept = Rejected(b'{"sessionId":"' + b"s" * 300 + b'"}', 7, "invalid", [], "s" * 300, context)
    cut = Rejected(b"x" * 600_000, 8, "forbidden", [{"pointer": "", "message": "m"}], "s", context)
    messages = [
        framer.record(Record("s1", b'{"n":1}', context)),
        framer.dead_letter(kept),  # key omitted: too long a sessionId
        framer.dead_letter(cut),  # its value cut to 512 KiB
    ]
    payload = _first_format(
        [(i > 0, m.key, m.value, list(m.headers or [])) for i, m in enumerate(messages)]
    )
    back = decode("activity", payload)
    assert back.accepted == [Record("s1", b'{"n":1}', context)]
    again = [framer.record(r) for r in back.accepted]
    again += [framer.dead_letter(r) for r in back.rejected]
    assert again == messages
    assert back.rejected[1].cut_from == (600_000, hashlib.sha256(cut.value).hexdigest())
    assert orjson.loads(dict(again[1].headers or [])["cafe-errors"]) == []


async def test_chunks_come_back_oldest_first_in_windows_and_stay_until_deleted(
    tmp_path: Path,
) -> None:
    file = SpoolFile(tmp_path, workers=1)
    try:
        rows = [(1000.0 + n, "activity", 1, encode(chunk(n, size=100))) for n in range(5)]
        await file.insert(rows)
        assert await file.totals() == (5, 5, sum(len(r[3]) for r in rows), 1000.0)
        # A window stops before the chunk that would pass its bytes, but holds one at least.
        size = len(rows[0][3])
        window = await file.oldest(2 * size + 1)
        assert [stored.spooled_at for stored in window] == [1000.0, 1001.0]
        assert [stored.chunk for stored in window] == [chunk(0, 100), chunk(1, 100)]
        assert len(await file.oldest(1)) == 1
        await file.delete([stored.id for stored in window], empty=False)
    finally:
        await file.close()
    reopened = SpoolFile(tmp_path, workers=1)
    try:
        assert (await reopened.totals())[:2] == (3, 3)
        assert [s.chunk for s in await reopened.oldest(1 << 20)] == [
            chunk(n, 100) for n in (2, 3, 4)
        ]
        await reopened.delete([s.id for s in await reopened.oldest(1 << 20)], empty=True)
        assert await reopened.totals() == (0, 0, 0, None)
    finally:
        await reopened.close()


async def test_files_left_by_workers_beyond_the_count_are_named_in_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "spool-3.sqlite3").write_bytes(b"")
    file = SpoolFile(tmp_path, workers=2)
    with caplog.at_level(logging.ERROR, logger="gateway.spool.file"):
        try:
            await file.probe()
        finally:
            await file.close()
    assert "spool-3.sqlite3 belongs to worker 3, and CAFE_WORKERS is 2" in caplog.text
    assert "run with CAFE_WORKERS=4 until it is empty" in caplog.text


async def test_a_window_is_deleted_in_one_commit(tmp_path: Path) -> None:
    """Deleting a window writes a few pages to the log, not a commit (and an fsync) per
    chunk: 500 chunks wrote 661 log frames one by one, 24 in one transaction."""
    file = SpoolFile(tmp_path, workers=1)
    try:
        await file.insert([(1000.0, "activity", 1, encode(chunk(n))) for n in range(500)])
        await file._run(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        window = await file.oldest(1 << 30)
        assert len(window) == 500
        await file.delete([stored.id for stored in window], empty=False)
        frames = await file._run(
            lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        )
        assert frames < 50
        assert await file.totals() == (0, 0, 0, None)
    finally:
        await file.close()


async def test_deleting_large_chunks_writes_a_fraction_of_what_spooling_them_did(
    tmp_path: Path,
) -> None:
    """A W20 request's chunk spans several pages. Deleting a window of them writes only
    the pages that point to them, not every freed page zeroed (Debian's SQLite is built
    with secure_delete on: 100 chunks of 12 KB wrote 312 log frames to spool and 304 to
    delete; 7 with it FAST)."""
    file = SpoolFile(tmp_path, workers=1)

    def frames_since_checkpoint(db: sqlite3.Connection) -> int:
        frames: int = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next count starts at 0
        return frames

    try:
        await file.insert([(1000.0, "activity", 20, encode(chunk(n, 12_000))) for n in range(100)])
        spooled = await file._run(frames_since_checkpoint)
        window = await file.oldest(1 << 30)
        await file.delete([stored.id for stored in window], empty=False)
        deleted = await file._run(frames_since_checkpoint)
        assert spooled > 300
        assert deleted < spooled / 10, (spooled, deleted)
    finally:
        await file.close()


async def test_a_probe_fails_on_a_disk_too_full_for_a_chunk(tmp_path: Path) -> None:
    """A probe writes: on a full disk (SQLite's max_page_count reached) it fails as an
    insert would, where a delete of nothing passes."""
    file = SpoolFile(tmp_path, workers=1)
    try:
        assert await file.totals() == (0, 0, 0, None)  # opened
        pages = await file._run(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
        await file._run(lambda db: db.execute(f"PRAGMA max_page_count={pages}"))
        await file._run(lambda db: db.execute("DELETE FROM chunks WHERE id < 0"))
        with pytest.raises(sqlite3.OperationalError, match="full"):
            await file.probe()
        assert await file.totals() == (0, 0, 0, None)
    finally:
        await file.close()
