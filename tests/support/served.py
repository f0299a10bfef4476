"""Gateways run as `cafe-gateway serve` processes: started, asked, watched and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import psutil
from aiohttp.test_utils import TestClient

from gateway.config import TopicSettings
from tests.support.kafka import Broker
from tests.support.keys import KeyFile

# The partitions of the topics a served gateway creates (CAFE_TOPIC_PARTITIONS' default).
GATEWAY_PARTITIONS = TopicSettings().partitions


class Served:
    """A `cafe-gateway serve` process whose output is read as it comes.

    Read all along, not only at exit: a gateway that fills its stderr pipe blocks on
    its next log line.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._output = bytearray()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self._output.extend(chunk)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def finish(self) -> str:
        """Wait (at most 30 s) for the process to exit; returns everything it wrote."""
        await asyncio.wait_for(self.proc.wait(), timeout=30)
        await self._reader
        return self._output.decode(errors="replace")

    async def stop(self) -> str:
        """SIGTERM, then check that it exits 0; returns everything it wrote."""
        self.send_signal(signal.SIGTERM)
        output = await self.finish()
        assert self.returncode == 0, output
        return output

    async def kill(self) -> None:
        """Kill the process and its workers (which would otherwise keep the pipe open)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        await self.proc.wait()
        await self._reader


async def serve(env: dict[str, str]) -> Served:
    """Start `cafe-gateway serve` with `env` over the test's own environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # a process group of its own, for kill()
    )
    return Served(proc)


@contextlib.asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[Served]:
    """`serve`, killed on the way out unless the test has stopped it."""
    proc = await serve(env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            await proc.kill()


@contextlib.asynccontextmanager
async def serving(
    env: dict[str, str], client_timeout_s: float | None = None
) -> AsyncIterator[tuple[Served, aiohttp.ClientSession]]:
    """`running(env)`, and a client session to its port, once /readyz has said 200."""
    timeout = aiohttp.ClientTimeout(total=client_timeout_s)
    async with (
        running(env) as gateway,
        aiohttp.ClientSession(f"http://127.0.0.1:{env['CAFE_PORT']}", timeout=timeout) as http,
    ):
        await ready_in_a_row(http, 1)
        yield gateway, http


async def ready_in_a_row(http: aiohttp.ClientSession, times: int) -> None:
    """Wait until /readyz answers 200 `times` times in a row, each on a new connection
    (so that, with several workers, every one of them is asked); fail after 30 s."""
    deadline = time.monotonic() + 30
    good = 0
    while good < times:
        assert time.monotonic() < deadline, f"not ready {times} times in a row within 30s"
        try:
            async with http.get("/readyz", headers={"Connection": "close"}) as resp:
                good = good + 1 if resp.status == 200 else 0
        except aiohttp.ClientConnectionError:
            good = 0
        await asyncio.sleep(0.1)


def gateway_env(
    port: int, kafka: Broker, key_file: KeyFile, prefix: str, **more: str
) -> dict[str, str]:
    """A serve environment on `port` whose topics all start with `prefix`."""
    return {
        "CAFE_PORT": str(port),
        "CAFE_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "CAFE_KEYS_FILE": str(key_file.path),
        **{f"CAFE_TOPIC_{t.upper()}": f"{prefix}.{t}" for t in ("activity", "log", "profile")},
        "CAFE_TOPIC_DEADLETTER": f"{prefix}.deadletter",
        **more,
    }


def spool_env(
    port: int, bootstrap: str, key_file: KeyFile, prefix: str, spool: Path
) -> dict[str, str]:
    """`gateway_env` on the broker at `bootstrap` (a test's own), with the spool in `spool`."""
    return gateway_env(
        port, Broker(bootstrap, "spare broker"), key_file, prefix, CAFE_SPOOL_DIR=str(spool)
    )


async def readyz_is(http: aiohttp.ClientSession | TestClient, status: int) -> bool:  # type: ignore[type-arg]
    """True if /readyz answers `status`; a refused or timed-out probe is neither."""
    try:
        async with http.get("/readyz", headers={"Connection": "close"}) as resp:
            return resp.status == status
    except (aiohttp.ClientError, TimeoutError):
        return False


async def watch_rss(gateways: Sequence[Served], peaks: list[int], stop: asyncio.Event) -> None:
    """Keep in `peaks[i]` the largest RSS seen of `gateways[i]` and its workers, for each
    gateway from when it is added to the list until it has exited."""
    while not stop.is_set():
        peaks.extend([0] * (len(gateways) - len(peaks)))
        for i, gateway in enumerate(gateways):
            if gateway.returncode is not None:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(gateway.pid)
                rss = 0
                for proc in [process, *process.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        rss += proc.memory_info().rss
                peaks[i] = max(peaks[i], rss)
        await asyncio.sleep(0.2)
