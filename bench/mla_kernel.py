"""MLA on the GPU: the Triton decode and extend (prefill) kernels against their floors and the
torch backend.

    python -m bench.mla_kernel                       # decode and extend, 16 and 128 heads
    python -m bench.mla_kernel --mode decode --heads 16 --batch-sizes 1,64 --contexts 2048
    python -m bench.mla_kernel --mode decode --splits 0,1,2,4   # the rule's ranges and others
    python -m bench.mla_kernel --mode decode --tiles 32x8x2,32x4x3a  # keys x warps x stages[a]
    python -m bench.mla_kernel --mode extend --extend-cases 64x128,8x2048 --block-m 128
    TRITON_INTERPRET=1 python -m bench.mla_kernel --mode extend --device cpu --heads 2 \
        --extend-cases 2x16+16                       # a smoke run of the script (no real times)

Decode: one layer's decode step in the absorbed form (latent 512, rope key 64, bfloat16, page
size `--page-size`, pages scattered over the pool). Times are CUDA-graph replays of `--layers`
calls cycling as many layers' caches, so that consecutive calls read different memory.
Floor: the bytes the step must read, every cached token's latent and rope key once (B x
context x 576 x 2) plus the queries and outputs, over the device-to-device copy bandwidth of
the same run. The baseline gathers each sequence's context into a padded `[B, L, 576]` tensor
and runs `scaled_dot_product_attention` (what the torch backend does per layer). `--splits`
times each case at several context-range counts (0: the kernel's rule, labelled).

Extend: one layer's prefill/extend attention in the non-absorbed form
(`engine.kernels.mla_extend`), DeepSeek-V3's head dims (no-rope 128, rope 64, value 128),
bfloat16 (`--dtype`). A case `BxE+P` is B sequences of E new tokens each over a cached prefix
of P (chunked prefill, prefix hits; `+P` optional). Columns: the kernel alone (causal
attention over the already up-projected context), and the backend's whole layer
(`TritonAttentionBackend.forward_mla_expanded`: store the new latents, gather the prefix's,
up-project the context with `kv_b_proj`, the kernel), each in TFLOP/s and as a share of the
matmul rate measured in the same run (`bench.ceiling.matmul_rate`); then the torch backend's
absorbed padded attention for the same layer (q absorbed into the latent space, `forward_mla`,
the output up-projected: what MLA prefill ran before) and its max error against the Triton
layer, over the largest value. FLOPs: attention 2 H (128 + 64 + 128) per causal (query, key)
pair; up-projection 2 x 512 x H x 256 per context token. Times: medians of CUDA-graph replays.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from bench.args import int_list, split_list
from bench.ceiling import copy_bandwidth, matmul_rate
from bench.moe_kernel import time_graph
from engine.forward_batch import ForwardBatch
from engine.kernels.attention import extend_blocks
from engine.kernels.mla_decode import (
    default_block_h,
    default_num_kv_splits,
    default_num_warps,
    mla_decode,
)
from engine.kernels.mla_extend import Tiles, default_tiles, mla_extend_attention
from engine.kernels.sms import sm_count
from engine.kv_cache import KVCache, KVCacheSpec
from engine.layers.attention import TorchAttentionBackend
from engine.layers.triton_attention import TritonAttentionBackend

RANK, ROPE = 512, 64
NOPE, V_DIM = 128, 128  # DeepSeek-V3's per-head no-rope key and value widths
SCALE = 192**-0.5  # (qk_nope 128 + rope 64) ** -0.5, DeepSeek-V3's
QUARTERS_LABEL = {None: "", 0: " 1c", 1: " q"}
DEFAULT_EXTEND_CASES = ("64x128", "8x2048", "1x8192", "4x1024+3072", "16x1+2048")


@dataclass(frozen=True)
class Case:
    """One batch: every sequence `context` tokens long, pages scattered over the pool."""

    caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [pages, ps, 1, R], [.., P]
    table: torch.Tensor  # [B, pages per sequence] int32
    seq_lens: torch.Tensor  # [B] int32
    q_latent: torch.Tensor  # [B, H, R]
    q_pe: torch.Tensor  # [B, H, P]
    out: torch.Tensor  # [B, H, R]
    block_h: int | None  # heads sharing one read of a latent tile (None: the kernel's rule)
    splits: int | None = None  # context ranges per sequence (None: the kernel's rule)
    # block_n, num_warps (0: default), num_stages, pages read a tile ahead
    tiles: tuple[int, int, int, bool] = (32, 0, 2, False)
    quarters: bool | None = None  # the latent in four column quarters (None: the rule)

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
                num_kv_splits=self.splits,
                block_n=self.tiles[0],
                block_h=self.block_h,
                num_warps=self.tiles[1] or None,
                num_stages=self.tiles[2],
                pages_ahead=self.tiles[3],
                quarters=self.quarters,
            )

    def baseline(self, rows: slice = slice(None)) -> torch.Tensor:
        """Gather + SDPA over the sequences `rows` (all by default)."""
        table = self.table[rows]
        batch = table.shape[0]
        q = torch.cat((self.q_latent[rows], self.q_pe[rows]), dim=-1)[:, :, None]  # [B, H, 1, R+P]
        result = q
        for latent, pe in self.caches:
            kv = torch.cat((latent[table], pe[table]), dim=-1)  # [B, n, ps, 1, R + P]
            k = kv.view(batch, 1, -1, RANK + ROPE)  # [B, 1, L, R + P]
            result = F.scaled_dot_product_attention(
                q, k, k[..., :RANK], scale=SCALE, enable_gqa=True
            )
        return result[:, :, 0]


def make_case(
    heads: int, batch: int, context: int, page_size: int, layers: int, block_h: int | None
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


@dataclass(frozen=True)
class ExtendShape:
    """`batch` sequences of `new` tokens each over a cached prefix of `prefix` tokens."""

    batch: int
    new: int
    prefix: int

    @classmethod
    def parse(cls, text: str) -> ExtendShape:
        try:
            head, _, prefix = text.partition("+")
            batch, new = head.split("x")
            shape = cls(int(batch), int(new), int(prefix or 0))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected BxE or BxE+P, got {text!r}") from None
        if shape.batch < 1 or shape.new < 1 or shape.prefix < 0:
            raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
        return shape

    def __str__(self) -> str:
        return f"{self.batch}x{self.new}" + (f"+{self.prefix}" if self.prefix else "")

    def attention_flops(self, heads: int) -> int:
        pairs = self.new * self.prefix + self.new * (self.new + 1) // 2  # causal, per sequence
        return 2 * heads * (NOPE + ROPE + V_DIM) * pairs * self.batch

    def up_projection_flops(self, heads: int) -> int:
        return 2 * RANK * heads * (NOPE + V_DIM) * self.batch * (self.prefix + self.new)


@dataclass(frozen=True)
class ExtendCase:
    """One layer's extend step and its inputs, prepared for both backends."""

    triton_batch: ForwardBatch
    torch_batch: ForwardBatch
    q_nope: torch.Tensor  # [T, H, 128]
    q_pe: torch.Tensor  # [T, H, 64]
    c_kv: torch.Tensor  # [T, 1, 512]
    k_pe: torch.Tensor  # [T, 1, 64]
    kv_b_proj: torch.nn.Linear  # 512 -> H * 256
    kernel_args: dict[str, object]

    def triton_layer(self) -> torch.Tensor:
        return TritonAttentionBackend(mla=True).forward_mla_expanded(
            self.q_nope, self.q_pe, self.c_kv, self.k_pe, self.kv_b_proj, 0,
            self.triton_batch, SCALE,
        )  # fmt: skip

    def torch_layer(self) -> torch.Tensor:
        heads = self.q_nope.shape[1]
        w_uk, w_uv = self.kv_b_proj.weight.view(heads, NOPE + V_DIM, RANK).split([NOPE, V_DIM], 1)
        q_latent = torch.einsum("thn,hnr->thr", self.q_nope, w_uk)
        out = TorchAttentionBackend().forward_mla(
            q_latent, self.q_pe, self.c_kv, self.k_pe, 0, self.torch_batch, SCALE
        )
        return torch.einsum("thr,hvr->thv", out, w_uv)

    def kernel(self) -> torch.Tensor:
        return mla_extend_attention(**self.kernel_args)  # type: ignore[arg-type]


