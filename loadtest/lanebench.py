"""The fast lane against the general path, in alternating pairs of runs.

    python -m loadtest.lanebench [--rounds 3] [--seconds 5] [--batches 1,20]
                                 [--targets gateway,no-sink]

Each round runs each target twice at each batch size, once with CAFE_FAST_LANE=false and
once with true, one after the other, so both see the same moment of this shared
machine; it prints requests/s and the server's CPU µs a request, and the ratios of the
fast lane to the general path. Needs wrk and the local Kafka, as `make bench` does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import uuid
from pathlib import Path

from gateway.keys.file import write_keys_file
from gateway.keys.model import mint_key
from loadtest.benchlib import TOPIC_PARTITIONS, delete_topics, measured_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--batches", default="1,20")
    parser.add_argument("--targets", default="gateway,no-sink")
    parser.add_argument(
        "--bootstrap", default=os.environ.get("CAFE_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    run_id = uuid.uuid4().hex[:8]
    topics = {n: f"bench.{run_id}.{n}" for n in ("activity", "log", "profile", "deadletter")}
    workdir = Path(tempfile.mkdtemp(prefix="cafe-lanebench-"))
    key, record = mint_key(("analytics-portal",))
    write_keys_file(workdir / "keys.json", [record])
    env = {
        **os.environ,
        "CAFE_KEYS_FILE": str(workdir / "keys.json"),
        "CAFE_KAFKA_BOOTSTRAP": args.bootstrap,
        "CAFE_TOPIC_PARTITIONS": str(TOPIC_PARTITIONS),
        "CAFE_ACCESS_LOG": "false",
        **{f"CAFE_TOPIC_{name.upper()}": topic for name, topic in topics.items()},
    }
    # (target, batch, fast lane) -> [(requests/s, CPU µs a request)] of each round.
    seen: dict[tuple[str, int, bool], list[tuple[float, float]]] = {}
    try:
        for round_ in range(1, args.rounds + 1):
            for target in args.targets.split(","):
                for batch in batches:
                    for fast in (False, True):
                        lane = {"CAFE_FAST_LANE": "true" if fast else "false"}
                        rate, cpu_us = measured_run(
                            target, {**env, **lane}, batch=batch, seconds=args.seconds,
                            key=key, run_id=f"{run_id}-{round_}-{fast}",
                        )  # fmt: skip
                        seen.setdefault((target, batch, fast), []).append((rate, cpu_us))
                        said = "on " if fast else "off"
                        print(
                            f"round {round_} {target:8} W{batch:<3} fast lane {said} "
                            f"{rate:7,.0f} requests/s {cpu_us:6.1f} CPU µs a request",
                            flush=True,
                        )
    finally:
        asyncio.run(delete_topics(args.bootstrap, list(topics.values())))
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nmedians over the rounds, and the fast lane against the general path:")
    for target in args.targets.split(","):
        for batch in batches:
            off, on = seen[(target, batch, False)], seen[(target, batch, True)]
            rate_off, rate_on = (statistics.median(r for r, _ in runs) for runs in (off, on))
            cpu_off, cpu_on = (statistics.median(c for _, c in runs) for runs in (off, on))
            print(
                f"{target:8} W{batch:<3} requests/s {rate_off:,.0f} -> {rate_on:,.0f}"
                f" ({rate_on / rate_off:.2f}x); CPU µs a request {cpu_off:.1f} -> {cpu_on:.1f}"
                f" ({cpu_on / cpu_off:.2f}x)"
            )


if __name__ == "__main__":
    main()
