"""The Kubernetes manifests (deploy/k8s/), checked against the Kubernetes JSON schemas that
kubernetes-validate bundles (strict: unknown fields are errors) and against each other."""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]

from tests.support.deploy import (
    K8S,
    KAFKA_SECRET_FILES,
    KAFKA_SECRETS_DIR,
    SPOOL_DIR,
    Tools,
    check_gateway_env,
    check_kafka_example,
    commented_examples,
    commented_setting,
    kafka_secret_files,
    load_yaml,
)

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