def make_extend_case(
    heads: int,
    shape: ExtendShape,
    page_size: int,
    device: torch.device,
    dtype: torch.dtype,
    tiles: Tiles,
) -> ExtendCase:
    g = torch.Generator(device=device).manual_seed(heads + shape.new)

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, device=device, generator=g) * std).to(dtype)

    batch, new, prefix = shape.batch, shape.new, shape.prefix
    pages_per_seq = -(-(prefix + new) // page_size)
    num_pages = batch * pages_per_seq
    cache = KVCache(1, num_pages, page_size, KVCacheSpec(1, RANK, ROPE), dtype, device)
    cache.k[0].copy_(randn(*cache.k[0].shape))
    cache.v[0].copy_(randn(*cache.v[0].shape))
    table = torch.randperm(num_pages, device=device, generator=g).view(batch, pages_per_seq)
    table = table.to(torch.int32)
    positions = torch.arange(prefix, prefix + new, device=device).repeat(batch)
    rows = torch.arange(batch, device=device)
    token_rows = rows.repeat_interleave(new)
    out_slots = table[token_rows, positions // page_size].long() * page_size
    t = batch * new
    fb = ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.long, device=device),
        positions=positions,
        out_slots=out_slots + positions % page_size,
        page_table=table,
        req_rows=rows,
        prefix_lens=torch.full((batch,), prefix, device=device),
        extend_lens=torch.full((batch,), new, device=device),
        logits_indices=torch.arange(1, batch + 1, device=device) * new - 1,
        max_extend_len=new,
        max_seq_len=prefix + new,
        kv_cache=cache,
        is_decode=False,
        host_extend_lens=(new,) * batch,
        host_prefix_lens=(prefix,) * batch,
    )
    triton_batch, torch_batch = replace(fb), replace(fb)
    TritonAttentionBackend(mla=True).prepare(triton_batch)
    TorchAttentionBackend().prepare(torch_batch)
    kv_b_proj = torch.nn.Linear(RANK, heads * (NOPE + V_DIM), bias=False, device=device)
    kv_b_proj.weight.data.copy_(randn(heads * (NOPE + V_DIM), RANK, std=RANK**-0.5))
    kv_b_proj = kv_b_proj.to(dtype)
    q_nope, q_pe = randn(t, heads, NOPE, std=0.3), randn(t, heads, ROPE, std=0.3)
    # The kernel alone: the context up-projected once, outside the timed call.
    meta = triton_batch.attn_metadata
    latent, pe = cache.slots(0)
    ctx = fb.out_slots if meta.context_slots is None else meta.context_slots
    with torch.no_grad():
        kv = kv_b_proj(latent[ctx].flatten(1)).view(-1, heads, NOPE + V_DIM)
    k_nope, v = kv.split([NOPE, V_DIM], dim=-1)
    seqs, firsts = extend_blocks([new] * batch, tiles.block_m)
    blocks = torch.tensor([seqs, firsts], dtype=torch.int32, device=device)
    kernel_args = dict(
        q_nope=q_nope, q_pe=q_pe, k_nope=k_nope, k_pe=pe[ctx], v=v,
        prefix_lens=fb.prefix_lens, extend_lens=fb.extend_lens, q_starts=meta.q_starts,
        kv_starts=meta.kv_starts, block_seq=blocks[0], block_first=blocks[1], scale=SCALE,
        tiles=tiles,
    )  # fmt: skip
    return ExtendCase(
        triton_batch,
        torch_batch,
        q_nope,
        q_pe,
        randn(t, 1, RANK),
        randn(t, 1, ROPE),
        kv_b_proj,
        kernel_args,
    )


