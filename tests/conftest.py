"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.keys import KeyFile, make_key_file


@pytest.fixture
def key_file(tmp_path: Path) -> KeyFile:
    """A keys file with one enabled key for the platform analytics-portal."""
    return make_key_file(tmp_path)
