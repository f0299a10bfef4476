"""API keys: the `ApiKey` model and its rules, the keys file, and the in-memory `KeyStore`.

The file is JSON, replaced atomically and readable by its owner only; every change is
made under a lock on `<file>.lock` beside it:

    {"keys": [{"id": "k_3f9a1c0b2e7d", "sha256": "<64 hex>",
               "platforms": ["analytics-portal"], "enabled": true,
               "created": "2026-11-26T10:00:00Z"}]}

A key's plaintext is shown once, when it is minted, and never stored. The gateway holds
every key of the file in memory as a dict by hash, so finding a key costs one SHA-256
and one lookup, and polls the file for changes once a second. Nothing here knows HTTP:
the CLI and the benchmark use this module alone; what a key admits is `gateway.auth`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.metrics import Metrics

log = logging.getLogger(__name__)

_ID = re.compile(r"k_[0-9a-f]{12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Same shape the record schemas allow for productPlatform.
_PLATFORM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A web origin as browsers send it: scheme, host, optional port; no path, no slash.
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


class InvalidKey(ValueError):
    """A key breaks one of the rules of `ApiKey`."""


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
    record = ApiKey(
        id="k_" + secrets.token_hex(6),
        sha256=hash_key(plaintext),
        platforms=tuple(dict.fromkeys(platforms)),
        enabled=True,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        requests_per_second=requests_per_second,
        records_per_second=records_per_second,
        origins=tuple(dict.fromkeys(origins)),
        browser=browser,
    )
    return plaintext, record


def disable_key(keys: list[ApiKey], key_id: str) -> list[ApiKey]:
    """The same keys with `key_id` disabled; KeyError if no key has that id."""
    if key_id not in {k.id for k in keys}:
        raise KeyError(key_id)
    return [replace(k, enabled=False) if k.id == key_id else k for k in keys]


def read_keys_file(path: Path) -> list[ApiKey]:
    """Parse and check the whole file; a missing file is an empty key set."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeysFileError(f"{path}: {exc.strerror}") from exc
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
    doc = {"keys": [asdict(k) for k in keys]}
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


class KeyStore:
    """Every key of the keys file by hash, reloaded when the file changes.

    Disabled keys are kept too, so that a refusal can say which it was without a second
    digest. A reload swaps in a whole new dict, so a request sees either the old set or
    the new one, never a mix; a file that fails to parse leaves the last good set in place.
    """

    def __init__(self, path: Path | None, metrics: Metrics | None = None) -> None:
        self.path = path
        self._metrics = metrics
        self._by_hash: dict[str, ApiKey] = {}
        self._enabled = 0
        # Every enabled key's origins: a CORS preflight carries no key to look up.
        self.origins: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        """How many enabled keys it holds: the keys that admit requests."""
        return self._enabled

    def load(self) -> None:
        """Read the file now; raise KeysFileError if it is missing or malformed."""
        if self.path is None:
            return
        if not self.path.exists():
            raise KeysFileError(
                f"{self.path} does not exist: create a key with `cafe-gateway keys create`"
            )
        self._stamp = _file_stamp(self.path)
        self._install(read_keys_file(self.path), "loaded")

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
        """Reload if the file's inode, size or mtime moved; True if a new set is in place."""
        if self.path is None:
            return False
        stamp = _file_stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # a bad file is reported once, not every second
        if stamp is None:
            log.error("keeping the last good API keys: %s has disappeared", self.path)
            self._count_reload("failed")
            return False
        try:
            keys = read_keys_file(self.path)
        except KeysFileError as exc:
            log.error("keeping the last good API keys: %s", exc)
            self._count_reload("failed")
            return False
        self._install(keys, "reloaded")
        self._count_reload("ok")
        return True

    def _install(self, keys: list[ApiKey], verb: str) -> None:
        self._by_hash = {k.sha256: k for k in keys}
        enabled = [k for k in keys if k.enabled]
        self._enabled = len(enabled)
        self.origins = frozenset(o for k in enabled for o in k.origins)
        log.info("%s %d enabled API keys from %s", verb, self._enabled, self.path)
        if self._metrics is not None:
            self._metrics.keys_loaded.set(self._enabled)

    def _count_reload(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.key_reloads.labels(result).inc()

    async def watch(self, interval_s: float = 1.0) -> None:
        """Poll the file forever (a stat per interval); cancel to stop."""
        while True:
            await asyncio.sleep(interval_s)
            self.reload_if_changed()


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
