"""Kafka compression, for `make bench`: what each CAFE_KAFKA_COMPRESSION costs in CPU and
records/s, and what it saves on the broker's disk.

For each codec (none, gzip, snappy, lz4, zstd) a gateway (gateway-rs, one process pinned
as bench pins it) runs with CAFE_KAFKA_COMPRESSION set, on topics of its own, deleted
afterwards. The five run side by side, and wrk drives one at a time: at W500, then at
W20, each is warmed up, then the codecs take turns in ROUNDS short runs (in reverse order
every other round) that add up to --codec-seconds each, so that a slow change in the
load of the (shared, noisy) machine falls on every codec alike. Per codec and batch size:
records/s, and as a ratio to `none` (only ratios within a run mean anything); the CPU
time of the gateway process, and of the broker's over the same runs (it decompresses
each compressed batch to check it), per record answered 2xx; and the bytes the runs
added to the segment files (`*.log`) of the codec's activity topic in the broker's data
directory, per record they added (the topic's end offsets). The data directory is the
local broker's, as deploy/kafka/kafka.sh lays it out; with a broker elsewhere the bytes
are not measured. Last, each codec's books: every eventId answered 2xx must be on its
topic (reading it back also decompresses every batch).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway.keys.file import write_keys_file
from gateway.keys.model import mint_key
from loadtest.benchlib import (
    RS,
    TOPIC_PARTITIONS,
    Balance,
    Result,
    count_event_ids,
    delete_topics,
    parse_args,
    run_wrk,
    server,
    server_env,
    tree_cpu_seconds,
)

TARGET = "gateway" + RS
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
BATCHES = (500, 20)
TOPICS = ("activity", "log", "profile", "deadletter")  # as bench's run_targets names them
WARM_UP_S = 2
# Each codec's figures at a batch size are from this many runs of --codec-seconds / ROUNDS,
# taking turns with the other codecs'.
ROUNDS = 3
# Before the first measured run: the broker may be a fresh JVM whose JIT has not compiled
# its produce path yet (in `make bench` the runs before this one have warmed it).
BROKER_WARM_UP_S = 10
# For requests wrk left in flight when it stopped to reach the log before it is measured.
SETTLE_S = 0.5
N = TypeVar("N", int, float)


@dataclass
class CodecRun:
    """One codec at one batch size: wrk at the gateway, and what the run cost and wrote."""

    codec: str
    result: Result  # its rounds' runs as one (see combine)
    rounds: int
    gateway_cpu_s: float  # the gateway's CPU time over the wrk runs
    broker_cpu_s: float | None  # the broker's over the same time, if its process was found
    log_bytes: int | None  # what the activity topic's segment files grew by, if found
    log_records: int  # what its end offsets grew by (answers in flight at wrk's end too)

    @property
    def records(self) -> int:
        """Records answered 2xx."""
        return self.result.ok * self.result.batch

    @property
    def gateway_us(self) -> float | None:
        """The gateway's CPU µs per record answered 2xx."""
        return self.gateway_cpu_s * 1e6 / self.records if self.records else None

    @property
    def gateway_percent(self) -> float:
        """The gateway's CPU time over its runs' time: under 100, it waited (for a core the
        machine's other processes had, or for Kafka), and records/s says less about the
        codec."""
        return 100 * self.gateway_cpu_s / self.result.seconds if self.result.seconds else 0

    @property
    def broker_us(self) -> float | None:
        """The broker's CPU µs per record answered 2xx (over the same time)."""
        if self.broker_cpu_s is None or not self.records:
            return None
        return self.broker_cpu_s * 1e6 / self.records

    @property
    def bytes_per_record(self) -> float | None:
        """Bytes on the broker's log per record written."""
        if self.log_bytes is None or not self.log_records:
            return None
        return self.log_bytes / self.log_records


