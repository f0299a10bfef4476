"""The spool under load, for `make bench`: what writing records to disk costs while Kafka
is away, and how fast the spool empties into Kafka once it is back.

The gateway (gateway-rs, one process pinned as bench pins it) runs with CAFE_SPOOL_DIR
set and its Kafka bootstrap on a loopback port where nothing listens. Kafka is then down
from the start: the Kafka sink refuses each request at once, so every request is spooled
(SQLite WAL, an fsync per group commit) without first waiting CAFE_SPOOL_AFTER_MS, and
the broker, which other runs share, is left alone. Its records/s at each batch size are
given as a ratio to the same gateway producing to Kafka in the same run: on a noisy
machine only ratios within a run mean anything. Then a gateway on the same spool dir,
with the real Kafka and no client traffic, replays it; the books: every spooled eventId
must be on the topic.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from devkit.net import free_port
from devkit.samples import curl_bodies
from gateway.keys.file import write_keys_file
from gateway.keys.model import mint_key
from loadtest.benchlib import (
    BATCHES,
    RS,
    Balance,
    Result,
    count_event_ids,
    delete_topics,
    parse_args,
    run_wrk,
    server,
    server_env,
)

TARGET = "gateway" + RS
TOPICS = ("activity", "log", "profile", "deadletter")  # as bench's run_targets names them
WARM_UP_S = 2
# Far more than a run writes: a full spool would answer 503 and measure something else.
SPOOL_MAX_BYTES = 16 << 30
REPLAY_TIMEOUT_S = 600
POLL_S = 0.05


@dataclass
class SpoolRun:
    """One batch size: wrk at the spooling gateway, what its /metrics counted over the run,
    and the same gateway producing to Kafka, with the spool off and on."""

    spooled: Result
    direct: Result
    standby: Result  # the spool on, Kafka up: what the spool costs while it is not used
    records_spooled: int  # cafe_spool_records_spooled_total's increase
    commits: int  # group commits: cafe_spool_write_seconds_count's increase
    commit_seconds: float  # their time: cafe_spool_write_seconds_sum's increase

    @property
    def in_flight(self) -> float:
        """Requests spooled but not answered: wrk drops those in flight when it stops."""
        return (self.records_spooled - self.spooled.ok * self.spooled.batch) / self.spooled.batch

    @property
    def counted(self) -> bool:
        """The spool wrote the records answered 2xx, and besides at most those of one
        request per connection (in flight at wrk's end)."""
        return self.in_flight.is_integer() and 0 <= self.in_flight <= self.spooled.connections


@dataclass
class Replay:
    """The spool emptying into Kafka, with no client traffic."""

    records: int  # cafe_spool_records_replayed_total once empty
    records_per_s: int  # from the first replayed window to empty
    to_empty_s: float  # from the gateway's first answer to empty


@dataclass
class Spool:
    """What the spool run found."""

    runs: list[SpoolRun]
    replay: Replay
    books: Balance  # records spooled (the metric, warm-ups included); their eventIds on the topic
    header: bool  # a probe request was answered 200 with X-Cafe-Spooled: true
    filesystem: str  # the spool's (on tmpfs an fsync costs nothing)

    @property
    def ok(self) -> bool:
        """The books balance and every answer was spooled."""
        return self.books.ok and self.header and all(run.counted for run in self.runs)

    def markdown(self) -> str:
        """The table, the replay and the books."""
        lines = [
            f"{TARGET}, one process, with Kafka down (its bootstrap a closed port): every "
            f"request spooled, fsynced per group commit (spool on {self.filesystem}); "
            "direct: the same gateway producing to Kafka in this run; standby: the same "
            "with the spool on and Kafka up (nothing spooled).",
            "",
            "| batch | spooled records/s | direct records/s | spooled vs direct "
            "| standby vs direct | p50 ms | p99 ms "
            "| direct p99 ms | non-2xx | group commits | mean commit ms | records spooled "
            "| 2xx x batch | in flight at end |",
            "|---|" + "---:|" * 13,
        ]
        for run in self.runs:
            s, d, o = run.spooled, run.direct, run.standby
            ratio = f"{s.records_per_s / d.records_per_s:.0%}" if d.records_per_s else ""
            standby = f"{o.records_per_s / d.records_per_s:.0%}" if d.records_per_s else ""
            mean = f"{run.commit_seconds / run.commits * 1000:.2f}" if run.commits else ""
            lines.append(
                f"| W{s.batch} | {s.records_per_s:,} | {d.records_per_s:,} | {ratio} | {standby} "
                f"| {s.p50_ms:.1f} | {s.p99_ms:.1f} | {d.p99_ms:.1f} | {s.requests - s.ok:,} "
                f"| {run.commits:,} | {mean} | {run.records_spooled:,} | {s.ok * s.batch:,} "
                f"| {run.in_flight:g} |"
            )
        replay, books = self.replay, self.books
        counted = "yes" if all(run.counted for run in self.runs) else "**no**"
        lines += [
            "",
            f"Replay, with no client traffic: {replay.records:,} records at "
            f"{replay.records_per_s:,} records/s (from the first replayed window); the spool "
            f"was empty {replay.to_empty_s:.1f} s after the gateway first answered.",
            "",
            f"Books: {books.acknowledged:,} records spooled (warm-ups included), "
            f"{books.on_topic:,} of their eventIds on the topic after the replay: "
            f"{books.verdict}. Records spooled = (2xx answers + requests in flight when wrk "
            f"stopped, at most one per connection) x batch in every run: {counted}; "
            f"X-Cafe-Spooled: true on a probe request: {'yes' if self.header else '**no**'}.",
        ]
        return "\n".join(lines)

    def as_report(self) -> dict[str, Any]:
        """For the JSON report."""
        return {**asdict(self), "ok": self.ok}


def run(args: argparse.Namespace, results: list[Result]) -> Spool:
    """Measure spooling and replay on topics of this run's own, deleted afterwards; reuse
    bench's peak runs of gateway-rs as the direct figures if it made them."""
    run_id = uuid.uuid4().hex[:8]
    topics = {name: f"bench.{run_id}.{name}" for name in TOPICS}
    workdir = Path(tempfile.mkdtemp(prefix="cafe-spool-"))
    key, record = mint_key(("analytics-portal",))
    write_keys_file(workdir / "keys.json", [record])
    env = {**server_env(args, workdir / "keys.json", topics), "CAFE_WORKERS": "1"}
    spool_env = {
        **env,
        "CAFE_SPOOL_DIR": str(workdir / "spool"),
        "CAFE_SPOOL_MAX_BYTES": str(SPOOL_MAX_BYTES),
    }
    direct = {
        r.batch: r for r in results if r.target == TARGET and r.load == "peak" and args.workers == 1
    }
    tag = f"{run_id}s"  # the spooled records' eventIds begin with it
    try:
        missing = [batch for batch in BATCHES if batch not in direct]
        if missing:
            direct |= measure_direct(env, missing, args.seconds, key, f"{run_id}d")
        # A port just bound and closed again: nothing listens there.
        down = {**spool_env, "CAFE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
        standby = measure_direct(spool_env, list(BATCHES), args.seconds, key, f"{run_id}o")
        runs, header, spooled = measure_spooling(down, direct, standby, args.seconds, key, tag)
        replay = replay_spool(spool_env, spooled)
        on_topic = asyncio.run(count_event_ids(args.bootstrap, topics["activity"], tag))
        filesystem = filesystem_of(workdir)
    finally:
        asyncio.run(delete_topics(args.bootstrap, list(topics.values())))
        shutil.rmtree(workdir, ignore_errors=True)
    return Spool(runs, replay, Balance(spooled, on_topic), header, filesystem)


def measure_direct(
    env: dict[str, str], batches: list[int], seconds: int, key: str, tag: str
) -> dict[int, Result]:
    """The gateway producing to Kafka at each batch size, after a short warm-up."""
    found = {}
    with server(TARGET, env) as (port, proc):
        wrk = functools.partial(run_wrk, port, proc, target=TARGET, key=key, run_id=tag)
        for batch in batches:
            wrk(batch=batch, seconds=WARM_UP_S, load="warm")
            found[batch] = wrk(batch=batch, seconds=seconds)
            report("direct", found[batch])
    return found


def measure_spooling(
    env: dict[str, str],
    direct: dict[int, Result],
    standby: dict[int, Result],
    seconds: int,
    key: str,
    tag: str,
) -> tuple[list[SpoolRun], bool, int]:
    """The gateway spooling every request at each batch size; the runs, whether a probe
    was answered as spooled, and the records spooled in all."""
    runs = []
    with server(TARGET, env) as (port, proc):
        header = probe(port, key, tag)
        wrk = functools.partial(run_wrk, port, proc, target=TARGET, key=key, run_id=tag)
        for batch in BATCHES:
            wrk(batch=batch, seconds=WARM_UP_S, load="warm")
            before = settled_metrics(port)
            result = wrk(batch=batch, seconds=seconds)
            after = settled_metrics(port)
            runs.append(
                SpoolRun(
                    result,
                    direct[batch],
                    standby[batch],
                    round(delta(before, after, "cafe_spool_records_spooled_total")),
                    round(delta(before, after, "cafe_spool_write_seconds_count")),
                    delta(before, after, "cafe_spool_write_seconds_sum"),
                )
            )
            report("spooled", result)
        spooled = round(settled_metrics(port)["cafe_spool_records_spooled_total"])
    return runs, header, spooled


def replay_spool(env: dict[str, str], spooled: int) -> Replay:
    """Start a gateway on the spool with Kafka up and no traffic; time it until empty.

    Its /metrics is polled on a port of its own (CAFE_METRICS_PORT) from the moment it
    answers, while bench's server() still waits for /readyz: the replay starts with it."""
    port = free_port()
    found: list[Replay] = []
    watcher = threading.Thread(target=watch_replay, args=(port, spooled, found), daemon=True)
    watcher.start()
    with server(TARGET, {**env, "CAFE_METRICS_PORT": str(port)}):
        watcher.join(REPLAY_TIMEOUT_S)
    if not found:
        raise SystemExit(f"the spool did not empty within {REPLAY_TIMEOUT_S}s")
    print(f"{'replayed':10} {found[0].records:,} records at {found[0].records_per_s:,}/s")
    return found[0]


def watch_replay(port: int, spooled: int, found: list[Replay]) -> None:
    """Poll /metrics until all `spooled` records are replayed and the spool is empty."""
    deadline = time.monotonic() + REPLAY_TIMEOUT_S
    up: float | None = None
    first: tuple[float, float] | None = None  # when a replayed window was first seen
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        try:
            metrics = unlabelled_metrics(port)
        except OSError:
            continue  # not listening yet
        now = time.monotonic()
        up = up or now
        replayed = metrics["cafe_spool_records_replayed_total"]
        if replayed and first is None:
            first = (now, replayed)
        if replayed >= spooled and metrics["cafe_spool_records"] == 0:
            # Emptied by the first window seen: count from the gateway's first answer.
            since, already = first if first and now > first[0] else (up, 0.0)
            rate = (replayed - already) / max(now - since, POLL_S)
            found.append(Replay(round(replayed), round(rate), round(now - up, 2)))
            return


def probe(port: int, key: str, tag: str) -> bool:
    """Send the spec's activity sample (with an eventId of the run's): answered 200 with
    X-Cafe-Spooled: true?"""
    body = orjson.loads(curl_bodies()["activity"])
    body["records"][0]["eventId"] = f"{tag}-probe"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/activity",
        data=orjson.dumps(body),
        headers={"x-api-key": key, "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 (http://)
            return bool(answer.status == 200 and answer.headers["X-Cafe-Spooled"] == "true")
    except urllib.error.HTTPError:
        return False


def unlabelled_metrics(port: int) -> dict[str, float]:
    """The gateway's metrics without labels, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    pairs = (line.partition(" ") for line in text.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, _, value in pairs if name and "{" not in name}


def settled_metrics(port: int) -> dict[str, float]:
    """The metrics once the requests wrk left in flight at its end are written."""
    time.sleep(0.5)
    return unlabelled_metrics(port)


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """How much a metric rose."""
    return after[name] - before[name]


def filesystem_of(path: Path) -> str:
    """The type of the file system `path` is on."""
    mounts = [m for m in psutil.disk_partitions(all=True) if path.is_relative_to(m.mountpoint)]
    return max(mounts, key=lambda m: len(m.mountpoint)).fstype if mounts else "unknown"


def report(what: str, result: Result) -> None:
    """One line of progress, as bench prints its runs."""
    print(f"{what:10} W{result.batch:<4} {result.records_per_s:>9,} records/s", end="  ")
    print(f"p99 {result.p99_ms:6.1f} ms", flush=True)


if __name__ == "__main__":
    # A quick look, without the rest of bench: `python -m loadtest.spoolbench --seconds 5`.
    print(run(parse_args(), []).markdown())
