"""API keys: the keys file (hashes only), the in-memory key set, and the key check.

The file is JSON, replaced atomically and readable by its owner only; every change is
made under a lock on `<file>.lock` beside it:

    {"keys": [{"id": "k_3f9a1c0b2e7d", "sha256": "<64 hex>",
               "platforms": ["analytics-portal"], "enabled": true,
               "created": "2026-11-26T10:00:00Z"}]}

A key's plaintext is shown once, when it is minted, and never stored. The gateway
holds the file in memory as a dict by hash, so checking a key costs one SHA-256 and
one lookup, and polls the file for changes once a second.
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
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import (
    InvalidApiKey,
    MissingApiKey,
    NotABrowserKey,
    OriginNotAllowed,
    WriteOnlyKey,
)
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

_ID = re.compile(r"k_[0-9a-f]{12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Same shape the record schemas allow for productPlatform.
_PLATFORM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A web origin as browsers send it: scheme, host, optional port; no path, no slash.
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


class KeysFileError(ValueError):
    """The keys file cannot be read or does not have the expected shape."""


@dataclass(frozen=True)
class ApiKey:
    """One key as stored: its id, hash, the platforms it may write, and whether it works."""

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


# The key a request was admitted with, set by the middleware for handlers to read.
API_KEY: web.RequestKey[ApiKey] = web.RequestKey("api_key", ApiKey)


def hash_key(plaintext: str) -> str:
    """The hex SHA-256 of a key, which is all the keys file holds of it."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def check_origin(origin: str) -> str:
    """Return `origin` if it is a web origin (scheme://host[:port]), else raise ValueError."""
    if not _ORIGIN.fullmatch(origin):
        raise ValueError(f"{origin!r} is not an origin like https://app.example.com[:port]")
    return origin


def check_platform(name: str) -> str:
    """Return `name` if it is a valid productPlatform, else raise ValueError."""
    if not _PLATFORM.fullmatch(name):
        raise ValueError(f"{name!r} is not a platform name (letters, digits, '._-', <= 64)")
    return name


def mint_key(
    platforms: tuple[str, ...],
    *,
    requests_per_second: float | None = None,
    records_per_second: float | None = None,
    origins: tuple[str, ...] = (),
    browser: bool = False,
) -> tuple[str, ApiKey]:
    """A new random key: (plaintext to show once, record to store)."""
    if not platforms:
        raise ValueError("a key needs at least one platform")
    for name in platforms:
        check_platform(name)
    for origin in origins:
        check_origin(origin)
    if browser and not origins:
        raise ValueError("a browser key needs at least one origin")
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
    keys = [_parse_key(path, i, entry) for i, entry in enumerate(doc["keys"])]
    for field_name in ("id", "sha256"):
        values = [getattr(k, field_name) for k in keys]
        if len(set(values)) != len(values):
            raise KeysFileError(f"{path}: two keys share one {field_name}")
    return keys


_REQUIRED = {"id", "sha256", "platforms", "enabled", "created"}
_LIMITS = ("requests_per_second", "records_per_second")
_OPTIONAL = {*_LIMITS, "origins", "browser"}


def _parse_key(path: Path, index: int, entry: Any) -> ApiKey:
    where = f"{path}: keys[{index}]"
    if not isinstance(entry, dict) or not _REQUIRED <= set(entry) <= _REQUIRED | _OPTIONAL:
        raise KeysFileError(
            f"{where}: expected id, sha256, platforms, enabled, created "
            f"(and optionally {', '.join(sorted(_OPTIONAL))})"
        )
    if not isinstance(entry["id"], str) or not _ID.fullmatch(entry["id"]):
        raise KeysFileError(f"{where}: id must look like k_ and 12 hex digits")
    if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
        raise KeysFileError(f"{where}: sha256 must be 64 lowercase hex digits")
    platforms = entry["platforms"]
    if (
        not isinstance(platforms, list)
        or not platforms
        or not all(isinstance(p, str) and _PLATFORM.fullmatch(p) for p in platforms)
    ):
        raise KeysFileError(f"{where}: platforms must be a non-empty list of platform names")
    if not isinstance(entry["enabled"], bool):
        raise KeysFileError(f"{where}: enabled must be true or false")
    if not isinstance(entry["created"], str):
        raise KeysFileError(f"{where}: created must be a string")
    for limit in _LIMITS:
        value = entry.get(limit)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
        ):
            raise KeysFileError(f"{where}: {limit} must be a positive number or null")
    origins = entry.get("origins", [])
    if not isinstance(origins, list) or not all(
        isinstance(o, str) and _ORIGIN.fullmatch(o) for o in origins
    ):
        raise KeysFileError(f"{where}: origins must be a list of origins like https://host[:port]")
    browser = entry.get("browser", False)
    if not isinstance(browser, bool) or (browser and not origins):
        raise KeysFileError(f"{where}: browser must be true or false, and true needs origins")
    return ApiKey(
        id=entry["id"],
        sha256=entry["sha256"],
        platforms=tuple(platforms),
        enabled=entry["enabled"],
        created=entry["created"],
        requests_per_second=entry.get("requests_per_second"),
        records_per_second=entry.get("records_per_second"),
        origins=tuple(origins),
        browser=browser,
    )


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


