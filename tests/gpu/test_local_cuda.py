"""`pdserve local --device cuda` end to end on a GPU: prefill and decode workers on the GPU(s)
(one shared GPU, each with its memory fraction, or one each), KV handed over by `cuda_ipc`,
greedy tokens equal to one colocated worker's, and a short bench.serving run through the
router. Skipped without CUDA.

    PYTHONPATH=. python -m pytest -q tests/gpu/test_local_cuda.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import serving
from cluster.local import LocalCluster, LocalClusterSpec
from engine.cli import default_model_dir
from tests.e2e.procs import WORKER_FLAGS
from tests.e2e.test_cluster import post

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["Hi", "The decode worker reserves pages for the prompt and then", "Radix trees " * 20]


def completions(url: str) -> list[str]:
    texts = []
    for prompt in PROMPTS:  # one at a time: the same batch shapes on both paths
        body = {"model": "qwen3-moe", "prompt": prompt, "max_tokens": 12, "temperature": 0}
        status, raw = post(f"{url}/v1/completions", body)
        assert status == 200, raw
        texts.append(json.loads(raw)["choices"][0]["text"])
    return texts


def start(
    tmp_path: Path, name: str, engine_args: tuple[str, ...] = WORKER_FLAGS, **kw: object
) -> LocalCluster:
    spec = LocalClusterSpec(
        model_path=str(default_model_dir()),
        port=0,  # the router picks a free one (a port chosen here can be taken by a worker)
        engine_args=engine_args,
        log_dir=str(tmp_path / name),
        **kw,  # type: ignore[arg-type]
    )
    return LocalCluster(spec).start()


@pytest.mark.parametrize("gpus", [1, 2])
def test_disaggregated_on_cuda_matches_colocated(tmp_path: Path, gpus: int) -> None:
    if gpus > torch.cuda.device_count():
        pytest.skip(f"needs {gpus} GPUs")
    with start(tmp_path, "colocated", colocated=True, device="cuda:0") as colocated:
        want = completions(colocated.url)
    extra = ("--transfer-backend", "cuda_ipc")
    disagg = start(tmp_path, "disagg", device="cuda", gpu_count=gpus,
                   engine_args=(*WORKER_FLAGS, *extra))  # fmt: skip
    with disagg:
        assert completions(disagg.url) == want
        out = tmp_path / "serving.json"
        argv = ["--base-url", disagg.url, "--num-prompts", "16", "--random-input-len", "64",
                "--random-output-len", "16", "--request-rates", "8", "inf",
                "--output-file", str(out), "--disable-tqdm"]  # fmt: skip
        assert serving.main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert all(r["completed"] == 16 and r["failed"] == 0 for r in runs)
