"""The `ApiKey` model and its rules: minting, importing, disabling and rotating keys.

A key's plaintext is shown once, when it is minted, and never stored; a key brought
from elsewhere (`import_key`) must be strong enough to be kept that way.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

from gateway.config import CLIENT_IP_MODES
from gateway.keys.strength import check_key_strength

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


def is_utc_text(text: str) -> bool:
    """Whether `text` is a time as the files write it."""
    return _TIME.fullmatch(text) is not None


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
    # Rate limits (None: unlimited); see gateway/limits/local.py.
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
    # What is kept of the caller's address beside this key's records (full, truncated,
    # hashed or off), or None: the gateway's CAFE_CLIENT_IP.
    client_ip: str | None = None

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

    def may_write(self, platform: str) -> bool:
        """Whether records of `platform` (their productPlatform) may be sent with the key."""
        return platform in self.platforms

    def state(self, now: float | None = None) -> str:
        """What the key does at `now` (an epoch; the clock's time if None): "enabled"
        (it admits requests), "disabled" or "expired". Every check of a key is this one.

        A key without an expiry reads no clock; one with it a clock read and a float
        compare, its expiry parsed once when the file was loaded: the gateway asks on
        every request.
        """
        if not self.enabled:
            return "disabled"
        expires = self.expires_epoch
        if expires is not None and (time.time() if now is None else now) >= expires:
            return "expired"
        return "enabled"

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
        if self.client_ip is not None and self.client_ip not in CLIENT_IP_MODES:
            raise InvalidKey(f"client_ip must be one of {', '.join(CLIENT_IP_MODES)}, or null")
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


def key_from_json(entry: Any) -> ApiKey:
    """The key an entry of the file describes; InvalidKey if it breaks a rule."""
    if not isinstance(entry, dict) or not set(_REQUIRED) <= set(entry) <= _FIELDS:
        raise InvalidKey(f"expected {', '.join(_REQUIRED)} (and optionally {', '.join(_OPTIONAL)})")
    # JSON has lists where the model has tuples; the model checks all the rest.
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
    return ApiKey(**values)


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
    (WeakKey, from `gateway.keys.strength`) or the record breaks a rule of `ApiKey`."""
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
    successor = replace(successor, rotated_from=old.limit_id, client_ip=old.client_ip)
    ends = now + grace_s
    if old.expires_epoch is not None:
        ends = min(ends, old.expires_epoch)
    dated = change_key(keys, key_id, lambda k: replace(k, expires_at=utc_text(ends)))
    return plaintext, successor, [*dated, successor]
