"""The image (deploy/docker/Dockerfile), read by BuildKit's parser and checked by its lint
rules (`docker build --check`), and the build context it is sent."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.support.deploy import (
    DOCKERFILE,
    ROOT,
    SPOOL_DIR,
)


def test_dockerfile_has_no_lint_warnings(dockerfile: dict[str, Any]) -> None:
    assert not dockerfile["warnings"], json.dumps(dockerfile["warnings"], indent=2)


def test_image_runs_the_gateway_as_a_non_root_user(dockerfile: dict[str, Any]) -> None:
    stages = dockerfile["stages"]
    assert all(s["base"].startswith("python:3.11-slim") for s in stages), stages
    final = stages[-1]
    user = final["user"].split(":")[0]
    assert user.isdigit(), f"USER {final['user']!r}: a numeric uid lets runAsNonRoot verify it"
    assert int(user) != 0
    assert final["entrypoint"] == ["cafe-gateway"]
    assert final["entrypoint_json"], "ENTRYPOINT in shell form would not get SIGTERM"
    assert final["cmd"] == ["serve"]
    assert {"8080", "9100"} <= set(final["expose"])
    assert "CAFE_HOST=0.0.0.0" in final["env"]


def test_image_healthcheck_asks_healthz_without_curl(dockerfile: dict[str, Any]) -> None:
    test = dockerfile["stages"][-1]["healthcheck"]
    assert test, "the image has no HEALTHCHECK"
    assert test[0] == "CMD"
    assert test[1] == "python", "python:3.11-slim has no curl or wget"
    assert "/healthz" in test[-1]


def test_image_installs_with_the_pinned_constraints() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"pip install -c constraints\.txt \.", text)


def test_image_gives_the_spool_directory_to_its_user() -> None:
    # An empty named volume mounted there takes the directory's owner from the image.
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(rf"mkdir -p [^\n]*{SPOOL_DIR}", text), f"the image makes no {SPOOL_DIR}"
    assert re.search(rf"chown cafe:cafe [^\n]*{SPOOL_DIR}", text), f"{SPOOL_DIR} is root's"


def test_dockerfile_copies_only_files_the_build_context_sends(dockerfile: dict[str, Any]) -> None:
    sources = dockerfile["copy_sources"]
    assert sources
    missing = [s["path"] for s in sources if not s["exists"]]
    ignored = [s["path"] for s in sources if s["ignored"]]
    assert not missing, f"COPY of paths that do not exist: {missing}"
    assert not ignored, f"COPY of paths .dockerignore leaves out of the context: {ignored}"


def test_dockerignore_leaves_out_local_state() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    wanted = {".git", ".venv", ".dev", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
    wanted |= {"docs/bench", "loadtest/results"}
    assert wanted <= patterns, sorted(wanted - patterns)
