"""A keys file holding freshly minted keys, for tests that need an API key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway import auth


@dataclass
class KeyFile:
    """A keys file and the plaintext of its first key (platform analytics-portal)."""

    path: Path
    key: str
    record: auth.ApiKey

    def add(
        self, *platforms: str, origins: tuple[str, ...] = (), browser: bool = False
    ) -> tuple[str, auth.ApiKey]:
        """Mint another key into the file; returns its plaintext and record."""
        plaintext, record = auth.mint_key(platforms, origins=origins, browser=browser)
        auth.update_keys_file(self.path, lambda keys: [*keys, record])
        return plaintext, record

    def disable(self, key_id: str) -> None:
        auth.update_keys_file(self.path, lambda keys: auth.disable_key(keys, key_id))


def make_key_file(directory: Path) -> KeyFile:
    path = directory / "keys.json"
    plaintext, record = auth.mint_key(("analytics-portal",))
    auth.write_keys_file(path, [record])
    return KeyFile(path, plaintext, record)
