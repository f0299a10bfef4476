"""A gateway's /metrics, scraped and read back, for tests that check metric values."""

from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families


class Samples:
    """The samples of one scrape, looked up by name and (some of) their labels."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`; 0 if none."""
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and labels.items() <= sample_labels.items()
        )

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}


async def scrape(http: aiohttp.ClientSession | TestClient) -> Samples:  # type: ignore[type-arg]
    """GET /metrics of the gateway `http` talks to (on its main port unless
    CAFE_METRICS_PORT is set): answered 200, in Prometheus' text format."""
    async with http.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return Samples(await resp.text())
