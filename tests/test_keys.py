"""API keys: minting, the keys file, the key store (the `keys` commands: test_cli.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import orjson
import pytest

from gateway.keys import (
    KeysFileError,
    KeyStore,
    hash_key,
    mint_key,
    read_keys_file,
    write_keys_file,
)
from tests.keys import KeyFile


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
