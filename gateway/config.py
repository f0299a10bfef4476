"""Settings: frozen dataclasses built once from `CAFE_*` environment variables."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# CAFE_MAX_QUEUED_BYTES, unset, is this many times CAFE_MAX_INFLIGHT_BYTES: room for the
# records of requests answered 503 that the sink still delivers, beside those in flight.
_QUEUED_PER_INFLIGHT = 4
_N = TypeVar("_N", int, float)
# Kafka's own rule for topic names.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


class ConfigError(ValueError):
    """A setting has a value the gateway cannot run with; the message names the variable."""


@dataclass(frozen=True)
class TopicSettings:
    """The topic of each record type, and how many partitions a created topic gets."""

    activity: str = "cafe.activity"
    log: str = "cafe.log"
    profile: str = "cafe.profile"
    deadletter: str = "cafe.deadletter"
    partitions: int = 6

    def all(self) -> tuple[str, ...]:
        """Every topic the gateway writes to."""
        return (self.activity, self.log, self.profile, self.deadletter)


@dataclass(frozen=True)
class KafkaSettings:
    """How the gateway reaches Kafka."""

    bootstrap: str = "127.0.0.1:9092"
    client_id: str = "cafe-gateway"
    # Extra wait for more records before a produce request. Records of concurrent
    # requests share batches anyway while the previous request is in flight; `make bench`
    # measured more records/s and lower latency with 2 than with 5.
    linger_ms: int = 2
    request_timeout_ms: int = 30_000
    # A request whose records are not all acknowledged within this time gets a 503.
    produce_timeout_ms: int = 5_000
    # Bytes of record values the sink may hold unacknowledged, including those of
    # requests already answered 503 that it still delivers; past it, requests get 503 at
    # once. Healthy traffic holds about what the requests in flight carry, so it must be
    # at least max_inflight_bytes; unset, it is _QUEUED_PER_INFLIGHT times that (the
    # default here is for the default max_inflight_bytes).
    max_queued_bytes: int = 32 * 1024 * 1024
    topics: TopicSettings = field(default_factory=TopicSettings)


@dataclass(frozen=True)
class Settings:
    """Everything the gateway process is configured with."""

    host: str = "127.0.0.1"
    port: int = 8080
    # Processes serving the port; one per core the gateway may use.
    workers: int = 1
    log_level: str = "INFO"
    # "json": one JSON object per line, for log pipelines; "text": for people.
    log_format: str = "json"
    # One line per request at INFO on the `gateway.access` logger.
    access_log: bool = True
    # Serve /metrics on this port only (None: on the main port, beside the API).
    metrics_port: int | None = None
    # After SIGTERM: seconds /readyz says "draining" while requests are still served,
    # then seconds requests in flight get to finish after the listener closes.
    drain_seconds: float = 0.0
    shutdown_grace_seconds: float = 10.0
    # A connection is closed when it has sent no complete request for this long: idle
    # keep-alive connections, and headers sent slowly (slow-loris).
    idle_timeout_seconds: float = 15.0
    # A request body must arrive within this time, else 408: a slow body holds capacity.
    body_timeout_seconds: float = 10.0
    # Open connections per process; past it a connection is answered 503 and closed
    # (gateway/listener.py). Each costs a file descriptor and some memory.
    max_connections: int = 4096
    keys_file: Path | None = None
    # Peers whose forwarded_header is believed.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # The one header the trusted proxies write the caller's address in: "x-forwarded-for"
    # or "forwarded" (RFC 7239). The other is ignored: a proxy that writes one passes the
    # client's own copy of the other through, so believing it lets a client pick its address.
    forwarded_header: str = "x-forwarded-for"
    max_body_bytes: int = 10 * 1024 * 1024
    # Body bytes of requests in progress at once; past it, requests are shed with 503.
    # Parsed records take several times their JSON size, so this bounds memory too.
    max_inflight_bytes: int = 8 * 1024 * 1024
    # A compressed body may decode to at most this many times its size (and at most
    # max_body_bytes): more is a bomb, refused with 413.
    max_compression_ratio: int = 100
    kafka: KafkaSettings = field(default_factory=KafkaSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read `CAFE_*` variables; unset ones keep their defaults."""
        defaults = cls()
        kafka_defaults = defaults.kafka
        topic_defaults = kafka_defaults.topics
        keys_file = env.get("CAFE_KEYS_FILE", "").strip()
        max_inflight_bytes = _int(
            env, "CAFE_MAX_INFLIGHT_BYTES", defaults.max_inflight_bytes, low=1024, high=1 << 34
        )
        settings = cls(
            host=_text(env, "CAFE_HOST", defaults.host),
            port=_int(env, "CAFE_PORT", defaults.port, low=0, high=65535),
            workers=_int(env, "CAFE_WORKERS", defaults.workers, low=1, high=256),
            log_level=_log_level(env, "CAFE_LOG_LEVEL", defaults.log_level),
            log_format=_choice(env, "CAFE_LOG_FORMAT", defaults.log_format, ("json", "text")),
            access_log=_bool(env, "CAFE_ACCESS_LOG", defaults.access_log),
            metrics_port=_optional_port(env, "CAFE_METRICS_PORT"),
            drain_seconds=_seconds(env, "CAFE_DRAIN_SECONDS", defaults.drain_seconds),
            shutdown_grace_seconds=_seconds(
                env, "CAFE_SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_seconds
            ),
            idle_timeout_seconds=_seconds(
                env, "CAFE_IDLE_TIMEOUT_SECONDS", defaults.idle_timeout_seconds
            ),
            body_timeout_seconds=_seconds(
                env, "CAFE_BODY_TIMEOUT_SECONDS", defaults.body_timeout_seconds
            ),
            max_connections=_int(
                env, "CAFE_MAX_CONNECTIONS", defaults.max_connections, low=1, high=1_000_000
            ),
            keys_file=Path(keys_file) if keys_file else None,
            trusted_proxies=_networks(env, "CAFE_TRUSTED_PROXIES"),
            forwarded_header=_choice(
                env,
                "CAFE_FORWARDED_HEADER",
                defaults.forwarded_header,
                ("x-forwarded-for", "forwarded"),
            ),
            max_body_bytes=_int(
                env, "CAFE_MAX_BODY_BYTES", defaults.max_body_bytes, low=1024, high=1 << 30
            ),
            max_inflight_bytes=max_inflight_bytes,
            max_compression_ratio=_int(
                env,
                "CAFE_MAX_COMPRESSION_RATIO",
                defaults.max_compression_ratio,
                low=1,
                high=100_000,
            ),
            kafka=KafkaSettings(
                bootstrap=_bootstrap(env, "CAFE_KAFKA_BOOTSTRAP", kafka_defaults.bootstrap),
                client_id=_text(env, "CAFE_KAFKA_CLIENT_ID", kafka_defaults.client_id),
                linger_ms=_int(
                    env, "CAFE_KAFKA_LINGER_MS", kafka_defaults.linger_ms, low=0, high=1000
                ),
                request_timeout_ms=_int(
                    env,
                    "CAFE_KAFKA_REQUEST_TIMEOUT_MS",
                    kafka_defaults.request_timeout_ms,
                    low=1000,
                    high=300_000,
                ),
                produce_timeout_ms=_int(
                    env,
                    "CAFE_PRODUCE_TIMEOUT_MS",
                    kafka_defaults.produce_timeout_ms,
                    low=100,
                    high=300_000,
                ),
                max_queued_bytes=_int(
                    env,
                    "CAFE_MAX_QUEUED_BYTES",
                    _QUEUED_PER_INFLIGHT * max_inflight_bytes,
                    low=1024,
                    high=1 << 36,
                ),
                topics=TopicSettings(
                    activity=_topic(env, "CAFE_TOPIC_ACTIVITY", topic_defaults.activity),
                    log=_topic(env, "CAFE_TOPIC_LOG", topic_defaults.log),
                    profile=_topic(env, "CAFE_TOPIC_PROFILE", topic_defaults.profile),
                    deadletter=_topic(env, "CAFE_TOPIC_DEADLETTER", topic_defaults.deadletter),
                    partitions=_int(
                        env, "CAFE_TOPIC_PARTITIONS", topic_defaults.partitions, low=1, high=10_000
                    ),
                ),
            ),
        )
        if settings.workers > 1 and settings.port == 0:
            raise ConfigError(f"CAFE_WORKERS={settings.workers} needs a fixed CAFE_PORT, not 0")
        if settings.kafka.max_queued_bytes < settings.max_inflight_bytes:
            raise ConfigError(
                f"CAFE_MAX_QUEUED_BYTES={settings.kafka.max_queued_bytes} is below "
                f"CAFE_MAX_INFLIGHT_BYTES={settings.max_inflight_bytes}: the requests "
                "admitted at once could not all be queued"
            )
        if settings.metrics_port is not None and settings.metrics_port == settings.port:
            raise ConfigError(
                f"CAFE_METRICS_PORT={settings.metrics_port} is CAFE_PORT; unset it to serve "
                "/metrics on the main port"
            )
        return settings


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    return _number(env, name, default, int, "an integer", low, high)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, float, "a number of seconds", 0, 3600)


