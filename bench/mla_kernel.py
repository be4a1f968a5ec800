"""MLA decode on the GPU: the Triton kernel against its floor and a gather-and-SDPA baseline.

    python -m bench.mla_kernel                       # Moonlight (16 heads) and DeepSeek-V3 (128)
    python -m bench.mla_kernel --heads 16 --batch-sizes 1,64 --contexts 2048

One layer's decode step in the absorbed form (latent 512, rope key 64, bfloat16, page size
`--page-size`, pages scattered over the pool). Times are CUDA-graph replays of `--layers` calls
cycling as many layers' caches, so that consecutive calls read different memory.

Floor: the bytes the step must read, every cached token's latent and rope key once (B x
context x 576 x 2) plus the queries and outputs, over the device-to-device copy bandwidth of
the same run. The baseline gathers each sequence's context into a padded `[B, L, 576]` tensor
and runs `scaled_dot_product_attention` (what the torch backend does per layer).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.ceiling import copy_bandwidth
from bench.moe_kernel import int_list, time_graph
from engine.kernels.mla_decode import mla_decode

RANK, ROPE = 512, 64
SCALE = 192**-0.5  # (qk_nope 128 + rope 64) ** -0.5, DeepSeek-V3's


@dataclass(frozen=True)
class Case:
    """One batch: every sequence `context` tokens long, pages scattered over the pool."""

    caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [pages, ps, 1, R], [.., P]
    table: torch.Tensor  # [B, pages per sequence] int32
    seq_lens: torch.Tensor  # [B] int32
    q_latent: torch.Tensor  # [B, H, R]
    q_pe: torch.Tensor  # [B, H, P]
    out: torch.Tensor  # [B, H, R]
    block_h: int  # heads sharing one read of a latent tile

    def kernel(self) -> None:
        for latent, pe in self.caches:
            mla_decode(
                self.q_latent,
                self.q_pe,
                latent,
                pe,
                self.table,
                self.seq_lens,
                SCALE,
                self.out,
                block_h=self.block_h,
            )

    def baseline(self) -> torch.Tensor:
        batch = self.table.shape[0]
        q = torch.cat((self.q_latent, self.q_pe), dim=-1)[:, :, None]  # [B, H, 1, R + P]
        result = q
        for latent, pe in self.caches:
            kv = torch.cat((latent[self.table], pe[self.table]), dim=-1)  # [B, n, ps, 1, R + P]
            k = kv.view(batch, 1, -1, RANK + ROPE)  # [B, 1, L, R + P]
            result = F.scaled_dot_product_attention(
                q, k, k[..., :RANK], scale=SCALE, enable_gqa=True
            )
        return result[:, :, 0]


def make_case(
    heads: int, batch: int, context: int, page_size: int, layers: int, block_h: int
) -> Case:
    pages_per_seq = context // page_size
    num_pages = batch * pages_per_seq
    g = torch.Generator(device="cuda").manual_seed(batch + context)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g).bfloat16()

    caches = [
        (randn(num_pages, page_size, 1, RANK), randn(num_pages, page_size, 1, ROPE))
        for _ in range(layers)
    ]
    perm = torch.randperm(num_pages, device="cuda", generator=g)
    return Case(
        caches,
        perm.view(batch, pages_per_seq).to(torch.int32),
        torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        randn(batch, heads, RANK) * 0.05,
        randn(batch, heads, ROPE) * 0.05,
        torch.empty(batch, heads, RANK, dtype=torch.bfloat16, device="cuda"),
        block_h,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int_list, default=(16, 128))
    parser.add_argument("--batch-sizes", type=int_list, default=(1, 16, 64, 256))
    parser.add_argument("--contexts", type=int_list, default=(128, 2048))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--block-h", type=int, default=16, choices=(16, 32), help="heads per tile read"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("bench.mla_kernel needs a CUDA device")
    bandwidth = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy "
        f"{bandwidth / 1e12:.2f} TB/s (read + write); bfloat16; page size {args.page_size}; "
        f"{args.layers} layers' caches cycled.\n"
    )
    print(
        "| heads | batch | context | floor µs | kernel µs | kernel / floor | baseline µs "
        "| max err |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    if any(c % args.page_size for c in args.contexts):
        parser.error("--contexts must be multiples of --page-size")
    for heads in args.heads:
        for context in args.contexts:
            for batch in args.batch_sizes:
                case = make_case(heads, batch, context, args.page_size, args.layers, args.block_h)
                kernel_s = time_graph(case.kernel, args.reps) / args.layers
                baseline_s = time_graph(case.baseline, args.reps) / args.layers
                want = case.baseline().float()
                case.kernel()
                err = (case.out.float() - want).abs().max().item()
                floor_bytes = batch * context * (RANK + ROPE) * 2 + 2 * batch * heads * RANK * 2
                floor_us = floor_bytes / bandwidth * 1e6
                print(
                    f"| {heads} | {batch} | {context} | {floor_us:.1f} | {kernel_s * 1e6:.1f} "
                    f"| {kernel_s * 1e6 / floor_us:.2f} | {baseline_s * 1e6:.1f} | {err:.1e} |",
                    flush=True,
                )
                del case
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
