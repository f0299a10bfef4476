"""OpenTelemetry tracing (gateway/tracing.py, gateway/otel.py): its settings, sampling by
ratio, the request's span and its children, the traceparent of a sampled request's
records, and the spans a full queue or a failing collector drops."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from gateway import cli
from gateway.config import ConfigError
from gateway.errors import SinkUnavailable
from gateway.otel import MAX_QUEUE_SPANS
from gateway.sink import MemorySink
from gateway.tracing import Tracing
from tests.support.app import Gateway, GatewayClient, access_lines, gateway_settings
from tests.support.keys import KeyFile
from tests.support.records import DEAD, sample
from tests.support.wait import eventually

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
PARENT = f"00-{TRACE}-{SPAN}-01"


# Settings.


@pytest.mark.parametrize("ratio", ["-0.1", "1.01", "nan", "half", "inf"])
def test_a_ratio_outside_0_to_1_stops_boot(ratio: str) -> None:
    with pytest.raises(ConfigError, match="CAFE_TRACE_SAMPLE_RATIO"):
        gateway_settings({"CAFE_TRACE_SAMPLE_RATIO": ratio})


@pytest.mark.parametrize(("raw", "ratio"), [("0", 0.0), ("0.01", 0.01), ("1", 1.0), ("", 0.0)])
def test_ratios_from_0_to_1_are_read(raw: str, ratio: float) -> None:
    assert gateway_settings({"CAFE_TRACE_SAMPLE_RATIO": raw}).trace_sample_ratio == ratio


def test_the_endpoint_is_an_http_url() -> None:
    assert gateway_settings({}).otlp_endpoint == "http://127.0.0.1:4318/v1/traces"
    url = "https://collector.example:4318/v1/traces"
    assert gateway_settings({"CAFE_OTLP_ENDPOINT": url}).otlp_endpoint == url
    with pytest.raises(ConfigError, match="CAFE_OTLP_ENDPOINT"):
        gateway_settings({"CAFE_OTLP_ENDPOINT": "collector:4318"})


def hide_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the OpenTelemetry packages look not installed to the settings' check."""
    find_spec = importlib.util.find_spec

    def without_otel(name: str, *args: Any) -> Any:
        if name.startswith("opentelemetry"):
            raise ModuleNotFoundError(name)
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_otel)


def test_tracing_without_the_extra_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hide_otel(monkeypatch)
    # Off, the extra is not needed.
    assert gateway_settings({"CAFE_TRACE_SAMPLE_RATIO": "0"}).trace_sample_ratio == 0
    monkeypatch.setenv("CAFE_TRACE_SAMPLE_RATIO", "0.5")
    assert cli.main(["serve"]) == 2
    error = capsys.readouterr().err
    assert "CAFE_TRACE_SAMPLE_RATIO=0.5" in error and "cafe-gateway[otel]" in error


def test_off_the_sdk_is_not_imported_and_no_tracing_metric_is_made() -> None:
    # A process of its own: this one has imported the SDK for the other tests. (redis
    # imports parts of the OpenTelemetry API and metrics SDK when they are installed: the
    # tracing SDK and the exporter are the gateway's.)
    code = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "from gateway.config import Settings\n"
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "registry = CollectorRegistry()\n"
        "app = create_app(Settings.from_env({}), registry=registry)\n"
        "ours = ('gateway.otel', 'opentelemetry.sdk.trace', 'opentelemetry.exporter')\n"
        "assert not [m for m in sys.modules if m.startswith(ours)], 'imported'\n"
        "assert b'cafe_trace' not in generate_latest(registry), 'metric made'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAFE_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


# Spans of requests, through the app.


def spans_by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    spans = exporter.get_finished_spans()
    found = {span.name: span for span in spans}
    assert len(found) == len(spans), [s.name for s in spans]
    return found


