"""Settings from the environment: defaults, parsing, refusals that name the variable, and
the configuration table (docs/configuration.md) checked against the declared variables."""

from __future__ import annotations

import re
from ipaddress import ip_network
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import (
    ConfigError,
    KafkaSettings,
    Settings,
    SpoolSettings,
    TopicSettings,
    declared_variables,
)

MIB = 1024 * 1024


def test_an_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings().kafka == KafkaSettings(bootstrap="127.0.0.1:9092")


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "CAFE_HOST": "::1",
            "CAFE_PORT": "9000",
            "CAFE_WORKERS": "2",
            "CAFE_TRUSTED_PROXIES": "10.0.0.0/8, 2001:db8::1",
            "CAFE_FORWARDED_HEADER": "Forwarded",
            "CAFE_MAX_BODY_BYTES": "2048",
            "CAFE_MAX_INFLIGHT_BYTES": "4096",
            "CAFE_PRODUCE_TIMEOUT_MS": "1500",
            "CAFE_MAX_QUEUED_BYTES": "65536",
            "CAFE_TOPIC_ACTIVITY": "a",
            "CAFE_TOPIC_LOG": "l",
            "CAFE_TOPIC_PROFILE": "p",
            "CAFE_TOPIC_DEADLETTER": "d",
            "CAFE_TOPIC_PARTITIONS": "12",
            "CAFE_LOG_LEVEL": "debug",
            "CAFE_KEYS_FILE": "/etc/cafe/keys.json",
            "CAFE_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "CAFE_KAFKA_CLIENT_ID": "gw-7",
            "CAFE_KAFKA_CLIENT": "LibRdKafka",
            "CAFE_KAFKA_LINGER_MS": "0",
            "CAFE_KAFKA_REQUEST_TIMEOUT_MS": "5000",
            "CAFE_LOG_FORMAT": "TEXT",
            "CAFE_ACCESS_LOG": "off",
            "CAFE_METRICS_PORT": "9100",
            "CAFE_DRAIN_SECONDS": "2.5",
            "CAFE_SHUTDOWN_GRACE_SECONDS": "30",
            "CAFE_IDLE_TIMEOUT_SECONDS": "5",
            "CAFE_BODY_TIMEOUT_SECONDS": "2",
            "CAFE_VALIDATOR": "JSONSCHEMA-RS",
        }
    )
    assert settings == Settings(
        host="::1",
        port=9000,
        workers=2,
        log_level="DEBUG",
        log_format="text",
        access_log=False,
        metrics_port=9100,
        drain_seconds=2.5,
        shutdown_grace_seconds=30.0,
        idle_timeout_seconds=5.0,
        body_timeout_seconds=2.0,
        keys_file=Path("/etc/cafe/keys.json"),
        trusted_proxies=(ip_network("10.0.0.0/8"), ip_network("2001:db8::1/128")),
        forwarded_header="forwarded",
        max_body_bytes=2048,
        max_inflight_bytes=4096,
        validator="jsonschema-rs",
        kafka=KafkaSettings(
            bootstrap="k1:9092,k2:9092",
            client_id="gw-7",
            client="librdkafka",
            linger_ms=0,
            request_timeout_ms=5000,
            produce_timeout_ms=1500,
            max_queued_bytes=65536,
            topics=TopicSettings(activity="a", log="l", profile="p", deadletter="d", partitions=12),
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
        ("CAFE_TRUSTED_PROXIES", "10.0.0.0/8,proxy", "'proxy' is not an IP network"),
        ("CAFE_FORWARDED_HEADER", "x-real-ip",
         "CAFE_FORWARDED_HEADER='x-real-ip' is not one of x-forwarded-for, forwarded"),
        ("CAFE_FORWARDED_HEADER", "x-forwarded-for, forwarded", "is not one of"),
        ("CAFE_TOPIC_LOG", "cafe log", "CAFE_TOPIC_LOG='cafe log' is not a Kafka topic name"),
        ("CAFE_TOPIC_LOG", "..", "is not a Kafka topic name"),
        ("CAFE_WORKERS", "0", "CAFE_WORKERS=0 is outside 1..256"),
        ("CAFE_LOG_FORMAT", "xml", "CAFE_LOG_FORMAT='xml' is not one of json, text"),
        ("CAFE_VALIDATOR", "rust",
         "CAFE_VALIDATOR='rust' is not one of fastjsonschema, jsonschema-rs"),
        ("CAFE_ACCESS_LOG", "maybe", "CAFE_ACCESS_LOG='maybe' is not a boolean"),
        ("CAFE_KAFKA_CLIENT", "kafka-python",
         "CAFE_KAFKA_CLIENT='kafka-python' is not one of aiokafka, librdkafka"),
        ("CAFE_METRICS_PORT", "0", "CAFE_METRICS_PORT=0 is outside 1..65535"),
        ("CAFE_METRICS_PORT", "8080", "CAFE_METRICS_PORT=8080 is CAFE_PORT"),
        ("CAFE_DRAIN_SECONDS", "soon", "CAFE_DRAIN_SECONDS='soon' is not a number of seconds"),
        ("CAFE_SHUTDOWN_GRACE_SECONDS", "-1", "CAFE_SHUTDOWN_GRACE_SECONDS=-1 is outside 0..3600"),
        ("CAFE_MAX_QUEUED_BYTES", "4194304",
         "CAFE_MAX_QUEUED_BYTES=4194304 is below CAFE_MAX_INFLIGHT_BYTES=8388608"),
        ("CAFE_SPOOL_MAX_AGE", "soon", "CAFE_SPOOL_MAX_AGE='soon' is not a duration"),
        ("CAFE_SPOOL_MAX_AGE", "30s", "CAFE_SPOOL_MAX_AGE=30s is outside 60..7.776e+06 seconds"),
        ("CAFE_SPOOL_MAX_AGE", "91d", "is outside 60..7.776e+06 seconds"),
        ("CAFE_SPOOL_MAX_BYTES", "1000", "CAFE_SPOOL_MAX_BYTES=1000 is outside"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert message in str(info.value)
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "x-forwarded-for"),
        ("x-forwarded-for", "x-forwarded-for"),
        ("X-Forwarded-For", "x-forwarded-for"),
        ("forwarded", "forwarded"),
        (" FORWARDED ", "forwarded"),
    ],
)
def test_the_forwarded_header_is_one_of_two(value: str, expected: str) -> None:
    assert Settings.from_env({"CAFE_FORWARDED_HEADER": value}).forwarded_header == expected


