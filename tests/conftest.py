"""Fixtures shared by unit and integration tests, and the run's header and summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import Settings
from gateway.http.state import SETTINGS
from tests.support.app import VALIDATOR, AiohttpClient, GatewayClient, GatewayTestServer
from tests.support.deploy import DOCKERFILE, ROOT, Tools, deploycheck, install_tools
from tests.support.keys import KeyFile, make_key_file


def pytest_report_header() -> str:
    return f"record validator: {VALIDATOR} (CAFE_VALIDATOR)"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how many hostile-input and fuzz cases ran, and how many passed."""
    files = (
        "tests/test_hostile.py",
        "tests/test_ingest_properties.py",
        "tests/integration/test_fuzz.py",
    )
    reports = [
        report
        for outcome in ("passed", "failed", "xfailed", "xpassed", "error")
        for report in terminalreporter.stats.get(outcome, [])
        if getattr(report, "when", "call") == "call" and report.nodeid.startswith(files)
    ]
    if reports:
        passed = sum(1 for r in reports if r.passed)
        terminalreporter.write_line(
            f"hostile input: {passed} of {len(reports)} cases passed "
            "(tests/test_hostile.py tables, property tests, schemathesis)"
        )


@pytest.fixture
def key_file(tmp_path: Path) -> KeyFile:
    """A keys file with one enabled key for the platform analytics-portal."""
    return make_key_file(tmp_path)


@pytest.fixture
def aiohttp_client(aiohttp_client: AiohttpClient) -> AiohttpClient:
    """pytest-aiohttp's fixture, serving every gateway app through GatewayTestServer, and
    only one that validates records with the suite's VALIDATOR."""

    async def client(app: Any, **kwargs: Any) -> TestClient:  # type: ignore[type-arg]
        if isinstance(app, web.Application) and SETTINGS in app:
            validator = app[SETTINGS].validator
            assert validator == VALIDATOR, (
                f"a gateway validating with {validator}, not the suite's {VALIDATOR}: "
                "build its Settings with tests.support.app.gateway_settings"
            )
            app = GatewayTestServer(app, **kwargs.pop("server_kwargs", {}))
        return await aiohttp_client(app, **kwargs)

    return client


@pytest.fixture
def gateway_client(aiohttp_client: AiohttpClient) -> GatewayClient:
    """Makes a gateway app of Settings and create_app's keyword arguments (sink,
    registry...), and returns a test client of it; `server_kwargs` go to its server."""

    async def client(settings: Settings, **kwargs: Any) -> TestClient:  # type: ignore[type-arg]
        server_kwargs = kwargs.pop("server_kwargs", {})
        return await aiohttp_client(create_app(settings, **kwargs), server_kwargs=server_kwargs)

    return client


@pytest.fixture(scope="session")
def tools() -> Tools:
    """The pinned tools deploy/ is checked with (deploy/tools.sh), installed or from the
    cache in ~/.cache/cafe-gateway/tools (CAFE_TOOLS_DIR)."""
    return install_tools()


@pytest.fixture(scope="session")
def dockerfile(tools: Tools) -> dict[str, Any]:
    """deploy/docker/Dockerfile as BuildKit's parser reads it, with its lint warnings."""
    report: dict[str, Any] = deploycheck(tools, "dockerfile", str(DOCKERFILE), str(ROOT))
    return report