@dataclass
class Codecs:
    """What the compression run found."""

    runs: list[CodecRun]
    books: dict[str, Balance]  # by codec
    seconds: int  # each round's runs' length
    log_dir: str | None  # the broker's data directory the bytes were read in
    broker_pid: int | None  # the broker process whose CPU time was measured

    @property
    def ok(self) -> bool:
        """Every codec's books balance."""
        return all(books.ok for books in self.books.values())

    def markdown(self) -> str:
        """The table and the books."""
        where = (
            f"the `*.log` segment files of the activity topic's {TOPIC_PARTITIONS} "
            f"partitions in the broker's data directory (kafka.sh's "
            f"{Path(self.log_dir).parent.name}/data)"
            if self.log_dir
            else "not measured: no local broker data directory found for the bootstrap"
        )
        broker = (
            f"the broker process's (pid {self.broker_pid}, on the same cores)"
            if self.broker_pid
            else "not measured: no local broker process found"
        )
        lines = [
            f"{TARGET}, one process pinned to CPU 0, per CAFE_KAFKA_COMPRESSION codec, on "
            f"topics of its own; after a {WARM_UP_S} s warm-up each, the codecs take turns in "
            f"{ROUNDS} rounds of {self.seconds} s wrk runs (every other round in reverse "
            "order). vs none: records/s against `none` at the same batch size in this run. "
            "p99: the median of the rounds'. Gateway CPU: its process's CPU time over its "
            "runs per record answered 2xx, and as a share of the runs' time (under 100%, the "
            "gateway waited, for a core or for Kafka; its records/s then tell less about the "
            f"codec than its µs/record). Broker CPU: {broker} over the same runs, per "
            f"record answered 2xx. Log bytes: what the runs added to {where}, per record "
            "they added (the topic's end offsets).",
            "",
            "| batch | codec | records/s | vs none | p99 ms | gateway CPU µs/record "
            "| gateway CPU % | broker CPU µs/record | log bytes/record | bytes vs none "
            "| non-2xx |",
            "|---|---|" + "---:|" * 9,
        ]
        base = {run.result.batch: run for run in self.runs if run.codec == "none"}
        order = sorted(
            self.runs, key=lambda run: (BATCHES.index(run.result.batch), CODECS.index(run.codec))
        )
        for run in order:
            r, none = run.result, base.get(run.result.batch)
            vs = f"{r.records_per_s / none.result.records_per_s:.0%}" if none else ""
            size = run.bytes_per_record
            base_size = none.bytes_per_record if none else None
            bytes_vs = f"{size / base_size:.0%}" if size and base_size else ""
            lines.append(
                f"| W{r.batch} | {run.codec} | {r.records_per_s:,} | {vs} | {r.p99_ms:.1f} "
                f"| {fmt(run.gateway_us)} | {run.gateway_percent:.0f} | {fmt(run.broker_us)} "
                f"| {fmt(size, 0)} "
                f"| {bytes_vs} | {r.requests - r.ok:,} |"
            )
        each = "; ".join(
            f"{codec} {books.on_topic:,} of {books.acknowledged:,} {books.verdict}"
            for codec, books in self.books.items()
        )
        lines += ["", f"Books (this run's eventIds answered 2xx found on each topic): {each}."]
        return "\n".join(lines)

    def as_report(self) -> dict[str, Any]:
        """For the JSON report, with the figures the table derives."""
        runs = [
            {
                **asdict(run),
                "gateway_cpu_us_per_record": run.gateway_us,
                "gateway_cpu_percent": run.gateway_percent,
                "broker_cpu_us_per_record": run.broker_us,
                "log_bytes_per_record": run.bytes_per_record,
            }
            for run in self.runs
        ]
        return {
            "seconds_per_run": self.seconds,
            "log_dir": self.log_dir,
            "broker_pid": self.broker_pid,
            "runs": runs,
            "books": {codec: books.as_report() for codec, books in self.books.items()},
            "ok": self.ok,
        }


def fmt(value: float | None, places: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{places}f}"