def disable_key(keys: list[ApiKey], key_id: str) -> list[ApiKey]:
    """The same keys with `key_id` disabled; KeyError if no key has that id."""
    if key_id not in {k.id for k in keys}:
        raise KeyError(key_id)
    return [replace(k, enabled=False) if k.id == key_id else k for k in keys]


class KeyStore:
    """The enabled keys by hash, reloaded when the keys file changes.

    A reload swaps in a whole new dict, so a request sees either the old set or the new
    one, never a mix; a file that fails to parse leaves the last good set in place.
    """

    def __init__(self, path: Path | None, metrics: Metrics | None = None) -> None:
        self.path = path
        self._metrics = metrics
        self._by_hash: dict[str, ApiKey] = {}
        self._disabled: frozenset[str] = frozenset()  # hashes, to say why a key is refused
        # Every enabled key's origins: a CORS preflight carries no key to look up.
        self.origins: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self._by_hash)

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
        """The enabled key with this plaintext, or None.

        Looked up by the key's SHA-256, never compared as text: how long a lookup takes
        depends on the digest, which tells a caller nothing about any stored key.
        """
        if not plaintext.isascii():
            # Keys are ASCII. aiohttp decodes other header bytes to lone surrogates,
            # which cannot even be encoded for hashing: no key of ours.
            return None
        return self._by_hash.get(hash_key(plaintext))

    def is_disabled(self, plaintext: str) -> bool:
        """True if this is a key of the file that has been disabled."""
        return plaintext.isascii() and hash_key(plaintext) in self._disabled

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
        self._by_hash = {k.sha256: k for k in keys if k.enabled}
        self._disabled = frozenset(k.sha256 for k in keys if not k.enabled)
        self.origins = frozenset(o for k in keys if k.enabled for o in k.origins)
        log.info("%s %d enabled API keys from %s", verb, len(self._by_hash), self.path)
        if self._metrics is not None:
            self._metrics.keys_loaded.set(len(self._by_hash))

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


# Under /v1 every route needs a key except these, which clients and tooling fetch freely.
_PUBLIC_PREFIXES = ("/v1/schema/", "/v1/openapi.json")


def api_key_middleware(
    keys: KeyStore, metrics: Metrics, ingest_paths: frozenset[str]
) -> Middleware:
    """A middleware that admits /v1 requests carrying an enabled key in `x-api-key`.

    On `ingest_paths` a browser key may come as `?api_key=` instead. A request with an
    `Origin` (from a web page) is admitted only if the key lists that origin. Refusals
    are counted by reason; an unknown key and a disabled one get the same answer.
    """

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/") and not request.path.startswith(_PUBLIC_PREFIXES):
            sends_records = request.method == "POST" and request.path in ingest_paths
            supplied = request.headers.get("x-api-key")
            in_query = not supplied and sends_records and "api_key" in request.query
            if in_query:
                supplied = request.query["api_key"]
            if not supplied:
                metrics.auth_failures.labels("missing").inc()
                raise MissingApiKey("send an API key in the x-api-key header")
            key = keys.lookup(supplied)
            if key is None:
                reason = "disabled" if keys.is_disabled(supplied) else "unknown"
                metrics.auth_failures.labels(reason).inc()
                raise InvalidApiKey("the API key is unknown or disabled")
            # Set before the browser checks, so that a refusal is logged with the key's id
            # and its answer carries CORS headers only for the key's own origins.
            request[API_KEY] = key
            _check_browser_use(key, request, sends_records=sends_records, in_query=in_query)
        return await handler(request)

    def _check_browser_use(
        key: ApiKey, request: web.Request, *, sends_records: bool, in_query: bool
    ) -> None:
        origin = request.headers.get("Origin")
        if in_query and not key.browser:
            metrics.auth_failures.labels("not_browser_key").inc()
            raise NotABrowserKey("only a browser key may be sent as ?api_key=")
        if in_query and origin is None:
            metrics.auth_failures.labels("origin").inc()
            raise OriginNotAllowed("?api_key= is accepted only from a web page (no Origin sent)")
        if origin is not None and origin not in key.origins:
            metrics.auth_failures.labels("origin").inc()
            raise OriginNotAllowed(f"this API key may not be used from origin {origin!r}")
        if key.browser and not sends_records:
            metrics.auth_failures.labels("browser_read").inc()
            raise WriteOnlyKey("a browser key may only send records")

    return check_api_key
