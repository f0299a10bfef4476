"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.keys import KeyFile, make_key_file


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
