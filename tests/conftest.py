"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.listener import GatewayRunner
from gateway.state import SETTINGS
from tests.keys import KeyFile, make_key_file

# The type of pytest-aiohttp's `aiohttp_client` fixture, for every test's annotations.
AiohttpClient = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


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


class GatewayTestServer(TestServer):
    """A test server that serves a gateway app as `cafe-gateway serve` does: through
    GatewayRunner, so the connection cap and the answers to unparsable requests hold."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        # aiohttp's test server cancels a handler whose client has gone; `serve` does not
        # (aiohttp's default), so a request keeps running to its answer, as in production.
        kwargs.pop("handler_cancellation", None)
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
def aiohttp_client(aiohttp_client: AiohttpClient) -> AiohttpClient:
    """pytest-aiohttp's fixture, serving every gateway app through GatewayTestServer."""

    async def client(app: Any, **kwargs: Any) -> TestClient:  # type: ignore[type-arg]
        if isinstance(app, web.Application) and SETTINGS in app:
            app = GatewayTestServer(app, **kwargs.pop("server_kwargs", {}))
        return await aiohttp_client(app, **kwargs)

    return client