def run(args: argparse.Namespace) -> Codecs:
    """Every codec's gateway on topics of its own, deleted afterwards; the books of each."""
    round_s = max(1, args.codec_seconds // ROUNDS)
    run_id = uuid.uuid4().hex[:8]
    broker = Broker.of(args.bootstrap)
    workdir = Path(tempfile.mkdtemp(prefix="cafe-codec-"))
    key, record = mint_key(("analytics-portal",))
    write_keys_file(workdir / "keys.json", [record])
    topics = {
        codec: {name: f"bench.{run_id}.{codec}.{name}" for name in TOPICS} for codec in CODECS
    }
    try:
        with ExitStack() as stack:
            keys = workdir / "keys.json"
            gateways = {codec: start(stack, args, keys, codec, topics[codec]) for codec in CODECS}
            runs = measure(gateways, broker, round_s, key, run_id)
        books = {
            codec: count_books(broker.bootstrap, topics[codec]["activity"], run_id, runs, codec)
            for codec in CODECS
        }
    finally:
        every = [topic for names in topics.values() for topic in names.values()]
        asyncio.run(delete_topics(args.bootstrap, every))
        shutil.rmtree(workdir, ignore_errors=True)
    data, pid = broker.data, broker.process.pid if broker.process else None
    return Codecs(runs, books, round_s, str(data) if data else None, pid)


@dataclass(frozen=True)
class CodecGateway:
    """One codec's gateway, running."""

    codec: str
    port: int
    proc: psutil.Process
    topic: str  # its activity topic


def start(
    stack: ExitStack,
    args: argparse.Namespace,
    keys: Path,
    codec: str,
    topics: dict[str, str],
) -> CodecGateway:
    """A gateway with `codec` on `topics`, stopped when `stack` closes."""
    env = {
        **server_env(args, keys, topics),
        "CAFE_WORKERS": "1",
        "CAFE_KAFKA_COMPRESSION": codec,
    }
    port, proc = stack.enter_context(server(TARGET, env))
    return CodecGateway(codec, port, proc, topics["activity"])


def measure(
    gateways: dict[str, CodecGateway], broker: Broker, seconds: int, key: str, run_id: str
) -> list[CodecRun]:
    """At each batch size: every gateway warmed up, then ROUNDS runs of `seconds` each,
    the codecs taking turns, in reverse order every other round (warm-ups' eventIds are
    outside the books). A slow change in the machine's load falls on every codec alike."""

    def wrk(gateway: CodecGateway, batch: int, run_seconds: int, load: str, tag: str) -> Result:
        return run_wrk(gateway.port, gateway.proc, target=TARGET, batch=batch,
                       seconds=run_seconds, key=key, run_id=tag, load=load)  # fmt: skip

    wrk(gateways[CODECS[0]], 500, BROKER_WARM_UP_S, "broker-warm", run_id + "w")
    runs = []
    for batch in BATCHES:
        for gateway in gateways.values():
            wrk(gateway, batch, WARM_UP_S, "warm", run_id + "w")
        time.sleep(SETTLE_S)
        logs_before = {codec: broker.log(g.topic) for codec, g in gateways.items()}
        results: dict[str, list[Result]] = {codec: [] for codec in gateways}
        cpu = dict.fromkeys(gateways, 0.0)
        broker_cpu: dict[str, float | None] = dict.fromkeys(gateways, 0.0)
        for i in range(ROUNDS):
            for codec in CODECS if i % 2 == 0 else reversed(CODECS):
                gateway = gateways[codec]
                broker_before, cpu_before = broker.cpu_seconds(), tree_cpu_seconds(gateway.proc)
                # Each round's eventIds of their own: wrk numbers requests from 1 every run.
                results[codec].append(wrk(gateway, batch, seconds, f"round{i + 1}-", run_id))
                cpu[codec] += tree_cpu_seconds(gateway.proc) - cpu_before
                broker_cpu[codec] = plus(
                    broker_cpu[codec], minus(broker.cpu_seconds(), broker_before)
                )
        time.sleep(SETTLE_S)
        for codec, gateway in gateways.items():
            before, after = logs_before[codec], broker.log(gateway.topic)
            found = CodecRun(
                codec,
                combine(results[codec]),
                len(results[codec]),
                cpu[codec],
                broker_cpu[codec],
                minus(after.bytes, before.bytes),
                after.records - before.records,
            )
            runs.append(found)
            r = found.result
            print(
                f"{codec:10} W{batch:<4} {r.records_per_s:>9,} records/s  "
                f"p99 {r.p99_ms:6.1f} ms  gateway {fmt(found.gateway_us)} µs/record "
                f"({found.gateway_percent:.0f}% CPU)  "
                f"log {fmt(found.bytes_per_record, 0)} bytes/record",
                flush=True,
            )
    return runs


def combine(results: list[Result]) -> Result:
    """Runs at one gateway and batch size as one: their answers and time summed, each
    latency percentile the median of theirs, the largest memory."""
    seconds = sum(r.seconds for r in results)
    ok = sum(r.ok for r in results)
    statuses: Counter[str] = Counter()
    for r in results:
        statuses.update(r.statuses)
    first = results[0]
    return replace(
        first,
        load="peak",
        requests=sum(r.requests for r in results),
        ok=ok,
        seconds=round(seconds, 2),
        records_per_s=round(ok * first.batch / seconds),
        requests_per_s=round(ok / seconds),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        p999_ms=statistics.median(r.p999_ms for r in results),
        cpu_percent=round(sum(r.cpu_percent * r.seconds for r in results) / seconds),
        statuses=dict(statuses),
        errors=sum(r.errors for r in results),
        rss_max_mb=max(r.rss_max_mb for r in results),
    )


def count_books(
    bootstrap: str, topic: str, run_id: str, runs: list[CodecRun], codec: str
) -> Balance:
    """The records `codec`'s gateway answered 2xx in `runs`, and how many of their eventIds
    are on its `topic`."""
    books = Balance(sum(run.records for run in runs if run.codec == codec))
    books.on_topic = asyncio.run(count_event_ids(bootstrap, topic, run_id))
    print(f"{'books':10} {codec}: {books.on_topic:,} of {books.acknowledged:,} records "
          f"answered 2xx on the topic: {books.verdict}", flush=True)  # fmt: skip
    return books


def minus(after: N | None, before: N | None) -> N | None:
    """after - before, or None if either is unknown."""
    return None if after is None or before is None else after - before


def plus(a: N | None, b: N | None) -> N | None:
    """a + b, or None if either is unknown."""
    return None if a is None or b is None else a + b


@dataclass(frozen=True)
class Log:
    """A topic's log at one moment."""

    bytes: int | None  # in its partitions' segment files, if they were found
    records: int  # its partitions' end offsets, summed


@dataclass(frozen=True)
class Broker:
    """The broker: where to reach it and, if it is deploy/kafka/kafka.sh's local node, its
    data directory and its process."""

    bootstrap: str
    data: Path | None
    process: psutil.Process | None

    @classmethod
    def of(cls, bootstrap: str) -> Broker:
        port = local_port(bootstrap)
        if port is None:
            return cls(bootstrap, None, None)
        run = kafka_home() / f"run-{port}"  # as kafka.sh names a single node's state
        data = run / "data"
        process = None
        try:
            candidate = psutil.Process(int((run / "broker.pid").read_text().split()[0]))
            if "kafka.Kafka" in " ".join(candidate.cmdline()):
                process = candidate
        except (OSError, ValueError, IndexError, psutil.Error):
            pass
        return cls(bootstrap, data if (data / "meta.properties").is_file() else None, process)

    def cpu_seconds(self) -> float | None:
        if self.process is None:
            return None
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def log(self, topic: str) -> Log:
        """The bytes in the segment files of `topic`'s partitions and its end offsets."""
        size = None
        if self.data is not None:
            dirs = [self.data / f"{topic}-{p}" for p in range(TOPIC_PARTITIONS)]
            if all(d.is_dir() for d in dirs):
                size = sum(f.stat().st_size for d in dirs for f in d.glob("*.log"))
        return Log(size, asyncio.run(end_offsets(self.bootstrap, topic)))


def kafka_home() -> Path:
    """Where deploy/kafka/kafka.sh keeps its nodes' state (its CAFE_KAFKA_HOME)."""
    home = os.environ.get("CAFE_KAFKA_HOME")
    if home:
        return Path(home)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "cafe-gateway" / "kafka"


def local_port(bootstrap: str) -> int | None:
    """The port of a single loopback broker, or None for any other bootstrap."""
    host, _, port = bootstrap.rpartition(":")
    if "," in bootstrap or host not in ("127.0.0.1", "localhost") or not port.isdigit():
        return None
    return int(port)


async def end_offsets(bootstrap: str, topic: str) -> int:
    """The sum of `topic`'s partitions' end offsets: the records written to it (the
    gateway's idempotent producer writes no control records)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(TOPIC_PARTITIONS)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


if __name__ == "__main__":
    # Alone, without the rest of bench: `python -m loadtest.codecbench --codec-seconds 6`.
    print(run(parse_args()).markdown())
