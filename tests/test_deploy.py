"""deploy/: the image, the compose file, the Kubernetes manifests, alerts and dashboard.

Each file is read by the parser of the program that will consume it, and checked
against the gateway's own code: its metric names, its settings, its endpoints.

- Dockerfile: BuildKit's parser and its lint rules (`docker build --check`);
- docker-compose.yml: compose-go, the loader behind `docker compose config`, alone and
  with docker-compose.secure.yml over it;
- Kubernetes manifests: the Kubernetes JSON schemas that kubernetes-validate bundles
  (strict: unknown fields are errors);
- alerts.yml: Prometheus' rule file parser, as `promtool check rules` uses it;
- alerts and dashboard: Prometheus' PromQL parser, then every metric they name must be
  one gateway/metrics.py defines, and every metric it defines must be on the dashboard;
- deploy/redis/redis.sh: run, on a port of its own, with Debian's redis-server.

The tools come from deploy/tools.sh, pinned, cached in ~/.cache/cafe-gateway/tools
(CAFE_TOOLS_DIR). A tool that cannot be installed fails the tests; none is skipped.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
# Over COMPOSE_FILE: the gateway against a Kafka that asks for TLS and a login.
COMPOSE_SECURE_FILE = DEPLOY / "docker-compose.secure.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "cafe-gateway.json"

# Kubernetes versions the manifests must be valid for: the newest schemas
# kubernetes-validate has, and an older release still common in managed clusters.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# Shown in the manifests' directory but deliberately not applied by kustomization.yaml:
# the Secrets' shapes, the StatefulSet to apply instead of the Deployment for the spool,
# and the optional Redis of fleet-wide rate limits.
SPOOL_STATEFULSET = K8S / "spool-statefulset.yaml"
K8S_REDIS = K8S / "redis.yaml"
KAFKA_SECRET_EXAMPLE = K8S / "secret-kafka.example.yaml"
EXAMPLE_MANIFESTS = {
    "secret.example.yaml",
    KAFKA_SECRET_EXAMPLE.name,
    SPOOL_STATEFULSET.name,
    K8S_REDIS.name,
}
# Both workloads: the Deployment, and the StatefulSet of the spool.
K8S_WORKLOADS = (K8S / "deployment.yaml", SPOOL_STATEFULSET)
# Where the pods (from the optional Secret cafe-gateway-kafka) and the secure compose file
# (compose secrets) put the files of Kafka's credentials, and the files that may be there.
KAFKA_SECRETS_DIR = PurePosixPath("/run/secrets/kafka")
KAFKA_SECRET_FILES = {"password", "ca.crt", "tls.crt", "tls.key", "token"}
REDIS_SH = DEPLOY / "redis" / "redis.sh"
# Where the image, compose and spool-statefulset.yaml keep the spool (CAFE_SPOOL_DIR).
SPOOL_DIR = "/var/lib/cafe-gateway/spool"
# Series Prometheus makes itself, which alerts may use besides the gateway's.
PROMETHEUS_SERIES = {"up"}
# Grafana's built-in interval variables, replaced by a sample value before parsing.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
TOOLS_TIMEOUT_SECONDS = 1200


@dataclass(frozen=True)
class Tools:
    deploycheck: Path
    kubernetes_validate: Path


@pytest.fixture(scope="session")
def tools() -> Tools:
    """Install (or find in the cache) the pinned tools of deploy/tools.sh."""
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        done = subprocess.run(
            ["bash", str(DEPLOY / "tools.sh")],
            capture_output=True,
            text=True,
            env=env,
            timeout=TOOLS_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"deploy/tools.sh took over {TOOLS_TIMEOUT_SECONDS} s")
    if done.returncode != 0:
        pytest.fail(
            "deploy/tools.sh could not install the deploy checks' tools "
            f"(exit {done.returncode}); a cold cache needs the Go module proxy and PyPI:\n"
            f"{done.stderr[-4000:]}"
        )
    paths = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    return Tools(
        deploycheck=Path(paths["deploycheck"]),
        kubernetes_validate=Path(paths["kubernetes-validate"]),
    )


def deploycheck(tools: Tools, *args: str, stdin: str | None = None) -> Any:
    """Run deploycheck and return the JSON it prints; fail the test if it fails."""
    done = subprocess.run(
        [str(tools.deploycheck), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"deploycheck {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> dict[str, dict[str, Any]]:
    """The applied (non-example) objects by kind; each file holds one."""
    objects = {}
    for path in k8s_manifests():
        if path.name not in EXAMPLE_MANIFESTS:
            doc = load_yaml(path)
            objects[doc["kind"]] = doc
    return objects


def gateway_setting_names() -> set[str]:
    """Every CAFE_* variable the gateway's code reads."""
    names: set[str] = set()
    for source in (ROOT / "gateway").glob("*.py"):
        names.update(re.findall(r'"(CAFE_[A-Z0-9_]+)"', source.read_text(encoding="utf-8")))
    return names


