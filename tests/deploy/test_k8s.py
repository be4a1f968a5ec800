"""deploy/k8s: every overlay renders with kustomize (`kubectl kustomize`; the Makefile installs
Debian's kubernetes-client where no kubectl is), every object validates against its schema
(kubernetes-validate for core kinds, the KubeRay and Prometheus-operator CRD schemas kept in
tests/deploy/schemas for theirs), and the pieces agree with each other: the cluster spec is
valid and names the Services, ports and Ray resources the manifests define."""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.spec import ClusterSpec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = {"cpu": ("CPU", None), "nvidia": ("GPU", "nvidia.com/gpu"),
            "ascend": ("NPU", "huawei.com/Ascend910")}  # fmt: skip
NAMESPACE = "pdserve"


@functools.cache
def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not installed (make install installs kubernetes-client)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def objects(overlay: str, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in render(overlay) if o["kind"] == kind}


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """The CRD's openAPIV3Schema, closed as the API server's strict field validation is: an
    object that lists its properties takes no others (unless it keeps unknown fields)."""
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{group}_{version}_{kind.lower()}.json.gz"
    if not path.exists():
        return None
    schema: dict[str, Any] = json.loads(gzip.decompress(path.read_bytes()))

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                try:
                    re.compile(node["pattern"])
                except re.error:  # RE2 syntax Python's re lacks (inline flags mid-pattern)
                    del node["pattern"]
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    # metadata is the API server's to check (ObjectMeta), not the CRD's.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_object_validates(overlay: str) -> None:
    kinds = set()
    for obj in render(overlay):
        kinds.add(obj["kind"])
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE
        schema = crd_schema(obj["apiVersion"], obj["kind"])
        if schema is not None:
            jsonschema.validate(obj, schema)
        else:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    assert kinds >= {
        "Namespace", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "RayCluster", "ServiceMonitor", "ScrapeConfig", "PrometheusRule",
    }  # fmt: skip


def test_validation_catches_mistakes() -> None:
    """The validators refuse what the API server would (so that the test above means it)."""
    ray = copy.deepcopy(objects("cpu", "RayCluster")["pdserve"])
    ray["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolcy"] = 1
    schema = crd_schema(ray["apiVersion"], ray["kind"])
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolcy"):
        jsonschema.validate(ray, schema)
    router = copy.deepcopy(objects("cpu", "Deployment")["pdserve-router"])
    router["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(router, kubernetes_validate.latest_version(), strict=True)


def spec_of(overlay: str) -> ClusterSpec:
    raw = yaml.safe_load(
        objects(overlay, "ConfigMap")["pdserve-cluster-spec"]["data"]["cluster.yaml"]
    )
    return ClusterSpec.from_dict(raw)


def ray_resources(group: dict[str, Any]) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources", '"{}"')
    parsed: dict[str, float] = json.loads(json.loads(raw))  # KubeRay's quoted JSON
    return parsed


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_pieces_agree(overlay: str) -> None:
    device, device_resource = OVERLAYS[overlay]
    spec = spec_of(overlay)
    services = objects(overlay, "Service")
    ray = objects(overlay, "RayCluster")["pdserve"]["spec"]
    groups = {g["groupName"]: g for g in ray["workerGroupSpecs"]}
    router = objects(overlay, "Deployment")["pdserve-router"]["spec"]["template"]["spec"]
    [container] = router["containers"]

    # Ray starts no router; the Deployment's finds the workers in the same Redis.
    assert not spec.router.enabled
    redis = services["pdserve-redis"]["spec"]["ports"][0]["port"]
    assert spec.redis == f"redis://pdserve-redis:{redis}/0"
    assert f"--registry={spec.redis}" in container["args"]
    assert f"--model-path={spec.model.path}" in container["args"]
    # Router probes: HTTP on its port; workers: gRPC health on the port the spec pins.
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["port"] == "http"
    port = int(spec.model.engine_args[spec.model.engine_args.index("--port") + 1])
    for group in groups.values():
        [worker] = group["template"]["spec"]["containers"]
        assert worker["readinessProbe"]["grpc"]["port"] == port
        assert worker["image"] == f"pdserve:{ {'GPU': 'cuda', 'NPU': 'ascend'}.get(device, 'cpu') }"
    # One worker (one decode instance: all its ranks) per pod of its group, on its device.
    assert spec.prefill.device == spec.decode.device == device
    per_pod = {"prefill": (spec.prefill.ray_resource, 1),
               "decode": (spec.decode.ray_resource, spec.decode.ep_size)}  # fmt: skip
    for name, (resource, count) in per_pod.items():
        advertised = ray_resources(groups[name])
        assert advertised[resource] == count, (name, advertised)
        assert float(groups[name]["rayStartParams"]["num-cpus"]) >= count
        [worker] = groups[name]["template"]["spec"]["containers"]
        if device_resource is not None:
            assert worker["resources"]["limits"][device_resource] == count
        if device == "NPU":
            assert advertised["NPU"] == count
    # A pod per prefill replica and per decode instance: the controller waits for all.
    assert groups["prefill"]["replicas"] == spec.prefill.replicas
    assert groups["decode"]["replicas"] == spec.decode.instances
    assert ray["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no worker on the head
    # The controller's metrics port is published by the head and its Service.
    head = ray["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports[services["pdserve-controller"]["spec"]["ports"][0]["targetPort"]] == (
        spec.metrics.port
    )
    assert "pdserve up /etc/pdserve/cluster.yaml" in " ".join(
        head["lifecycle"]["postStart"]["exec"]["command"]
    )
    # Monitoring: each ServiceMonitor selects a Service and one of its ports; the workers'
    # service discovery is the controller's, in this namespace.
    for monitor in objects(overlay, "ServiceMonitor").values():
        wanted = monitor["spec"]["selector"]["matchLabels"]
        [svc] = [s for s in services.values() if wanted.items() <= s["metadata"]["labels"].items()]
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    [sd] = objects(overlay, "ScrapeConfig")["pdserve-workers"]["spec"]["httpSDConfigs"]
    assert sd["url"] == f"http://pdserve-controller.{NAMESPACE}.svc:{spec.metrics.port}/targets"
    # HPA and PDB act on the router.
    hpa = objects(overlay, "HorizontalPodAutoscaler")["pdserve-router"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "pdserve-router"
    pdb = objects(overlay, "PodDisruptionBudget")["pdserve-router"]["spec"]
    labels = objects(overlay, "Deployment")["pdserve-router"]["spec"]["template"]["metadata"]
    assert pdb["selector"]["matchLabels"].items() <= labels["labels"].items()


def test_prometheus_rule_is_the_alert_rules() -> None:
    spec = importlib.util.spec_from_file_location("sync_rules", K8S / "sync_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert (K8S / "base" / "prometheusrule.yaml").read_text() == module.render(), (
        "run python deploy/k8s/sync_rules.py"
    )
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for overlay in OVERLAYS:
        rule = objects(overlay, "PrometheusRule")["pdserve"]
        assert rule["spec"]["groups"] == alerts["groups"]
