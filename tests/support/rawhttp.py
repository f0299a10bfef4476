"""Raw HTTP/1.1 over a socket, for tests about bytes and connections no client sends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson


class Answer:
    """A response as read off the socket."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One response: status line, headers (names in lower case), Content-Length body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split()[1]), headers, body)


class Connection:
    """One keep-alive client connection, spoken to in raw HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def ask(self, request: bytes) -> Answer:
        self.writer.write(request)
        return await read_answer(self.reader)

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), timeout=5) == b""

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[Connection]:
    conn = Connection(*await asyncio.open_connection("127.0.0.1", port))
    try:
        yield conn
    finally:
        conn.close()