async def traced_gateway(
    gateway_client: GatewayClient, key_file: KeyFile, ratio: float, *, fast_lane: bool = True
) -> tuple[Gateway, InMemorySpanExporter]:
    sink, exporter = MemorySink(), InMemorySpanExporter()
    settings = gateway_settings(
        keys_file=key_file.path, trace_sample_ratio=ratio, fast_lane=fast_lane
    )
    client = await gateway_client(settings, sink=sink, span_exporter=exporter)
    return Gateway(client, key_file, sink=sink), exporter


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_sampled_requests_records_name_the_gateways_span_as_their_parent(
    gateway_client: GatewayClient, key_file: KeyFile, fast_lane: bool
) -> None:
    gw, exporter = await traced_gateway(gateway_client, key_file, 1.0, fast_lane=fast_lane)
    batch = [sample("activity"), sample("activity", eventTime="yesterday")]
    answer = await gw.post(
        "/v1/activity", {"records": batch}, traceparent=PARENT, tracestate="vendor=opaque"
    )
    assert answer.status == 207
    await eventually(lambda: len(exporter.get_finished_spans()) == 3, within=5)
    spans = spans_by_name(exporter)
    request = spans["POST /v1/activity"]
    ids = request.context
    assert ids is not None and f"{ids.trace_id:032x}" == TRACE
    assert request.parent is not None and f"{request.parent.span_id:016x}" == SPAN
    assert request.parent.is_remote
    assert dict(request.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/v1/activity",
        "http.response.status_code": 207,
        "cafe.request_id": answer.response.headers["X-Request-Id"],
        "cafe.records.accepted": 1,
        "cafe.records.rejected": 1,
    }
    for name, records in (("validate records", 2), ("await kafka acknowledgement", 1)):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == ids.span_id
        assert child.context is not None and child.context.trace_id == ids.trace_id
        assert dict(child.attributes or {}) == {"cafe.records": records}
        # Within the request's span.
        assert request.start_time is not None and child.start_time is not None
        assert request.end_time is not None and child.end_time is not None
        assert request.start_time <= child.start_time <= child.end_time <= request.end_time
    assert spans["validate records"].end_time <= spans["await kafka acknowledgement"].start_time  # type: ignore[operator]
    # The records and the dead letter carry the gateway's span, sampled, as their parent;
    # the client's tracestate goes with them.
    gateway_parent = f"00-{TRACE}-{ids.span_id:016x}-01".encode()
    produced = gw.produced()
    for message in (*produced["cafe.activity"], *produced[DEAD]):
        headers = dict(message.headers or ())
        assert headers["traceparent"] == gateway_parent
        assert headers["tracestate"] == b"vendor=opaque"


