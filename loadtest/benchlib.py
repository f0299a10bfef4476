"""What the runs of `make bench` share: options, servers, wrk runs, results, topics, books."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devkit.net import free_port
from devkit.topics import read_to_end

HERE = Path(__file__).resolve().parent
BATCHES = (500, 20, 1)
# Enough connections to keep the server busy at each batch size, few enough that
# requests do not queue for long inside the server.
CONNECTIONS = {500: 8, 20: 32, 1: 64}
# "gateway-rs" and "no-sink-rs" are "gateway" and "no-sink" validating with jsonschema-rs
# (CAFE_VALIDATOR); the others validate with the default, fastjsonschema.
RS = "-rs"
TARGETS = ("gateway", "gateway" + RS, "no-sink", "no-sink" + RS, "bare")
VALIDATORS = ("fastjsonschema", "jsonschema-rs")
# Distinct sessionIds (the records' Kafka key) the records draw from, uniformly: so many
# that no cache of a key's partition, or of anything else per session, hides what each
# new key costs. --sessions 10000 draws from as many as the runs before issue 28.
SESSIONS = 1_000_000


@dataclass(frozen=True)
class Peer:
    """Another HTTP-to-Kafka bridge, run by its script in deploy/peer/."""

    name: str  # the target's name, and its script's: deploy/peer/<name>.sh
    product: str
    config: str  # the file that sets it up as a bridge, for the report
    # Seconds of W500 traffic before its first measured run: until then a cold JIT (the
    # broker's, and a Java peer's own) measures its warm-up, not its speed.
    warm_up_s: int
    # Its shortest measured run. wrk opens its connections anew for each run; a peer
    # that makes a Kafka producer per connection pays for making them within the run,
    # which a longer run spreads as long-lived connections would.
    min_run_s: int = 0

    @property
    def script(self) -> str:
        return str(HERE.parent / "deploy" / "peer" / f"{self.name}.sh")


PEERS = {
    "bento": Peer("bento", "Bento", "deploy/peer/bento.yaml", 10),
    # Its own README: the JIT needs about a minute of traffic. A producer per connection:
    # in 10 s runs it served W20 at 4.4-4.7k records/s and W1 at 0.89-1.0k requests/s,
    # in 30 s runs at 7.0k and 1.35k.
    "strimzi": Peer("strimzi", "Strimzi Kafka Bridge", "deploy/peer/strimzi.properties", 60, 30),
}

TOPIC_PARTITIONS = 6


@dataclass
class Result:
    """One wrk run against one server at one batch size."""

    target: str
    batch: int
    load: str  # "peak" or "half"
    requests: int
    ok: int
    seconds: float
    records_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    cpu_percent: float
    statuses: dict[str, int]
    errors: int
    connections: int
    rss_max_mb: float


def kind(target: str) -> str:
    """The server a target runs, whichever validator it has: gateway, no-sink, bare, or
    a peer's name."""
    return target.removesuffix(RS)


def validator(target: str) -> str:
    """The CAFE_VALIDATOR a target runs with."""
    return "jsonschema-rs" if target.endswith(RS) else "fastjsonschema"


def wait_healthy(port: int, proc: subprocess.Popen[bytes], path: str = "/healthz") -> None:
    """Wait for 10 good answers in a row (each a new connection, so every worker is asked)."""
    deadline = time.monotonic() + 60
    good = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                good = good + 1 if 200 <= r.status < 300 else 0  # the Strimzi bridge: 204
        except OSError:
            good = 0
        if good == 10:
            return
        time.sleep(0.1)
    raise SystemExit(f"server on {port} not healthy within 60s")


@contextmanager
def server(target: str, env: dict[str, str]) -> Iterator[tuple[int, psutil.Process]]:
    """Start one target (pinned to CPU 0 if it is one process); yield its port and process."""
    port = free_port()
    python = sys.executable
    health = "/healthz"
    if kind(target) == "gateway":
        cmd = [python, "-m", "gateway", "serve"]
        health = "/readyz"
    elif target in PEERS:
        # The script execs the peer, so the process measured is the peer itself.
        cmd = [PEERS[target].script, "run"]
        health = "/ready"
    else:
        cmd = [python, "-m", "loadtest.ceilings", kind(target), str(port)]
    env = {**env, "CAFE_PORT": str(port), "CAFE_PEER_PORT": str(port), "CAFE_LOG_LEVEL": "WARNING"}
    env["CAFE_VALIDATOR"] = validator(target)
    if kind(target) != "gateway":
        env["CAFE_WORKERS"] = "1"  # the ceilings and the peer are one process each
    pin = ["taskset", "-c", "0"] if env.get("CAFE_WORKERS", "1") == "1" else []
    proc = subprocess.Popen([*pin, *cmd], env=env, cwd=HERE.parent)
    try:
        wait_healthy(port, proc, health)
        yield port, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree_cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of a server and its workers."""
    return sum(p.cpu_times().user + p.cpu_times().system for p in (proc, *proc.children()))


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a server and its workers."""
    return sum(p.memory_info().rss for p in (proc, *proc.children()))