def test_blank_values_mean_unset() -> None:
    assert Settings.from_env({"CAFE_PORT": " ", "CAFE_KEYS_FILE": ""}) == Settings()


def test_the_queue_bound_follows_the_in_flight_cap_unless_set() -> None:
    mib = 1024 * 1024
    assert Settings().kafka.max_queued_bytes == 4 * Settings().max_inflight_bytes
    raised = Settings.from_env({"CAFE_MAX_INFLIGHT_BYTES": str(100 * mib)})
    assert raised.kafka.max_queued_bytes == 400 * mib
    both = Settings.from_env(
        {"CAFE_MAX_INFLIGHT_BYTES": str(100 * mib), "CAFE_MAX_QUEUED_BYTES": str(150 * mib)}
    )
    assert both.kafka.max_queued_bytes == 150 * mib


def test_the_queue_bound_unset_takes_the_largest_body() -> None:
    # One request queues up to CAFE_MAX_BODY_BYTES, and the queue has no room for a request
    # alone: below that, a request of the largest body would get 503 on every try.
    small = Settings.from_env({"CAFE_MAX_INFLIGHT_BYTES": str(MIB)})
    assert small.kafka.max_queued_bytes == small.max_body_bytes == 10 * MIB
    large = Settings.from_env({"CAFE_MAX_BODY_BYTES": str(64 * MIB)})
    assert large.kafka.max_queued_bytes == 64 * MIB


def test_a_queue_bound_below_the_largest_body_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = {"CAFE_MAX_INFLIGHT_BYTES": str(MIB), "CAFE_MAX_QUEUED_BYTES": str(4 * MIB)}
    message = "CAFE_MAX_QUEUED_BYTES=4194304 is below CAFE_MAX_BODY_BYTES=10485760"
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)
    both = {**env, "CAFE_MAX_BODY_BYTES": str(4 * MIB)}
    assert Settings.from_env(both).kafka.max_queued_bytes == 4 * MIB
    # As every bad setting does: exit status 2, the message on stderr.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["keys", "--keys-file", str(tmp_path / "keys.json"), "list"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("24H", 86400), ("7d", 604800)]
)
def test_the_spool_age_is_seconds_or_a_duration_with_a_unit(value: str, seconds: float) -> None:
    assert Settings.from_env({"CAFE_SPOOL_MAX_AGE": value}).spool.max_age_seconds == seconds