def check_gateway_env(env: dict[str, str], where: str) -> None:
    """`env` names only variables the gateway reads, with values its parser accepts."""
    from gateway.config import Settings

    cafe = {k: v for k, v in env.items() if k.startswith("CAFE_")}
    unknown = set(cafe) - gateway_setting_names()
    assert not unknown, f"{where} sets variables the gateway does not read: {sorted(unknown)}"
    Settings.from_env(cafe)  # raises ConfigError, naming the variable, on a bad value


def commented_examples(path: Path) -> list[dict[str, str]]:
    """Each run of commented-out `# CAFE_NAME: value` lines in `path`, as settings."""
    examples: list[dict[str, str]] = []
    example: dict[str, str] = {}
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        match = re.fullmatch(r" *# (CAFE_[A-Z0-9_]+: .+)", line)
        if match:
            [(name, value)] = yaml.safe_load(match[1]).items()
            assert name not in example, f"{path.name}: {name} twice in one example"
            example[name] = str(value)
        elif example:
            examples.append(example)
            example = {}
    return examples


def kafka_secret_files(env: dict[str, str]) -> dict[str, PurePosixPath]:
    """The settings of `env` whose value is a path under KAFKA_SECRETS_DIR."""
    return {
        name: PurePosixPath(value)
        for name, value in env.items()
        if PurePosixPath(value).is_relative_to(KAFKA_SECRETS_DIR)
    }