class RssSampler:
    """The largest resident set size of a server and its workers, sampled 5 times a second."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.max_bytes = tree_rss(proc)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.max_bytes = max(self.max_bytes, tree_rss(self.proc))


def run_wrk(
    port: int,
    proc: psutil.Process,
    *,
    target: str,
    batch: int,
    seconds: int,
    key: str,
    run_id: str,
    load: str = "peak",
    delay_ms: float = 0,
    connections: int | None = None,
    path: str = "/v1/activity",
    sessions: int = SESSIONS,
) -> Result:
    env = {
        **os.environ,
        "BENCH_BATCH": str(batch),
        "BENCH_KEY": key,
        # wrk numbers requests from 1 in every run: the run's own tag keeps eventIds unique.
        "BENCH_RUN": f"{run_id}-{target}-{load}{batch}",
        "BENCH_DELAY_MS": str(delay_ms),
        "BENCH_SESSIONS": str(sessions),
        # The same records; the peer takes them wrapped in its JSON embedded format.
        "BENCH_FORMAT": "bridge" if target in PEERS else "cafe",
    }
    conns = connections or CONNECTIONS[batch]
    # With one server process, wrk has CPU 1 to itself; with more, everything shares.
    pin = ["taskset", "-c", "1"] if not proc.children() else []
    cmd = [
        *pin, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(HERE / "activity.lua"), f"http://127.0.0.1:{port}{path}",
    ]  # fmt: skip
    cpu_before = tree_cpu_seconds(proc)
    wall_before = time.monotonic()
    with RssSampler(proc) as rss:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - wall_before
    cpu_after = tree_cpu_seconds(proc)
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    data = json.loads(line.removeprefix("BENCH "))
    secs = data["duration_us"] / 1e6
    ok = sum(n for status, n in data["statuses"].items() if status.startswith("2"))
    cpu = (cpu_after - cpu_before) / wall
    return Result(
        target=target,
        batch=batch,
        load=load,
        requests=data["requests"],
        ok=ok,
        seconds=round(secs, 2),
        records_per_s=round(ok * batch / secs),
        requests_per_s=round(ok / secs),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        p999_ms=data["p999_us"] / 1000,
        cpu_percent=round(cpu * 100),
        statuses=data["statuses"],
        errors=data["errors"],
        connections=conns,
        rss_max_mb=round(rss.max_bytes / 2**20, 1),
    )


async def count_event_ids(bootstrap: str, topic: str, run_id: str) -> int:
    """Distinct eventIds of this run on the topic, read to its end offsets."""
    pattern = re.compile(rb'"eventId":"(' + re.escape(run_id.encode()) + rb'-[^"]+)"')
    seen: set[bytes] = set()
    async for message in read_to_end(bootstrap, topic, TOPIC_PARTITIONS):
        match = pattern.search(message.value)
        if match:
            seen.add(match.group(1))
    return len(seen)


async def create_topic(bootstrap: str, topic: str) -> None:
    """A peer's topic, partitioned like the gateway's (the broker creates none by itself)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, TOPIC_PARTITIONS, 1)])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


def measured_run(
    target: str, env: dict[str, str], *, batch: int, seconds: int, key: str, run_id: str
) -> tuple[float, float]:
    """Start `target`, run wrk at `batch` against it, stop it: requests/s, and the
    server's CPU µs a request (the alternating A/B benches, lanebench and tracebench)."""
    with server(target, env) as (port, proc):
        cpu_before = tree_cpu_seconds(proc)
        result = run_wrk(
            port, proc, target=target, batch=batch, seconds=seconds, key=key, run_id=run_id,
            sessions=SESSIONS,
        )  # fmt: skip
        cpu_us = (tree_cpu_seconds(proc) - cpu_before) / result.ok * 1e6
    return result.requests_per_s, cpu_us


@dataclass
class Balance:
    """The books of a run: records acknowledged with a 2xx, against this run's eventIds
    found on the topic."""

    acknowledged: int = 0
    on_topic: int = 0

    @property
    def ok(self) -> bool:
        return self.on_topic >= self.acknowledged

    @property
    def verdict(self) -> str:
        return "OK" if self.ok else "MISSING RECORDS"

    def as_report(self) -> dict[str, Any]:
        return {"acknowledged": self.acknowledged, "on_topic": self.on_topic, "ok": self.ok}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="`make bench`: the gateway on real Kafka against its ceilings, in one run."
    )
    parser.add_argument("--seconds", type=int, default=10, help="each run's length")
    parser.add_argument(
        "--bootstrap", default=os.environ.get("CAFE_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "bench")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"which servers, comma-separated: of {', '.join((*TARGETS, *PEERS))}",
    )
    parser.add_argument("--workers", type=int, default=1, help="gateway processes (CAFE_WORKERS)")
    parser.add_argument(
        "--sessions",
        type=int,
        default=SESSIONS,
        help="distinct sessionIds the records draw from, for the gateway and the peers alike",
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help="also measure the peers, HTTP-to-Kafka bridges (deploy/peer/), at each batch size",
    )
    parser.add_argument(
        "--spool",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then the spool with Kafka down, and its replay (loadtest/spoolbench.py)",
    )
    parser.add_argument(
        "--codecs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then each CAFE_KAFKA_COMPRESSION at W500 and W20 (loadtest/codecbench.py)",
    )
    parser.add_argument(
        "--codec-seconds",
        type=int,
        default=6,
        help="the codecs run's wrk time per codec and batch size (in 3 interleaved rounds)",
    )
    parser.add_argument(
        "--limits",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then a rate-limited key at W1, local and in Redis (loadtest/limitbench.py)",
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("CAFE_BENCH_REDIS_URL", "redis://127.0.0.1:6390/0"),
        help="the Redis of the limits run (make bench starts deploy/redis/redis.sh)",
    )
    args = parser.parse_args()
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    return args


def server_env(args: argparse.Namespace, keys_file: Path, topics: dict[str, str]) -> dict[str, str]:
    """The environment every target starts with: one key, the broker, this run's topics."""
    return {
        **os.environ,
        "CAFE_KEYS_FILE": str(keys_file),
        "CAFE_KAFKA_BOOTSTRAP": args.bootstrap,
        "CAFE_TOPIC_PARTITIONS": str(TOPIC_PARTITIONS),
        "CAFE_WORKERS": str(args.workers),
        **{f"CAFE_TOPIC_{name.upper()}": topic for name, topic in topics.items()},
    }