def test_the_spool_wait_must_be_shorter_than_the_produce_timeout_when_the_spool_is_on() -> None:
    shorter = {"CAFE_PRODUCE_TIMEOUT_MS": "800"}
    assert Settings.from_env(shorter).spool.dir is None  # off: nothing to check
    with pytest.raises(ConfigError, match="CAFE_SPOOL_AFTER_MS=1000 is not below"):
        Settings.from_env({**shorter, "CAFE_SPOOL_DIR": "/var/spool/cafe"})
    on = Settings.from_env({"CAFE_SPOOL_DIR": "/var/spool/cafe", "CAFE_SPOOL_AFTER_MS": "200"})
    assert on.spool == SpoolSettings(dir=Path("/var/spool/cafe"), after_ms=200)


def test_several_workers_need_a_fixed_port() -> None:
    with pytest.raises(ConfigError, match="CAFE_WORKERS=2 needs a fixed CAFE_PORT"):
        Settings.from_env({"CAFE_WORKERS": "2", "CAFE_PORT": "0"})


def test_each_variable_is_declared_once() -> None:
    names = [variable.name for variable, _ in declared_variables()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    assert not repeated, f"declared more than once: {repeated}"
    assert all(name.startswith("CAFE_") for name in names)


# The configuration table and the declared variables list the same settings.

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
DECLARED = {variable.name: (variable, default) for variable, default in declared_variables()}


def _table_rows() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) of each row of the table under "# Configuration", the
    page's title, before its first "## " section."""
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("# Configuration\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(CAFE_\w+)` \| (.+?) \| (.*) \|$", section, flags=re.MULTILINE)


ROWS = _table_rows()


def test_the_table_lists_each_declared_variable_once_and_no_other() -> None:
    listed = [name for name, _, _ in ROWS]
    repeated = sorted({name for name in listed if listed.count(name) > 1})
    assert not repeated, f"the table lists these more than once: {repeated}"
    missing = sorted(DECLARED.keys() - set(listed))
    assert not missing, f"declared in gateway/config.py but not in the table: {missing}"
    unknown = sorted(set(listed) - DECLARED.keys())
    assert not unknown, f"in the table but not declared in gateway/config.py: {unknown}"


@pytest.mark.parametrize(("name", "default", "meaning"), ROWS, ids=[row[0] for row in ROWS])
def test_the_table_gives_the_declared_default(name: str, default: str, meaning: str) -> None:
    assert name in DECLARED, f"{name} is in the table but not declared"
    variable, declared = DECLARED[name]
    assert meaning.strip(), f"{name}: the table gives no meaning"
    size = re.search(r"\((\d+) MiB\)", default)
    if size:
        assert declared == int(size[1]) * 1024 * 1024, f"{name}: table {size[0]}, {declared=}"
    if default.startswith("(none"):
        assert declared in (None, ()), f"{name}: the table says no default, {declared=}"
        return
    # A default given as a rule, "N times `CAFE_OTHER`": the declared default is what the rule
    # gives for the other's default (from_env applying it is tested above).
    rule = re.match(r"(\d+) \u00d7 `(CAFE_\w+)`", default)
    if rule:
        other = DECLARED[rule[2]][1]
        assert declared == int(rule[1]) * other, f"{name}: table {rule[0]}, {declared=}"
        return
    # Otherwise the first `value` in the cell, read as the gateway reads the variable.
    value = re.search(r"`([^`]+)`", default)
    assert value, f"{name}: the table's default {default!r} has no `value`"
    read = variable.parse(name, value[1])
    assert read == declared, f"{name}: table {value[1]!r} reads as {read!r}, {declared=}"
    # A range the meaning gives, "(low-high)", is the one the variable accepts.
    bounds = re.search(r"\((\d+)-(\d+)\)", meaning)
    if bounds:
        low, high = int(bounds[1]), int(bounds[2])
        assert variable.parse(name, str(low)) == low
        assert variable.parse(name, str(high)) == high
        for outside in (low - 1, high + 1):
            with pytest.raises(ConfigError, match=f"{name}=.* is outside {low}..{high}"):
                variable.parse(name, str(outside))