async def test_a_sampled_request_without_a_trace_gets_a_root_span_and_the_log_names_it(
    gateway_client: GatewayClient, key_file: KeyFile, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw, exporter = await traced_gateway(gateway_client, key_file, 1.0)
    assert (await gw.post("/v1/log", {"records": [sample("log")]})).status == 200
    assert (await gw.client.get("/healthz")).status == 200
    await eventually(lambda: len(exporter.get_finished_spans()) == 4, within=5)
    spans = spans_by_name(exporter)
    request = spans["POST /v1/log"]
    assert request.parent is None and request.context is not None
    (message,) = gw.produced()["cafe.log"]
    traceparent = dict(message.headers or ())["traceparent"].decode()
    assert traceparent == f"00-{request.context.trace_id:032x}-{request.context.span_id:016x}-01"
    (line,) = [line for line in access_lines(caplog) if line["route"] == "/v1/log"]
    assert line["trace_id"] == traceparent[3:35]
    assert dict(spans["GET /healthz"].attributes or {})["http.response.status_code"] == 200


class RefusingSink(MemorySink):
    async def send(self, *args: Any, **kwargs: Any) -> Any:
        raise SinkUnavailable("the test's Kafka is down")


async def test_an_error_answer_is_a_span_in_error_only_for_a_5xx(
    gateway_client: GatewayClient, key_file: KeyFile
) -> None:
    exporter = InMemorySpanExporter()
    settings = gateway_settings(keys_file=key_file.path, trace_sample_ratio=1.0)
    client = await gateway_client(settings, sink=RefusingSink(), span_exporter=exporter)
    gw = Gateway(client, key_file)
    assert (await gw.post("/v1/activity", b"{", traceparent=PARENT)).status == 400
    assert (await gw.post("/v1/activity", {"records": [sample("activity")]})).status == 503
    await eventually(lambda: len(exporter.get_finished_spans()) == 4, within=5)
    invalid, checked, waited, refused = exporter.get_finished_spans()
    assert [s.name for s in (checked, waited)] == [
        "validate records",
        "await kafka acknowledgement",
    ]
    statuses = [
        (dict(s.attributes or {})["http.response.status_code"], s.status.status_code)
        for s in (invalid, refused)
    ]
    assert statuses == [(400, StatusCode.UNSET), (503, StatusCode.ERROR)]


# A trace id whose low 64 bits, which TraceIdRatioBased compares with the ratio, are
# the largest: sampled only at ratio 1.
UNLIKELY = "0af7651916cd43ddffffffffffffffff"
# And the smallest: sampled at any ratio above 0.
LIKELY = "0af7651916cd43dd0000000000000001"


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_an_unsampled_requests_records_carry_the_clients_trace_as_sent(
    gateway_client: GatewayClient, key_file: KeyFile, fast_lane: bool
) -> None:
    gw, exporter = await traced_gateway(gateway_client, key_file, 0.5, fast_lane=fast_lane)
    # The client's sampled flag does not force sampling: the ratio decides, on the id.
    unlikely = f"00-{UNLIKELY}-{SPAN}-01"
    answer = await gw.post(
        "/v1/activity", {"records": [sample("activity")]}, traceparent=unlikely, tracestate="a=1"
    )
    assert answer.status == 200
    (message,) = gw.produced()["cafe.activity"]
    headers = dict(message.headers or ())
    assert (headers["traceparent"], headers["tracestate"]) == (unlikely.encode(), b"a=1")
    # And a request the ratio picks, though its client did not sample it.
    likely = f"00-{LIKELY}-{SPAN}-00"
    assert (
        await gw.post("/v1/activity", {"records": [sample("activity")]}, traceparent=likely)
    ).status == 200
    await eventually(lambda: len(exporter.get_finished_spans()) == 3, within=5)
    request = spans_by_name(exporter)["POST /v1/activity"]
    assert request.context is not None and f"{request.context.trace_id:032x}" == LIKELY


@pytest.mark.parametrize("ratio", [0.01, 0.5])
def test_the_ratio_picks_about_its_share_of_traces(ratio: float) -> None:
    tracing = Tracing(
        gateway_settings(trace_sample_ratio=ratio), CollectorRegistry(), InMemorySpanExporter()
    )
    tracing.start()
    try:
        sampled = 0
        for _ in range(20_000):
            span = tracing.request_span("POST", None, "r")
            if span is not None:
                sampled += 1
                span.end("POST", "/v1/log", 200, None)
        assert abs(sampled / 20_000 - ratio) < 0.2 * ratio + 0.005
    finally:
        asyncio.run(tracing.stop())


# A collector that is down or slow costs spans, counted, never a request's time.


class StuckExporter(SpanExporter):
    """An exporter whose first export waits until released, and which fails every export.
    `left` says whether that first export has returned: work done while it is unset was
    done while the collector was stuck, so it did not wait on it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.left = threading.Event()
        self.batches: list[int] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.batches.append(len(spans))
        self.entered.set()
        self.release.wait(30)
        self.left.set()
        return SpanExportResult.FAILURE


def dropped(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("cafe_trace_spans_dropped_total", {"reason": reason})
    assert value is not None
    return value


async def test_a_full_queue_and_failed_exports_are_counted_and_no_span_waits() -> None:
    registry, exporter = CollectorRegistry(), StuckExporter()
    tracing = Tracing(gateway_settings(trace_sample_ratio=1.0), registry, exporter)
    assert dropped(registry, "queue_full") == dropped(registry, "export_failed") == 0
    tracing.start()

    def one_span() -> None:
        span = tracing.request_span("POST", None, "r")
        assert span is not None
        span.end("POST", "/v1/log", 200, (1, 0))

    one_span()
    # The export thread takes it within its schedule (a second), and is held there.
    assert await asyncio.to_thread(exporter.entered.wait, 5)
    assert exporter.batches == [1]
    for _ in range(MAX_QUEUE_SPANS + 10):
        one_span()
    # 2,058 spans ended while the exporter is stuck: none waited on it.
    assert not exporter.left.is_set()
    assert dropped(registry, "queue_full") == 10
    exporter.release.set()
    # The queue, full, goes out in batches, each refused.
    await eventually(lambda: dropped(registry, "export_failed") == 1 + MAX_QUEUE_SPANS, within=20)
    assert sum(exporter.batches) == 1 + MAX_QUEUE_SPANS
    await tracing.stop()


async def test_stopping_waits_for_a_stuck_collector_only_briefly() -> None:
    exporter = StuckExporter()
    tracing = Tracing(gateway_settings(trace_sample_ratio=1.0), CollectorRegistry(), exporter)
    tracing.start()
    span = tracing.request_span("POST", None, "r")
    assert span is not None
    span.end("POST", "/v1/log", 200, None)
    assert await asyncio.to_thread(exporter.entered.wait, 5)
    await tracing.stop(timeout_s=0.3)
    # Stopped while the export is still stuck: it did not wait for the collector.
    assert not exporter.left.is_set()
    exporter.release.set()
    assert tracing.request_span("POST", None, "r") is None  # stopped: no more spans
