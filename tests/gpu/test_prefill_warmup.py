"""The prefill warm-up on a GPU (engine/prefill_warmup.py): after the engine has started, a
stream of requests of every kind (short and long prompts, batches of many short ones, cached
prefixes, chunked prompts, greedy and sampled) compiles no Triton kernel, and the greedy tokens
are those of an engine started without the warm-up. Skipped without CUDA.

    PYTHONPATH=. python -m pytest -q tests/gpu/test_prefill_warmup.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.first_use import Compiles, counting_compiles
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_engine(path: Path, warm: bool) -> Engine:
    return Engine(
        EngineConfig(
            model_path=str(path),
            num_pages=2048,
            page_size=16,
            device="cuda",
            dtype="bfloat16",
            attention_backend="triton",
            cuda_graph_max_bs=16,
            max_running_requests=24,
            chunked_prefill_size=1536,  # the tiny models' context: 2,048
            piecewise_cuda_graph_max_tokens=384,
            disable_prefill_warmup=not warm,
        )
    )


def batches(vocab: int) -> list[tuple[list[list[int]], SamplingParams]]:
    g = torch.Generator().manual_seed(11)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    greedy = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=5, ignore_eos=True)
    shared = prompt(700)
    return [
        ([prompt(300)], greedy),  # through the pieces
        ([prompt(1000)], greedy),  # eagerly
        ([prompt(n) for n in (37, 61, 90, 130, 251, 77, 19)], greedy),  # short sequences
        ([prompt(1900)], greedy),  # chunked: its second chunk over a cached prefix
        ([shared], greedy),
        ([shared + prompt(n) for n in (29, 450, 1100)], sampled),  # prefix-cache hits
        ([prompt(n) for n in range(5, 21)], sampled),  # as decode rows, 16 requests decoding
        ([prompt(1537)], greedy),
    ]


@pytest.mark.parametrize("family", ["llama", "qwen3-moe", "deepseek-v3"])
def test_no_request_compiles_a_kernel(tiny_models: dict[str, Path], family: str) -> None:
    warm = make_engine(tiny_models[family], warm=True)
    assert warm.runner.warmup_prefills > 0
    work = batches(warm.model_config.vocab_size)
    with counting_compiles() as counts:
        counts.append(Compiles())
        outputs = [[r.output_ids for r in warm.generate(p, s)] for p, s in work]
        compiled = counts[-1]
    assert not compiled.kernels, f"requests compiled {compiled.names()}"
    assert warm.num_free_pages == warm.pool.num_pages
    del warm
    cold = make_engine(tiny_models[family], warm=False)
    assert cold.runner.warmup_prefills == 0
    for (prompts, params), ours in zip(work, outputs, strict=True):
        if params.greedy:
            assert [r.output_ids for r in cold.generate(prompts, params)] == ours
