"""deploy/kafka/kafka.sh: a second broker on other ports, started and stopped twice."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.net import free_ports
from tests.support.kafka import KAFKA_SH, kafka_sh

pytestmark = pytest.mark.integration


@pytest.fixture
def ports_env() -> Iterator[dict[str, str]]:
    """Environment for a broker on two free ports; it shares the jar cache with the main one.
    Its data and logs are deleted afterwards."""
    port, controller_port = free_ports(2)
    env = {
        **os.environ,
        "CAFE_KAFKA_PORT": str(port),
        "CAFE_KAFKA_CONTROLLER_PORT": str(controller_port),
    }
    yield env
    kafka_sh("destroy", env=env)


def test_up_and_down_are_idempotent(ports_env: dict[str, str]) -> None:
    port = ports_env["CAFE_KAFKA_PORT"]
    try:
        first = kafka_sh("up", env=ports_env)
        assert first.returncode == 0, first.stderr
        assert f"ready on 127.0.0.1:{port}" in first.stderr
        again = kafka_sh("up", env=ports_env)
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stderr
        assert kafka_sh("status", env=ports_env).returncode == 0
    finally:
        down = kafka_sh("down", env=ports_env)
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stderr
    down_again = kafka_sh("down", env=ports_env)
    assert down_again.returncode == 0, down_again.stderr
    assert "not running" in down_again.stderr
    assert kafka_sh("status", env=ports_env).returncode == 3
    # "starting Apache Kafka ... (logs: <its run directory>/logs)"
    run_dir = Path(first.stderr.split("(logs: ", 1)[1].split(")", 1)[0]).parent
    assert (run_dir.name, run_dir.is_dir()) == (f"run-{port}", True)
    destroyed = kafka_sh("destroy", env=ports_env)
    assert destroyed.returncode == 0, destroyed.stderr
    assert f"deleted {run_dir}" in destroyed.stderr
    assert not run_dir.exists()


def test_a_broker_that_cannot_start_shows_its_log_and_fails(ports_env: dict[str, str]) -> None:
    # A 1 MB heap is too small for the JVM to boot at all.
    result = kafka_sh("up", env={**ports_env, "CAFE_KAFKA_HEAP": "-Xms1m -Xmx1m"})
    assert result.returncode == 1, result.stderr
    assert "stdout.log" in result.stderr, result.stderr
    assert "heap" in result.stderr.lower(), result.stderr
    assert kafka_sh("status", env=ports_env).returncode == 3


def _can_unshare_network() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_network(), reason="needs `unshare -n` (root) and `ip`")
def test_a_start_after_the_first_needs_no_network(ports_env: dict[str, str]) -> None:
    # The main broker already filled the jar cache; in a fresh network namespace only
    # loopback exists, so any attempt to reach Maven Central would fail the start.
    script = f"ip link set lo up && {KAFKA_SH} up && {KAFKA_SH} down"
    result = subprocess.run(
        ["unshare", "-n", "bash", "-c", script],
        env=ports_env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "resolving" not in result.stderr
    assert "ready on 127.0.0.1" in result.stderr
    assert "stopped" in result.stderr
