"""The shape deploy/k8s gives a cluster, on a local multi-node Ray cluster: a head with no CPUs
for workers, one node per worker group advertising its role's Ray resource, `pdserve up` on the
CPU overlay's own cluster spec (router not started by Ray, an external Redis), and the router
run apart, as its Deployment runs it, finding the workers in Redis.

What cannot be the same on one machine: the spec's fixed worker port (two workers would share
it here) becomes 0, and the model path, Redis address and metrics address are local ones."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.local import Child, stop_child, wait_ready
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.deploy.test_k8s import objects
from tests.redis_server import RedisServer, free_port

MODEL = "qwen3-moe"
PDSERVE = [sys.executable, "-m", "cluster.cli"]


def pdserve(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [*PDSERVE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        body: bytes = resp.read()
        return body


@pytest.fixture(scope="module")
def k8s_shaped(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("k8s-shaped")
    config = objects("cpu", "ConfigMap")["pdserve-cluster-spec"]["data"]["cluster.yaml"]
    spec = yaml.safe_load(config)
    ray_head = objects("cpu", "RayCluster")["pdserve"]["spec"]
    router_container = objects("cpu", "Deployment")["pdserve-router"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    redis = RedisServer(tmp).start()
    metrics_port = free_port()
    spec["model"]["path"] = str(tiny_models[MODEL])
    spec["model"]["engine_args"].update(port=0, **{"max-total-tokens": 4096})
    spec["redis"]["address"] = redis.url
    spec["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(spec))

    # The RayCluster's nodes: the head's rayStartParams, and one node per worker group with
    # the Ray resources its pods advertise.
    head_cpus = int(ray_head["headGroupSpec"]["rayStartParams"]["num-cpus"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    for group in ray_head["workerGroupSpecs"]:
        params = group["rayStartParams"]
        for _ in range(group["replicas"]):
            cluster.add_node(
                num_cpus=int(params["num-cpus"]),
                resources=json.loads(json.loads(params["resources"])),
            )
    router: Child | None = None
    try:
        out = pdserve("up", str(tmp / "cluster.yaml"), "--address", cluster.address,
                      "--log-dir", str(tmp / "logs"))  # fmt: skip
        assert "router not started by Ray" in out, out
        # The router as its Deployment runs it, with local addresses.
        port = free_port()
        local = {"--model-path": str(tiny_models[MODEL]), "--host": "127.0.0.1",
                 "--port": str(port), "--registry": redis.url}  # fmt: skip
        args = [
            f"{name}={local.get(name, value)}"
            for name, value in (a.split("=", 1) for a in router_container["args"])
        ]
        assert router_container["command"][:3] == ["python", "-m", "router"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", *args], stdout=subprocess.PIPE, text=True,
            stderr=(tmp / "router.log").open("w"),
        )  # fmt: skip
        router = Child("router", proc)
        url = str(wait_ready(router, 120)["url"])
        yield {
            "url": url,
            "address": cluster.address,
            "metrics": f"http://127.0.0.1:{metrics_port}",
        }
        pdserve("down", "--address", cluster.address)
    finally:
        if router is not None:
            router.proc.terminate()
            stop_child(router)
        cluster.shutdown()
        redis.stop()


def test_k8s_shaped_cluster_serves(
    tiny_models: dict[str, Path], k8s_shaped: dict[str, Any]
) -> None:
    prompt = [3, 14, 15, 92, 65]
    engine = Engine(EngineConfig(model_path=str(tiny_models[MODEL]), max_total_tokens=1024))
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    [expected] = engine.generate([prompt], params)
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 12,
            "ignore_eos": True}}  # fmt: skip
    req = urllib.request.Request(
        k8s_shaped["url"] + "/generate", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert json.loads(resp.read())["output_ids"] == expected.output_ids

    # Each worker took its role's one unit of Ray resource: one worker per node of its group.
    rows = [line.split() for line in pdserve("status", "--address", k8s_shaped["address"])
            .strip().splitlines()[1:]]  # fmt: skip
    assert sorted(r[1] for r in rows) == ["decode", "prefill"], rows
    import ray

    ray.init(address=k8s_shaped["address"])
    try:
        free = ray.available_resources()
    finally:
        ray.shutdown()
    assert free.get("pdserve_prefill", 0) == 0 and free.get("pdserve_decode", 0) == 0, free

    # The controller (on the head) serves restarts and the workers' service discovery.
    text = get(k8s_shaped["metrics"] + "/metrics").decode()
    assert 'pdserve:worker_restarts_total{group="prefill-0",role="prefill"} 0.0' in text
    targets = json.loads(get(k8s_shaped["metrics"] + "/targets"))
    assert sorted(t["labels"]["pdserve_role"] for t in targets) == ["decode", "prefill"]
    for target in targets:
        assert b"pdserve:kv_pages_total" in get(f"http://{target['targets'][0]}/metrics")
