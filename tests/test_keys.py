"""API keys: minting, the keys file, the key store (the `keys` commands: test_cli.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import stat
import string
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from devkit.samples import sample_api_key
from gateway.http.state import KEYS
from gateway.keys.file import (
    _keys_file_lock,
    read_keys_file,
    read_last_used,
    update_keys_file,
    write_keys_file,
)
from gateway.keys.model import (
    InvalidKey,
    KeysFileError,
    NoSuchKey,
    change_key,
    hash_key,
    import_key,
    mint_key,
    rotate_key,
    utc_text,
)
from gateway.keys.store import KeyStore
from gateway.keys.strength import WeakKey, check_key_strength
from gateway.sink import MemorySink
from tests.support.app import GatewayClient, gateway_settings
from tests.support.keys import KeyFile
from tests.support.scrape import scrape


def test_a_minted_key_is_stored_as_its_hash_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    plaintext, record = mint_key(("analytics-portal", "analytics-portal", "mobile"))
    write_keys_file(path, [record])

    assert plaintext.startswith("cafe_") and len(plaintext) > 40
    assert record.sha256 == hash_key(plaintext)
    assert record.platforms == ("analytics-portal", "mobile")
    assert plaintext not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keys_file(path) == [record]


def test_two_minted_keys_differ() -> None:
    (a, ka), (b, kb) = mint_key(("web",)), mint_key(("web",))
    assert a != b and ka.id != kb.id


def test_a_missing_file_is_an_empty_key_set(tmp_path: Path) -> None:
    assert read_keys_file(tmp_path / "absent.json") == []


def _valid_entry() -> dict[str, object]:
    return {
        "id": "k_0123456789ab",
        "sha256": "a" * 64,
        "platforms": ["web"],
        "enabled": True,
        "created": "2026-11-26T00:00:00Z",
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[]", 'expected an object with a "keys" list'),
        (b'{"keys": [1]}', r"keys\[0\]: expected id, sha256"),
        ({"id": "key1"}, "id must look like k_"),
        ({"sha256": "A" * 64}, "sha256 must be 64 lowercase hex"),
        ({"platforms": []}, "platforms must be a non-empty list"),
        ({"platforms": ["has space"]}, "platforms must be a non-empty list"),
        ({"enabled": "yes"}, "enabled must be true or false"),
        ({"extra": 1}, "expected id, sha256, platforms, enabled, created"),
    ],
)
def test_a_malformed_file_is_refused_with_the_reason(
    tmp_path: Path, content: bytes | dict[str, object], message: str
) -> None:
    path = tmp_path / "keys.json"
    if isinstance(content, dict):
        content = orjson.dumps({"keys": [{**_valid_entry(), **content}]})
    path.write_bytes(content)
    with pytest.raises(KeysFileError, match=message):
        read_keys_file(path)


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    second = {**_valid_entry(), "sha256": "b" * 64}
    path.write_bytes(orjson.dumps({"keys": [_valid_entry(), second]}))
    with pytest.raises(KeysFileError, match="share one id"):
        read_keys_file(path)


def test_platform_names_are_checked() -> None:
    with pytest.raises(ValueError, match="not a platform name"):
        mint_key(("bad/name",))
    with pytest.raises(ValueError, match="at least one platform"):
        mint_key(())


def test_the_store_admits_enabled_keys_only(key_file: KeyFile) -> None:
    _, other = key_file.add("web")
    key_file.disable(other.id)
    store = KeyStore(key_file.path)
    store.load()
    assert store.lookup(key_file.key) == key_file.record
    assert len(store) == 1
    assert store.lookup("cafe_" + "x" * 43) is None


def test_the_store_refuses_to_start_without_its_file(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="does not exist"):
        KeyStore(tmp_path / "absent.json").load()


def test_the_store_reloads_changes_and_keeps_the_last_good_set(
    key_file: KeyFile, caplog: pytest.LogCaptureFixture
) -> None:
    store = KeyStore(key_file.path)
    store.load()
    assert store.reload_if_changed() is False  # nothing changed

    new_key, _ = key_file.add("web")
    assert store.reload_if_changed() is True
    assert store.lookup(new_key) is not None

    key_file.path.write_text('{"keys": [{"id": "broken"}]}')
    assert store.reload_if_changed() is False
    assert "keeping the last good API keys" in caplog.text
    assert store.lookup(new_key) is not None and store.lookup(key_file.key) is not None

    key_file.path.unlink()
    assert store.reload_if_changed() is False
    assert store.lookup(key_file.key) is not None

    _, record = mint_key(("web",))
    write_keys_file(key_file.path, [record])
    assert store.reload_if_changed() is True
    assert store.lookup(key_file.key) is None


SPEC_SAMPLE_KEY = sample_api_key()


def test_the_spec_sample_key_and_random_keys_are_strong_enough() -> None:
    check_key_strength(SPEC_SAMPLE_KEY)
    # The rules must not refuse a random key of the shortest length allowed.
    rng = random.Random(17)
    alphabet = string.ascii_letters + string.digits
    for _ in range(5000):
        check_key_strength("".join(rng.choices(alphabet, k=20)))


@pytest.mark.parametrize(
    ("plaintext", "message"),
    [
        ("", "the key is empty"),
        ("x7Kq9Lm2Vw", "shorter than 20"),
        ("a" * 257, "longer than 256"),
        ("VTwgEDNQDHnM8XFY x2eJckeou49", "printable ASCII"),
        ("VTwgEDNQDHnM8XFYé2eJckeou49", "printable ASCII"),
        ("aaaaaaaaaaaaaaaaaaaaaaaa", "too few different characters"),
        ("ababababababababababab", "too few different characters"),
        ("passwordpassword1234", "repeats"),
        ("12345678901234567890", "repeats"),
    ],
)
def test_weak_keys_are_refused_saying_why(plaintext: str, message: str) -> None:
    with pytest.raises(WeakKey, match=message):
        check_key_strength(plaintext)


def test_an_imported_key_is_stored_as_its_hash() -> None:
    record = import_key(SPEC_SAMPLE_KEY, ("web",), requests_per_second=5)
    assert record.sha256 == hash_key(SPEC_SAMPLE_KEY)
    assert record.id.startswith("k_") and record.enabled
    assert record.requests_per_second == 5
    with pytest.raises(WeakKey, match="shorter than 20"):
        import_key("short", ("web",))


def test_expires_at_is_checked_and_kept_as_an_epoch(tmp_path: Path) -> None:
    _, record = mint_key(("web",))
    assert record.expires_at is None and record.expires_epoch is None
    dated = replace(record, expires_at="2026-12-01T00:00:10Z")
    assert dated.expires_epoch == 1796083210.0
    assert dated.state(1796083209.9) == "enabled" and dated.state(1796083210.0) == "expired"
    assert replace(dated, enabled=False).state(1796083209.9) == "disabled"
    write_keys_file(tmp_path / "keys.json", [dated])
    assert read_keys_file(tmp_path / "keys.json") == [dated]
    bad: Any
    for bad in ("2026-12-01 00:00:10", "2026-13-01T00:00:00Z", 1796083210):
        with pytest.raises(InvalidKey, match="expires_at must be"):
            replace(record, expires_at=bad)


def test_rotate_mints_a_twin_and_dates_the_old_key() -> None:
    _, old = mint_key(("web", "app"), records_per_second=9, origins=("https://a.example",))
    now = 1796083200.0  # 2026-12-01T00:00:00Z
    plaintext, new, keys = rotate_key([old], old.id, 7 * 86400, now)
    assert keys == [replace(old, expires_at="2026-12-08T00:00:00Z"), new]
    assert new.sha256 == hash_key(plaintext) and new.id != old.id
    same = ("platforms", "origins", "browser", "requests_per_second", "records_per_second")
    assert [getattr(new, f) for f in same] == [getattr(old, f) for f in same]
    assert new.expires_at is None
    # An earlier expiry is kept: rotating never lets a key live longer.
    _, _, again = rotate_key(keys, old.id, 30 * 86400, now)
    assert again[0].expires_at == "2026-12-08T00:00:00Z"
    with pytest.raises(NoSuchKey, match="no key with id k_000000000000"):
        rotate_key(keys, "k_000000000000", 0, now)


def test_the_store_drops_expired_keys_from_its_counts_when_they_expire(key_file: KeyFile) -> None:
    _, dated = key_file.add("web", origins=("https://a.example",))
    update_keys_file(
        key_file.path,
        lambda keys: change_key(keys, dated.id, lambda k: replace(k, expires_at=utc_text(1000))),
    )
    store = KeyStore(key_file.path)
    store.load(now=999.0)
    assert len(store) == 2 and store.origins == {"https://a.example"}
    store.expire_if_due(now=999.5)
    assert len(store) == 2
    store.expire_if_due(now=1000.0)
    assert len(store) == 1 and store.origins == frozenset()


def test_used_key_ids_are_merged_into_the_last_used_file(key_file: KeyFile) -> None:
    store = KeyStore(key_file.path)
    store.load()
    last_used = key_file.path.with_name("keys.json.last-used.json")
    store.used.update({"k_aaaaaaaaaaaa", "k_bbbbbbbbbbbb"})
    store.save_last_used(now=1796083200.0)
    assert store.used == set()
    assert read_last_used(key_file.path) == dict.fromkeys(
        ["k_aaaaaaaaaaaa", "k_bbbbbbbbbbbb"], "2026-12-01T00:00:00Z"
    )
    # Another process (a worker, another host on a shared volume) saw one key later and
    # another earlier: each key keeps its latest time.
    other = KeyStore(key_file.path)
    other.used.add("k_aaaaaaaaaaaa")
    other.save_last_used(now=1796083260.0)
    store.used.add("k_bbbbbbbbbbbb")
    store.save_last_used(now=1796083100.0)
    assert orjson.loads(last_used.read_bytes()) == {
        "k_aaaaaaaaaaaa": "2026-12-01T00:01:00Z",
        "k_bbbbbbbbbbbb": "2026-12-01T00:00:00Z",
    }
    assert stat.S_IMODE(last_used.stat().st_mode) == 0o600
    store.save_last_used(now=1796090000.0)  # nothing used since: nothing written
    assert read_last_used(key_file.path)["k_bbbbbbbbbbbb"] == "2026-12-01T00:00:00Z"


@pytest.mark.parametrize("blocked", ["keys.json.lock", "keys.json.last-used.json"])
def test_an_unwritable_last_used_file_costs_one_warning(
    key_file: KeyFile, caplog: pytest.LogCaptureFixture, blocked: str
) -> None:
    # As with a Kubernetes Secret mounted read-only, where nothing can be written beside
    # the keys file. A directory in the way stands in for it: the tests may run as root,
    # whom file modes do not stop.
    (key_file.path.parent / blocked).mkdir()
    store = KeyStore(key_file.path)
    store.load()
    for _ in range(3):
        store.used.add(key_file.record.id)
        store.save_last_used()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "last-used" in warnings[0].getMessage()
    assert not store.used  # dropped, not piling up


def test_a_broken_last_used_file_reads_as_empty(key_file: KeyFile) -> None:
    last_used = key_file.path.with_name("keys.json.last-used.json")
    last_used.write_text('{"k_aaaaaaaaaaaa": 5, "k_bbbbbbbbbbbb": "2026-12-01T00:00:00Z"}')
    assert read_last_used(key_file.path) == {"k_bbbbbbbbbbbb": "2026-12-01T00:00:00Z"}
    last_used.write_text("{oops")
    assert read_last_used(key_file.path) == {}


async def test_the_watcher_saves_last_used_when_cancelled(key_file: KeyFile) -> None:
    store = KeyStore(key_file.path)
    store.load()
    watcher = asyncio.create_task(store.watch(interval_s=0.01))
    store.used.add(key_file.record.id)
    await asyncio.sleep(0.05)
    assert read_last_used(key_file.path) == {}  # not due for a minute
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    assert key_file.record.id in read_last_used(key_file.path)


class _Clock:
    """Stands in for the `time` module in gateway.keys.model: the time a key's state is
    asked at; the module's other uses of `time` (parsing an expiry) are the real one's."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_a_key_is_refused_from_its_expiry_on_without_a_reload(
    gateway_client: GatewayClient, key_file: KeyFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    dated_key, dated = key_file.add("analytics-portal")
    update_keys_file(
        key_file.path,
        lambda keys: change_key(keys, dated.id, lambda k: replace(k, expires_at=utc_text(5000))),
    )
    clock = _Clock(4999.0)
    monkeypatch.setattr("gateway.keys.model.time", clock)
    client = await gateway_client(gateway_settings(keys_file=key_file.path), sink=MemorySink())
    app = client.app
    assert app is not None
    for key, status in ((dated_key, 200), (key_file.key, 200)):
        resp = await client.get("/v1/ip", headers={"x-api-key": key})
        assert resp.status == status
    assert app[KEYS].used == {dated.id, key_file.record.id}
    app[KEYS].used.clear()

    clock.now = 5000.0
    resp = await client.get("/v1/ip", headers={"x-api-key": dated_key})
    assert resp.status == 401
    # The same answer as an unknown or disabled key: only the metric says which.
    assert (await resp.json(content_type=None))["detail"] == "the API key is unknown or disabled"
    assert app[KEYS].used == set()
    resp = await client.get("/v1/ip", headers={"x-api-key": key_file.key})
    assert resp.status == 200
    samples = await scrape(client)
    assert samples.value("cafe_auth_failures_total", reason="expired") == 1


