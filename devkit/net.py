"""Loopback ports nothing listens on, for the servers tests and benchmarks start."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports nothing listens on right now.

    All are held open together while chosen: asked one after the other, the kernel may
    hand out the same just-released port twice.
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
