"""docker-compose.yml, read by compose-go (the loader behind `docker compose config`), alone
and with docker-compose.secure.yml over it."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]

from tests.support.deploy import (
    ALERTS,
    COMPOSE_FILE,
    COMPOSE_SECURE_FILE,
    DASHBOARD,
    DOCKERFILE,
    GRAFANA,
    KAFKA_SECRET_FILES,
    KAFKA_SECRETS_DIR,
    PROMETHEUS_CONFIG,
    ROOT,
    SPOOL_DIR,
    Tools,
    check_gateway_env,
    check_kafka_example,
    commented_examples,
    commented_setting,
    deploycheck,
    kafka_secret_files,
    load_dashboard_datasource_uid,
    load_yaml,
)


@pytest.fixture(scope="session")
def compose(tools: Tools) -> dict[str, Any]:
    report: dict[str, Any] = deploycheck(tools, "compose", str(COMPOSE_FILE))
    return report


def test_compose_file_loads_and_its_files_exist(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"kafka", "gateway", "prometheus", "grafana"}
    assert not compose["missing_files"], compose["missing_files"]
    gateway = compose["services"]["gateway"]
    assert Path(gateway["build_context"]).resolve() == ROOT
    assert (ROOT / gateway["dockerfile"]).resolve() == DOCKERFILE


def test_compose_gateway_talks_to_the_compose_kafka(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway = services["gateway"]
    check_gateway_env(gateway["environment"], "docker-compose.yml")
    assert gateway["depends_on"] == {"kafka": "service_healthy"}
    assert services["kafka"]["healthcheck"], "kafka needs a healthcheck for service_healthy"
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for broker in gateway["environment"]["CAFE_KAFKA_BOOTSTRAP"].split(","):
        assert broker.split(":")[0] in services
        assert f"//{broker}" in advertised, f"{broker} is not an advertised listener"


def test_compose_keys_file_is_on_a_volume(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    keys_dir = str(Path(gateway["environment"]["CAFE_KEYS_FILE"]).parent)
    mounts = {v.split(":", 1)[1]: v.split(":", 1)[0] for v in gateway["volumes"]}
    assert keys_dir in mounts, f"nothing is mounted at {keys_dir}"
    assert mounts[keys_dir] in compose["volumes"]
    # Off by default; uncommenting CAFE_SPOOL_DIR puts the spool on this volume.
    assert SPOOL_DIR in mounts, f"nothing is mounted at {SPOOL_DIR}"
    assert mounts[SPOOL_DIR] in compose["volumes"]
    assert gateway["environment"].get("CAFE_SPOOL_DIR", SPOOL_DIR) == SPOOL_DIR


def test_compose_redis_is_optional_internal_and_what_the_gateway_would_use(
    compose: dict[str, Any],
) -> None:
    # compose-go leaves out a service whose profile is not asked for: `up` starts no Redis.
    assert "redis" not in compose["services"]
    services = load_yaml(COMPOSE_FILE)["services"]
    redis = services["redis"]
    assert redis["profiles"] == ["redis"]
    assert "ports" not in redis, "Redis has no password: keep it on the compose network"
    assert "redis" not in services["gateway"].get("depends_on", {})
    assert redis["read_only"] is True
    assert redis["cap_drop"] == ["ALL"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    command = redis["command"]
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    # Off by default; uncommented, the setting names this service on Redis' own port.
    assert "CAFE_RATELIMIT_STORAGE" not in compose["services"]["gateway"]["environment"]
    url = urlsplit(commented_setting(COMPOSE_FILE, "CAFE_RATELIMIT_STORAGE"))
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    assert "--port" not in command


@pytest.fixture(scope="session")
def compose_secure(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml with docker-compose.secure.yml over it, as `docker compose -f
    docker-compose.yml -f docker-compose.secure.yml config` loads them (compose's include
    merges a list of files that way), with the variables the secure file asks for."""
    where = tmp_path_factory.mktemp("compose-secure")
    env_file = where / "env"
    env_file.write_text(
        f"KAFKA_BOOTSTRAP=kafka-1.example.com:9093,kafka-2.example.com:9093\n"
        f"KAFKA_SECRETS_DIR={where}\n",
        encoding="utf-8",
    )
    include = {"path": [str(COMPOSE_FILE), str(COMPOSE_SECURE_FILE)], "env_file": str(env_file)}
    wrapper = where / "compose.yml"
    wrapper.write_text(yaml.safe_dump({"name": "cafe-gateway", "include": [include]}))
    report: dict[str, Any] = deploycheck(tools, "compose", str(wrapper))
    return report


