"""`make bench`: the gateway on real Kafka against its ceilings, in one run.

For each batch size (W500, W20, W1 records per request) wrk drives POST /v1/activity
(each record's sessionId drawn from a million, or --sessions) at each server in turn:
the gateway producing to the local Kafka, the same gateway with Kafka switched off (its
parse + validate + encode ceiling), each of the two with either record validator
(CAFE_VALIDATOR: "gateway" and "no-sink" with fastjsonschema, "gateway-rs" and
"no-sink-rs" with jsonschema-rs), and a bare aiohttp handler that reads the body and
answers. Then each gateway runs again at half its peak rate, for latency under a normal
load. Last, the books: every eventId a gateway acknowledged must be on the topic. Beside
the table, what each validator costs per record.

With --peer, two HTTP-to-Kafka bridges developed independently of the gateway (deploy/
peer/: Bento and the Strimzi Kafka Bridge) get the same records at the same batch sizes
on the same broker, in the Kafka REST JSON embedded format, and each one's books are
checked on its own topic. Last, each of the gateway's performance goals (issue 28) is
marked met or not met with the figures that decide it.

The server is pinned to CPU 0 and wrk to CPU 1 (on a 2-core machine the broker shares
them), so the load generator never starves the server it measures. Only loopback
traffic; every run is bounded by its duration.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import timeit
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from devkit.samples import curl_bodies
from gateway.keys.file import write_keys_file
from gateway.keys.model import mint_key
from gateway.schemas import load_record_types
from loadtest import codecbench, limitbench, spoolbench
from loadtest.benchlib import (
    BATCHES,
    CONNECTIONS,
    PEERS,
    RS,
    SESSIONS,
    TARGETS,
    VALIDATORS,
    Balance,
    Result,
    count_event_ids,
    create_topic,
    delete_topics,
    kind,
    parse_args,
    run_wrk,
    server,
    server_env,
)
from loadtest.codecbench import Codecs
from loadtest.limitbench import Limits
from loadtest.spoolbench import Spool

# 16 times the connections that keep the gateway busy at W500.
OVERLOAD_CONNECTIONS = 128


def cpu_model() -> str:
    """The processor's name as Linux reports it, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def table(results: list[Result]) -> str:
    peak = {(r.target, r.batch): r for r in results if r.load == "peak"}
    lines = [
        "| batch | server | records/s | requests/s | p50 ms | p99 ms | p99.9 ms | CPU % "
        "| CPU µs/request | CPU µs/record | max RSS MB | non-2xx | vs no-sink | vs bare |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        # Ratios compare peaks with peaks; the other loads are not trying for the most.
        # A gateway's ceiling is the no-sink run with its validator.
        ceiling = "no-sink" + (RS if r.target.endswith(RS) else "")
        no_sink = peak.get((ceiling, r.batch)) if r.load == "peak" else None
        bare = peak.get(("bare", r.batch)) if r.load == "peak" else None
        ratio = ""
        # no-sink is the gateway's own ceiling: it bounds neither bare nor the peers.
        if no_sink and kind(r.target) in ("gateway", "no-sink"):
            ratio = f"{r.requests_per_s / no_sink.requests_per_s:.0%}"
        bare_ratio = f"{r.requests_per_s / bare.requests_per_s:.0%}" if bare else ""
        name = r.target if r.load == "peak" else f"{r.target} ({r.load}, {r.connections} conns)"
        # What a request and a record cost in CPU time, at the peak only (the server's
        # whole process tree, Kafka client included): a regression shows as a number.
        per_request = per_record = ""
        if r.load == "peak" and r.requests_per_s:
            us = r.cpu_percent / 100 * 1e6 / r.requests_per_s
            per_request, per_record = f"{us:,.0f}", f"{us / r.batch:,.1f}"
        lines.append(
            f"| W{r.batch} | {name} | {r.records_per_s:,} | {r.requests_per_s:,} | {r.p50_ms:.1f} "
            f"| {r.p99_ms:.1f} | {r.p999_ms:.1f} | {r.cpu_percent} | {per_request} | {per_record} "
            f"| {r.rss_max_mb:.0f} | {r.requests - r.ok:,} | {ratio} | {bare_ratio} |"
        )
    return "\n".join(lines)


def side_by_side(results: list[Result]) -> str:
    """The gateway, with each validator, and each peer at each batch size (peak runs);
    how many times a peer's records/s the gateway's are."""
    peak = {(r.target, r.batch): r for r in results if r.load == "peak"}
    peers = [name for name in PEERS if any(r.target == name for r in results)]
    gateways = [t for t in ("gateway", "gateway" + RS) if any(r.target == t for r in results)]
    header = "| batch | " + " | ".join(f"{t} records/s" for t in gateways)
    rule = "|---|" + "---:|" * len(gateways)
    for name in peers:
        header += f" | {name} records/s | gateway vs {name}"
        rule += "---:|---:|"
    header += " | " + " | ".join(f"{t} p99 ms" for t in (*gateways, *peers)) + " |"
    rule += "---:|" * (len(gateways) + len(peers))
    lines = [header, rule]
    for batch in BATCHES:
        rows = [peak.get((t, batch)) for t in (*gateways, *peers)]
        gateway = peak.get((gateways[0], batch)) if gateways else None
        if gateway is None or any(row is None for row in rows):
            continue
        cells = [f"W{batch}", *(f"{peak[t, batch].records_per_s:,}" for t in gateways)]
        for name in peers:
            peer = peak[name, batch]
            times = gateway.records_per_s / peer.records_per_s if peer.records_per_s else 0
            cells += [f"{peer.records_per_s:,}", f"{times:.1f}x"]
        cells += [f"{row.p99_ms:.1f}" for row in rows if row is not None]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: list[Result], books: Balance | None = None) -> str:
    """Issue 28's goals for one gateway process with the fast validator (gateway-rs),
    each marked met or not met, with the figures that decide it. A goal against a peer
    is left out when that peer did not run."""
    peak = {(r.target, r.batch): r for r in results if r.load == "peak"}
    half = {(r.target, r.batch): r for r in results if r.load == "half"}
    fast = "gateway" + RS
    lines: list[str] = []

    def goal(text: str, met: bool, figures: str) -> None:
        lines.append(f"- {'met' if met else '**not met**'}: {text} ({figures})")

    def at(target: str, batch: int) -> Result | None:
        return peak.get((target, batch))

    # Bento is the bar at every batch size: at W1 in requests/s, what a request costs (at
    # one record a request, records/s and requests/s are one figure).
    for batch, times in ((1, 1), (20, 1.5), (500, 2)):
        run, bento = at(fast, batch), at("bento", batch)
        if batch == 500 and run:
            goal("W500 at least 100,000 records/s", run.records_per_s >= 100_000,
                 f"{run.records_per_s:,}")  # fmt: skip
        if run and bento:
            unit = "requests/s" if batch == 1 else "records/s"
            bar = "Bento's" if times == 1 else f"{times:g} times Bento's"
            figures = f"{run.records_per_s:,} against {bento.records_per_s:,}"
            if bento.records_per_s:
                figures += f": {run.records_per_s / bento.records_per_s:.2f}x"
            goal(f"W{batch} {unit} at least {bar}",
                 run.records_per_s >= times * bento.records_per_s, figures)  # fmt: skip
    strimzi = [(b, at(fast, b), at("strimzi", b)) for b in BATCHES]
    pairs = [
        (b, g.records_per_s / p.records_per_s) for b, g, p in strimzi if g and p and p.records_per_s
    ]
    if pairs:
        goal("at least 5 times the Strimzi Kafka Bridge's records/s at every batch size",
             all(times >= 5 for _, times in pairs),
             ", ".join(f"W{b} {times:.1f}x" for b, times in pairs))  # fmt: skip
    for batch in (20, 1):
        run = half.get((fast, batch))
        if run:
            goal(f"W{batch} p99 at most 20 ms at half load", run.p99_ms <= 20,
                 f"{run.p99_ms:.1f} ms at {run.requests_per_s:,} requests/s")  # fmt: skip
    if books is not None:
        goal("every record the gateway acknowledged with a 2xx is on its topic", books.ok,
             f"{books.acknowledged:,} acknowledged, {books.on_topic:,} on the topic")  # fmt: skip
    if not lines:
        return ""
    return "Goals (issue 28), for gateway-rs:\n\n" + "\n".join(lines)


