"""MLA's two weight absorptions in decode on the GPU: cuBLAS's batched product (the torch
attention backend's) against `engine.kernels.head_bmm` (the Triton backend's).

    python -m bench.mla_absorb                        # 16 and 128 heads, 1 to 256 rows
    python -m bench.mla_absorb --heads 16 --rows 1,256 --layers 32
    python -m bench.mla_absorb --heads 16 --rows 1,16,64 --with-latent

Per layer of a decode step in the absorbed form (DeepSeek-V3's dims: no-rope query 128, value
128, latent 512; bfloat16): the query absorption `[T, H, 128] @ W_UK [H, 128, 512]` and the
output's `[T, H, 512] @ W_UV^T [H, 512, 128]`, each on the views the model passes (the query's
no-rope part, W_UK and W_UV transposed as views of `kv_b_proj`'s weight). Times are medians of
CUDA-graph replays of `--layers` calls cycling as many layers' weights (32 x 2 MB at 16 heads:
more than the L2, as in a step, where each layer's weights are read from memory). Floor: the
larger of the bytes (weights, input, output) over the copy bandwidth and the FLOPs over the
matmul rate, both measured in the same run. Error: the largest difference from a float32
product, over the largest value.

`--with-latent`: the query's absorption and the latent side of the step (the latent's RMSNorm,
RoPE of the rotary query and key, the cache write: `fused.mla_latent_rope_store`) as the two
launches the Triton backend runs by default against the one of
`head_bmm.absorb_query_and_latent` (`triton_attention.MLA_ABSORB_WITH_LATENT`), each layer
with its own cache; "same" says whether the outputs and caches are equal bit for bit, else
gives the largest difference (the one launch reduces the latent's RMS sum over 4 warps, the
latent kernel over 1, so a last bit may differ).
"""

from __future__ import annotations

import argparse
import functools

import torch

from bench.args import int_list
from bench.ceiling import copy_bandwidth, matmul_rate
from bench.moe_kernel import time_graph
from engine.config import RopeConfig
from engine.kernels import fused
from engine.kernels.head_bmm import absorb_query_and_latent, head_bmm
from engine.layers.attention import AttentionBackend, TorchAttentionBackend
from engine.layers.rotary import RotaryEmbedding
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
    p.add_argument("--with-latent", action="store_true", help="the one launch with the latent")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (tests/engine/test_head_bmm.py runs the kernel on the CPU)")
    if args.with_latent:
        with_latent(args)
        return
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


def with_latent(args: argparse.Namespace) -> None:
    """The query's absorption and the latent side: two launches against one."""
    print(
        f"\n## MLA query absorption with the latent side: {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}; bfloat16; {args.layers} layers' weights and caches "
        "cycled.\n\n| heads | rows | two launches µs | one launch µs | saved µs | same |\n"
        "| ---: | ---: | ---: | ---: | ---: | :--- |"
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    for heads in args.heads:
        w_uks = [
            (
                torch.randn(heads, NOPE + V, RANK, device="cuda", generator=g) * RANK**-0.5
            ).bfloat16()[:, :NOPE]
            for _ in range(args.layers)
        ]
        for rows in args.rows:
            LatentRow(heads, rows, w_uks, g).time(args.reps)
        torch.cuda.empty_cache()


class LatentRow:
    """One row of `--with-latent`'s table: `rows` tokens of `heads` heads, a cache per layer
    for each of the two forms."""

    def __init__(
        self, heads: int, rows: int, w_uks: list[torch.Tensor], g: torch.Generator
    ) -> None:
        self.heads, self.rows, self.w_uks = heads, rows, w_uks
        rotary = RotaryEmbedding(RopeConfig(theta=10000.0), ROPE, 4096, interleaved=True)
        norm = (1 + 0.1 * torch.randn(RANK, device="cuda", generator=g)).bfloat16()
        width = heads * (NOPE + ROPE)
        proj = torch.randn(rows, width + RANK + ROPE, device="cuda", generator=g).bfloat16()
        q = proj[:, :width].view(rows, heads, NOPE + ROPE)
        self.q_nope = q[..., :NOPE]
        self.latent_in = (
            q[..., NOPE:], proj[:, width : width + RANK][:, None], proj[:, width + RANK :][:, None],
            torch.arange(100, 100 + rows, device="cuda"), rotary.cos.cuda(), rotary.sin.cuda(),
            True, norm, 1e-6,
        )  # fmt: skip
        self.slots = torch.arange(rows, device="cuda") * 3
        self.caches = {form: [self._cache() for _ in w_uks] for form in ("two", "one")}
        self.outs: dict[str, list[torch.Tensor]] = {"two": [], "one": []}

    def _cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (3 * self.rows, 1)
        return (
            torch.zeros(*shape, RANK, device="cuda", dtype=torch.bfloat16),
            torch.zeros(*shape, ROPE, device="cuda", dtype=torch.bfloat16),
        )

    def two(self) -> None:
        self.outs["two"] = []
        for w_uk, (latent, pe) in zip(self.w_uks, self.caches["two"], strict=True):
            out = self.q_nope.new_empty(self.rows, self.heads, RANK)
            head_bmm(self.q_nope, w_uk, out)
            q_pe, _, _ = fused.mla_latent_rope_store(*self.latent_in, latent, pe, self.slots)
            self.outs["two"] += [out, q_pe]

    def one(self) -> None:
        self.outs["one"] = []
        for w_uk, (latent, pe) in zip(self.w_uks, self.caches["one"], strict=True):
            launch = fused.MLALatentLaunch.of(*self.latent_in, latent, pe, self.slots)
            self.outs["one"] += list(absorb_query_and_latent(self.q_nope, w_uk, launch))

    def time(self, reps: int) -> None:
        layers = len(self.w_uks)
        t_two = time_graph(self.two, reps) / layers * 1e6
        t_one = time_graph(self.one, reps) / layers * 1e6
        self.two()
        self.one()
        torch.cuda.synchronize()
        pairs = list(zip(self.outs["two"], self.outs["one"], strict=True))
        for two, one in zip(self.caches["two"], self.caches["one"], strict=True):
            pairs += list(zip(two, one, strict=True))
        same = all(torch.equal(a, b) for a, b in pairs)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in pairs if a.numel())
        print(
            f"| {self.heads} | {self.rows} | {t_two:.1f} | {t_one:.1f} | {t_two - t_one:.1f} "
            f"| {'yes' if same else f'no, {diff:.1e}'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