class ComposeLoader(yaml.SafeLoader):  # type: ignore[misc]
    """PyYAML's safe loader, reading compose's `!reset` tag (a value dropped) as None."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def test_compose_secure_file_uses_another_kafka(
    compose: dict[str, Any], compose_secure: dict[str, Any]
) -> None:
    # Over docker-compose.yml, the gateway neither waits for nor starts the compose Kafka.
    assert set(compose_secure["services"]) == set(compose["services"]) - {"kafka"}
    assert not compose_secure["missing_files"], compose_secure["missing_files"]
    gateway = compose_secure["services"]["gateway"]
    assert gateway["depends_on"] == {}
    env = gateway["environment"]
    assert env["CAFE_KAFKA_BOOTSTRAP"] == "kafka-1.example.com:9093,kafka-2.example.com:9093"
    assert env["CAFE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    # The rest of the gateway is docker-compose.yml's.
    plain = compose["services"]["gateway"]
    assert gateway["volumes"] == plain["volumes"]
    kafka_settings = {k for k in env if k.startswith("CAFE_KAFKA_")}
    assert {k: v for k, v in env.items() if k not in kafka_settings} == {
        k: v for k, v in plain["environment"].items() if k not in kafka_settings
    }
    # Alone, docker-compose.yml is for an open Kafka.
    assert "CAFE_KAFKA_SECURITY_PROTOCOL" not in plain["environment"]


def test_compose_secure_secrets_are_files_under_run_secrets_kafka(
    compose_secure: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file the secure settings name is a compose secret (a file on the host)
    mounted there, and each mounted secret is named by a setting."""
    text = COMPOSE_SECURE_FILE.read_text(encoding="utf-8")
    secure = yaml.load(text, Loader=ComposeLoader)  # noqa: S506 (a SafeLoader)
    mounted = {
        PurePosixPath(s["target"]): s["source"] for s in secure["services"]["gateway"]["secrets"]
    }
    for target, source in mounted.items():
        assert target.parent == KAFKA_SECRETS_DIR, target
        assert target.name in KAFKA_SECRET_FILES, target
        assert set(secure["secrets"][source]) == {"file"}, f"secret {source}: not a file"
    env = compose_secure["services"]["gateway"]["environment"]
    files = kafka_secret_files(env)
    assert set(files.values()) == set(mounted), "settings and mounted secrets differ"
    settings = check_kafka_example(env, COMPOSE_SECURE_FILE.name, tmp_path, monkeypatch)
    assert settings.kafka.security.protocol == "SASL_SSL"
    # The commented-out mutual TLS: the SASL settings replaced by its lines, its files
    # among the secrets commented out beside the others.
    [mtls] = commented_examples(COMPOSE_SECURE_FILE)
    commented = {PurePosixPath(t) for t in re.findall(r"^ *#\s+target: (\S+)$", text, re.M)}
    assert set(kafka_secret_files(mtls).values()) <= set(mounted) | commented
    env = {k: v for k, v in env.items() if not k.startswith("CAFE_KAFKA_SASL_")} | mtls
    settings = check_kafka_example(env, f"{COMPOSE_SECURE_FILE.name}, mTLS", tmp_path, monkeypatch)
    assert settings.kafka.security.protocol == "SSL"
    assert settings.kafka.security.cert_file is not None


def test_compose_prometheus_scrapes_the_gateway_and_loads_the_alerts(
    compose: dict[str, Any],
) -> None:
    prometheus = compose["services"]["prometheus"]
    binds = {Path(b["source"]).resolve(): b["target"] for b in prometheus["binds"]}
    config = load_yaml(PROMETHEUS_CONFIG)
    assert binds[PROMETHEUS_CONFIG] == "/etc/prometheus/prometheus.yml"
    assert config["rule_files"] == [binds[ALERTS]]
    metrics_port = compose["services"]["gateway"]["environment"]["CAFE_METRICS_PORT"]
    targets = [
        target
        for job in config["scrape_configs"]
        if job["job_name"] == "cafe-gateway"
        for group in job["static_configs"]
        for target in group["targets"]
    ]
    assert targets == [f"gateway:{metrics_port}"]


def test_compose_grafana_is_provisioned_with_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert grafana["depends_on"] == {"prometheus": "service_healthy"}
    binds = {Path(b["source"]).resolve(): b["target"] for b in grafana["binds"]}
    assert binds[GRAFANA / "provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "cafe-gateway.yml")
    assert [p["options"]["path"] for p in providers["providers"]] == [binds[DASHBOARD.parent]]
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    [datasource] = datasources["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["uid"] == load_dashboard_datasource_uid()
