"""Settings from the environment: defaults, parsing, and refusals that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, KafkaSettings, Settings


def test_an_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings().kafka == KafkaSettings(bootstrap="127.0.0.1:9092")


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "CAFE_HOST": "::1",
            "CAFE_PORT": "9000",
            "CAFE_LOG_LEVEL": "debug",
            "CAFE_KEYS_FILE": "/etc/cafe/keys.json",
            "CAFE_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "CAFE_KAFKA_CLIENT_ID": "gw-7",
            "CAFE_KAFKA_LINGER_MS": "0",
            "CAFE_KAFKA_REQUEST_TIMEOUT_MS": "5000",
        }
    )
    assert settings == Settings(
        host="::1",
        port=9000,
        log_level="DEBUG",
        keys_file=Path("/etc/cafe/keys.json"),
        kafka=KafkaSettings(
            bootstrap="k1:9092,k2:9092", client_id="gw-7", linger_ms=0, request_timeout_ms=5000
        ),
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CAFE_PORT", "http", "CAFE_PORT='http' is not an integer"),
        ("CAFE_PORT", "70000", "CAFE_PORT=70000 is outside 0..65535"),
        ("CAFE_LOG_LEVEL", "loud", "CAFE_LOG_LEVEL='LOUD' is not a log level"),
        ("CAFE_KAFKA_BOOTSTRAP", "kafka", "'kafka' is not host:port"),
        ("CAFE_KAFKA_BOOTSTRAP", "k1:9092,k2", "'k2' is not host:port"),
        ("CAFE_KAFKA_BOOTSTRAP", "k1:0", "'k1:0' is not host:port"),
        ("CAFE_KAFKA_LINGER_MS", "-1", "CAFE_KAFKA_LINGER_MS=-1 is outside 0..1000"),
        ("CAFE_KAFKA_REQUEST_TIMEOUT_MS", "10", "is outside 1000..300000"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert message in str(info.value)
    assert name in str(info.value)


def test_blank_values_mean_unset() -> None:
    assert Settings.from_env({"CAFE_PORT": " ", "CAFE_KEYS_FILE": ""}) == Settings()
