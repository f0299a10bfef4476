"""GET /metrics: every outcome of a request moves the counters an SRE would watch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from devkit.samples import curl_bodies
from gateway.app import create_app, create_metrics_app
from gateway.errors import KafkaUnavailable
from gateway.http.metrics import HttpMetrics
from gateway.keys.store import KeyStore
from gateway.metrics import LATENCY_BUCKETS, MULTIPROC_ENV, Metrics, Tally, share_values
from gateway.sink import Delivery, MemorySink, Record, Rejected
from tests.support.app import AiohttpClient, GatewayClient, gateway_settings
from tests.support.keys import KeyFile, json_headers
from tests.support.scrape import Samples, scrape


class SwitchableSink(MemorySink):
    """A memory sink whose sends fail as Kafka's would while `failing` is set."""

    failing = False

    async def send(
        self,
        record_type: str,
        accepted: Sequence[Record],
        rejected: Sequence[Rejected] = (),
        *,
        patient: bool = False,
    ) -> Delivery:
        if self.failing:
            raise KafkaUnavailable("Kafka did not acknowledge the records within 5s")
        return await super().send(record_type, accepted, rejected)


def log_batch(*changes: dict[str, object]) -> bytes:
    base = orjson.loads(curl_bodies()["log"])["records"][0]
    return orjson.dumps({"records": [{**base, **c} for c in changes]})


