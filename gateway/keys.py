"""API keys: the `ApiKey` model and its rules, the keys file, and the in-memory `KeyStore`.

The file is JSON, replaced atomically and readable by its owner only; every change is
made under a lock on `<file>.lock` beside it:

    {"keys": [{"id": "k_3f9a1c0b2e7d", "sha256": "<64 hex>",
               "platforms": ["analytics-portal"], "enabled": true,
               "created": "2026-11-26T10:00:00Z", "expires_at": null}]}

A key's plaintext is shown once, when it is minted, and never stored; a key brought
from elsewhere (`import_key`) must be strong enough to be kept that way. The gateway
holds every key of the file in memory as a dict by hash, so finding a key costs one
SHA-256 and one lookup, and polls the file for changes once a second. It notes which
keys it admitted and, about once a minute, merges when into `<keys file>.last-used.json`.
Nothing here knows HTTP: the CLI and the benchmark use this module alone; what a key
admits is `gateway.auth`.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import math
import os
import random
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import orjson

from gateway.keystrength import check_key_strength
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

_ID = re.compile(r"k_[0-9a-f]{12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Same shape the record schemas allow for productPlatform.
_PLATFORM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A web origin as browsers send it: scheme, host, optional port; no path, no slash.
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
# Times in the files: UTC, to the second.
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


class InvalidKey(ValueError):
    """A key breaks one of the rules of `ApiKey`."""


class NoSuchKey(LookupError):
    """No key of the file has the id a change names."""

    def __str__(self) -> str:
        return f"no key with id {self.args[0]}"


def utc_text(epoch: float) -> str:
    """`epoch` as the files write times: 2026-12-01T00:00:00Z (the second it falls in)."""
    return time.strftime(_TIME_FORMAT, time.gmtime(math.floor(epoch)))


def _epoch(text: str) -> float:
    """The epoch of a time as the files write it; ValueError if it is not one."""
    if not _TIME.fullmatch(text):
        raise ValueError(text)
    return float(calendar.timegm(time.strptime(text, _TIME_FORMAT)))


class KeysFileError(ValueError):
    """The keys file cannot be read or does not have the expected shape."""


def check_platform(name: str) -> str:
    """Return `name` if it is a valid productPlatform, else raise ValueError."""
    if not isinstance(name, str) or not _PLATFORM.fullmatch(name):
        raise ValueError(f"{name!r} is not a platform name (letters, digits, '._-', <= 64)")
    return name


def check_origin(origin: str) -> str:
    """Return `origin` if it is a web origin (scheme://host[:port]), else raise ValueError."""
    if not isinstance(origin, str) or not _ORIGIN.fullmatch(origin):
        raise ValueError(f"{origin!r} is not an origin like https://app.example.com[:port]")
    return origin


@dataclass(frozen=True)
class ApiKey:
    """One key as stored: its id, hash, the platforms it may write, and whether it works.

    The rules for a valid key are checked here, on every construction (minted, read
    from the file, or changed with `replace`), so no invalid key exists anywhere.
    """

    id: str
    sha256: str
    platforms: tuple[str, ...]
    enabled: bool
    created: str
    # Rate limits (None: unlimited); see gateway/ratelimit.py.
    requests_per_second: float | None = None
    records_per_second: float | None = None
    # Web origins ("https://shop.example.com") whose pages may send with this key.
    origins: tuple[str, ...] = ()
    # A browser key may also come as ?api_key= (sendBeacon sets no headers), only from
    # one of its origins, and only to send records: it reads nothing.
    browser: bool = False
    # When the key stops working (a rotated key's grace period ends), or None: never.
    expires_at: str | None = None
    # The key that rotations of it began with, or None: its successors share its rate
    # limits, so a grace period does not double them.
    rotated_from: str | None = None

    @property
    def limit_id(self) -> str:
        """The id a key's rate limits are kept under: the same for all its rotations."""
        return self.rotated_from or self.id

    @functools.cached_property
    def expires_epoch(self) -> float | None:
        """`expires_at` as an epoch, worked out once per key: the gateway compares it
        with time.time() on every request, where parsing a date would cost more."""
        # A cached_property writes to the instance's __dict__, which a frozen dataclass
        # allows, and is no field: not stored, compared or copied by `replace`.
        return None if self.expires_at is None else _epoch(self.expires_at)

    def expired(self, now: float) -> bool:
        """True if the key has an expiry and `now` (an epoch) is at or past it."""
        return self.expires_epoch is not None and now >= self.expires_epoch

    def __post_init__(self) -> None:
        # The types are checked too: a key read from the file is whatever JSON held.
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            raise InvalidKey("id must look like k_ and 12 hex digits")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise InvalidKey("sha256 must be 64 lowercase hex digits")
        rule = "platforms must be a non-empty list of platform names"
        _check_each(rule, self.platforms, check_platform)
        if not self.platforms:
            raise InvalidKey(f"{rule}: a key needs at least one platform")
        if not isinstance(self.enabled, bool):
            raise InvalidKey("enabled must be true or false")
        if not isinstance(self.created, str):
            raise InvalidKey("created must be a string")
        for name in ("requests_per_second", "records_per_second"):
            rate = getattr(self, name)
            if rate is not None and (
                isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0
            ):
                raise InvalidKey(f"{name} must be a positive number or null")
        _check_each("origins must be a list of web origins", self.origins, check_origin)
        if not isinstance(self.browser, bool):
            raise InvalidKey("browser must be true or false")
        if self.browser and not self.origins:
            raise InvalidKey("a browser key needs at least one origin")
        if self.rotated_from is not None and not (
            isinstance(self.rotated_from, str) and _ID.fullmatch(self.rotated_from)
        ):
            raise InvalidKey("rotated_from must be a key id or null")
        try:
            self.expires_epoch  # noqa: B018 - parsed now, so a bad time is refused here
        except (TypeError, ValueError):
            raise InvalidKey(
                "expires_at must be a UTC time like 2026-12-01T00:00:00Z or null"
            ) from None


def _check_each(rule: str, values: tuple[str, ...], check: Callable[[str], str]) -> None:
    """Apply `check` to each of `values`, which must be a tuple; every complaint starts `rule`."""
    if not isinstance(values, tuple):
        raise InvalidKey(rule)
    for value in values:
        try:
            check(value)
        except ValueError as exc:
            raise InvalidKey(f"{rule}: {exc}") from None


# An entry of the file holds the model's fields by name; those without a default must be there.
_FIELDS = frozenset(f.name for f in fields(ApiKey))
_REQUIRED = tuple(f.name for f in fields(ApiKey) if f.default is MISSING)
_OPTIONAL = sorted(_FIELDS - set(_REQUIRED))


def hash_key(plaintext: str) -> str:
    """The hex SHA-256 of a key, which is all the keys file holds of it."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def mint_key(
    platforms: tuple[str, ...],
    *,
    requests_per_second: float | None = None,
    records_per_second: float | None = None,
    origins: tuple[str, ...] = (),
    browser: bool = False,
) -> tuple[str, ApiKey]:
    """A new random key: (plaintext to show once, record to store); InvalidKey if invalid."""
    # 32 random bytes: guessing is hopeless, so an unsalted fast hash is safe to store.
    plaintext = "cafe_" + secrets.token_urlsafe(32)
    record = import_key(
        plaintext,
        platforms,
        requests_per_second=requests_per_second,
        records_per_second=records_per_second,
        origins=origins,
        browser=browser,
    )
    return plaintext, record


def import_key(
    plaintext: str,
    platforms: tuple[str, ...],
    *,
    requests_per_second: float | None = None,
    records_per_second: float | None = None,
    origins: tuple[str, ...] = (),
    browser: bool = False,
) -> ApiKey:
    """The record to store for `plaintext` (made elsewhere, or by `mint_key`) under a new
    id; InvalidKey if the key is too weak to store as an unsalted hash
    (WeakKey, from `gateway.keystrength`) or the record breaks a rule of `ApiKey`."""
    return ApiKey(
        id="k_" + secrets.token_hex(6),
        sha256=hash_key(check_key_strength(plaintext)),
        platforms=tuple(dict.fromkeys(platforms)),
        enabled=True,
        created=utc_text(time.time()),
        requests_per_second=requests_per_second,
        records_per_second=records_per_second,
        origins=tuple(dict.fromkeys(origins)),
        browser=browser,
    )


def change_key(keys: list[ApiKey], key_id: str, change: Callable[[ApiKey], ApiKey]) -> list[ApiKey]:
    """The same keys with `change` applied to `key_id`'s; NoSuchKey if no key has that id."""
    if key_id not in {k.id for k in keys}:
        raise NoSuchKey(key_id)
    return [change(k) if k.id == key_id else k for k in keys]


def disable_key(keys: list[ApiKey], key_id: str) -> list[ApiKey]:
    """The same keys with `key_id` disabled; NoSuchKey if no key has that id."""
    return change_key(keys, key_id, lambda k: replace(k, enabled=False))


def rotate_key(
    keys: list[ApiKey], key_id: str, grace_s: float, now: float
) -> tuple[str, ApiKey, list[ApiKey]]:
    """Mint a successor to `key_id` with the same settings, and date the old key to expire
    `grace_s` after `now` (or earlier, if it already would): (plaintext, successor, keys)."""
    old = next((k for k in keys if k.id == key_id), None)
    if old is None:
        raise NoSuchKey(key_id)
    plaintext, successor = mint_key(
        old.platforms,
        requests_per_second=old.requests_per_second,
        records_per_second=old.records_per_second,
        origins=old.origins,
        browser=old.browser,
    )
    successor = replace(successor, rotated_from=old.limit_id)
    ends = now + grace_s
    if old.expires_epoch is not None:
        ends = min(ends, old.expires_epoch)
    dated = change_key(keys, key_id, lambda k: replace(k, expires_at=utc_text(ends)))
    return plaintext, successor, [*dated, successor]


def read_keys_file(path: Path) -> list[ApiKey]:
    """Parse and check the whole file; a missing file is an empty key set."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeysFileError(f"{path}: {exc.strerror}") from exc
    return _parse_keys_file(path, raw)


def _parse_keys_file(path: Path, raw: bytes) -> list[ApiKey]:
    """The keys of the file at `path`, read as `raw`; KeysFileError if they are not valid."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise KeysFileError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeysFileError(f'{path}: expected an object with a "keys" list')
    keys = []
    for index, entry in enumerate(doc["keys"]):
        try:
            keys.append(_key_from_json(entry))
        except InvalidKey as exc:
            raise KeysFileError(f"{path}: keys[{index}]: {exc}") from None
    for field_name in ("id", "sha256"):
        values = [getattr(k, field_name) for k in keys]
        if len(set(values)) != len(values):
            raise KeysFileError(f"{path}: two keys share one {field_name}")
    return keys


def _key_from_json(entry: Any) -> ApiKey:
    """The key an entry of the file describes; InvalidKey if it breaks a rule."""
    if not isinstance(entry, dict) or not set(_REQUIRED) <= set(entry) <= _FIELDS:
        raise InvalidKey(f"expected {', '.join(_REQUIRED)} (and optionally {', '.join(_OPTIONAL)})")
    # JSON has lists where the model has tuples; the model checks all the rest.
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
    return ApiKey(**values)


def write_keys_file(path: Path, keys: list[ApiKey]) -> None:
    """Replace the file atomically, so a gateway reading it never sees half a file."""
    _replace_file(path, {"keys": [asdict(k) for k in keys]})


def _replace_file(path: Path, doc: object) -> None:
    """Write `doc` as JSON to a new file and rename it over `path`, readable by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is on disk only once the directory is: a crash before that could bring
    # the old file back, and with it a key `keys disable` had disabled.
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Flush `directory`'s entries to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (some network and FUSE ones) cannot fsync a directory and say
        # so with EINVAL; a rename there is as durable as they make it. PostgreSQL
        # ignores it too (fsync_fname).
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def update_keys_file(path: Path, change: Callable[[list[ApiKey]], list[ApiKey]]) -> None:
    """Read the file, apply `change` and write the result, all under the file's lock."""
    with _keys_file_lock(path):
        write_keys_file(path, change(read_keys_file(path)))


@contextlib.contextmanager
def _keys_file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<path>.lock`, so changes by two processes never interleave."""
    # A file of its own, never deleted: the keys file is replaced on every write, so a
    # lock on it would be on an inode the next writer no longer opens. The gateway
    # reads without it, since a replace is atomic.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # which releases the lock


def _last_used_path(path: Path) -> Path:
    return path.with_name(path.name + ".last-used.json")


def read_last_used(path: Path) -> dict[str, str]:
    """When each key of the keys file at `path` was last admitted, as far as is known.

    Approximate: the gateway stamps the keys it admitted once a minute (and at shutdown)
    with the time it writes them, so a time is up to a minute late, and it covers the
    hosts that share this file only. A missing or broken file reads as nothing known.
    """
    try:
        doc = orjson.loads(_last_used_path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, str) and _TIME.fullmatch(v)}


def merge_last_used(path: Path, stamps: dict[str, str]) -> None:
    """Merge `stamps` (key id to time) into the last-used file beside the keys file at
    `path`, keeping each key's later time; OSError if it cannot be written."""
    # Under the keys file's lock: every worker of every host sharing the file merges
    # into it, and a read-modify-write that interleaved would lose stamps.
    with _keys_file_lock(path):
        merged = read_last_used(path)
        for key_id, stamp in stamps.items():
            # The times have one fixed format, so as text they sort as times do.
            merged[key_id] = max(stamp, merged.get(key_id, stamp))
        _replace_file(_last_used_path(path), merged)


class KeyStore:
    """Every key of the keys file by hash, reloaded when the file changes.

    Disabled and expired keys are kept too, so that a refusal can say which it was
    without a second digest. A reload swaps in a whole new dict, so a request sees either
    the old set or the new one, never a mix; a file that fails to parse leaves the last
    good set in place. What admits a key is `gateway.auth`, which also adds the id of
    every key it admits to `used`, saved to the last-used file by `watch`.
    """

    def __init__(self, path: Path | None, metrics: Metrics | None = None) -> None:
        self.path = path
        self._metrics = metrics
        self._keys: list[ApiKey] = []
        self._by_hash: dict[str, ApiKey] = {}
        self._active = 0
        # Every active key's origins: a CORS preflight carries no key to look up.
        self.origins: frozenset[str] = frozenset()
        # When the next active key expires, so the counts above can drop it then.
        self._next_expiry: float | None = None
        self._stamp: tuple[int, int, int] | None = None
        # The file could not be looked at last time: reported once per outage.
        self._unreadable = False
        self.used: set[str] = set()
        self._save_failed = False

    def __len__(self) -> int:
        """How many enabled, unexpired keys it holds: the keys that admit requests."""
        return self._active

    def load(self, now: float | None = None) -> None:
        """Read the file now; raise KeysFileError if it is missing or malformed."""
        if self.path is None:
            return
        if not self.path.exists():
            raise KeysFileError(
                f"{self.path} does not exist: create a key with `cafe-gateway keys create`"
            )
        self._stamp = _file_stamp(self.path)
        self._install(read_keys_file(self.path), "loaded", now)

    def lookup(self, plaintext: str) -> ApiKey | None:
        """The key of the file with this plaintext, enabled or not, or None.

        Looked up by the key's SHA-256, never compared as text: how long a lookup takes
        depends on the digest, which tells a caller nothing about any stored key.
        """
        if not plaintext.isascii():
            # Keys are ASCII. aiohttp decodes other header bytes to lone surrogates,
            # which cannot even be encoded for hashing: no key of ours.
            return None
        return self._by_hash.get(hash_key(plaintext))

    def reload_if_changed(self) -> bool:
        """Reload if the file's inode, size or mtime moved; True if a new set is in place.

        A file that cannot be looked at (ESTALE, EIO or EACCES while an NFS volume or a
        Kubernetes Secret is remounted) says nothing about the keys: the last good set
        stays, and the next call looks again.
        """
        if self.path is None:
            return False
        try:
            stamp = _file_stamp(self.path)
            changed = stamp is not None and stamp != self._stamp
            raw = self.path.read_bytes() if changed else b""
        except OSError as exc:
            # The stamp is left as it was, so a change made meanwhile is read once the
            # file can be.
            if not self._unreadable:
                log.error("keeping the last good API keys: cannot read %s: %s", self.path, exc)
                self._count_reload("failed")
                self._unreadable = True
            return False
        if self._unreadable:
            log.info("can read %s again", self.path)
            self._unreadable = False
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # a bad file is reported once, not every second
        if stamp is None:
            log.error("keeping the last good API keys: %s has disappeared", self.path)
            self._count_reload("failed")
            return False
        try:
            keys = _parse_keys_file(self.path, raw)
        except KeysFileError as exc:
            log.error("keeping the last good API keys: %s", exc)
            self._count_reload("failed")
            return False
        self._install(keys, "reloaded")
        self._count_reload("ok")
        return True

    def expire_if_due(self, now: float | None = None) -> None:
        """Drop keys that have expired since the last install from the counts and origins.

        The requests of an expired key are refused whether or not this has run (auth
        checks each key's expiry); this keeps `len` and the CORS origins in step.
        """
        now = time.time() if now is None else now
        if self._next_expiry is not None and now >= self._next_expiry:
            self._install(self._keys, "expired keys out of", now)

    def _install(self, keys: list[ApiKey], verb: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._keys = keys
        self._by_hash = {k.sha256: k for k in keys}
        active = [k for k in keys if k.enabled and not k.expired(now)]
        self._active = len(active)
        self.origins = frozenset(o for k in active for o in k.origins)
        expiries = [k.expires_epoch for k in active if k.expires_epoch is not None]
        self._next_expiry = min(expiries, default=None)
        log.info("%s %d enabled API keys from %s", verb, self._active, self.path)
        if self._metrics is not None:
            self._metrics.keys_loaded.set(self._active)

    def _count_reload(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.key_reloads.labels(result).inc()

    def save_last_used(self, now: float | None = None) -> None:
        """Merge the ids in `used`, stamped `now`, into the last-used file, and forget them.

        Never raises: a keys file on a read-only mount (a Kubernetes Secret) has nowhere
        to keep this, which costs one warning and no request.
        """
        self._merge_last_used(self._take_used(now))

    async def _save_last_used_in_thread(self) -> None:
        """`save_last_used`, with the merge on a thread of its own.

        The merge waits for the keys file's lock, which every worker and `keys` command
        takes, and fsyncs: on the event loop, requests would wait for both.
        """
        stamps = self._take_used()
        if stamps:
            await asyncio.to_thread(self._merge_last_used, stamps)

    def _take_used(self, now: float | None = None) -> dict[str, str]:
        """The ids in `used` stamped `now`, and `used` emptied (on the event loop, where
        requests add to it)."""
        if self.path is None or not self.used:
            return {}
        stamp = utc_text(time.time() if now is None else now)
        used, self.used = self.used, set()
        return dict.fromkeys(used, stamp)

    def _merge_last_used(self, stamps: dict[str, str]) -> None:
        if self.path is None or not stamps:
            return
        try:
            merge_last_used(self.path, stamps)
        except OSError as exc:
            if not self._save_failed:
                log.warning("not keeping when keys were last used (keys last-used file): %s", exc)
                self._save_failed = True

    async def watch(self, interval_s: float = 1.0, save_every_s: float = 60.0) -> None:
        """Poll the file forever (a stat per interval), drop keys as they expire, and save
        the keys used every `save_every_s` and when cancelled; cancel to stop."""
        # The first save comes at a random point of the first interval: the workers of a
        # host start together, and would otherwise all wait for the file's lock at once.
        next_save = time.monotonic() + random.uniform(0, save_every_s)  # noqa: S311 - no secret
        failing = False
        try:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    if not self.reload_if_changed():
                        self.expire_if_due()
                    if time.monotonic() >= next_save:
                        next_save = time.monotonic() + save_every_s
                        await self._save_last_used_in_thread()
                except Exception:
                    # A watcher that ended would leave the keys as they are (a `keys
                    # disable` without effect) until a restart: it logs and goes on, and
                    # a fault that lasts is logged once, not every second.
                    if not failing:
                        log.exception("the API keys watcher failed; it goes on polling")
                    failing = True
                else:
                    failing = False
        finally:
            # At shutdown the watcher is cancelled after the last request is answered.
            await self._save_last_used_in_thread()


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """The file's inode, size and mtime, None if it is missing; OSError if it cannot be
    looked at."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
