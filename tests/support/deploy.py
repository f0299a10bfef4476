"""deploy/ as its consumers read it: paths, the pinned tools, and checks several files share."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
# Over COMPOSE_FILE: the gateway against a Kafka that asks for TLS and a login.
COMPOSE_SECURE_FILE = DEPLOY / "docker-compose.secure.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "cafe-gateway.json"

# Where the pods (from the optional Secret cafe-gateway-kafka) and the secure compose file
# (compose secrets) put the files of Kafka's credentials, and the files that may be there.
KAFKA_SECRETS_DIR = PurePosixPath("/run/secrets/kafka")
KAFKA_SECRET_FILES = {"password", "ca.crt", "tls.crt", "tls.key", "token"}
# Where the image, compose and spool-statefulset.yaml keep the spool (CAFE_SPOOL_DIR).
SPOOL_DIR = "/var/lib/cafe-gateway/spool"
TOOLS_TIMEOUT_SECONDS = 1200


@dataclass(frozen=True)
class Tools:
    """Where deploy/tools.sh put the pinned tools."""

    deploycheck: Path
    kubernetes_validate: Path


def deploycheck(tools: Tools, *args: str, stdin: str | None = None) -> Any:
    """Run deploycheck and return the JSON it prints; fail the test if it fails."""
    done = subprocess.run(
        [str(tools.deploycheck), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"deploycheck {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def gateway_setting_names() -> set[str]:
    """Every CAFE_* variable the gateway's code reads."""
    names: set[str] = set()
    for source in (ROOT / "gateway").rglob("*.py"):
        names.update(re.findall(r'"(CAFE_[A-Z0-9_]+)"', source.read_text(encoding="utf-8")))
    return names


def check_gateway_env(env: dict[str, str], where: str) -> None:
    """`env` names only variables the gateway reads, with values its parser accepts."""
    from gateway.config import Settings

    cafe = {k: v for k, v in env.items() if k.startswith("CAFE_")}
    unknown = set(cafe) - gateway_setting_names()
    assert not unknown, f"{where} sets variables the gateway does not read: {sorted(unknown)}"
    Settings.from_env(cafe)  # raises ConfigError, naming the variable, on a bad value


def commented_examples(path: Path) -> list[dict[str, str]]:
    """Each run of commented-out `# CAFE_NAME: value` lines in `path`, as settings."""
    examples: list[dict[str, str]] = []
    example: dict[str, str] = {}
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        match = re.fullmatch(r" *# (CAFE_[A-Z0-9_]+: .+)", line)
        if match:
            [(name, value)] = yaml.safe_load(match[1]).items()
            assert name not in example, f"{path.name}: {name} twice in one example"
            example[name] = str(value)
        elif example:
            examples.append(example)
            example = {}
    return examples


def kafka_secret_files(env: dict[str, str]) -> dict[str, PurePosixPath]:
    """The settings of `env` whose value is a path under KAFKA_SECRETS_DIR."""
    return {
        name: PurePosixPath(value)
        for name, value in env.items()
        if PurePosixPath(value).is_relative_to(KAFKA_SECRETS_DIR)
    }


def check_kafka_example(
    env: dict[str, str], where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """`env` is a configuration the gateway starts with once the files it names under
    KAFKA_SECRETS_DIR are there: each is made in `tmp_path`, and `env` points there.
    Returns the Settings."""
    from gateway.config import Settings

    # The files made here are placeholders, not PEM: the TLS context is not built.
    monkeypatch.setattr("gateway.config.KafkaSecurity.tls_context", lambda security: None)
    local = dict(env)
    for name, path in kafka_secret_files(env).items():
        file = tmp_path / path.relative_to(KAFKA_SECRETS_DIR)
        file.write_text("placeholder\n", encoding="utf-8")
        local[name] = str(file)
    check_gateway_env(local, where)
    return Settings.from_env({k: v for k, v in local.items() if k.startswith("CAFE_")})


def install_tools() -> Tools:
    """Install (or find in the cache) the pinned tools of deploy/tools.sh; a tool that cannot
    be installed fails the test, none is skipped."""
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        done = subprocess.run(
            ["bash", str(DEPLOY / "tools.sh")],
            capture_output=True,
            text=True,
            env=env,
            timeout=TOOLS_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"deploy/tools.sh took over {TOOLS_TIMEOUT_SECONDS} s")
    if done.returncode != 0:
        pytest.fail(
            "deploy/tools.sh could not install the deploy checks' tools "
            f"(exit {done.returncode}); a cold cache needs the Go module proxy and PyPI:\n"
            f"{done.stderr[-4000:]}"
        )
    paths = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    return Tools(
        deploycheck=Path(paths["deploycheck"]),
        kubernetes_validate=Path(paths["kubernetes-validate"]),
    )


def commented_setting(path: Path, name: str) -> str:
    """The value of the one commented-out `# NAME: value` line in `path`."""
    [value] = re.findall(rf"^ *# {name}: (\S+)$", path.read_text(encoding="utf-8"), re.M)
    return str(value)


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def load_dashboard_datasource_uid() -> str:
    [variable] = [v for v in load_dashboard()["templating"]["list"] if v["type"] == "datasource"]
    uid: str = variable["current"]["value"]
    return uid
