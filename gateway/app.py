"""The app factory: the one place where settings, sink, middlewares and routes are wired."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import SecretFile, Settings
from gateway.http import health
from gateway.http.access import Access, access_middleware
from gateway.http.admission import Admission, admission_middleware
from gateway.http.auth import api_key_middleware
from gateway.http.clientip import get_ip
from gateway.http.cors import cors_middleware
from gateway.http.fastlane import FastLane
from gateway.http.ingest import ingest_handler
from gateway.http.metrics import HttpMetrics
from gateway.http.openapi import build_openapi, get_openapi, get_schema
from gateway.http.problems import problem_middleware
from gateway.http.ratelimit import rate_limit_middleware
from gateway.http.requestid import RequestIds
from gateway.http.state import (
    DRAINING,
    EXPOSITION,
    FAST_LANE,
    KEYS,
    LIMITER,
    METRICS,
    OPENAPI,
    RECORD_TYPES,
    SETTINGS,
    SINK,
)
from gateway.kafka.sink import KafkaSink
from gateway.keys.store import KeyStore
from gateway.limits.fleet import FleetBuckets
from gateway.limits.local import BucketTable, RateLimiter
from gateway.metrics import Metrics
from gateway.schemas import load_record_types
from gateway.sink import Sink
from gateway.spool.sink import SpoolingSink
from gateway.tracing import Tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter


def create_app(
    settings: Settings,
    *,
    sink: Sink | None = None,
    registry: CollectorRegistry | None = None,
    buckets: BucketTable | None = None,
    metrics_dir: Path | None = None,
    span_exporter: SpanExporter | None = None,
) -> web.Application:
    """Build the gateway; `sink` replaces Kafka in unit tests and ceiling benchmarks
    (with CAFE_SPOOL_DIR set, the spool wraps whichever it is).

    Record schemas are compiled here, so a broken schema stops start-up. Metrics go to
    `registry`, a fresh one by default; rate-limit buckets to `buckets`, the table all
    workers share, a fresh one by default; with several workers, metrics keep their
    values in files in `metrics_dir`, which every worker's scrape adds up. With tracing on,
    `span_exporter` replaces the OTLP exporter in tests.
    """
    gateway_version = version("cafe-gateway")
    exposition = Metrics(
        registry if registry is not None else CollectorRegistry(), gateway_version, metrics_dir
    )
    # Each package makes its own metrics on the registry: these are the HTTP side's.
    metrics = HttpMetrics(exposition.registry, exposition.tally)
    hash_key = settings.client_ip.hash_key
    keys = KeyStore(settings.keys_file, exposition, can_hash_client_ip=hash_key is not None)
    record_types = load_record_types(settings.kafka.topics.by_record_type(), settings.validator)
    admission = Admission(settings.max_inflight_bytes, settings.max_body_bytes)
    fleet = None
    if settings.ratelimit_storage != "local":
        fleet = FleetBuckets(settings.ratelimit_storage, exposition)
    limiter = RateLimiter(settings.workers, buckets, fleet)
    # The order matters. Outermost, every request gets its id, timing and log line,
    # whatever happens below. CORS answers preflights, and marks the answers a page may
    # read, errors included. Then errors are rendered, so every error below gets the
    # problem shape. Keys, then their rate limits, are checked before admission, so
    # callers without a key or over their limit take no capacity.
    ingest_paths = frozenset(f"/v1/{name}" for name in record_types)
    draining = asyncio.Event()
    # With CAFE_TRACE_SAMPLE_RATIO at 0 there is no tracer, and the SDK is not imported.
    tracing = None
    if settings.trace_sample_ratio > 0:
        tracing = Tracing(settings, exposition.registry, span_exporter)
    access = Access(settings, metrics, RequestIds(), draining, tracing)
    app = web.Application(
        middlewares=[
            access_middleware(access),
            cors_middleware(keys, ingest_paths),
            problem_middleware(metrics),
            api_key_middleware(keys, metrics, ingest_paths),
            rate_limit_middleware(limiter),
            admission_middleware(admission),
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[EXPOSITION] = exposition
    app[LIMITER] = limiter
    if sink is None:
        sink = _kafka_sink(settings, exposition)
    if settings.spool.dir is not None:
        sink = SpoolingSink(
            sink,
            settings.spool,
            settings.spool.dir,
            workers=settings.workers,
            # A replayed window must fit, beside live traffic, in what the Kafka sink
            # may hold unacknowledged, or it would be refused every time.
            max_window_bytes=settings.kafka.max_queued_bytes // 2,
            produce_timeout_s=settings.kafka.produce_timeout_ms / 1000,
            metrics=exposition,
        )
    app[SINK] = sink
    app[KEYS] = keys
    app[RECORD_TYPES] = record_types
    app[OPENAPI] = orjson.dumps(build_openapi(record_types, gateway_version))
    app[DRAINING] = draining
    if settings.fast_lane:
        # The same steps as the middlewares above, in one function, for the record POSTs
        # (gateway/http/fastlane.py); GatewayRunner puts it in front of the app.
        lane = FastLane(record_types, settings, access, keys, limiter, admission, sink)
        app[FAST_LANE] = lane.in_front_of
    if tracing is not None:
        app.cleanup_ctx.append(functools.partial(_tracing_lifetime, tracing))
    app.cleanup_ctx.append(_keys_lifetime)
    app.cleanup_ctx.append(_sink_lifetime)
    if fleet is not None:
        app.cleanup_ctx.append(functools.partial(_fleet_lifetime, fleet))
    if hash_key is not None:
        app.cleanup_ctx.append(functools.partial(_secret_lifetime, hash_key))
    if metrics_dir is not None:
        app.cleanup_ctx.append(functools.partial(_tally_lifetime, exposition))

    types = "|".join(record_types)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    if settings.metrics_port is None:
        app.router.add_get("/metrics", exposition.handle)
    for record_type in record_types.values():
        # A plain path per type: aiohttp finds one with a dict lookup, where a pattern
        # such as /v1/{record_type} costs a regex match per request (1.8 us more).
        app.router.add_post(
            f"/v1/{record_type.name}", ingest_handler(record_type, settings, sink, metrics)
        )
    app.router.add_get("/v1/ip", get_ip)
    app.router.add_get(f"/v1/schema/{{record_type:{types}}}", get_schema)
    # A version is at most six digits (gateway/schemas.py names the files so).
    app.router.add_get(
        f"/v1/schema/{{record_type:{types}}}/{{version:[1-9][0-9]{{0,5}}}}", get_schema
    )
    app.router.add_get("/v1/openapi.json", get_openapi)
    return app


def _kafka_sink(settings: Settings, exposition: Metrics) -> Sink:
    """The Kafka sink on the client CAFE_KAFKA_CLIENT names."""
    if settings.kafka.client == "librdkafka":
        # Imported only when chosen: confluent-kafka is an optional extra.
        from gateway.kafka.rdkafka import RdKafkaSink

        return RdKafkaSink(settings.kafka, exposition)
    return KafkaSink(settings.kafka, exposition)


def create_metrics_app(app: web.Application) -> web.Application:
    """A second app serving only `app`'s /metrics, for CAFE_METRICS_PORT."""
    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", app[EXPOSITION].handle)
    return metrics_app


