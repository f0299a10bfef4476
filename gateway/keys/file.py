"""The keys file and its last-used stamps, each replaced atomically under one lock.

The file is JSON, replaced atomically and readable by its owner only; every change is
made under a lock on `<file>.lock` beside it:

    {"keys": [{"id": "k_3f9a1c0b2e7d", "sha256": "<64 hex>",
               "platforms": ["analytics-portal"], "enabled": true,
               "created": "2026-11-26T10:00:00Z", "expires_at": null}]}

A key may also hold "client_ip" (see `ApiKey`), written only when set.

When keys were last used is kept beside it, in `<keys file>.last-used.json`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import orjson

from gateway.keys.model import ApiKey, InvalidKey, KeysFileError, is_utc_text, key_from_json


def read_keys_file(path: Path) -> list[ApiKey]:
    """Parse and check the whole file; a missing file is an empty key set."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeysFileError(f"{path}: {exc.strerror}") from exc
    return parse_keys_file(path, raw)


def parse_keys_file(path: Path, raw: bytes) -> list[ApiKey]:
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
            keys.append(key_from_json(entry))
        except InvalidKey as exc:
            raise KeysFileError(f"{path}: keys[{index}]: {exc}") from None
    for field_name in ("id", "sha256"):
        values = [getattr(k, field_name) for k in keys]
        if len(set(values)) != len(values):
            raise KeysFileError(f"{path}: two keys share one {field_name}")
    return keys


# Fields added since the file's first form, written only when set: a file where no key
# sets them stays readable by gateways older than them (during an upgrade, say), which
# refuse a field they do not know.
_WRITTEN_WHEN_SET = ("client_ip",)


def write_keys_file(path: Path, keys: list[ApiKey]) -> None:
    """Replace the file atomically, so a gateway reading it never sees half a file."""
    _replace_file(path, {"keys": [_entry(k) for k in keys]})


def _entry(key: ApiKey) -> dict[str, object]:
    entry = asdict(key)
    for name in _WRITTEN_WHEN_SET:
        if entry[name] is None:
            del entry[name]
    return entry


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
    return {k: v for k, v in doc.items() if isinstance(v, str) and is_utc_text(v)}


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