def check_kafka_example(
    env: dict[str, str], where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """`env` is a configuration the gateway starts with once the files it names under
    KAFKA_SECRETS_DIR are there: each is made in `tmp_path`, and `env` points there.
    Returns the Settings."""
    from gateway.config import Settings

    # The files made here are placeholders, not PEM: the TLS context is not built.
    monkeypatch.setattr("gateway.config.KafkaSecurity.tls_context", lambda security: None)
    local = dict(env)
    for name, path in kafka_secret_files(env).items():
        file = tmp_path / path.relative_to(KAFKA_SECRETS_DIR)
        file.write_text("placeholder\n", encoding="utf-8")
        local[name] = str(file)
    check_gateway_env(local, where)
    return Settings.from_env({k: v for k, v in local.items() if k.startswith("CAFE_")})


# --- Settings named in deploy/ -------------------------------------------------------


def deploy_yaml_files() -> list[Path]:
    return sorted([*K8S.glob("*.yaml"), *DEPLOY.glob("docker-compose*.yml")])


@pytest.mark.parametrize("path", deploy_yaml_files(), ids=lambda p: p.name)
def test_deploy_files_name_only_declared_settings(path: Path) -> None:
    """Every CAFE_ variable a manifest or compose file names, set or in a comment (the
    commented-out examples included), is one the gateway declares."""
    from gateway.config import declared_variables

    declared = {variable.name for variable, _ in declared_variables()}
    named = set(re.findall(r"\bCAFE_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    assert not named - declared, f"{path.name} names undeclared settings: {named - declared}"


# --- Dockerfile ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def dockerfile(tools: Tools) -> dict[str, Any]:
    report: dict[str, Any] = deploycheck(tools, "dockerfile", str(DOCKERFILE), str(ROOT))
    return report


def test_dockerfile_has_no_lint_warnings(dockerfile: dict[str, Any]) -> None:
    assert not dockerfile["warnings"], json.dumps(dockerfile["warnings"], indent=2)


def test_image_runs_the_gateway_as_a_non_root_user(dockerfile: dict[str, Any]) -> None:
    stages = dockerfile["stages"]
    assert all(s["base"].startswith("python:3.11-slim") for s in stages), stages
    final = stages[-1]
    user = final["user"].split(":")[0]
    assert user.isdigit(), f"USER {final['user']!r}: a numeric uid lets runAsNonRoot verify it"
    assert int(user) != 0
    assert final["entrypoint"] == ["cafe-gateway"]
    assert final["entrypoint_json"], "ENTRYPOINT in shell form would not get SIGTERM"
    assert final["cmd"] == ["serve"]
    assert {"8080", "9100"} <= set(final["expose"])
    assert "CAFE_HOST=0.0.0.0" in final["env"]


def test_image_healthcheck_asks_healthz_without_curl(dockerfile: dict[str, Any]) -> None:
    test = dockerfile["stages"][-1]["healthcheck"]
    assert test, "the image has no HEALTHCHECK"
    assert test[0] == "CMD"
    assert test[1] == "python", "python:3.11-slim has no curl or wget"
    assert "/healthz" in test[-1]


def test_image_installs_with_the_pinned_constraints() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"pip install -c constraints\.txt \.", text)


def test_image_gives_the_spool_directory_to_its_user() -> None:
    # An empty named volume mounted there takes the directory's owner from the image.
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(rf"mkdir -p [^\n]*{SPOOL_DIR}", text), f"the image makes no {SPOOL_DIR}"
    assert re.search(rf"chown cafe:cafe [^\n]*{SPOOL_DIR}", text), f"{SPOOL_DIR} is root's"


def test_dockerfile_copies_only_files_the_build_context_sends(dockerfile: dict[str, Any]) -> None:
    sources = dockerfile["copy_sources"]
    assert sources
    missing = [s["path"] for s in sources if not s["exists"]]
    ignored = [s["path"] for s in sources if s["ignored"]]
    assert not missing, f"COPY of paths that do not exist: {missing}"
    assert not ignored, f"COPY of paths .dockerignore leaves out of the context: {ignored}"


def test_dockerignore_leaves_out_local_state() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    wanted = {".git", ".venv", ".dev", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
    wanted |= {"docs/bench", "loadtest/results"}
    assert wanted <= patterns, sorted(wanted - patterns)


# --- docker-compose.yml --------------------------------------------------------------


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


def commented_setting(path: Path, name: str) -> str:
    """The value of the one commented-out `# NAME: value` line in `path`."""
    [value] = re.findall(rf"^ *# {name}: (\S+)$", path.read_text(encoding="utf-8"), re.M)
    return str(value)


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


# --- Kubernetes ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def kubernetes_validate(tools: Tools) -> Iterator[ModuleType]:
    """kubernetes_validate.utils, imported from the tools cache."""
    path = str(tools.kubernetes_validate)
    sys.path.insert(0, path)
    try:
        yield importlib.import_module("kubernetes_validate.utils")
    finally:
        sys.path.remove(path)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", k8s_manifests(), ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(
    kubernetes_validate: ModuleType, path: Path, version: str
) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{path.name}: {exc.message}")


def test_kustomization_applies_every_manifest_but_the_examples() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    expected = {p.name for p in k8s_manifests()} - EXAMPLE_MANIFESTS
    assert set(listed) == expected


def test_manifests_name_no_namespace() -> None:
    for path in k8s_manifests():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert "namespace" not in doc["metadata"], path.name
    assert "namespace" not in load_yaml(K8S / "kustomization.yaml")


def test_objects_refer_to_each_other_by_the_right_names_and_labels() -> None:
    objects = k8s_objects()
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [env_from] = container["envFrom"]
    assert env_from["configMapRef"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    port_names = {p["name"] for p in container["ports"]}
    for port in objects["Service"]["spec"]["ports"]:
        assert port["targetPort"] in port_names


def test_deployment_serves_on_the_gateway_ports_with_its_probes() -> None:
    objects = k8s_objects()
    config = objects["ConfigMap"]["data"]
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(config["CAFE_PORT"]), "metrics": int(config["CAFE_METRICS_PORT"])}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == config["CAFE_METRICS_PORT"]


def test_deployment_shuts_down_within_the_grace_period() -> None:
    objects = k8s_objects()
    config = objects["ConfigMap"]["data"]
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = (
        float(command[1])
        + float(config["CAFE_DRAIN_SECONDS"])
        + float(config["CAFE_SHUTDOWN_GRACE_SECONDS"])
        # Then the producer delivers what it holds, for at most the produce timeout.
        + float(config["CAFE_PRODUCE_TIMEOUT_MS"]) / 1000
    )
    assert pod["terminationGracePeriodSeconds"] > needed


def test_deployment_is_locked_down() -> None:
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    # A read-only root still needs a writable /tmp: the workers' metrics files go there.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # noqa: S108 (the container's /tmp)


def test_image_user_is_the_pods_user(dockerfile: dict[str, Any]) -> None:
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    uid = dockerfile["stages"][-1]["user"].split(":")[0]
    assert pod["securityContext"]["runAsUser"] == int(uid)


def test_keys_file_comes_from_the_secret() -> None:
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    keys_file = Path(env["CAFE_KEYS_FILE"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # The whole directory, not a subPath: only then do Secret updates reach the file.
    mount = mounts[str(keys_file.parent)]
    assert "subPath" not in mount
    assert mount["readOnly"] is True
    secret = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["secret"]
    assert secret["secretName"] == "cafe-gateway-keys"
    assert [i["path"] for i in secret["items"]] == [keys_file.name]
    example = load_yaml(K8S / "secret.example.yaml")
    assert example["metadata"]["name"] == secret["secretName"]
    json.loads(example["stringData"][keys_file.name])


@pytest.mark.parametrize("path", K8S_WORKLOADS, ids=lambda p: p.name)
def test_kafka_secret_is_an_optional_directory(path: Path) -> None:
    pod = load_yaml(path)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(KAFKA_SECRETS_DIR)]
    # The whole directory, not a subPath: only then do Secret updates reach the files.
    assert "subPath" not in mount
    assert "subPathExpr" not in mount
    assert mount["readOnly"] is True
    # Nor a file of it mounted inside on its own.
    inside = [p for p in mounts if PurePosixPath(p).parent.is_relative_to(KAFKA_SECRETS_DIR)]
    assert not inside, inside
    secret = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["secret"]
    assert secret["secretName"] == load_yaml(KAFKA_SECRET_EXAMPLE)["metadata"]["name"]
    # A Kafka that asks for no credentials needs no Secret: the pod starts without it.
    assert secret["optional"] is True
    # Every key of the Secret a file: a list of items would leave out those it does not name.
    assert "items" not in secret
    # Readable by the gateway (fsGroup), by no one else.
    assert secret["defaultMode"] & 0o440 == 0o440
    assert secret["defaultMode"] & 0o007 == 0
    assert "fsGroup" in pod["securityContext"]


def test_kafka_example_secret_holds_the_files_and_no_secret() -> None:
    example = load_yaml(KAFKA_SECRET_EXAMPLE)
    assert example["kind"] == "Secret"
    assert example["type"] == "Opaque"
    data = example["stringData"]
    assert set(data) == KAFKA_SECRET_FILES
    assert all(value.startswith("PLACEHOLDER") for value in data.values()), data
    # Its comments show how to make the real one, from files under these names.
    text = KAFKA_SECRET_EXAMPLE.read_text(encoding="utf-8")
    assert f"kubectl create secret generic {example['metadata']['name']} " in text
    from_files = set(re.findall(r"--from-file=([^=\s]+)=", text))
    assert from_files
    assert from_files <= KAFKA_SECRET_FILES


def test_configmap_kafka_examples_read_the_secret_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commented-out examples of configmap.yaml (SCRAM over TLS, mutual TLS, a token)
    name files of the mounted Secret, and each makes a configuration the gateway takes."""
    from gateway.config import KafkaSecurity, Settings

    objects = k8s_objects()
    config = objects["ConfigMap"]["data"]
    [container] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {**config, **{e["name"]: e["value"] for e in container["env"]}}
    # Uncommented, none of them: the defaults (PLAINTEXT) stay, for an open Kafka.
    assert Settings.from_env(env).kafka.security == KafkaSecurity()
    examples = [
        example
        for example in commented_examples(K8S / "configmap.yaml")
        if "CAFE_KAFKA_SECURITY_PROTOCOL" in example
    ]
    kinds = {
        (e["CAFE_KAFKA_SECURITY_PROTOCOL"], e.get("CAFE_KAFKA_SASL_MECHANISM")) for e in examples
    }
    assert {("SASL_SSL", "SCRAM-SHA-512"), ("SSL", None)} <= kinds, kinds
    named = set()
    for example in examples:
        files = kafka_secret_files(example)
        file_settings = {name for name in example if name.endswith("_FILE")}
        assert set(files) == file_settings, f"files outside {KAFKA_SECRETS_DIR}: {example}"
        for path in files.values():
            # The Secret's keys are files right in the directory.
            assert path.parent == KAFKA_SECRETS_DIR, path
            assert path.name in KAFKA_SECRET_FILES, path
            named.add(path.name)
        where = f"configmap.yaml's example {sorted(example.items())}"
        check_kafka_example({**env, **example}, where, tmp_path, monkeypatch)
    # Each file the example Secret holds is used by one of the examples.
    assert named == KAFKA_SECRET_FILES


def test_configmap_is_a_valid_gateway_configuration() -> None:
    objects = k8s_objects()
    config = objects["ConfigMap"]["data"]
    [container] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {**config, **{e["name"]: e["value"] for e in container["env"]}}
    check_gateway_env(env, "the ConfigMap and Deployment")
    # One worker per core of the CPU limit.
    cpu_limit = str(container["resources"]["limits"]["cpu"])
    cores = int(cpu_limit[:-1]) / 1000 if cpu_limit.endswith("m") else float(cpu_limit)
    assert int(config["CAFE_WORKERS"]) <= cores


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity in bytes: 4Gi, 500Mi, 2G, or a plain number."""
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", quantity)
    assert match, f"storage quantity {quantity!r}"
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    units |= {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(match[1]) * (units[match[2]] if match[2] else 1)


def test_spool_statefulset_is_the_deployment_with_a_claim_per_pod() -> None:
    """spool-statefulset.yaml runs deployment.yaml's pod, plus a spool on a claim of its own."""
    from gateway.config import Settings

    objects = k8s_objects()
    deployment = objects["Deployment"]
    statefulset = load_yaml(SPOOL_STATEFULSET)
    assert statefulset["kind"] == "StatefulSet"
    assert statefulset["metadata"] == deployment["metadata"]
    spec = statefulset["spec"]
    assert spec["selector"] == deployment["spec"]["selector"]
    assert spec["replicas"] == deployment["spec"]["replicas"]
    # What a claim holds was answered 2xx: neither a scale-down nor a delete removes it.
    retention = spec["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    [claim] = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = spec["template"]
    [container] = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    spooled = {name for name in env if name.startswith("CAFE_SPOOL_")}
    [mount] = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert env["CAFE_SPOOL_DIR"] == mount["mountPath"] == SPOOL_DIR
    assert not any(v["name"] == mount["name"] for v in pod["spec"]["volumes"])
    # Without the spool's variables and mount, the pod is the Deployment's.
    plain = copy.deepcopy(pod)
    [plain_container] = plain["spec"]["containers"]
    plain_container["env"] = [e for e in plain_container["env"] if e["name"] not in spooled]
    plain_container["volumeMounts"].remove(mount)
    assert plain == deployment["spec"]["template"], "the pods differ by more than the spool"
    # Each worker keeps a file of up to CAFE_SPOOL_MAX_BYTES; the claim holds them all,
    # with room left for SQLite's pages and write-ahead log.
    env = {**objects["ConfigMap"]["data"], **env}
    check_gateway_env(env, "the ConfigMap and spool-statefulset.yaml")
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("CAFE_")})
    storage = quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
    assert storage > settings.workers * settings.spool.max_bytes


def redis_objects() -> dict[str, dict[str, Any]]:
    """redis.yaml's objects by kind."""
    docs = yaml.safe_load_all(K8S_REDIS.read_text(encoding="utf-8"))
    return {doc["kind"]: doc for doc in docs}


def test_redis_manifest_is_one_locked_down_redis_without_persistence() -> None:
    deployment = redis_objects()["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    # A rollout must not run two Redis, each with half the buckets, behind one Service.
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = container["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/data"]]
    args = container["args"]
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--appendonly") + 1] == "no"
    # Redis evicts before the kernel kills it for its memory limit.
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"]
    # Redis' "64mb" is 64 x 2^20 bytes, Kubernetes' 64Mi.
    maxmemory = quantity_bytes(args[args.index("--maxmemory") + 1].replace("mb", "Mi"))
    assert maxmemory < quantity_bytes(limits["memory"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe in container, probe


def test_redis_is_what_the_configmap_names_and_only_the_gateway_reaches_it() -> None:
    objects = redis_objects()
    assert set(objects) == {"Deployment", "Service", "NetworkPolicy"}
    pod = objects["Deployment"]["spec"]["template"]
    redis_labels = pod["metadata"]["labels"]
    service = objects["Service"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= redis_labels.items()
    [container] = pod["spec"]["containers"]
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    # Off by default (the setting may be absent from the gateway); uncommented, it names
    # this Service and its port.
    configmap = K8S / "configmap.yaml"
    assert "CAFE_RATELIMIT_STORAGE" not in load_yaml(configmap)["data"]
    url = urlsplit(commented_setting(configmap, "CAFE_RATELIMIT_STORAGE"))
    assert (url.scheme, url.hostname, url.port) == ("redis", "cafe-redis", port["port"])
    assert url.hostname == service["metadata"]["name"]
    # Neither selects the other's pods: the gateway's Service, PDB and HPA stay its own.
    gateway = k8s_objects()["Deployment"]
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert (
        not objects["Deployment"]["spec"]["selector"]["matchLabels"].items()
        <= gateway_labels.items()
    )
    assert not gateway["spec"]["selector"]["matchLabels"].items() <= redis_labels.items()
    policy = objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    [rule] = policy["ingress"]
    [peer] = rule["from"]
    assert peer["podSelector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in rule["ports"]] == [port["targetPort"]]


# --- deploy/redis/redis.sh -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_cli(port: int, *words: str) -> list[str]:
    """The lines redis-cli prints for one command (redis-server's package brings it)."""
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *words], capture_output=True, text=True, timeout=10
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[:-1]


def test_redis_sh_runs_a_loopback_redis_without_persistence(tmp_path: Path) -> None:
    """up, up again, status, down, down again, status: on a port and home of the test's
    own, leaving the Redis that `make test` uses alone."""
    port = free_port()
    env = {**os.environ, "CAFE_REDIS_PORT": str(port), "CAFE_REDIS_HOME": str(tmp_path)}

    def redis_sh(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(REDIS_SH), command], env=env, capture_output=True, text=True, timeout=60
        )

    try:
        for _ in range(2):
            up = redis_sh("up")
            assert up.returncode == 0, up.stderr
        assert redis_sh("status").returncode == 0
        assert redis_cli(port, "PING") == ["PONG"]
        settings = {"bind": "127.0.0.1", "protected-mode": "yes", "save": "", "appendonly": "no"}
        for name, value in settings.items():
            assert redis_cli(port, "CONFIG", "GET", name) == [name, value]
    finally:
        down = redis_sh("down")
    assert down.returncode == 0, down.stderr
    assert redis_sh("down").returncode == 0
    status = redis_sh("status")
    assert status.returncode == 3, status.stderr
    assert list(tmp_path.glob("**/*.rdb")) == []


# --- Prometheus rules ----------------------------------------------------------------


def test_alert_rules_load_like_promtool_check_rules(tools: Tools) -> None:
    [report] = deploycheck(tools, "rules", str(ALERTS))
    assert report["errors"] == []
    assert report["rules"] == len(alert_rules())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_alerts_cover_errors_kafka_latency_dead_letters_and_keys() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert len(rules) == len(alert_rules()), "two alerts share a name"
    for name in (
        "CafeGatewayHighErrorRatio",
        "CafeGatewayKafkaUnavailable",
        "CafeGatewayHighLatencyP99",
        "CafeGatewayDeadLetterRatio",
        "CafeGatewayApiKeyReloadFailed",
        "CafeGatewaySpoolOldRecords",
        "CafeGatewaySpoolRecordsDropped",
        "CafeGatewaySpoolUnavailable",
        "CafeGatewayRateLimitRedisDown",
    ):
        assert name in rules
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"page", "warning"}, name
        assert rule["annotations"]["summary"], name
    assert "cafe_http_request_duration_seconds_bucket" in rules["CafeGatewayHighLatencyP99"]["expr"]


# --- Grafana and metric names --------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def load_dashboard_datasource_uid() -> str:
    [variable] = [v for v in load_dashboard()["templating"]["list"] if v["type"] == "datasource"]
    uid: str = variable["current"]["value"]
    return uid


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    panels = []
    for panel in load_dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "cafe-gateway"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "two panels share an id"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def grafana_variables() -> set[str]:
    return {v["name"] for v in load_dashboard()["templating"]["list"]}


def expand_grafana_variables(expr: str, where: str) -> str:
    """The PromQL Prometheus receives: Grafana's $variables replaced by sample values."""
    variables = grafana_variables()

    def sample(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name in GRAFANA_INTERVALS:
            return GRAFANA_INTERVALS[name]
        assert name in variables, f"{where}: ${name} is not a dashboard variable"
        return ".*"

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", sample, expr)


def promql_in_use() -> list[tuple[str, str]]:
    """(where, PromQL) for every expression of the dashboard and the alert rules."""
    exprs = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            where = f"dashboard panel {panel['title']!r} {target['refId']}"
            exprs.append((where, expand_grafana_variables(target["expr"], where)))
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(METRIC, LABEL) is Grafana's, not PromQL; its METRIC is.
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"dashboard variable {variable['name']}: {query}"
            exprs.append((f"dashboard variable {variable['name']}", match[1]))
    exprs.extend((f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules())
    return exprs


@pytest.fixture(scope="session")
def promql_metrics(tools: Tools) -> list[tuple[str, set[str]]]:
    """(where, metric names) of each expression in use, parsed by Prometheus' parser."""
    exprs = promql_in_use()
    parsed = deploycheck(tools, "promql", stdin=json.dumps([e for _, e in exprs]))
    errors = [
        f"{where}: {p['error']}"
        for (where, _), p in zip(exprs, parsed, strict=True)
        if p.get("error")
    ]
    assert not errors, "PromQL that does not parse:\n" + "\n".join(errors)
    return [(where, set(p["metrics"])) for (where, _), p in zip(exprs, parsed, strict=True)]


@pytest.fixture(scope="session")
def gateway_series() -> dict[str, str]:
    """Each series name the gateway exposes -> the metric it belongs to."""
    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry, "0.0.0")
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    series = {}
    for family in registry.collect():
        assert family.type in suffixes, f"{family.name}: metric type {family.type}"
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = family.name
    assert series, "gateway/metrics.py defines no metric"
    return series


def test_dashboard_and_alerts_use_only_metrics_the_gateway_exposes(
    promql_metrics: list[tuple[str, set[str]]], gateway_series: dict[str, str]
) -> None:
    known = set(gateway_series) | PROMETHEUS_SERIES
    unknown = [
        f"{where}: {sorted(names - known)}" for where, names in promql_metrics if names - known
    ]
    assert not unknown, "metrics gateway/metrics.py does not define:\n" + "\n".join(unknown)
    assert all(names for _, names in promql_metrics), "an expression selects no metric"


def test_dashboard_shows_every_gateway_metric(
    promql_metrics: list[tuple[str, set[str]]], gateway_series: dict[str, str]
) -> None:
    shown = {
        gateway_series[name]
        for where, names in promql_metrics
        if where.startswith("dashboard panel")
        for name in names
        if name in gateway_series
    }
    missing = set(gateway_series.values()) - shown
    assert not missing, f"metrics with no dashboard panel: {sorted(missing)}"