async def _keys_lifetime(app: web.Application) -> AsyncIterator[None]:
    """Load the API keys (a missing or malformed file stops start-up), then watch the file."""
    keys = app[KEYS]
    keys.load()
    watcher = asyncio.create_task(keys.watch(), name="keys-watch")
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def _fleet_lifetime(fleet: FleetBuckets, app: web.Application) -> AsyncIterator[None]:
    """With CAFE_RATELIMIT_STORAGE a Redis URL, reach it (or start on local limits until
    it answers); close it at shutdown."""
    await fleet.start()
    yield
    await fleet.close()


async def _secret_lifetime(secret: SecretFile, app: web.Application) -> AsyncIterator[None]:
    """With CAFE_CLIENT_IP_HASH_KEY_FILE set, read the file again every few seconds, so a
    rotated secret is in use without a restart."""
    watcher = asyncio.create_task(secret.watch(), name="client-ip-secret-watch")
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def _tally_lifetime(exposition: Metrics, app: web.Application) -> AsyncIterator[None]:
    """With several workers, a scrape reads every worker's files: each worker flushes the
    counts it keeps as plain numbers into its files every second, and once more at exit."""
    flusher = asyncio.create_task(exposition.tally.flush_often(), name="metrics-flush")
    yield
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher


async def _tracing_lifetime(tracing: Tracing, app: web.Application) -> AsyncIterator[None]:
    """With CAFE_TRACE_SAMPLE_RATIO above 0: make the tracer and its export thread at
    start-up, in each worker, after the fork (a thread does not survive a fork); send
    what spans are left, briefly, at shutdown."""
    tracing.start()
    yield
    await tracing.stop()


async def _sink_lifetime(app: web.Application) -> AsyncIterator[None]:
    """Connect the sink at start-up; deliver what it holds and close it at shutdown."""
    sink = app[SINK]
    await sink.start()
    yield
    await sink.close()
