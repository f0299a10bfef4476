"""An asyncio event loop on a virtual clock: timeouts of seconds pass in no real time.

`VirtualTimeLoop.time()` is a clock of its own, starting at 0. Whenever nothing is ready
to run, the clock jumps to the next timer instead of sleeping until it, so a test of
timeouts and retries is fast and runs the same way every time.

Work handed to a thread (`run_in_executor`: the spool's SQLite thread) runs on that
thread for real, but takes a virtual time of its own (`executor_latency`, one job after
another per executor, as a disk serves them). Its result is handed back when the clock
reaches that time, like a timer's; if the thread has not really finished by then, the
loop really waits for it. So callbacks interleave with disk work as they would with a
disk that takes that long, always in the same order, and however long the thread
really takes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

# How long the loop waits for a thread in real time before it calls it a hang.
_REAL_LIMIT_S = 60.0


class Deadlock(RuntimeError):
    """Nothing is ready, no timer is set and no thread works: the loop would wait forever."""


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, executor_latency: float = 0.001) -> None:
        super().__init__()
        self.executor_latency = executor_latency
        self._now = 0.0
        # Thread work not yet handed back: (due, order, its thread's future, the loop's).
        self._jobs: list[tuple[float, int, concurrent.futures.Future[Any], asyncio.Future[Any]]]
        self._jobs = []
        self._order = itertools.count()
        # When each executor's thread is free again, in virtual time.
        self._free_at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._idle: asyncio.Future[None] | None = None
        # The selector has no file descriptors but the loop's own self-pipe: select() is
        # where the loop would sleep, so that is where the clock moves.
        self._real_select = self._selector.select  # type: ignore[attr-defined]
        self._selector.select = self._select  # type: ignore[attr-defined]

    def time(self) -> float:
        return self._now

    @property
    def jobs(self) -> int:
        """Thread work whose result the loop has not handed back yet."""
        return len(self._jobs)

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., _T], *args: Any
    ) -> asyncio.Future[_T]:
        if executor is None:
            # Nothing under test uses the default executor: keep its real-time behaviour.
            return super().run_in_executor(executor, func, *args)
        work = executor.submit(func, *args)
        future: asyncio.Future[_T] = self.create_future()
        due = max(self._now, self._free_at.get(executor, 0.0)) + self.executor_latency
        self._free_at[executor] = due
        heapq.heappush(self._jobs, (due, next(self._order), work, future))
        return future

    def run_for(self, seconds: float) -> None:
        """Let `seconds` of virtual time pass, then run what is due at that instant."""
        self.run_until_complete(asyncio.sleep(seconds))
        self.run_until_idle()

    def run_until_idle(self) -> None:
        """Run everything that can run without the clock moving, then wait (really) for
        every thread to finish what it was given, so the files they write are still."""
        self._idle = self.create_future()
        try:
            self.run_until_complete(self._idle)
        finally:
            self._idle = None

    def _select(self, timeout: float | None) -> list[Any]:
        events: list[Any] = self._real_select(0)
        if timeout == 0 or events:
            return events  # callbacks are ready: they run first, at this instant
        next_timer = None if timeout is None else self._now + timeout
        if self._jobs and (self._jobs[0][0] <= self._now or self._idle is None):
            due, _, work, future = self._jobs[0]
            if next_timer is None or due <= next_timer:
                heapq.heappop(self._jobs)
                _wait(work)
                self._now = max(self._now, due)
                _hand_back(work, future)
                return []
        if self._idle is not None:
            for _, _, work, _ in self._jobs:
                _wait(work)
            if not self._idle.done():
                self._idle.set_result(None)
            return []
        if next_timer is None:
            raise Deadlock("nothing to run, no timer set and no thread working")
        self._now = next_timer
        return []


def _wait(work: concurrent.futures.Future[Any]) -> None:
    done, _ = concurrent.futures.wait([work], timeout=_REAL_LIMIT_S)
    if not done:
        raise RuntimeError(f"thread work did not finish within {_REAL_LIMIT_S}s (real time)")


def _hand_back(work: concurrent.futures.Future[Any], future: asyncio.Future[Any]) -> None:
    if future.done():  # cancelled: its task is gone
        return
    if work.cancelled():
        future.cancel()
    elif (error := work.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(work.result())
