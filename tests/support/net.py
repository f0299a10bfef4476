"""Loopback networking: consecutive free ports, and a TCP forwarder a test opens at will."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from pathlib import Path

from devkit.net import free_port


def consecutive_free_ports(count: int) -> list[int]:
    """`count` consecutive loopback ports nothing listens on right now (a Kafka cluster's
    brokers take consecutive ports).

    Drawn below the kernel's ephemeral range, where it never picks the local port of an
    outgoing connection: one of the cluster's own connections cannot take a port
    between this check and the JVM binding it, seconds later.
    """
    first_ephemeral = _ephemeral_ports()[0]
    for _ in range(100):
        first = random.randrange(10_000, first_ephemeral - count)
        ports = list(range(first, first + count))
        with contextlib.ExitStack() as stack:
            try:
                for port in ports:
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return ports
    raise RuntimeError(f"found no {count} consecutive free ports below {first_ephemeral}")


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux's default if
    it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return 32768, 60999
    return int(low), int(high)


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target` (host:port) once opened.

    Pointing the gateway's bootstrap at it lets a test show Kafka "appearing": before
    `open()` the port refuses connections, after it every connection reaches the broker.
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
