"""OpenTelemetry tracing's cost: W1 with tracing off, and at ratios 0.01 and 1, in turns.

    python -m loadtest.tracebench [--rounds 3] [--seconds 5] [--ratios 0.01,1]

Each round runs the gateway (on the local Kafka) once with tracing off
(CAFE_TRACE_SAMPLE_RATIO=0) and once at each ratio, one after the other, so all see the
same moment of this shared machine; the spans go to an OTLP/HTTP receiver in this
process (a thread on loopback) that accepts and discards them. It prints requests/s and
the server's CPU µs a request, and the medians over the rounds as ratios to "off".
Needs wrk and the local Kafka, as `make bench` does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import threading
import uuid
from pathlib import Path

from aiohttp import web

from devkit.net import free_port
from gateway.keys.file import write_keys_file
from gateway.keys.model import mint_key
from loadtest.benchlib import TOPIC_PARTITIONS, delete_topics, measured_run


class Receiver:
    """An OTLP/HTTP receiver of traces that reads each export and answers it empty (an
    empty ExportTraceServiceResponse), on its own event loop in a thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.exports = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="otlp-receiver", daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        if not self._ready.wait(10):
            raise SystemExit("the OTLP receiver did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        stop = self._stop
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        async def receive(request: web.Request) -> web.Response:
            await request.read()
            self.exports += 1
            return web.Response(body=b"", content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--ratios", default="0.01,1")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--bootstrap", default=os.environ.get("CAFE_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    args = parser.parse_args()
    variants = ["off", *args.ratios.split(",")]
    run_id = uuid.uuid4().hex[:8]
    topics = {n: f"bench.{run_id}.{n}" for n in ("activity", "log", "profile", "deadletter")}
    workdir = Path(tempfile.mkdtemp(prefix="cafe-tracebench-"))
    key, record = mint_key(("analytics-portal",))
    write_keys_file(workdir / "keys.json", [record])
    # variant -> [(requests/s, CPU µs a request)] of each round.
    seen: dict[str, list[tuple[float, float]]] = {}
    with Receiver() as receiver:
        env = {
            **os.environ,
            "CAFE_KEYS_FILE": str(workdir / "keys.json"),
            "CAFE_KAFKA_BOOTSTRAP": args.bootstrap,
            "CAFE_TOPIC_PARTITIONS": str(TOPIC_PARTITIONS),
            "CAFE_ACCESS_LOG": "false",
            "CAFE_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/traces",
            **{f"CAFE_TOPIC_{name.upper()}": topic for name, topic in topics.items()},
        }
        try:
            for round_ in range(1, args.rounds + 1):
                for variant in variants:
                    ratio = {"CAFE_TRACE_SAMPLE_RATIO": "0" if variant == "off" else variant}
                    rate, cpu_us = measured_run(
                        "gateway", {**env, **ratio}, batch=args.batch, seconds=args.seconds,
                        key=key, run_id=f"{run_id}-{round_}-{variant}",
                    )  # fmt: skip
                    seen.setdefault(variant, []).append((rate, cpu_us))
                    print(
                        f"round {round_} W{args.batch} tracing {variant:>5} "
                        f"{rate:7,.0f} requests/s {cpu_us:6.1f} CPU µs a request",
                        flush=True,
                    )
        finally:
            asyncio.run(delete_topics(args.bootstrap, list(topics.values())))
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"\n(the receiver took {receiver.exports} exports)")
    print(f"medians over {args.rounds} rounds, W{args.batch}, against tracing off:")
    rate_off = statistics.median(r for r, _ in seen["off"])
    cpu_off = statistics.median(c for _, c in seen["off"])
    for variant in variants:
        rate = statistics.median(r for r, _ in seen[variant])
        cpu = statistics.median(c for _, c in seen[variant])
        print(
            f"tracing {variant:>5}: {rate:8,.0f} requests/s ({rate / rate_off:.2f}x), "
            f"{cpu:6.1f} CPU µs a request ({cpu / cpu_off:.2f}x)"
        )


if __name__ == "__main__":
    main()
