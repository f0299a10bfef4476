"""One gateway process: the limits and collector settings `serve` applies at start."""

from __future__ import annotations

import gc
import logging
import resource
from collections.abc import Iterator

import pytest

from gateway import server


@pytest.fixture
def file_limit() -> Iterator[tuple[int, int]]:
    """Restores the soft limit on open files that a test changes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield soft, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_file_limit_is_raised_to_fit_the_cap(file_limit: tuple[int, int]) -> None:
    _, hard = file_limit
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"the hard limit ({hard}) leaves no room to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    server._raise_file_limit(1500)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 1500 + server._SPARE_FILES


def test_a_cap_past_the_hard_limit_is_warned_about(
    file_limit: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, hard = file_limit
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files")
    with caplog.at_level(logging.WARNING, logger="gateway.server"):
        server._raise_file_limit(hard)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    assert "CAFE_MAX_CONNECTIONS" in caplog.text


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Restores the collector's thresholds and unfreezes what a test froze."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_gc_freezes_what_start_up_made_and_collects_less_often(gc_state: None) -> None:
    made_at_start = {"a": [1, 2, 3]}
    server.tune_gc()
    assert gc.get_freeze_count() > 0
    # Frozen objects are out of every generation: no collection will scan them.
    assert not any(made_at_start is obj for obj in gc.get_objects())
    assert gc.get_threshold()[0] == 10_000