def chart(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"W{b}" for b in BATCHES]
    targets = [t for t in (*TARGETS, *PEERS) if any(r.target == t for r in results)]
    width = 0.8 / len(targets)
    for i, target in enumerate(targets):
        rows = {r.batch: r for r in results if r.target == target and r.load == "peak"}
        xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(BATCHES))]
        left.bar(xs, [rows[b].records_per_s if b in rows else 0 for b in BATCHES], width,
                 label=target)  # fmt: skip
        right.bar(xs, [rows[b].p99_ms if b in rows else 0 for b in BATCHES], width, label=target)
    for axis, title in ((left, "records/s acknowledged (peak)"), (right, "p99 latency ms (peak)")):
        axis.set_xticks(range(len(BATCHES)), labels)
        axis.set_title(title)
        axis.legend()
    left.set_yscale("log")
    title = "cafe-gateway on one core vs its ceilings"
    peers = [PEERS[t].product for t in targets if t in PEERS]
    if peers:
        title += " and peer bridges: " + ", ".join(peers)
    fig.suptitle(f"{title} (make bench)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def measure(
    target: str,
    port: int,
    proc: psutil.Process,
    *,
    seconds: int,
    key: str,
    run_id: str,
    path: str = "/v1/activity",
    sessions: int = SESSIONS,
) -> list[Result]:
    """Peak runs at every batch size; for the gateway, then half-load runs at W20 and W1."""
    if target in PEERS:
        seconds = max(seconds, PEERS[target].min_run_s)

    def run(
        batch: int, run_seconds: int = seconds, *, warm_up: bool = False, **more: Any
    ) -> Result:
        """One wrk run at this target; a warm-up's records carry their own eventIds,
        outside the books."""
        run_as = run_id + "w" if warm_up else run_id
        return run_wrk(
            port, proc, target=target, batch=batch, seconds=run_seconds, key=key,
            run_id=run_as, path=path, sessions=sessions, **more,
        )  # fmt: skip

    results = []
    # A fresh broker is a cold JVM: until its JIT has compiled the produce path the first
    # figures measure the broker's warm-up. Warm each that produces (any may be the first
    # to produce in a run), a Java peer for longer.
    if kind(target) == "gateway":
        run(500, 10, warm_up=True)
    elif target in PEERS:
        run(500, PEERS[target].warm_up_s, warm_up=True)
    for batch in BATCHES:
        # A short warm-up keeps set-up costs out.
        run(batch, 2, warm_up=True)
        result = run(batch)
        results.append(result)
        print(f"{target:10} W{batch:<4} {result.records_per_s:>9,} records/s", end="  ")
        print(f"p99 {result.p99_ms:6.1f} ms  cpu {result.cpu_percent}%", flush=True)
    if kind(target) != "gateway":
        return results
    for batch in (20, 1):
        peak = next(r for r in results if r.batch == batch)
        # Each connection pauses so that together they send half the peak rate.
        delay = 1000 * CONNECTIONS[batch] / (peak.requests_per_s / 2)
        half = run(batch, load="half", delay_ms=delay)
        results.append(half)
        print(f"{target:10} W{batch:<4} half load: {half.requests_per_s:,} requests/s", end="  ")
        print(f"p99 {half.p99_ms:.1f} ms", flush=True)
    # Overload: many times the connections that saturate the gateway, all sending W500.
    # It must shed the excess with 503s and keep its memory bounded, then serve the
    # normal load again at once.
    over = run(500, load="overload", connections=OVERLOAD_CONNECTIONS)
    # The work admitted during the flood is bounded (CAFE_MAX_INFLIGHT_BYTES), so it is
    # done within a second; then the normal load must be served in full.
    time.sleep(1)
    after = run(500, 3, load="recovery")
    results += [over, after]
    shed = over.statuses.get("503", 0)
    print(f"{target:10} W500 overload ({OVERLOAD_CONNECTIONS} connections): {over.ok:,} served,",
          f"{shed:,} shed, max RSS {over.rss_max_mb} MB; then {after.ok:,} of",
          f"{after.requests:,} served", flush=True)  # fmt: skip
    return results