async def test_each_request_outcome_moves_its_counters(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    sink = SwitchableSink()
    client = await gateway_client(gateway_settings(keys_file=key_file.path), sink=sink)
    headers = json_headers(key_file.key)
    before = await scrape(client)
    assert before.value("cafe_records_total") == 0
    assert before.value("cafe_api_keys_loaded") == 1
    gateway_version = version("cafe-gateway")
    assert before.value("cafe_build_info", version=gateway_version) == 1

    # 200: three records accepted.
    resp = await client.post("/v1/log", data=log_batch({}, {}, {}), headers=headers)
    assert resp.status == 200
    # 207: one accepted, one invalid, one forbidden; both rejects dead-lettered.
    mixed = log_batch({}, {"logLevel": "Loud"}, {"productPlatform": "someone-else"})
    resp = await client.post("/v1/log", data=mixed, headers=headers)
    assert resp.status == 207
    # 503: Kafka does not acknowledge two records.
    sink.failing = True
    resp = await client.post("/v1/log", data=log_batch({}, {}), headers=headers)
    assert resp.status == 503
    sink.failing = False
    # 400 and 401: no records counted.
    resp = await client.post("/v1/log", data=b"{not json", headers=headers)
    assert resp.status == 400
    resp = await client.post("/v1/log", data=log_batch({}), headers={"x-api-key": "nope"})
    assert resp.status == 401

    after = await scrape(client)
    records = {
        outcome: after.value("cafe_records_total", type="log", outcome=outcome)
        for outcome in ("accepted", "invalid", "forbidden", "unavailable")
    }
    assert records == {"accepted": 4, "invalid": 1, "forbidden": 1, "unavailable": 2}
    assert after.value("cafe_dead_letters_total", type="log", reason="invalid") == 1
    assert after.value("cafe_dead_letters_total", type="log", reason="forbidden") == 1
    assert len(sink.rejected["log"]) == 2

    route = {"route": "/v1/log", "method": "POST"}
    statuses = {
        status: after.value("cafe_http_requests_total", **route, status=status)
        for status in ("200", "207", "503", "400", "401")
    }
    assert statuses == {"200": 1, "207": 1, "503": 1, "400": 1, "401": 1}
    errors = {
        code: after.value("cafe_http_errors_total", code=code)
        for code in ("kafka_unavailable", "invalid_json", "invalid_api_key")
    }
    assert errors == {"kafka_unavailable": 1, "invalid_json": 1, "invalid_api_key": 1}
    assert after.value("cafe_http_request_duration_seconds_count", route="/v1/log") == 5
    assert after.value("cafe_http_request_body_bytes_count", route="/v1/log") == 5
    assert after.value("cafe_http_request_body_bytes_sum", route="/v1/log") == sum(
        len(b)
        for b in (log_batch({}, {}, {}), mixed, log_batch({}, {}), b"{not json", log_batch({}))
    )
    # Well-formed batches only: 3 + 3 + 2 records.
    assert after.value("cafe_records_per_request_count", type="log") == 3
    assert after.value("cafe_records_per_request_sum", type="log") == 8
    # The scrape itself is in flight while it renders; nothing else is.
    assert after.value("cafe_http_requests_in_flight") == 1


async def test_unknown_paths_and_methods_share_bounded_labels(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    client = await gateway_client(gateway_settings(keys_file=key_file.path), sink=MemorySink())
    for path in ("/a", "/b", "/c/d"):
        assert (await client.get(path)).status == 404
    assert (await client.request("PROPFIND", "/healthz")).status == 405
    samples = await scrape(client)
    assert samples.value("cafe_http_requests_total", route="unmatched", status="404") == 3
    # A 405 is on a known path, which is its label; the method is "other".
    other = samples.value("cafe_http_requests_total", route="/healthz", method="other")
    assert other == 1
    routes = {labels["route"] for name, labels, _ in samples.samples if "route" in labels}
    assert routes == {"unmatched", "/healthz"}


async def test_metrics_can_move_to_their_own_port(
    aiohttp_client: AiohttpClient, key_file: KeyFile
) -> None:
    settings = gateway_settings(keys_file=key_file.path, metrics_port=9100)
    app = create_app(settings, sink=MemorySink())
    client = await aiohttp_client(app)
    assert (await client.get("/metrics")).status == 404
    assert (await client.get("/healthz")).status == 200
    metrics_client = await aiohttp_client(create_metrics_app(app))
    samples = await scrape(metrics_client)
    # The main app's request is counted by the metrics app: one set of metrics.
    assert samples.value("cafe_http_requests_total", route="/healthz", status="200") == 1
    assert samples.value("cafe_http_requests_total", route="unmatched", status="404") == 1


def test_key_reloads_are_counted_by_result(key_file: KeyFile) -> None:
    metrics = Metrics(CollectorRegistry(), "test")
    keys = KeyStore(key_file.path, metrics)
    keys.load()
    key_file.add("analytics-portal")
    assert keys.reload_if_changed()
    key_file.path.write_text("{ broken")
    assert not keys.reload_if_changed()
    registry = metrics.registry
    assert registry.get_sample_value("cafe_api_key_reloads_total", {"result": "ok"}) == 1
    assert registry.get_sample_value("cafe_api_key_reloads_total", {"result": "failed"}) == 1
    # The last good set stays loaded.
    assert registry.get_sample_value("cafe_api_keys_loaded") == 2


def test_two_apps_in_one_process_count_apart(key_file: KeyFile) -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    settings = gateway_settings(keys_file=key_file.path)
    create_app(settings, sink=MemorySink(), registry=first)
    create_app(settings, sink=MemorySink(), registry=second)
    for registry in (first, second):
        assert registry.get_sample_value("cafe_http_requests_in_flight") == 0
        assert registry.get_sample_value("cafe_api_keys_loaded") == 0


async def test_metrics_given_a_shared_dir_keep_their_values_there_whenever_imported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # prometheus_client was imported long ago by this process, with no directory set:
    # the one given to share_values decides where values live all the same. (What it
    # sets is process-wide: monkeypatch takes both back after the test, so that neither
    # the other tests nor the gateways they start inherit it.)
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setenv(MULTIPROC_ENV, "")
    share_values(tmp_path)
    metrics = Metrics(CollectorRegistry(), "test", tmp_path)
    HttpMetrics(metrics.registry).records.labels("log", "accepted").inc(3)
    assert any(name.startswith("counter_") for name in os.listdir(tmp_path)), "no value file"
    # A scrape adds up the files of every worker: here, this process's.
    response = await metrics.handle(make_mocked_request("GET", "/metrics"))
    assert isinstance(response.body, bytes)
    samples = Samples(response.body.decode())
    assert samples.value("cafe_records_total", type="log", outcome="accepted") == 3


async def test_refused_keys_are_counted_by_reason_never_by_key(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    disabled_key, disabled = key_file.add("analytics-portal")
    key_file.disable(disabled.id)
    client = await gateway_client(gateway_settings(keys_file=key_file.path), sink=MemorySink())
    json_type = {"Content-Type": "application/json"}
    for key in (None, "cafe_not-a-key", disabled_key):
        headers = json_type if key is None else {**json_type, "x-api-key": key}
        resp = await client.post("/v1/log", data=log_batch({}), headers=headers)
        assert resp.status == 401
        # The client is not told which: only the metrics are.
        assert (await resp.json(content_type=None))["detail"] in (
            "send an API key in the x-api-key header",
            "the API key is unknown or disabled",
        )
    foreign = log_batch({}, {"productPlatform": "someone-else"}, {"productPlatform": "other"})
    resp = await client.post(
        "/v1/log", data=foreign, headers={**json_type, "x-api-key": key_file.key}
    )
    assert resp.status == 207

    resp = await client.get("/metrics")
    text = await resp.text()
    samples = Samples(text)
    reasons = {
        reason: samples.value("cafe_auth_failures_total", reason=reason)
        for reason in ("missing", "unknown", "disabled", "platform")
    }
    assert reasons == {"missing": 1, "unknown": 1, "disabled": 1, "platform": 1}
    assert disabled_key not in text and key_file.key not in text


# Updates as the hot path makes them: (series, amount) on a counter or the in-flight
# gauge, or an observation on a histogram.
_UPDATES = st.lists(
    st.one_of(
        st.tuples(st.just("counter"), st.integers(0, 500)),
        st.tuples(st.just("gauge"), st.sampled_from([1, -1])),
        st.tuples(
            st.just("histogram"),
            st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(0, 20, allow_nan=False)),
        ),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(_UPDATES, max_size=4))
def test_a_tally_flushed_gives_each_series_what_updating_it_at_once_gives(
    batches: list[list[tuple[str, float]]],
) -> None:
    """After every flush, the series updated through a Tally read exactly as the same
    series updated one by one (the exposition of both registries is compared)."""
    direct, tallied = CollectorRegistry(), CollectorRegistry()

    def series(registry: CollectorRegistry) -> dict[str, Any]:
        return {
            "counter": Counter("c", "c", ["route"], registry=registry).labels("/v1/log"),
            "gauge": Gauge("g", "g", registry=registry),
            "histogram": Histogram(
                "h", "h", ["route"], buckets=LATENCY_BUCKETS, registry=registry
            ).labels("/v1/log"),
        }

    at_once, later = series(direct), series(tallied)
    tally = Tally()
    for batch in batches:
        for kind, amount in batch:
            if kind == "histogram":
                at_once[kind].observe(amount)
                tally.observe(later[kind], amount)
            else:
                at_once[kind].inc(amount)
                tally.add(later[kind], amount)
        tally.flush()
        assert _exposed(tallied) == _exposed(direct)


def _exposed(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (sample.name, str(sorted(sample.labels.items()))): round(sample.value, 9)
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


async def test_a_scrape_counts_what_the_tally_holds(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    """In one process a scrape is exact: the request just answered is counted."""
    client = await gateway_client(gateway_settings(keys_file=key_file.path), sink=MemorySink())
    for expected in (1, 2, 3):
        resp = await client.post(
            "/v1/log", data=curl_bodies()["log"], headers=json_headers(key_file.key)
        )
        assert resp.status == 200
        samples = await scrape(client)
        assert samples.value("cafe_http_requests_total", route="/v1/log") == expected
        assert samples.value("cafe_records_total", type="log", outcome="accepted") == expected
        assert samples.value("cafe_records_per_request_count", type="log") == expected
        durations = samples.value("cafe_http_request_duration_seconds_count", route="/v1/log")
        assert durations == expected
