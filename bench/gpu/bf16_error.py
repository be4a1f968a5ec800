"""How far each attention backend's bfloat16 run is from the float32 one, on the tiny MoE
checkpoints, measured where every MoE layer's router reads the hidden state: the router's
logits over the prompts' prefill, bfloat16 against float32, per MoE layer (max and mean
absolute error). A bfloat16 divergence of `greedy_gpu` whose path stays this close to float32
(as close as the torch backend's) is a near-tie of the rounding, not an error of the path.

    python3 -m bench.gpu.bf16_error                  # on the GPU machine, from the repo root
    python3 -m bench.gpu.bf16_error deepseek-v3

The MoE runs on the torch backend (its routing functions are where the logits are read);
`greedy_gpu` found the Triton MoE and GEMMs token-equal to it in bfloat16.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import engine.layers.moe as moe
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.testing.tiny_models import write_tiny_models
from tests.engine.reference import reference

ONE_TOKEN = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
FAMILIES = ("qwen3-moe", "deepseek-v3")
LOGITS: list[torch.Tensor] = []


def recording(route: Callable[..., Any]) -> Callable[..., Any]:
    """`route` that first keeps a float32 copy of its router logits in `LOGITS`."""

    def wrapper(router_logits: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        LOGITS.append(router_logits.float().cpu())
        return route(router_logits, *args, **kwargs)

    return wrapper


def router_logits(
    path: Path, prompts: list[list[int]], attention: str, dtype: str
) -> list[torch.Tensor]:
    """Every MoE layer's router logits over the prompts' prefill, in layer order."""
    LOGITS.clear()
    config = EngineConfig(
        model_path=str(path), num_pages=256, page_size=16, device="cuda", dtype=dtype,
        attention_backend=attention, moe_backend="torch", gemm_backend="torch",
        disable_cuda_graph=True,
    )  # fmt: skip
    engine = Engine(config)
    engine.generate(prompts, ONE_TOKEN)
    del engine
    return list(LOGITS)


def main(families: list[str]) -> None:
    moe.select_experts = recording(moe.select_experts)
    moe.select_experts_grouped = recording(moe.select_experts_grouped)
    models = write_tiny_models(Path("/tmp/pdserve-tiny"))
    for family in families or FAMILIES:
        path = models[family]
        prompts = reference(path, device="cpu").prompts
        exact = router_logits(path, prompts, "torch", "float32")
        scale = max(x.abs().max().item() for x in exact)
        print(f"{family}: {len(exact)} MoE layers, router logits up to {scale:.3f} in float32")
        for attention in ("torch", "triton"):
            errors = [
                (got - want).abs()
                for got, want in zip(
                    router_logits(path, prompts, attention, "bfloat16"), exact, strict=True
                )
            ]
            print(
                f"  bfloat16 {attention:6} attention, error per layer: max "
                + " ".join(f"{e.max().item():.2e}" for e in errors)
                + "; mean "
                + " ".join(f"{e.mean().item():.2e}" for e in errors)
            )


if __name__ == "__main__":
    main(sys.argv[1:])
