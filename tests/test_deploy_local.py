"""deploy/redis/redis.sh, run on a port of its own with Debian's redis-server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from devkit.net import free_port
from tests.support.deploy import DEPLOY

REDIS_SH = DEPLOY / "redis" / "redis.sh"


def redis_cli(port: int, *words: str) -> list[str]:
    """The lines redis-cli prints for one command (redis-server's package brings it)."""
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *words], capture_output=True, text=True, timeout=10
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[:-1]


def test_redis_sh_runs_a_loopback_redis_without_persistence(tmp_path: Path) -> None:
    """up, up again, status, down, down again, status: on a port and home of the test's
    own, leaving the Redis that `make test` uses alone."""
    port = free_port()
    env = {**os.environ, "CAFE_REDIS_PORT": str(port), "CAFE_REDIS_HOME": str(tmp_path)}

    def redis_sh(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(REDIS_SH), command], env=env, capture_output=True, text=True, timeout=60
        )

    try:
        for _ in range(2):
            up = redis_sh("up")
            assert up.returncode == 0, up.stderr
        assert redis_sh("status").returncode == 0
        assert redis_cli(port, "PING") == ["PONG"]
        settings = {"bind": "127.0.0.1", "protected-mode": "yes", "save": "", "appendonly": "no"}
        for name, value in settings.items():
            assert redis_cli(port, "CONFIG", "GET", name) == [name, value]
    finally:
        down = redis_sh("down")
    assert down.returncode == 0, down.stderr
    assert redis_sh("down").returncode == 0
    status = redis_sh("status")
    assert status.returncode == 3, status.stderr
    assert list(tmp_path.glob("**/*.rdb")) == []
