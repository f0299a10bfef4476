"""Settings: frozen dataclasses built once from `CAFE_*` environment variables."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A setting has a value the gateway cannot run with; the message names the variable."""


@dataclass(frozen=True)
class KafkaSettings:
    """How the gateway reaches Kafka."""

    bootstrap: str = "127.0.0.1:9092"
    client_id: str = "cafe-gateway"
    # Records from concurrent requests wait this long to share one produce request.
    linger_ms: int = 5
    request_timeout_ms: int = 30_000


@dataclass(frozen=True)
class Settings:
    """Everything the gateway process is configured with."""

    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "INFO"
    keys_file: Path | None = None
    kafka: KafkaSettings = field(default_factory=KafkaSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read `CAFE_*` variables; unset ones keep their defaults."""
        defaults = cls()
        kafka_defaults = defaults.kafka
        keys_file = env.get("CAFE_KEYS_FILE", "").strip()
        return cls(
            host=_text(env, "CAFE_HOST", defaults.host),
            port=_int(env, "CAFE_PORT", defaults.port, low=0, high=65535),
            log_level=_log_level(env, "CAFE_LOG_LEVEL", defaults.log_level),
            keys_file=Path(keys_file) if keys_file else None,
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
            ),
        )


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside {low}..{high}")
    return value


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
