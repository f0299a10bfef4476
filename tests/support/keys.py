"""A keys file holding freshly minted keys, and the headers a request sends one in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.keys.file import update_keys_file, write_keys_file
from gateway.keys.model import ApiKey, disable_key, mint_key


@dataclass
class KeyFile:
    """A keys file and the plaintext of its first key (platform analytics-portal)."""

    path: Path
    key: str
    record: ApiKey

    def add(
        self, *platforms: str, origins: tuple[str, ...] = (), browser: bool = False
    ) -> tuple[str, ApiKey]:
        """Mint another key into the file; returns its plaintext and record."""
        plaintext, record = mint_key(platforms, origins=origins, browser=browser)
        update_keys_file(self.path, lambda keys: [*keys, record])
        return plaintext, record

    def disable(self, key_id: str) -> None:
        update_keys_file(self.path, lambda keys: disable_key(keys, key_id))


def make_key_file(directory: Path) -> KeyFile:
    path = directory / "keys.json"
    plaintext, record = mint_key(("analytics-portal",))
    write_keys_file(path, [record])
    return KeyFile(path, plaintext, record)


def json_headers(key: str) -> dict[str, str]:
    """The headers of a request that sends records as JSON with the API key `key`."""
    return {"x-api-key": key, "Content-Type": "application/json"}