@dataclass
class Outcome:
    """What a bench run found."""

    results: list[Result]
    # By server: "gateway" (either validator) and each peer measured.
    books: dict[str, Balance]
    peer_versions: dict[str, str]  # by peer name
    costs: dict[str, float]  # validation, us per record, by validator
    workers: int  # gateway processes
    sessions: int  # distinct sessionIds the records drew from
    spool: Spool | None = None  # loadtest/spoolbench.py's run, unless --no-spool
    limits: Limits | None = None  # loadtest/limitbench.py's run, unless --no-limits
    codecs: Codecs | None = None  # loadtest/codecbench.py's run, unless --no-codecs

    def goals(self) -> str:
        """The goals' verdicts; none with several workers: the goals are for one process."""
        return goals(self.results, self.books.get("gateway")) if self.workers == 1 else ""


def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    targets = args.targets.split(",")
    if args.peer:
        targets += [name for name in PEERS if name not in targets]
    unknown = set(targets) - {*TARGETS, *PEERS}
    if unknown:
        raise SystemExit(f"no such target: {', '.join(sorted(unknown))}")
    # Installed before any run starts: a long build, which must not eat a run's time.
    versions = {name: install_peer(name) for name in PEERS if name in targets}
    # Measured first, while the machine is otherwise idle.
    costs = validation_costs()
    results, books = run_targets(args, targets)
    spool = spoolbench.run(args, results) if args.spool else None
    codecs = codecbench.run(args) if args.codecs else None
    limits = limitbench.run(args) if args.limits else None
    outcome = Outcome(
        results, books, versions, costs, args.workers, args.sessions, spool, limits, codecs
    )
    print_summary(outcome)
    write_report(args, outcome)
    if (
        not all(b.ok for b in books.values())
        or (spool and not spool.ok)
        or (codecs and not codecs.ok)
    ):
        raise SystemExit(1)


