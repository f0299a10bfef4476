"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import Settings
from gateway.http.listener import GatewayRunner
from gateway.http.state import SETTINGS
from tests.keys import KeyFile, make_key_file

# The type of pytest-aiohttp's `aiohttp_client` fixture, for every test's annotations.
AiohttpClient = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]

# The record validator the suite runs with: CAFE_VALIDATOR, read and checked as `serve`
# reads it (.ci/run runs the suite with each). Gateways the integration tests start as
# processes inherit the variable; Settings a test builds get it as their default (a test
# that names a validator keeps its own), and so does every gateway made from them.
VALIDATOR = Settings.from_env({"CAFE_VALIDATOR": os.environ.get("CAFE_VALIDATOR", "")}).validator
Settings.__init__ = functools.partialmethod(Settings.__init__, validator=VALIDATOR)  # type: ignore[method-assign,assignment]


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
