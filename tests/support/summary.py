"""Lines a test has printed at the end of the run, where `make test` shows them."""

from __future__ import annotations

import pytest

SUMMARY_LINES = pytest.StashKey[list[str]]()


def summarise(config: pytest.Config, line: str) -> None:
    """Have `line` printed at the end of the run, where `make test` shows it (pytest
    captures what a test prints)."""
    config.stash.setdefault(SUMMARY_LINES, []).append(line)