def install_peer(name: str) -> str:
    """Build a peer if it is not there yet; return its version."""
    script = PEERS[name].script
    # Its progress goes to stderr, left to the terminal.
    subprocess.run([script, "install"], check=True)
    return subprocess.run(
        [script, "version"], stdout=subprocess.PIPE, text=True, check=True
    ).stdout.strip()


def validation_costs() -> dict[str, float]:
    """Microseconds each validator takes to check the spec's activity sample, as ingest
    checks each record (RecordType.check); the best of 5 rounds of 20,000."""
    record = orjson.loads(curl_bodies()["activity"])["records"][0]
    costs = {}
    for name in VALIDATORS:
        check = load_record_types(["activity"], name)["activity"].check
        if check(record) is not None:
            raise SystemExit(f"{name} refuses the spec's activity sample: {check(record)}")
        rounds = timeit.repeat(functools.partial(check, record), repeat=5, number=20_000)
        costs[name] = round(min(rounds) / 20_000 * 1e6, 2)
    return costs


def sessions_line(sessions: int) -> str:
    return f"sessionIds (the Kafka key): {sessions:,} distinct, each record's drawn at random"


def costs_line(costs: dict[str, float]) -> str:
    each = ", ".join(f"{name} {us:.2f}" for name, us in costs.items())
    return f"validation, µs per activity record (the spec's sample, best of 5 x 20,000): {each}"


def run_targets(
    args: argparse.Namespace, targets: list[str]
) -> tuple[list[Result], dict[str, Balance]]:
    """Measure every target on topics of this run's own, then count the books of the
    gateway and of each peer that ran. The topics and the keys file are removed whatever
    happens."""
    run_id = uuid.uuid4().hex[:8]
    topics = {
        name: f"bench.{run_id}.{name}" for name in ("activity", "log", "profile", "deadletter")
    }
    workdir = Path(tempfile.mkdtemp(prefix="cafe-bench-"))
    key, record = mint_key(("analytics-portal",))
    write_keys_file(workdir / "keys.json", [record])
    env = server_env(args, workdir / "keys.json", topics)
    # Each peer writes where the URL says, to a topic of the run's own.
    peers = [name for name in PEERS if name in targets]
    topics |= {name: f"bench.{run_id}.{name}" for name in peers}

    results: list[Result] = []
    books: dict[str, Balance] = {}
    try:
        for name in peers:
            asyncio.run(create_topic(args.bootstrap, topics[name]))
        for target in targets:
            path = f"/topics/{topics[target]}" if target in PEERS else "/v1/activity"
            with server(target, env) as (port, proc):
                # Every target, peers included, gets the same sessionIds: each wrk
                # thread draws them in the same order (activity.lua seeds by thread).
                results += measure(
                    target, port, proc, seconds=args.seconds, key=key, run_id=run_id, path=path,
                    sessions=args.sessions,
                )  # fmt: skip
        for name, topic in (("gateway", topics["activity"]), *((p, topics[p]) for p in peers)):
            books[name] = count_books(args.bootstrap, topic, run_id, results, name)
    finally:
        asyncio.run(delete_topics(args.bootstrap, list(topics.values())))
        shutil.rmtree(workdir, ignore_errors=True)
    return results, books


