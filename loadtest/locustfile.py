"""Locust load test of the CAFe ingestion gateway: a mix of batches like real frontends send.

Run it headless against a gateway (needs a key that may write the platform):

    CAFE_LOADTEST_KEY=$(cat .dev/api-key) .venv/bin/locust -f loadtest/locustfile.py \
        --headless --host http://127.0.0.1:8080 --users 20 --spawn-rate 10 --run-time 1m

or `make loadtest`. Leave out --headless for the web UI on http://127.0.0.1:8089.

Environment:
    CAFE_LOADTEST_KEY       the x-api-key to send (required)
    CAFE_LOADTEST_PLATFORM  the productPlatform of every record (default analytics-portal)

Each user sends about one request per second, so --users is the offered load in requests
per second for as long as the gateway answers within a second. Any answer but 200 counts
as a failure, named by its status and problem code.
"""

from __future__ import annotations

import os
import random
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from locust import constant_throughput, task
from locust.contrib.fasthttp import FastHttpUser, ResponseContextManager

API_KEY = os.environ.get("CAFE_LOADTEST_KEY", "")
if not API_KEY:
    sys.exit("CAFE_LOADTEST_KEY is not set: export the gateway API key to load-test with")
HEADERS = {"x-api-key": API_KEY}
PLATFORM = os.environ.get("CAFE_LOADTEST_PLATFORM", "analytics-portal")

# A distinct environment lets consumers tell load-test records from real ones.
ENVIRONMENT = "loadtest"
# Enough sessions to spread records over every partition, few enough that sessions repeat,
# as they do when real clients send several batches each.
SESSIONS = [str(uuid.uuid4()) for _ in range(10_000)]
USERS = [f"sso-{uuid.uuid4().hex[:16]}" for _ in range(2_000)]

ACTIONS = [
    ("GET_REPORT", "GET_REPORT"),
    ("NAVIGATION", "OPEN_PAGE"),
    ("SEARCH", "SUBMIT_QUERY"),
    ("EXPORT", "DOWNLOAD_CSV"),
    ("SETTINGS", "SAVE_PREFERENCES"),
]
PAGES = ["/", "/reports", "/reports/risk-assessment", "/search", "/settings"]
# Mostly chatty levels, as in real client logs.
LOG_LEVELS = ["Debug"] * 5 + ["Info"] * 3 + ["Warn", "Error"]
DEVICES = [
    {
        "userAgentString": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:128.0) "
        "Gecko/20100101 Firefox/128.0",
        "browserName": "Firefox",
        "browserVersion": "128.0",
        "osName": "macOS",
        "osVersion": "10.15",
        "engineName": "Gecko",
        "platformType": "desktop",
        "platformVendor": "Apple",
        "language": "en-US",
        "screenResolution": {"width": 3008, "height": 1692},
    },
    {
        "userAgentString": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
        "browserName": "Chrome",
        "browserVersion": "126.0",
        "osName": "Windows",
        "osVersion": "10",
        "engineName": "Blink",
        "platformType": "desktop",
        "platformVendor": "Microsoft",
        "language": "de-DE",
        "screenResolution": {"width": 1920, "height": 1080},
    },
]
TIME_ZONES = ["America/Los_Angeles", "Europe/Berlin", "Asia/Kolkata"]


def now() -> str:
    """The current time in RFC 3339 with an offset, as the schemas require."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def page() -> str:
    """A random page of the product."""
    return f"https://{PLATFORM}.example.com{random.choice(PAGES)}"


def envelope(record_type: str, session: str) -> dict[str, Any]:
    """The fields every record type shares."""
    return {
        "messageFormatVersion": 1,
        "messageType": record_type,
        "productEnvironment": ENVIRONMENT,
        "productPlatform": PLATFORM,
        "sessionId": session,
    }


def activity(session: str) -> dict[str, Any]:
    """One activity record, shaped like the spec's sample."""
    category, action = random.choice(ACTIONS)
    return {
        **envelope("ClientEventingActivity", session),
        "eventTime": now(),
        "eventId": str(uuid.uuid4()),
        "eventCategory": category,
        "eventAction": action,
        "userSSOGUID": random.choice(USERS),
        "eventUri": page(),
        "tags": [{"key": "reportType", "value": "reportType:risk-assessment:ui:v1"}],
    }


def log(session: str) -> dict[str, Any]:
    """One log record, shaped like the spec's sample."""
    level = random.choice(LOG_LEVELS)
    return {
        **envelope("ClientEventingLog", session),
        "logTime": now(),
        "logLevel": level,
        "logMessage": f"{level.upper()} load-test message {uuid.uuid4().hex[:8]}",
        "eventUri": page(),
    }


def profile(session: str) -> dict[str, Any]:
    """One profile record, shaped like the spec's sample CURL."""
    return {
        **envelope("ClientEventingProfile", session),
        "eventTime": now(),
        "platform": {**random.choice(DEVICES), "browserFingerprint": uuid.uuid4().hex},
        "location": {"timeZone": random.choice(TIME_ZONES), "ipAddress": "203.0.113.7"},
    }


def check(response: ResponseContextManager) -> None:
    """Fail any answer but 200, naming its status and problem code."""
    # Status 0 is a connection error: Locust already records the exception itself.
    if response.status_code in (0, 200):
        return
    try:
        body = response.json()
    except (TypeError, ValueError):
        body = None
    code = body.get("code") if isinstance(body, dict) else None
    if code is None and isinstance(body, dict) and body.get("rejections"):
        # 207 and 422 carry no code; the first rejection says what was wrong.
        first = body["rejections"][0]
        error = (first.get("errors") or [{}])[0]
        code = f"{first.get('reason')} {error.get('pointer')}: {error.get('message')}"
    response.failure(f"HTTP {response.status_code} {code or 'no problem code'}")


class CafeClient(FastHttpUser):
    """A product frontend sending batches of analytics records."""

    wait_time = constant_throughput(1)

    def send(self, path: str, records: list[dict[str, Any]]) -> None:
        """POST one batch and check the answer."""
        with self.client.post(
            path, json={"records": records}, headers=HEADERS, catch_response=True
        ) as response:
            check(response)

    @task(12)
    def activity_batch(self) -> None:
        """A small batch of one session's activity, the bulk of real traffic."""
        session = random.choice(SESSIONS)
        self.send("/v1/activity", [activity(session) for _ in range(random.randint(1, 20))])

    @task(4)
    def log_batch(self) -> None:
        """A batch of one session's log lines."""
        session = random.choice(SESSIONS)
        self.send("/v1/log", [log(session) for _ in range(random.randint(1, 10))])

    @task(1)
    def profile_batch(self) -> None:
        """A device profile, which a client sends once per session."""
        self.send("/v1/profile", [profile(random.choice(SESSIONS))])

    @task(1)
    def client_ip(self) -> None:
        """The caller's address, which frontends ask for now and then."""
        with self.client.get("/v1/ip", headers=HEADERS, catch_response=True) as response:
            check(response)
