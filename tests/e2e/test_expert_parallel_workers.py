"""A decode instance of two expert-parallel ranks behind one gRPC endpoint."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.e2e.procs import worker, workers
from tests.e2e.test_workers import (
    MAX_NEW,
    request,
    run_colocated,
    run_disaggregated,
    wait_pages_free,
)
from tests.engine.reference import make_prompts

MODEL = "qwen3-moe"


def offline(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(EngineConfig(model_path=str(model_dir), num_pages=256))
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)
    return [r.output_ids for r in engine.generate(prompts, params)]


def test_prefill_ep1_to_decode_ep2_equals_offline(tiny_models: dict[str, Path]) -> None:
    model_dir = tiny_models[MODEL]
    prompts = make_prompts(vocab_size=512)
    expected = offline(model_dir, prompts)
    specs = [("prefill",), ("decode", "--ep-size", "2"), ("null", "--ep-size", "2")]
    with workers(model_dir, *specs) as [(_, prefill), (_, decode), (_, colocated)]:

        async def main() -> tuple[list[list[int]], list[list[int]]]:
            reqs = [request(f"ep{i}", p) for i, p in enumerate(prompts)]
            dis = await asyncio.gather(*(run_disaggregated(prefill, decode, r) for r in reqs))
            col = await asyncio.gather(*(run_colocated(colocated, r) for r in reqs))
            await wait_pages_free(decode)
            await wait_pages_free(colocated)
            await wait_pages_free(prefill, prefill=True)
            return list(dis), list(col)

        dis, col = asyncio.run(main())
    assert dis == expected
    assert col == expected


def test_dead_rank_fails_health_and_requests(tiny_models: dict[str, Path]) -> None:
    with worker("null", tiny_models[MODEL], "--ep-size", "2") as (child, endpoint):
        ranks = subprocess.run(
            ["pgrep", "-P", str(child.proc.pid), "-f", "decode_worker.ranks"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert len(ranks) == 1, ranks
        subprocess.run(["kill", f"-{signal.SIGKILL.value}", ranks[0]], check=True)

        async def main() -> None:
            async with grpc.aio.insecure_channel(endpoint) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                deadline = time.monotonic() + 20
                while True:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
                    if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    assert time.monotonic() < deadline, "health stayed SERVING"
                    await asyncio.sleep(0.2)
            try:
                await asyncio.wait_for(run_colocated(endpoint, request("after", [1, 2, 3])), 10)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                assert "engine" in (exc.details() or "")
            else:
                raise AssertionError("a request on a broken instance succeeded")

        asyncio.run(main())


def scrape(child_ready: dict[str, object]) -> dict[str, float]:
    """`{sample line name+labels: value}` from a worker's /metrics."""
    import urllib.request

    with urllib.request.urlopen(str(child_ready["metrics"]), timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_eplb_at_run_time_keeps_outputs_and_exports_metrics(tiny_models: dict[str, Path]) -> None:
    model_dir = tiny_models[MODEL]
    prompts = make_prompts(vocab_size=512)
    expected = offline(model_dir, prompts)
    flags = ("--ep-size", "2", "--ep-num-redundant-experts", "2", "--enable-eplb",
             "--expert-metrics-interval", "1")  # fmt: skip
    with worker("null", model_dir, *flags) as (child, endpoint):

        async def run_all() -> list[list[int]]:
            reqs = [request(f"eplb{i}-{time.monotonic()}", p) for i, p in enumerate(prompts)]
            return list(await asyncio.gather(*(run_colocated(endpoint, r) for r in reqs)))

        assert asyncio.run(run_all()) == expected
        time.sleep(3)  # at least one expert-load reading and rebalance
        samples = scrape(child.ready)
        imbalance = [v for k, v in samples.items() if k.startswith("pdserve:expert_load_imbalance")]
        assert imbalance and all(v >= 1.0 for v in imbalance), samples
        assert any(k.startswith("pdserve:expert_load{") for k in samples)
        assert any(k.startswith("pdserve:eplb_rebalances_total") for k in samples)
        # Whatever was moved, outputs stay the same.
        assert asyncio.run(run_all()) == expected
        assert samples[next(k for k in samples if k.startswith("pdserve:worker_engine_alive"))] == 1