def _failing_stat(path: Path, error: int, times: int) -> tuple[Callable[..., Any], list[int]]:
    """A Path.stat that raises `error` for `path` the next `times` times, as while an NFS
    volume or a Kubernetes Secret is remounted; and the count of failures left."""
    stat_of = Path.stat
    left = [times]

    def failing(self: Path, **kwargs: Any) -> os.stat_result:
        if self == path and left[0]:
            left[0] -= 1
            raise OSError(error, os.strerror(error), str(path))
        return stat_of(self, **kwargs)

    return failing, left


async def _until(condition: Callable[[], bool]) -> None:
    """Let the event loop run until `condition` holds; fail if it does not within 2 s."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 2 s")


@pytest.mark.parametrize("error", [errno.ESTALE, errno.EIO, errno.EACCES])
async def test_the_watcher_outlives_a_file_it_cannot_stat(
    key_file: KeyFile, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    store = KeyStore(key_file.path)
    store.load()
    failing, left = _failing_stat(key_file.path, error, times=5)
    monkeypatch.setattr(Path, "stat", failing)
    watcher = asyncio.create_task(store.watch(interval_s=0.01, save_every_s=0.01))
    try:
        await _until(lambda: not left[0])
        store.used.add(key_file.record.id)
        key_file.disable(key_file.record.id)
        # The change is in force, and the keys used are still saved.
        await _until(lambda: not len(store))
        assert store.lookup(key_file.key) == replace(key_file.record, enabled=False)
        await _until(lambda: key_file.record.id in read_last_used(key_file.path))
        assert not watcher.done()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    # Five failed polls in a row are one outage: one line.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [
        f"keeping the last good API keys: cannot read {key_file.path}: "
        f"[Errno {error}] {os.strerror(error)}: '{key_file.path}'"
    ]


def test_a_change_the_store_could_not_read_is_read_at_the_next_poll(
    key_file: KeyFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(key_file.path)
    store.load()
    new_key, _ = key_file.add("web")
    read_bytes = Path.read_bytes

    def fails_once(path: Path) -> bytes:
        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", fails_once)
    assert store.reload_if_changed() is False
    assert store.lookup(new_key) is None
    assert store.reload_if_changed() is True
    assert store.lookup(new_key) is not None


async def test_the_watcher_logs_an_unexpected_error_and_goes_on(
    key_file: KeyFile, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(key_file.path)
    store.load()
    faults = [RuntimeError("a bug")] * 3

    def reload_if_changed() -> bool:
        if faults:
            raise faults.pop()
        return KeyStore.reload_if_changed(store)

    monkeypatch.setattr(store, "reload_if_changed", reload_if_changed)
    watcher = asyncio.create_task(store.watch(interval_s=0.01))
    try:
        await _until(lambda: not faults)
        key_file.disable(key_file.record.id)
        await _until(lambda: not len(store))
        assert not watcher.done()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    (logged,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert logged.getMessage() == "the API keys watcher failed; it goes on polling"
    assert logged.exc_info is not None and str(logged.exc_info[1]) == "a bug"


async def test_the_last_used_merge_leaves_the_event_loop_free(key_file: KeyFile) -> None:
    # A thread stands in for another process (a worker, a `keys` command) holding the
    # keys file's lock: the merge waits for it on a thread of its own; the loop answers.
    store = KeyStore(key_file.path)
    store.load()
    store.used.add(key_file.record.id)
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with _keys_file_lock(key_file.path):
            locked.set()
            release.wait(timeout=2.0)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    locked.wait()
    watcher = asyncio.create_task(store.watch(interval_s=0.01, save_every_s=0.01))
    try:
        started = time.monotonic()
        await asyncio.sleep(0.1)
        assert time.monotonic() - started < 1.0, "the event loop waited for the lock"
        assert not store.used and read_last_used(key_file.path) == {}  # the merge waits
        release.set()
        await _until(lambda: key_file.record.id in read_last_used(key_file.path))
    finally:
        release.set()
        holder.join()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_each_watcher_saves_first_at_a_random_point_of_the_interval(
    key_file: KeyFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # So the workers of a host, started together, do not all take the file's lock at once.
    drawn: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        drawn.append((low, high))
        return high / 100

    monkeypatch.setattr(random, "uniform", uniform)
    store = KeyStore(key_file.path)
    store.load()
    store.used.add(key_file.record.id)
    watcher = asyncio.create_task(store.watch(interval_s=0.01, save_every_s=30.0))
    try:
        await _until(lambda: key_file.record.id in read_last_used(key_file.path))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert drawn == [(0, 30.0)]


def test_a_replaced_file_is_made_durable_by_fsyncing_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Until the directory is fsynced, a crash can bring back the file a rename replaced:
    # a `keys disable` undone.
    calls: list[tuple[str, object]] = []
    fsync, rename = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        calls.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def record_replace(src: str, dst: Path) -> None:
        calls.append(("replace", Path(dst).name))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    path = tmp_path / "keys.json"
    write_keys_file(path, [mint_key(("web",))[1]])
    # The new file's data, then the rename, then the directory that holds the name.
    assert calls == [
        ("fsync", path.stat().st_ino),
        ("replace", "keys.json"),
        ("fsync", tmp_path.stat().st_ino),
    ]