def _number(
    env: Mapping[str, str],
    name: str,
    default: _N,
    parse: Callable[[str], _N],
    what: str,
    low: _N,
    high: _N,
) -> _N:
    """A number within low..high (a NaN is within nothing), or the default if unset."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {what}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw} is outside {low}..{high}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _text(env, name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (true or false)")


def _optional_port(env: Mapping[str, str], name: str) -> int | None:
    if not env.get(name, "").strip():
        return None
    return _int(env, name, 0, low=1, high=65535)


def _log_level(env: Mapping[str, str], name: str, default: str) -> str:
    value = _text(env, name, default).upper()
    if value not in logging.getLevelNamesMapping():
        raise ConfigError(f"{name}={value!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    return value


def _bootstrap(env: Mapping[str, str], name: str, default: str) -> str:
    """A comma-separated list of host:port pairs, as Kafka clients take it."""
    value = _text(env, name, default)
    for server in value.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name}={value!r}: {server.strip()!r} is not host:port")
    return value


def _topic(env: Mapping[str, str], name: str, default: str) -> str:
    value = _text(env, name, default)
    if not _TOPIC.fullmatch(value) or value in {".", ".."}:
        raise ConfigError(f"{name}={value!r} is not a Kafka topic name ([A-Za-z0-9._-], <= 249)")
    return value


def _networks(env: Mapping[str, str], name: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128)."""
    networks = []
    for item in env.get(name, "").split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"{name}: {item.strip()!r} is not an IP network") from None
    return tuple(networks)
