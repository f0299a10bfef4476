"""Waits between tries that fail: from a first delay, doubling, up to a last one."""

from __future__ import annotations


class Backoff:
    """The wait before each next try of something that keeps failing; a success starts
    over from the first."""

    __slots__ = ("delay", "first", "last")

    def __init__(self, first: float, last: float) -> None:
        self.first = first
        self.last = last
        self.delay = first

    def failed(self) -> float:
        """A try failed: the wait before the next; the one after is twice as long, up to
        `last`."""
        delay = self.delay
        self.delay = min(delay * 2, self.last)
        return delay

    def succeeded(self) -> None:
        self.delay = self.first
