"""The in-memory `KeyStore`: every key of the keys file by hash, reloaded on change.

Finding a key costs one SHA-256 and one lookup; the file is polled for changes once a
second. The store notes which keys were admitted and, about once a minute, merges when
into the last-used file. Nothing here knows HTTP: the CLI and the benchmark use this
package alone; what a key admits is `gateway.http.auth`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

from gateway.keys.file import merge_last_used, parse_keys_file, read_keys_file
from gateway.keys.metrics import KeyMetrics
from gateway.keys.model import ApiKey, KeysFileError, hash_key, utc_text
from gateway.metrics import Metrics

log = logging.getLogger(__name__)


class KeyStore:
    """Every key of the keys file by hash, reloaded when the file changes.

    Disabled and expired keys are kept too, so that a refusal can say which it was
    without a second digest. A reload swaps in a whole new dict, so a request sees either
    the old set or the new one, never a mix; a file that fails to parse leaves the last
    good set in place. What admits a key is `gateway.http.auth`, which also adds the id of
    every key it admits to `used`, saved to the last-used file by `watch`.
    """

    def __init__(
        self, path: Path | None, metrics: Metrics | None = None, *, can_hash_client_ip: bool = False
    ) -> None:
        """`can_hash_client_ip`: whether the gateway has a secret to hash addresses with
        (CAFE_CLIENT_IP_HASH_KEY_FILE); without one, a file with a key that asks for
        hashed addresses is refused, as a malformed one is."""
        self.path = path
        self._can_hash_client_ip = can_hash_client_ip
        self._metrics = KeyMetrics(metrics.registry) if metrics is not None else None
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
        self._install(self._checked(read_keys_file(self.path)), "loaded", now)

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
            keys = self._checked(parse_keys_file(self.path, raw))
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

    def _checked(self, keys: list[ApiKey]) -> list[ApiKey]:
        """`keys`, if this gateway can serve every one of them; KeysFileError otherwise."""
        if not self._can_hash_client_ip:
            for key in keys:
                if key.client_ip == "hashed":
                    raise KeysFileError(
                        f"{self.path}: key {key.id} asks for hashed client addresses, but no "
                        "secret to hash them with is set (CAFE_CLIENT_IP_HASH_KEY_FILE)"
                    )
        return keys

    def _install(self, keys: list[ApiKey], verb: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._keys = keys
        self._by_hash = {k.sha256: k for k in keys}
        active = [k for k in keys if k.state(now) == "enabled"]
        self._active = len(active)
        self.origins = frozenset(o for k in active for o in k.origins)
        expiries = [k.expires_epoch for k in active if k.expires_epoch is not None]
        self._next_expiry = min(expiries, default=None)
        log.info("%s %d enabled API keys from %s", verb, self._active, self.path)
        if self._metrics is not None:
            self._metrics.loaded.set(self._active)

    def _count_reload(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.reloads.labels(result).inc()

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