def bench_extend(args: argparse.Namespace, device: torch.device) -> None:
    dtype = getattr(torch, args.dtype)
    rate = matmul_rate(device, dtype)
    default = default_tiles(dtype)
    tiles = Tiles(
        args.block_m or default.block_m,
        args.block_n or default.block_n,
        args.num_warps or default.num_warps,
        args.num_stages or default.num_stages,
        args.tma or default.tma,
    )
    print(
        f"\n## MLA extend (non-absorbed): {device_label(device)}, torch {torch.__version__}; "
        f"{args.dtype} matmul {rate / 1e12:.0f} TFLOP/s; page size {args.page_size}; kernel "
        f"tiles {tiles} (the layer's: {default}); median of {args.reps}.\n"
    )
    print(
        "| heads | case | attn GFLOP | kernel µs | kernel TFLOP/s | of matmul | layer µs "
        "| layer TFLOP/s | of matmul | torch layer µs | layer speed-up | max rel err |\n"
        "| ---: | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for heads in args.heads:
        for shape in args.extend_cases:
            case = make_extend_case(heads, shape, args.page_size, device, dtype, tiles)
            attn, up = shape.attention_flops(heads), shape.up_projection_flops(heads)
            with torch.no_grad():
                kernel_s = time_graph(case.kernel, args.reps)
                layer_s = time_graph(case.triton_layer, args.reps)
                try:
                    torch_s: float | None = time_graph(case.torch_layer, args.reps)
                    want = case.torch_layer().float()
                except torch.OutOfMemoryError:
                    torch_s, want = None, None
                got = case.triton_layer().float()
            err = (
                "-"
                if want is None
                else f"{((got - want).abs().max() / want.abs().max()).item():.1e}"
            )
            torch_cols = (
                "oom | -" if torch_s is None else f"{torch_s * 1e6:.0f} | {torch_s / layer_s:.2f}x"
            )
            print(
                f"| {heads} | {shape} | {attn / 1e9:.1f} | {kernel_s * 1e6:.0f} "
                f"| {attn / kernel_s / 1e12:.0f} | {attn / kernel_s / rate:.0%} "
                f"| {layer_s * 1e6:.0f} | {(attn + up) / layer_s / 1e12:.0f} "
                f"| {(attn + up) / layer_s / rate:.0%} | {torch_cols} | {err} |",
                flush=True,
            )
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()


def bench_decode(args: argparse.Namespace) -> None:
    bandwidth = copy_bandwidth()
    print(
        f"\n## MLA decode (absorbed): {torch.cuda.get_device_name()}, torch {torch.__version__}; "
        f"copy "
        f"{bandwidth / 1e12:.2f} TB/s (read + write); bfloat16; page size {args.page_size}; "
        f"{args.layers} layers' caches cycled.\n"
    )
    print(
        "| heads | batch | context | splits | tiles | floor µs | kernel µs | kernel / floor "
        "| baseline µs | max err |\n"
        "| ---: | ---: | ---: | ---: | :--- | ---: | ---: | ---: | ---: | ---: |"
    )
    sms = sm_count(torch.device("cuda"))
    for heads in args.heads:
        for context in args.contexts:
            for batch in args.batch_sizes:
                case = make_case(
                    heads, batch, context, args.page_size, args.layers, args.block_h or None
                )
                # The baseline expands the shared latent to every head: 128 heads x 256 x 2,048
                # tokens would take 77 GB. Its time is then left out ("-"), and the reference
                # for the error column comes in chunks of 16 sequences.
                try:
                    baseline = f"{time_graph(case.baseline, args.reps) / args.layers * 1e6:.1f}"
                except torch.OutOfMemoryError:
                    baseline = "-"
                    torch.cuda.empty_cache()
                chunks = [slice(i, i + 16) for i in range(0, batch, 16)]
                want = torch.cat([case.baseline(rows).float() for rows in chunks])
                floor_bytes = batch * context * (RANK + ROPE) * 2 + 2 * batch * heads * RANK * 2
                floor_us = floor_bytes / bandwidth * 1e6
                for splits, tiles, quarters in itertools.product(
                    args.splits, args.tiles, args.quarters or (None,)
                ):
                    # The rule's heads a program, as the kernel resolves them (rank 512 takes
                    # the quartered kernel unless --quarters 0).
                    block_h = args.block_h or (
                        16 if quarters == 0 else default_block_h(torch.bfloat16, batch, heads, sms)
                    )
                    warps = tiles[1] or default_num_warps(
                        torch.bfloat16, batch, heads, sms, block_h
                    )
                    rule = default_num_kv_splits(batch, heads, sms, block_h, warps)
                    run = replace(
                        case,
                        splits=splits or None,
                        tiles=tiles,
                        quarters=None if quarters is None else bool(quarters),
                    )
                    kernel_s = time_graph(run.kernel, args.reps) / args.layers
                    run.kernel()
                    err = (run.out.float() - want).abs().max().item()
                    label = f"{splits or rule}" + ("" if splits else " (rule)")
                    n, w, st, ahead = tiles
                    print(
                        f"| {heads} | {batch} | {context} | {label} "
                        f"| {n}x{w or 'd'}x{st}{'a' if ahead else ''}{QUARTERS_LABEL[quarters]} "
                        f"| {floor_us:.1f} "
                        f"| {kernel_s * 1e6:.1f} | {kernel_s * 1e6 / floor_us:.2f} "
                        f"| {baseline} | {err:.1e} |",
                        flush=True,
                    )
                del case, run
                torch.cuda.empty_cache()


def tiles_list(text: str) -> tuple[tuple[int, int, int, bool], ...]:
    """`BLOCK_NxWARPSxSTAGES[a]` items, comma-separated: `a` reads each tile's page ids a step
    ahead (`mla_decode(..., pages_ahead=True)`, the quartered kernel's)."""
    values = []
    for item in (i.strip() for i in text.split(",")):
        ahead = item.endswith("a")
        try:
            numbers = tuple(int(v) for v in item.removesuffix("a").split("x"))
        except ValueError:
            numbers = ()
        if len(numbers) != 3 or numbers[0] < 16 or numbers[1] < 0 or numbers[2] < 1:
            raise argparse.ArgumentTypeError(
                f"expected BLOCK_NxWARPSxSTAGES[a] like 32x8x2,32x4x3a (warps 0: default; a: "
                f"pages read a tile ahead), got {text!r}"
            )
        values.append((*numbers, ahead))
    return tuple(values)


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("all", "decode", "extend"), default="all")
    parser.add_argument("--heads", type=int_list, default=(16, 128))
    parser.add_argument("--batch-sizes", type=int_list, default=(1, 16, 64, 256))
    parser.add_argument("--contexts", type=int_list, default=(128, 2048))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--splits",
        type=split_list,
        default=(0,),
        help="decode: context ranges per sequence to time (0: the kernel's rule)",
    )
    parser.add_argument(
        "--tiles",
        type=tiles_list,
        default=((32, 0, 2, False),),
        help="decode: split-kernel launches to time, BLOCK_NxWARPSxSTAGES[a] (warps 0: default; "
        "a: the quartered kernel's page ids read a tile ahead)",
    )
    parser.add_argument(
        "--block-h",
        type=int,
        default=0,
        choices=(0, 16, 32, 64),
        help="heads per tile read (0: the kernel's rule, default_block_h)",
    )
    parser.add_argument(
        "--quarters",
        type=functools.partial(int_list, minimum=0),
        default=(),
        help="decode: 0 the one-chain kernel ('1c'), 1 the latent in four quarters ('q'), "
        "e.g. 0,1 (default: the kernel's rule, unmarked)",
    )
    parser.add_argument(
        "--extend-cases",
        type=ExtendShape.parse,
        nargs="+",
        default=[ExtendShape.parse(c) for c in DEFAULT_EXTEND_CASES],
        help="BxE+P: B sequences of E new tokens over P cached ones",
    )
    # Extend tiles for the kernel-alone column (0: the engine's default for the dtype; the
    # layer column always runs the defaults).
    parser.add_argument("--block-m", type=int, default=0, help="extend: queries per tile")
    parser.add_argument("--block-n", type=int, default=0, help="extend: keys per tile")
    parser.add_argument("--num-warps", type=int, default=0, help="extend: warps per program")
    parser.add_argument("--num-stages", type=int, default=0, help="extend: software pipeline")
    parser.add_argument(
        "--tma", action="store_true", help="extend: the context's tiles by TMA descriptors"
    )
    parser.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="extend"
    )
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: a smoke run of --mode extend under TRITON_INTERPRET=1 (no meaningful times)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("bench.mla_kernel needs a CUDA device (--device cpu smokes --mode extend)")
    if args.device == "cpu" and (
        args.mode != "extend" or os.environ.get("TRITON_INTERPRET") != "1"
    ):
        parser.error("--device cpu takes --mode extend and TRITON_INTERPRET=1")
    if args.mode != "extend" and any(c % args.page_size for c in args.contexts):
        parser.error("--contexts must be multiples of --page-size")
    if args.mode != "extend":
        bench_decode(args)
    if args.mode != "decode":
        bench_extend(args, torch.device(args.device))


if __name__ == "__main__":
    main()
