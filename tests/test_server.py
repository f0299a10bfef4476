"""One gateway process: the limits, collector and allocator settings `serve` applies at start."""

from __future__ import annotations

import ctypes
import gc
import logging
import resource
import subprocess
import sys
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


# Counts the buffers of three MiB that glibc served from an mmap of their own
# (mallinfo2's hblks), in a fresh process: the thresholds are process-wide, and
# cannot be read back.
_COUNT_MMAPPED = """
import ctypes, sys
from gateway import server

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
tuned = sys.argv[1] == "tuned" and server.tune_malloc()
before = mallinfo2().hblks
held = [bytearray(3 * 1024 * 1024) for _ in range(4)]
print(tuned, mallinfo2().hblks - before)
"""


def _mmapped(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _COUNT_MMAPPED, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_tune_malloc_serves_request_sized_buffers_from_the_heap() -> None:
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33 or later: no mallinfo2 to count mmapped buffers")
    assert _mmapped("default") == ("False", 4)  # the default threshold is 128 KiB
    assert _mmapped("tuned") == ("True", 0)
