"""Waiting in a test: for a condition to come true, and for work run alongside it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

import pytest

# A condition to wait for: a function returning whether it holds, or a coroutine
# function returning that.
Check = Callable[[], bool | Awaitable[bool]]


async def holds_within(check: Check, seconds: float, *, every: float = 0.1) -> bool:
    """Whether `check` comes true within `seconds`, asked every `every` seconds (the
    event loop runs in between)."""
    deadline = time.monotonic() + seconds
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)


async def eventually(check: Check, *, within: float = 30.0) -> None:
    """Wait until `check` is true; fail the test after `within` seconds (a deadline, not
    a timing)."""
    if not await holds_within(check, within):
        pytest.fail(f"condition not met within {within}s")


@contextlib.asynccontextmanager
async def at_work(
    workers: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]],
) -> AsyncIterator[None]:
    """Each of `workers` running as a task for the block, given an event set when it
    ends. Then each finishes what it has in hand (a sender retries its batch until it
    gets an answer it takes), within 60 s; if the block fails, every one is cancelled."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(work(stop)) for work in workers]
    try:
        yield
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