def count_books(
    bootstrap: str, topic: str, run_id: str, results: list[Result], target: str
) -> Balance:
    """The records `target` acknowledged with a 2xx (with either validator), and how many
    of them are on `topic`."""
    acknowledged = sum(r.ok * r.batch for r in results if kind(r.target) == target)
    return Balance(acknowledged, asyncio.run(count_event_ids(bootstrap, topic, run_id)))


def print_summary(outcome: Outcome) -> None:
    print()
    print(table(outcome.results))
    print()
    print(sessions_line(outcome.sessions))
    print(costs_line(outcome.costs))
    for name, books in outcome.books.items():
        print(
            f"books of {name}: {books.acknowledged:,} records acknowledged with 2xx; "
            f"{books.on_topic:,} of this run's eventIds are on its topic: {books.verdict}"
        )
    if outcome.peer_versions:
        print()
        print(f"the gateway and {peer_list(outcome)}, peak runs:")
        print(side_by_side(outcome.results))
    if outcome.goals():
        print()
        print(outcome.goals())
    if outcome.spool:
        print()
        print(outcome.spool.markdown())
    if outcome.codecs:
        print()
        print(outcome.codecs.markdown())
    if outcome.limits:
        print()
        print(outcome.limits.markdown())


def peer_list(outcome: Outcome) -> str:
    return ", ".join(
        f"{PEERS[name].product} {version} ({PEERS[name].config})"
        for name, version in outcome.peer_versions.items()
    )


def write_report(args: argparse.Namespace, outcome: Outcome) -> None:
    """The .json, .md and .png files in --out."""
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
        },
        "seconds_per_run": args.seconds,
        "gateway_workers": args.workers,
        "sessions": outcome.sessions,
        "results": [asdict(r) for r in outcome.results],
        "books": {name: books.as_report() for name, books in outcome.books.items()},
        "validation_us_per_record": outcome.costs,
        "peers": {
            name: {"product": PEERS[name].product, "version": v, "config": PEERS[name].config}
            for name, v in outcome.peer_versions.items()
        },
    }
    markdown = table(outcome.results) + "\n\n" + sessions_line(outcome.sessions) + "\n\n"
    markdown += costs_line(outcome.costs) + "\n"
    stem = "bench" if args.workers == 1 else f"bench-workers{args.workers}"
    if outcome.peer_versions:
        markdown += f"\nThe gateway and {peer_list(outcome)}, peak runs:\n\n"
        markdown += side_by_side(outcome.results) + "\n"
        # Its own files: a run with the peers does not replace the gateway's record.
        stem += "-peer"
    if outcome.goals():
        markdown += "\n" + outcome.goals() + "\n"
    if outcome.spool:
        report["spool"] = outcome.spool.as_report()
        markdown += "\n## Spool\n\n" + outcome.spool.markdown() + "\n"
    if outcome.codecs:
        report["codecs"] = outcome.codecs.as_report()
        markdown += "\n## Kafka compression\n\n" + outcome.codecs.markdown() + "\n"
    if outcome.limits:
        report["limits"] = outcome.limits.as_report()
        markdown += "\n## Rate limits\n\n" + outcome.limits.markdown() + "\n"
        outcome.limits.write(args.out)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown)
    chart(outcome.results, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json, .md and .png")


if __name__ == "__main__":
    main()
