"""MLA's two weight absorptions in decode on the GPU: cuBLAS's batched product (the torch
attention backend's) against `engine.kernels.head_bmm` (the Triton backend's).

    python -m bench.mla_absorb                        # 16 and 128 heads, 1 to 256 rows
    python -m bench.mla_absorb --heads 16 --rows 1,256 --layers 32

Per layer of a decode step in the absorbed form (DeepSeek-V3's dims: no-rope query 128, value
128, latent 512; bfloat16): the query absorption `[T, H, 128] @ W_UK [H, 128, 512]` and the
output's `[T, H, 512] @ W_UV^T [H, 512, 128]`, each on the views the model passes (the query's
no-rope part, W_UK and W_UV transposed as views of `kv_b_proj`'s weight). Times are medians of
CUDA-graph replays of `--layers` calls cycling as many layers' weights (32 x 2 MB at 16 heads:
more than the L2, as in a step, where each layer's weights are read from memory). Floor: the
larger of the bytes (weights, input, output) over the copy bandwidth and the FLOPs over the
matmul rate, both measured in the same run. Error: the largest difference from a float32
product, over the largest value.
"""

from __future__ import annotations

import argparse
import functools

import torch

from bench.args import int_list
from bench.ceiling import copy_bandwidth, matmul_rate
from bench.moe_kernel import time_graph
from engine.layers.attention import AttentionBackend, TorchAttentionBackend
from engine.layers.triton_attention import TritonAttentionBackend

NOPE, V, RANK, ROPE = 128, 128, 512, 64
NAMES = {"query": "q @ W_UK", "output": "out @ W_UV^T"}
Weights = tuple[torch.Tensor, torch.Tensor]  # W_UK [H, 128, 512], W_UV [H, 128, 512] (views)


def absorb(backend: AttentionBackend, kind: str, a: torch.Tensor, w: Weights) -> torch.Tensor:
    """One layer's product `kind` ("query" or "output") through `backend`."""
    if kind == "query":
        return backend.mla_absorb_query(a, w[0])
    return backend.mla_absorb_output(a, w[1])


def reference(kind: str, a: torch.Tensor, w: Weights) -> torch.Tensor:
    """The product in float32, `[T, H, N]`."""
    weight = w[0].float() if kind == "query" else w[1].float().transpose(1, 2)
    return torch.bmm(a.float().transpose(0, 1), weight).transpose(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int_list, default=(16, 128))
    p.add_argument("--rows", type=int_list, default=(1, 16, 64, 256))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (tests/engine/test_head_bmm.py runs the kernel on the CPU)")
    bandwidth = copy_bandwidth()
    rate = matmul_rate("cuda", torch.bfloat16)
    print(
        f"\n## MLA absorptions: {torch.cuda.get_device_name()}, torch {torch.__version__}; copy "
        f"{bandwidth / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TFLOP/s; bfloat16; "
        f"{args.layers} layers' weights cycled.\n"
    )
    print(
        "| heads | rows | product | floor µs | cuBLAS µs | Triton µs | Triton / floor "
        "| cuBLAS err | Triton err |\n"
        "| ---: | ---: | :--- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    backends: tuple[AttentionBackend, ...] = (TorchAttentionBackend(), TritonAttentionBackend())
    g = torch.Generator(device="cuda").manual_seed(0)
    for heads in args.heads:
        weights: list[Weights] = []
        for _ in range(args.layers):
            w = torch.randn(heads * (NOPE + V), RANK, device="cuda", generator=g) * RANK**-0.5
            w_uk, w_uv = w.bfloat16().view(heads, NOPE + V, RANK).split([NOPE, V], dim=1)
            weights.append((w_uk, w_uv))
        for rows in args.rows:
            q = torch.randn(rows, heads, NOPE + ROPE, device="cuda", generator=g).bfloat16()
            latent = torch.randn(rows, heads, RANK, device="cuda", generator=g).bfloat16()
            for kind, a, k, n in (
                ("query", q[:, :, :NOPE], NOPE, RANK),
                ("output", latent, RANK, V),
            ):
                nbytes = 2 * (heads * k * n + rows * heads * (k + n))
                flops = 2 * rows * heads * k * n
                floor_us = max(nbytes / bandwidth, flops / rate) * 1e6
                want = reference(kind, a, weights[0])
                times, errs = [], []
                for backend in backends:
                    step = functools.partial(run_layers, backend, kind, a, weights)
                    times.append(time_graph(step, args.reps) / args.layers * 1e6)
                    got = absorb(backend, kind, a, weights[0]).float()
                    errs.append((got - want).abs().max().item() / want.abs().max().item())
                print(
                    f"| {heads} | {rows} | {NAMES[kind]} | {floor_us:.1f} | {times[0]:.1f} "
                    f"| {times[1]:.1f} | {times[1] / floor_us:.2f} | {errs[0]:.1e} "
                    f"| {errs[1]:.1e} |",
                    flush=True,
                )
        del weights
        torch.cuda.empty_cache()


def run_layers(
    backend: AttentionBackend, kind: str, a: torch.Tensor, weights: list[Weights]
) -> None:
    for w in weights:
        absorb(backend, kind, a, w)


if __name__ == "__main__":
    main()
