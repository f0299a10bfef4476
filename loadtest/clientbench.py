"""The two Kafka clients side by side (CAFE_KAFKA_CLIENT): records/s and the process's
CPU time per record of the sink alone, in this process, at batches of 1, 20 and 500.

    CAFE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m loadtest.clientbench

For each batch size, each client's sink (KafkaSink on aiokafka, RdKafkaSink on
librdkafka, as gateway/app.py makes them, with the default settings: zstd, linger 2 ms)
gets topics of its own and is warmed up; then the clients take turns in --rounds runs of
--seconds each (in reverse order every other round), so that a change in the load of the
(shared) machine falls on both alike. A run keeps --concurrency requests in flight, each a
`send` of one batch of activity records (one session each, ~0.6 KB, the sample of
docs/api.md) awaiting Kafka's acknowledgement, as the gateway's requests do. CPU time is
the process's user + system time (getrusage RUSAGE_SELF: every thread, librdkafka's
included); no HTTP, no validation: only what producing costs. Last, the books: each
topic's end offsets must add up to the records acknowledged. The broker must be on
loopback; the topics are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import resource
import socket
import statistics
import time
import uuid
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from devkit.samples import curl_bodies
from gateway.config import KafkaSettings, TopicSettings
from gateway.kafka.rdkafka import RdKafkaSink
from gateway.kafka.sink import KafkaSink
from gateway.sink import Context, Record

CLIENTS = ("aiokafka", "librdkafka")
BATCHES = (1, 20, 500)
PARTITIONS = 6
WARM_UP_S = 1.0


@dataclass
class Cell:
    """One client at one batch size: what its runs added up to."""

    records: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    rates: list[float] = field(default_factory=list)

    def add(self, records: int, seconds: float, cpu_seconds: float) -> None:
        self.records += records
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        self.rates.append(records / seconds)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loopback(bootstrap: str) -> None:
    for server in bootstrap.split(","):
        host = server.strip().rpartition(":")[0].strip("[]")
        for info in socket.getaddrinfo(host, None):
            if not ipaddress.ip_address(info[4][0]).is_loopback:
                raise SystemExit(f"{server} is not on loopback: this bench runs on one machine")


def _records(batch: int, n: int) -> list[Record]:
    (base,) = orjson.loads(curl_bodies()["activity"])["records"]
    context = Context("k_bench", "127.0.0.1", f"bench-{n}", "2026-12-07T00:00:00.000Z")
    session = str(uuid.uuid4())
    return [
        Record(
            session,
            orjson.dumps({**base, "sessionId": session, "eventId": f"{n}-{i}"}),
            context,
        )
        for i in range(batch)
    ]


async def _connected(sink: KafkaSink | RdKafkaSink) -> None:
    deadline = time.monotonic() + 60
    while await sink.unavailable() is not None:
        if time.monotonic() > deadline:
            raise SystemExit(f"not connected: {await sink.unavailable()}")
        await asyncio.sleep(0.1)


async def _run(
    sink: KafkaSink | RdKafkaSink, batch: int, seconds: float, concurrency: int
) -> tuple[int, float, float]:
    """Keep `concurrency` sends of `batch` records in flight for `seconds`; the records
    acknowledged, the wall time and the CPU time."""
    pool = [_records(batch, n) for n in range(concurrency * 4)]
    acknowledged = 0
    stop = time.monotonic() + seconds

    async def sender(first: int) -> None:
        nonlocal acknowledged
        n = first
        while time.monotonic() < stop:
            await sink.send("activity", pool[n % len(pool)])
            acknowledged += batch
            n += concurrency

    cpu, began = _cpu(), time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(concurrency)))
    return acknowledged, time.perf_counter() - began, _cpu() - cpu


async def _end_offsets(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


async def main(args: argparse.Namespace) -> None:
    bootstrap = os.environ.get("CAFE_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    _loopback(bootstrap)
    run = uuid.uuid4().hex[:8]
    cells: dict[tuple[str, int], Cell] = {}
    books: dict[str, int] = {}
    try:
        for batch in args.batches:
            sinks = {}
            for client in CLIENTS:
                prefix = f"clientbench.{run}.{client}.w{batch}"
                topics = TopicSettings(
                    activity=f"{prefix}.activity",
                    log=f"{prefix}.log",
                    profile=f"{prefix}.profile",
                    deadletter=f"{prefix}.deadletter",
                    partitions=PARTITIONS,
                )
                settings = KafkaSettings(
                    bootstrap=bootstrap, topics=topics, client=client, linger_ms=args.linger_ms
                )
                sink = RdKafkaSink(settings) if client == "librdkafka" else KafkaSink(settings)
                await sink.start()
                await _connected(sink)
                sinks[client] = (sink, topics.activity)
                books[topics.activity] = 0
                records, _, _ = await _run(sink, batch, WARM_UP_S, args.concurrency)
                books[topics.activity] += records
            for round_ in range(args.rounds):
                order = CLIENTS if round_ % 2 == 0 else CLIENTS[::-1]
                for client in order:
                    sink, topic = sinks[client]
                    records, seconds, cpu = await _run(sink, batch, args.seconds, args.concurrency)
                    books[topic] += records
                    cells.setdefault((client, batch), Cell()).add(records, seconds, cpu)
            for sink, _ in sinks.values():
                await sink.close()
        for topic, acknowledged in books.items():
            stored = await _end_offsets(bootstrap, topic)
            if stored < acknowledged:
                raise SystemExit(f"{topic}: {acknowledged} records acknowledged, {stored} stored")
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            names = [t for t in await admin.list_topics() if t.startswith(f"clientbench.{run}.")]
            if names:
                await admin.delete_topics(names)
        finally:
            await admin.close()
    print(
        f"{args.rounds} rounds of {args.seconds:g}s per client and batch, "
        f"{args.concurrency} sends in flight, linger {args.linger_ms} ms, broker at {bootstrap}; "
        "books balanced"
    )
    print("| batch | client | records/s (median of rounds) | CPU µs/record | CPU share |")
    print("|---|---|---:|---:|---:|")
    for batch in args.batches:
        for client in CLIENTS:
            cell = cells[(client, batch)]
            print(
                f"| W{batch} | {client} | {statistics.median(cell.rates):,.0f} | "
                f"{cell.cpu_seconds / cell.records * 1e6:.1f} | "
                f"{cell.cpu_seconds / cell.seconds:.0%} |"
            )


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="each run (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per client (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="sends in flight")
    parser.add_argument(
        "--linger-ms",
        type=int,
        default=KafkaSettings().linger_ms,
        help="CAFE_KAFKA_LINGER_MS of both sinks (default: its default)",
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=list(BATCHES), help="records per send"
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(_args()))
