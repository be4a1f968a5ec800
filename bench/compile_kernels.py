"""Compile every Triton kernel of the engine (and the `cuda_ipc` copy kernel) for a CUDA target,
on any host (no GPU needed).

    python -m bench.compile_kernels                 # sm_90 (H100/H200); exits 1 on a failure
    python -m bench.compile_kernels --arch 80 --all-configs

Triton's interpreter (what `make test` runs) executes the kernels' logic but not the compiler,
so a kernel can pass every interpreter test and still fail to compile, or compile with
register spills, on the device. This compiles each kernel at the shapes and block sizes the
engine uses (Triton ships `ptxas`) and prints the registers, spill stack and shared memory of
each; `--fail-on-spill` also fails on spills. It must run without `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench.compile_kernels compiles for the GPU: run it without TRITON_INTERPRET=1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.kernels import (
    argmax,
    attention,
    fused,
    fused_moe,
    fused_moe_small,
    head_bmm,
    mla_decode,
    mla_extend,
    moe_routing,
    sampling,
    sampling_split,
    skinny_gemm,
)
from engine.kernels.fused_moe_configs import (
    TUNED,
    MoEKernelConfig,
    candidates,
    default_config,
    fit_shared,
)
from engine.kernels.sms import H200_SHARED_MEMORY
from kv_transfer import copy_kernel

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass(frozen=True)
class Usage:
    name: str
    registers: int
    stack: int
    shared: int

    def line(self) -> str:
        return (
            f"{self.name}: {self.registers} registers, {self.stack} B stack, {self.shared} B smem"
        )


def compile_kernel(
    arch: int,
    kernel: Any,
    pointers: dict[str, str],
    constants: dict[str, Any],
    floats: Sequence[str] = (),
    divisible: Sequence[str] = (),
    **options: int,
) -> Any:
    """Compile `kernel` with pointer arguments typed by `pointers`, `floats` as fp32 scalars,
    the other runtime arguments as i32, and `constants` as its constexprs. `divisible`: the
    integer arguments a launch passes as multiples of 16 (Triton specializes on that at run
    time, and vectorizes by it). Every pointer (not a TMA descriptor) is taken as 16-byte
    aligned, as a launch specializes a tensor at the start of its allocation (without that,
    Triton 3.9 compiled the decode split kernel's K and V loads to one 2-byte load an element
    and 255 registers, where a launch takes 16-byte loads and about 90)."""
    if "PDL" in kernel.arg_names and "PDL" not in constants:
        # Compiled as a launch with PDSERVE_PDL=1 makes it (engine/kernels/pdl.py).
        constants = {**constants, "PDL": 2}
        options = {**options, "launch_pdl": True}
    if arch < 90 and "PDL" in constants:
        # Before sm_90 the engine launches without PDL (`pdl.enabled`): PDL=0, no griddepcontrol.
        constants = {**constants, "PDL": 0}
        options = {k: v for k, v in options.items() if k != "launch_pdl"}
    signature = {}
    for arg in kernel.arg_names:
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
        else:
            signature[arg] = "fp32" if arg in floats else "i32"
    aligned = [
        arg
        for arg, kind in pointers.items()
        if kind.startswith("*") and arg in kernel.arg_names and arg not in constants
    ]
    attrs = {
        (kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in (*divisible, *aligned)
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def strides(kernel: Any, *other: str) -> tuple[str, ...]:
    """`kernel`'s `stride_*` arguments but `other`: those a launch at the benchmarked models'
    shapes passes as multiples of 16 (heads of 64-576 elements), for `divisible`."""
    return tuple(a for a in kernel.arg_names if a.startswith("stride_") and a not in other)


def compile_one(arch: int, name: str, *args: Any, **kwargs: Any) -> Usage:
    """`compile_kernel`, then its resource usage under `name`."""
    return resource_usage(name, compile_kernel(arch, *args, **kwargs))


def resource_usage(name: str, compiled: Any) -> Usage:
    """Registers, spill stack and shared memory of a compiled kernel (cuobjdump's report)."""
    registers = stack = 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    for token in dump.split():
        if token.startswith("REG:"):
            registers = int(token[4:])
        elif token.startswith("STACK:"):
            stack = int(token[6:])
    return Usage(name, registers, stack, int(compiled.metadata.shared))


def copy_kernel_ptx(word: int, arch: int = 90) -> str:
    """The PTX of the `cuda_ipc` copy kernel for writes whose addresses and lengths are
    multiples of `word` bytes (what a launch of that word compiles)."""
    elem, elem_bytes = copy_kernel.ELEMENTS[word]
    constants = {"ELEM": elem, "ELEM_BYTES": elem_bytes, "WORD": word,
                 "BLOCK": copy_kernel.block_elements(elem_bytes)}  # fmt: skip
    compiled = compile_kernel(arch, copy_kernel.copy_writes_kernel, {"writes": "*i64"},
                              constants, num_warps=copy_kernel.NUM_WARPS)  # fmt: skip
    return str(compiled.asm["ptx"])


def decode_attention_launch(
    rope: bool = False, tiles: attention.DecodeTiles = attention.ONE_SPLIT_TILES
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`compile_kernel`'s arguments for the per-head decode split kernel at Llama-3-8B's heads
    (32 / 8, dim 128, pages of 16, one split, the engine's `tiles` for it): (positional,
    keyword). `rope`: with RoPE, the q/k norms and the KV write folded in
    (`attention.decode_attention` of a `DecodeRope`)."""
    pointers = {x: "*bf16" for x in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")} | {
        "table_ptr": "*i32", "rows_ptr": "*i64", "seq_lens_ptr": "*i32",
        "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32",
    }  # fmt: skip
    if rope:
        pointers |= {x: "*bf16" for x in ("rope_q_ptr", "rope_k_ptr", "rope_v_ptr")}
        pointers |= {x: "*fp32" for x in ("cos_ptr", "sin_ptr")}
        pointers |= {x: "*bf16" for x in ("q_norm_ptr", "k_norm_ptr")}
        pointers |= {"pos_ptr": "*i64", "slots_ptr": "*i64"}
    constants: dict[str, Any] = {
        "GROUP": 4, "GROUP_PAD": 16, "DK": 128, "DV": 128, "BLOCK_DK": 128, "BLOCK_DV": 128,
        "PAGE_SIZE": 16, "BLOCK_N": tiles.block_n, "PRECISION": "tf32",
        "DIRECT": True, "ROPE": rope, "HALF": 64 if rope else 1,
        "BLOCK_HALF": 64 if rope else 1, "INTERLEAVED": False, "NORM": rope,
        "SHORT_N": tiles.short_n, "SHORT_MAX": tiles.short_max,
        "MIN_TILES": tiles.min_split_tiles,
    }  # fmt: skip
    # The page table's width and the log-sum-exps' split count vary; the rest are heads.
    divisible = strides(attention._decode_split_kernel, "stride_table", "stride_lb", "stride_lh")
    kwargs = {
        "floats": ("scale", "eps") if rope else ("scale",),
        "divisible": divisible,
        "num_warps": tiles.num_warps,
        "num_stages": tiles.num_stages,
    }
    return (attention._decode_split_kernel, pointers, constants), kwargs


# The most shared memory one program may take, per compute capability (the opt-in limit).
SHARED_LIMIT = {
    80: 166912,
    86: 101376,
    89: 101376,
    90: H200_SHARED_MEMORY,
    100: H200_SHARED_MEMORY,
    120: 101376,
}


def jobs(all_configs: bool, arch: int = 90) -> list[tuple[str, Callable[[int], Usage]]]:
    """(name, compile at an arch) for every kernel at the engine's shapes, in the tiles its
    rules choose for `arch`'s shared memory."""
    out: list[tuple[str, Callable[[int], Usage]]] = []
    smem = SHARED_LIMIT.get(arch, SHARED_LIMIT[90])

    def add(name: str, *args: Any, **kwargs: Any) -> None:
        out.append((name, lambda arch: compile_one(arch, name, *args, **kwargs)))

    args, kwargs = decode_attention_launch()
    add("decode_split_kernel bf16", *args, **kwargs)
    args, kwargs = decode_attention_launch(rope=True)
    add("decode_split_kernel bf16, RoPE, q/k norms and the KV write folded in", *args, **kwargs)
    ids = {"topk_ids": "*i64"}
    i32 = "*i32"
    for experts in (64, 128, 256):
        e_pow2 = triton.next_power_of_2(experts + 1)
        add(
            f"align_kernel E={experts}",
            fused_moe.align_kernel,
            {**ids, "sorted_pairs": i32, "block_expert": i32, "num_rows": i32},
            {"BLOCK_M": 16, "E_POW2": e_pow2, "CHUNK": fused_moe.align_chunk(e_pow2)},
            num_warps=8,
        )
    add(
        "align_count_kernel",
        fused_moe.align_count_kernel,
        {**ids, "chunk_counts": i32, "rank_in_chunk": i32, "sorted_pairs": i32},
        {"FILL": 256, "E_POW2": 256, "CHUNK": fused_moe.PARALLEL_CHUNK},
        num_warps=8,
    )
    # Routing with the align's count: Qwen3-30B-A3B's softmax top-8 of 128 (bf16 logits),
    # Moonlight's grouped top-6 of 64 with 2 fused shared experts and DeepSeek-V3's top-8 of
    # 8 x 32 with 1 (float32 logits).
    for name, route, width, routed, stacked, geometry, logits in (
        ("qwen3-30b-a3b", 1, 8, 128, 128, (1, 1, 1, 0), "*bf16"),
        ("moonlight", 2, 8, 64, 66, (1, 64, 1, 2), "*fp32"),
        ("deepseek-v3", 2, 9, 256, 257, (8, 32, 4, 1), "*fp32"),
    ):
        groups, per_group, topk_groups, shared = geometry
        k_pow2 = triton.next_power_of_2(width)
        add(
            f"route_count_kernel {name}",
            fused_moe.route_count_kernel,
            {
                "router_logits": logits,
                "correction_bias": "*fp32",
                "topk_weights": "*fp32" if route == 2 else logits,
                "topk_ids": "*i64",
                "chunk_counts": i32,
                "rank_in_chunk": i32,
                "sorted_pairs": i32,
            },
            {
                "WIDTH": width,
                "K_POW2": k_pow2,
                "L_POW2": triton.next_power_of_2(routed),
                "E_POW2": triton.next_power_of_2(stacked + 1),
                "BLOCK_T": fused_moe.ROUTE_COUNT_LANES // k_pow2,
                "FILL": 256,
                "ROUTE": route,
                "RENORMALIZE": True,
                "NUM_GROUPS": groups,
                "PER_GROUP": per_group,
                "TOPK_GROUPS": topk_groups,
                "NUM_SHARED": shared,
                "G_POW2": groups,
                "P_POW2": per_group,
            },
            floats=("scaling",),
            divisible=("router_logits", "stride_lt"),
            num_warps=8,
        )
    for experts in (64, 128, 256, 384):  # the widest tile a long prefill takes
        e_pow2 = triton.next_power_of_2(experts + 1)
        add(
            f"align_offsets_kernel E={experts}",
            fused_moe.align_offsets_kernel,
            {"chunk_counts": i32, "expert_start": i32, "expert_end": i32, "num_rows": i32},
            {
                "BLOCK_M": 64,
                "E_POW2": e_pow2,
                "CHUNK_BLOCK": fused_moe.offsets_chunk_block(e_pow2, 1 << 20, smem),
            },
            num_warps=8,
        )
    add(
        "align_scatter_kernel",
        fused_moe.align_scatter_kernel,
        {
            **ids,
            "chunk_offsets": i32,
            "rank_in_chunk": i32,
            "expert_start": i32,
            "expert_end": i32,
            "num_rows": i32,
            "sorted_pairs": i32,
            "block_expert": i32,
        },
        {"BLOCK_M": 64, "E_POW2": 256, "CHUNK": fused_moe.PARALLEL_CHUNK, "BLOCKS_PER_CHUNK": 4},
        num_warps=4,
    )
    for experts in (64, 128, 256):  # each at the widest tile it folds by default
        e_pow2 = triton.next_power_of_2(experts + 1)
        add(
            f"align_scatter_folded_kernel E={experts}",
            fused_moe.align_scatter_folded_kernel,
            {
                **ids,
                "chunk_counts": i32,
                "rank_in_chunk": i32,
                "sorted_pairs": i32,
                "block_expert": i32,
                "num_rows": i32,
            },
            {
                "BLOCK_M": 16,
                "E_POW2": e_pow2,
                "CHUNK": fused_moe.PARALLEL_CHUNK,
                "BLOCKS_PER_CHUNK": 32,
                "CHUNK_BLOCK": fused_moe.folded_chunk_block(
                    e_pow2, fused_moe.FOLDED_OFFSETS_MAX_CHUNKS
                ),
            },
            num_warps=8,
        )
    for dtype in ("bf16", "fp32"):
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        size = torch_dtype.itemsize
        defaults = {
            fit_shared(default_config(t, 128, 8, torch_dtype), size, smem)
            for t in (1, 64, 256, 4096)
        }
        # Every configuration a tuned table picks is compiled too, and may spill: it was
        # measured the fastest as it is (reported, not failed).
        tuned = set()
        if dtype == "bf16":
            tuned = {fit_shared(c, size, smem) for rows in TUNED.values() for _, c in rows}
        configs: list[MoEKernelConfig] = sorted(defaults | tuned, key=repr)
        if all_configs and dtype == "bf16":
            configs = candidates() + candidates(rows_per_expert=128)
        for row in configs:
            for gate_up in (True, False):
                # A default that is a tuned row's configuration was measured as it is.
                label = "tuned " if row in tuned else ""
                cfg = row if gate_up else row.down_config  # the down GEMM's own launch, if any
                w_desc = f"tensordesc<{dtype}[{cfg.block_n}, {cfg.block_k}]>"
                a_desc = f"tensordesc<{dtype}[{cfg.block_m}, {cfg.block_k}]>"
                kernel = (
                    fused_moe.grouped_gemm_tma_kernel if cfg.tma else fused_moe.grouped_gemm_kernel
                )
                add(
                    f"grouped_gemm {dtype} {label}{'gate-up' if gate_up else 'down'} {cfg}",
                    kernel,
                    {
                        "a": f"*{dtype}" if gate_up or not cfg.tma else a_desc,
                        "w": f"*{dtype}",
                        "w_desc": w_desc,
                        "c": f"*{dtype}",
                        "sorted_pairs": i32,
                        "block_expert": i32,
                        "num_rows": i32,
                    },
                    {
                        "TOP_K": 8 if gate_up else 1,
                        "GATE_UP": gate_up,
                        "EXACT_FP32": dtype == "fp32",
                        "BLOCK_M": cfg.block_m,
                        "BLOCK_N": cfg.block_n,
                        "BLOCK_K": cfg.block_k,
                        "GROUP_M": cfg.group_m,
                    },
                    # The models' widths (768-7,168) are multiples of 16, as are their strides.
                    divisible=("N_OUT", "K", *strides(kernel)),
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                )
    for weights in ("fp32", "bf16"):
        add(
            f"combine_kernel ({weights} weights)",
            fused_moe.combine_kernel,
            {"y": "*bf16", "topk_weights": f"*{weights}", "topk_ids": "*i64", "out": "*bf16"},
            {"TOP_K": 8, "BLOCK_H": 1024},
        )
    add_small_batch_moe(add, arch)
    for word, (elem, elem_bytes) in copy_kernel.ELEMENTS.items():
        block = copy_kernel.block_elements(elem_bytes)
        add(
            f"copy_writes_kernel (cuda_ipc) word={word}",
            copy_kernel.copy_writes_kernel,
            {"writes": "*i64"},
            {"ELEM": elem, "ELEM_BYTES": elem_bytes, "WORD": word, "BLOCK": block},
            num_warps=copy_kernel.NUM_WARPS,
        )
    add(
        "softmax_topk_kernel E=128 k=8",
        moe_routing.softmax_topk_kernel,
        {"logits": "*bf16", "weights": "*bf16", "ids": "*i64"},
        {"TOP_K": 8, "K_POW2": 8, "E_POW2": 128, "RENORMALIZE": True},
    )
    # Moonlight, DeepSeek-V3, Kimi-K2; the first two also with their shared experts fused.
    grouped = ((1, 64, 1, 6, 0), (1, 64, 1, 6, 2), (8, 32, 4, 8, 0), (8, 32, 4, 8, 1))
    for groups, per_group, topk_groups, top_k, shared in (*grouped, (1, 384, 1, 8, 0)):
        add(
            f"grouped_topk_kernel {groups}x{per_group} k={top_k} shared={shared}",
            moe_routing.grouped_topk_kernel,
            {"logits": "*fp32", "bias": "*fp32", "weights": "*fp32", "ids": "*i64"},
            {
                "NUM_GROUPS": groups,
                "PER_GROUP": per_group,
                "TOPK_GROUPS": topk_groups,
                "TOP_K": top_k,
                "NUM_SHARED": shared,
                "G_POW2": triton.next_power_of_2(groups),
                "P_POW2": triton.next_power_of_2(per_group),
                "K_POW2": triton.next_power_of_2(top_k + shared),
                "RENORMALIZE": True,
            },
            floats=("scaling",),
        )
    # The gate's logits: a decode step's few tokens (1 and 8 rows; more take cuBLAS).
    for block_t, block_e, block_k in ((1, 2, 1024), (8, 2, 128)):
        # float32 logits (DeepSeek's router), or rounded to the weights' (Qwen3-MoE's gate)
        for dtype, logits in (("bf16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")):
            add(
                f"router_logits_kernel {dtype} out {logits} {block_t}x{block_e}x{block_k}",
                moe_routing.router_logits_kernel,
                {"x": f"*{dtype}", "w": f"*{dtype}", "out": f"*{logits}"},
                {"BLOCK_T": block_t, "BLOCK_E": block_e, "BLOCK_K": block_k},
                divisible=("x", "w", "out", "hidden", "stride_xt", "stride_we"),
                num_warps=4,
            )
    # DIRECT: one context range, the split kernel writes the output (no partials). The
    # one-chain kernel at 32-key tiles; the quartered one (the default at rank 512 in 16-bit
    # types) at 16 to 64 heads a program: at 16 heads and 4 warps (batch 256) with its page
    # ids read a tile ahead (`default_pages_ahead`: 32-key tiles in 3 stages), at batch 1's 8
    # warps and wider head blocks in 64-key tiles through registers.
    one_chain, quarters = mla_decode.mla_decode_split_kernel, mla_decode.mla_decode_quarters_kernel
    for kernel, dtype, block_h, direct, batch in (
        (one_chain, "bf16", 16, False, 256),
        (one_chain, "bf16", 32, False, 256),
        (one_chain, "fp32", 16, False, 256),
        (one_chain, "bf16", 16, True, 256),
        (quarters, "bf16", 16, False, 256),
        (quarters, "bf16", 16, True, 256),
        (quarters, "bf16", 16, False, 1),
        (quarters, "bf16", 32, False, 256),
        (quarters, "bf16", 64, True, 256),
    ):
        size = 4 if dtype == "fp32" else 2
        if kernel is quarters and not mla_decode.fits(block_h, 64, 576, size, smem):
            continue  # `default_block_h` does not take it there
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        warps = mla_decode.default_num_warps(torch_dtype, batch, 16, block_h=block_h)
        ahead = mla_decode.default_pages_ahead(kernel is quarters, block_h, warps)
        block_n = mla_decode.default_block_n(kernel is quarters, block_h, 576, size, smem)
        block_n = mla_decode.AHEAD_BLOCK_N if ahead else block_n
        if not mla_decode.fits(block_h, block_n, 576, size, smem, kernel is quarters):
            continue  # nor does any tile fit
        mid = f"*{dtype}" if direct else "*fp32"
        name = "mla_decode_quarters_kernel" if kernel is quarters else "mla_decode_split_kernel"
        add(
            f"{name} {dtype} block_h={block_h} block_n={block_n} {warps} warps"
            + (" direct" if direct else "")
            + (" pages ahead" if ahead else ""),
            kernel,
            {
                "q_latent": f"*{dtype}",
                "q_pe": f"*{dtype}",
                "latent_cache": f"*{dtype}",
                "pe_cache": f"*{dtype}",
                "page_table": i32,
                "req_rows": "*i64",
                "seq_lens": i32,
                "mid_out": mid,
                "mid_lse": mid,
                "out": f"*{dtype}",
            },
            {
                "NUM_SPLITS": 1 if direct else 8,
                "DIRECT": direct,
                "HAS_ROWS": True,
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                "BLOCK_H": block_h,
                "BLOCK_R": 512,
                "BLOCK_P": 64,
                "BLOCK_N": block_n,
                **({"AHEAD": ahead} if kernel is quarters else {}),
            },
            floats=("scale",),
            divisible=strides(kernel, "stride_table"),
            num_warps=warps,
            num_stages=mla_decode.AHEAD_STAGES if ahead else 2,
        )
    # MLA's query absorption, at one row and at 64 (the tile rule's two ends at 16 heads).
    for block_m, block_n in ((16, 32), (64, 64)):
        add(
            f"head_bmm_kernel bf16 {block_m}x{block_n}",
            head_bmm.head_bmm_kernel,
            {"a": "*bf16", "w": "*bf16", "out": "*bf16"},
            {"PRECISION": "tf32", "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64},
            divisible=("a", "w", "out", "K", "N", "stride_ah", "stride_wh", "stride_wk"),
            num_warps=4,
            num_stages=3,
        )
    # The same at one row with MLA's latent side in its launch (MLA_ABSORB_WITH_LATENT):
    # Moonlight's 16 heads, latent 512, rotary 64 interleaved, one token a program.
    add(
        "mla_absorb_latent_kernel bf16 16x32, the latent side of 16 heads",
        head_bmm.mla_absorb_latent_kernel,
        {
            "a": "*bf16", "w": "*bf16", "out": "*bf16",
            **{p: "*bf16" for p in ("q_pe_ptr", "c_kv_ptr", "k_pe_ptr", "q_out_ptr")},
            **{p: "*bf16" for p in ("c_out_ptr", "k_out_ptr", "norm_ptr")},
            **{p: "*bf16" for p in ("latent_cache_ptr", "pe_cache_ptr")},
            **{p: "*i64" for p in ("pos_ptr", "slots_ptr")},
            **{p: "*fp32" for p in ("cos_ptr", "sin_ptr")},
        },
        {
            "PRECISION": "tf32", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64,
            "HQ": 16, "HALF": 32, "BLOCK": 32, "BLOCK_R": 512, "INTERLEAVED": True,
            "RETURN_KV": False, "TOKENS": 1,
        },
        floats=("eps",),
        divisible=("a", "w", "out", "K", "N", "stride_ah", "stride_wh", "stride_wk"),
        num_warps=4,
        num_stages=3,
    )  # fmt: skip
    add(
        "mla_decode_combine_kernel",
        mla_decode.mla_decode_combine_kernel,
        {"mid_out": "*fp32", "mid_lse": "*fp32", "out": "*bf16"},
        {"NUM_SPLITS": 16, "BLOCK_S": 16, "BLOCK_R": 512},
        num_warps=4,
    )
    # The combine in the output's absorption (MLA_COMBINE_IN_OUTPUT): Moonlight at one row,
    # 16 ranges, W_UV's 16-column slabs of 512.
    add(
        "combine_head_bmm_kernel bf16 16 ranges, 16 x 512",
        head_bmm.combine_head_bmm_kernel,
        {"mid_out": "*fp32", "mid_lse": "*fp32", "w": "*bf16", "out": "*bf16"},
        {"NUM_SPLITS": 16, "BLOCK_S": 16, "BLOCK_N": 16, "BLOCK_K": 512},
        divisible=("w", "out", "K", "N", "stride_wh", "stride_wn"),
        num_warps=4,
    )
    starts = ("prefix_lens_ptr", "extend_lens_ptr", "q_starts_ptr", "block_seq_ptr")
    meta = {name: "*i64" for name in starts} | {"block_first_ptr": i32}
    # With TMA: a trial of the H200's (the default tiles load by pointer).
    for dtype, tma in (("bf16", False), ("fp32", False), ("bf16", True))[: 3 if arch == 90 else 2]:
        # DeepSeek-V3/Kimi-K2/Moonlight: no-rope key 128, rope key 64, value 128.
        tiles = mla_extend.default_tiles(torch.bfloat16 if dtype == "bf16" else torch.float32, smem)
        n = tiles.block_n
        descriptors = {  # TMA: the context's tiles by descriptor (else the arguments are None)
            "k_nope_desc": f"tensordesc<{dtype}[{n}, 1, 128]>",
            "k_pe_desc": f"tensordesc<{dtype}[{n}, 64]>",
            "v_desc": f"tensordesc<{dtype}[{n}, 1, 128]>",
        }
        add(
            f"mla_extend_kernel {dtype}{' TMA' if tma else ''}",
            mla_extend.mla_extend_kernel,
            {
                **{f"{x}_ptr": f"*{dtype}" for x in ("q_nope", "q_pe", "k_nope", "k_pe", "v")},
                "out_ptr": f"*{dtype}",
                "kv_starts_ptr": "*i64",
                **meta,
                **(descriptors if tma else {}),
            },
            {
                "D_NOPE": 128,
                "D_ROPE": 64,
                "D_V": 128,
                "BLOCK_NOPE": 128,
                "BLOCK_ROPE": 64,
                "BLOCK_DV": 128,
                "BLOCK_M": tiles.block_m,
                "BLOCK_N": tiles.block_n,
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                "TMA": tma,
                **({} if tma else dict.fromkeys(descriptors)),
            },
            floats=("scale",),
            divisible=strides(mla_extend.mla_extend_kernel),
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
    # Per-head extend attention: Llama/Qwen3 (head dim 128) and wider heads, in each dtype's
    # default tiles (16-bit, head dim 128: long and short extends).
    for dtype, dk, ext in (("bf16", 128, None), ("bf16", 128, 1), ("bf16", 256, None),
                           ("fp32", 128, None)):  # fmt: skip
        extend = attention.extend_tiles(
            dk, torch.bfloat16 if dtype == "bf16" else torch.float32, ext, smem
        )
        add(
            f"extend_kernel {dtype} head dim {dk} {extend.block_m}x{extend.block_n}",
            attention._extend_kernel,
            {
                **{f"{x}_ptr": f"*{dtype}" for x in ("q", "k", "v", "out")},
                "table_ptr": i32,
                "rows_ptr": "*i64",
                **meta,
            },
            {
                "GROUP": 4,
                "DK": dk,
                "DV": dk,
                "BLOCK_DK": dk,
                "BLOCK_DV": dk,
                "PAGE_SIZE": 16,
                "BLOCK_M": extend.block_m,
                "BLOCK_N": extend.block_n,
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
            },
            floats=("scale",),
            divisible=strides(attention._extend_kernel, "stride_table"),
            num_warps=extend.num_warps,
            num_stages=extend.num_stages,
        )
    # Greedy sampling: the model's logits (bfloat16 as the LM head wrote them, float32 in the
    # float32 runs), a 128k vocabulary's 126 partials a row reduced.
    for dtype in ("bf16", "fp32"):
        add(
            f"argmax partials {dtype}",
            argmax._argmax_partials_kernel,
            {"x_ptr": f"*{dtype}", "part_val_ptr": "*fp32", "part_idx_ptr": i32},
            {"BLOCK": argmax.BLOCK},
            divisible=("x_ptr", "stride_x", "n", "chunk"),
            num_warps=4,
        )
    add(
        "argmax combine",
        argmax._argmax_combine_kernel,
        {"part_val_ptr": "*fp32", "part_idx_ptr": i32, "out_ptr": "*i64"},
        {"BLOCK_C": 128},
        num_warps=1,
    )
    # Sampled rows: float32 logits of a 128k vocabulary, the default tiles.
    add(
        "sample",
        sampling._sample_kernel,
        {"logits_ptr": "*fp32", "rows_ptr": "*i64", "settings_ptr": "*fp32",
         "uniforms_ptr": "*fp32", "out_ptr": "*i64", "cand_x_ptr": "*fp32",
         "cand_i_ptr": i32, "stats_ptr": "*fp32"},
        {"BLOCK": sampling.BLOCK, "CAND": sampling.CANDIDATES, "WRITE_STATS": False,
         "TILES": triton.next_power_of_2(triton.cdiv(128256, sampling.BLOCK))},
        divisible=("logits_ptr", "stride", "n", "cand_x_ptr", "cand_i_ptr"),
        num_warps=sampling.NUM_WARPS,
    )  # fmt: skip
    add_split_sampling(add)
    add_skinny_gemm(add, all_configs, hopper=arch == 90)
    return out


def add_split_sampling(add: Callable[..., None]) -> None:
    """The sampling kernel's split path (small batches) at its defaults, for a 128k vocabulary:
    the stats, the probing pass (the first, the later ones, the last: the compaction), the draw."""
    vocab, block, probes = 128256, sampling.BLOCK, sampling_split.PROBES
    tiles = triton.cdiv(vocab, block)
    sizes = {"BLOCK": block, "PW": 2 * probes + 1}
    rows = {"logits_ptr": "*fp32", "rows_ptr": "*i64", "settings_ptr": "*fp32"}
    scratch = {"rec_ptr": "*fp32", "part_ptr": "*fp32", "cand_x_ptr": "*fp32", "cand_i_ptr": "*i32"}
    divisible = ("logits_ptr", "stride", "n")
    add(
        "sample split stats",
        sampling_split._sample_stats_kernel,
        {"logits_ptr": "*fp32", "rows_ptr": "*i64", "part_ptr": "*fp32"},
        sizes,
        divisible=divisible,
        num_warps=sampling.NUM_WARPS,
    )
    for name, first, compact in (("first", True, False), ("", False, False), ("last", False, True)):
        add(
            f"sample split pass {name}".rstrip(),
            sampling_split._sample_pass_kernel,
            {**rows, **scratch},
            {**sizes, "SUB": sampling_split.sub_block(block, probes), "PROBES": probes,
             "TP": triton.next_power_of_2(tiles), "CAND": sampling.CANDIDATES, "FIRST": first,
             "COMPACT": compact},
            divisible=divisible,
            num_warps=sampling.NUM_WARPS,
        )  # fmt: skip
    add(
        "sample split draw",
        sampling_split._sample_draw_kernel,
        {**rows, **scratch, "uniforms_ptr": "*fp32", "out_ptr": "*i64", "stats_ptr": "*fp32"},
        {"BLOCK": block, "TP": triton.next_power_of_2(tiles), "CAND": sampling.CANDIDATES,
         "SUBC": sampling_split.sub_candidates(sampling.CANDIDATES, tiles), "WRITE_STATS": False},
        divisible=divisible,
        num_warps=sampling.NUM_WARPS,
    )  # fmt: skip


def add_small_batch_moe(add: Callable[..., None], arch: int) -> None:
    """The small-batch MoE's two kernels at their default tiles, for Qwen3-30B-A3B (128 experts,
    H 2048, I 768, top-8; the gate-up kernel also with its softmax routing folded in), Moonlight
    (H 2048, I 1408, top-6 plus 2 fused shared experts, grouped routing folded in, float32
    routing weights), DeepSeek-V3 (top-8 plus 1 shared: 16 pair slots) and Kimi-K2's routing
    (384 experts, one group): the sizes and strides are multiples of 16 there, as a launch
    specializes them."""
    tiles = fused_moe_small.DEFAULT_TILES
    sizes = ("hidden", "inter", "stride_we", "stride_wn")
    none, softmax, grouped = (
        fused_moe_small.ROUTE_NONE,
        fused_moe_small.ROUTE_SOFTMAX,
        fused_moe_small.ROUTE_GROUPED,
    )
    # (model, pairs a token, routes, grouped routing's groups, experts per group, best groups
    # and fused shared experts)
    models = (
        ("qwen3-30b-a3b", 8, (none, softmax), (1, 1, 1, 0)),
        ("moonlight", 8, (none, grouped), (1, 64, 1, 2)),
        ("deepseek-v3", 9, (none, grouped), (8, 32, 4, 1)),
        ("kimi-k2", 9, (grouped,), (1, 384, 1, 1)),
    )
    for (model, top_k, routes, geometry), dtype in itertools.product(models, ("bf16", "fp32")):
        groups, per_group, topk_groups, shared = geometry
        weights = "*fp32" if model != "qwen3-30b-a3b" else f"*{dtype}"
        k_pow2 = triton.next_power_of_2(top_k)
        for route in routes:
            is_grouped = route == grouped
            add(
                f"small_gate_up_kernel {dtype} {model} route={route}",
                fused_moe_small.small_gate_up_kernel,
                {
                    "x": f"*{dtype}",
                    "w13": f"*{dtype}",
                    "topk_ids": "*i64",
                    "act": f"*{dtype}",
                    "router_logits": "*fp32" if is_grouped else f"*{dtype}",
                    "topk_weights": weights,
                    "correction_bias": "*fp32",
                },
                {
                    "TOP_K": top_k,
                    "K_POW2": k_pow2,
                    "E_POW2": 128 if route == softmax else 1,
                    "ROUTE": route,
                    "RENORMALIZE": True,
                    "NUM_GROUPS": groups,
                    "PER_GROUP": per_group,
                    "TOPK_GROUPS": topk_groups,
                    "NUM_SHARED": shared if is_grouped else 0,
                    "G_POW2": groups,
                    "P_POW2": triton.next_power_of_2(per_group),
                    "BLOCK_N": tiles.gate_up_n,
                    "BLOCK_K": tiles.gate_up_k,
                    "DOT": tiles.gate_up_dot,
                    "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                },
                floats=("scaling",),
                divisible=("x", "w13", "act", "router_logits", "stride_xt", "stride_lt", *sizes),
                num_warps=tiles.num_warps,
            )
        add(
            f"small_down_combine_kernel {dtype} {model}",
            fused_moe_small.small_down_combine_kernel,
            {
                "act": f"*{dtype}",
                "w2": f"*{dtype}",
                "topk_weights": weights,
                "topk_ids": "*i64",
                "out": f"*{dtype}",
            },
            {
                "TOP_K": top_k,
                "K_POW2": k_pow2,
                "BLOCK_N": tiles.down_n,
                "BLOCK_K": fused_moe_small.down_block_k(tiles, k_pow2, 4 if dtype == "fp32" else 2),
                "DOT": False,
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
            },
            divisible=("act", "w2", "out", *sizes),
            num_warps=tiles.num_warps,
        )
    # The gate-up on the tensor cores (`fused_moe_small.DOT_TILES`, the default for experts of
    # 1,024 columns or more): Moonlight's, with its grouped routing.
    dot = fused_moe_small.DOT_TILES
    for model, top_k, k_pow2, (groups, per_group, topk_groups, shared) in (
        ("moonlight", 8, 8, (1, 64, 1, 2)),
        ("deepseek-v3", 9, 16, (8, 32, 4, 1)),
    ):
        add(
            f"small_gate_up_kernel bf16 {model} route=2 dot tiles",
            fused_moe_small.small_gate_up_kernel,
            {
                **{name: "*bf16" for name in ("x", "w13", "act")},
                **{n: "*fp32" for n in ("router_logits", "topk_weights", "correction_bias")},
                "topk_ids": "*i64",
            },
            {
                **{"TOP_K": top_k, "K_POW2": k_pow2, "E_POW2": 1, "ROUTE": grouped},
                **{"RENORMALIZE": True, "NUM_GROUPS": groups, "PER_GROUP": per_group},
                **{"TOPK_GROUPS": topk_groups, "NUM_SHARED": shared, "G_POW2": groups},
                **{"P_POW2": per_group, "BLOCK_N": dot.gate_up_n, "BLOCK_K": dot.gate_up_k},
                **{"DOT": True, "PRECISION": "tf32"},
            },
            floats=("scaling",),
            divisible=("x", "w13", "act", "router_logits", "stride_xt", "stride_lt", *sizes),
            num_warps=dot.num_warps,
            num_stages=dot.gate_up_stages,
        )
    # The down kernel on the tensor cores (`SmallBatchTiles.down_dot`, on trial), 16 and 32
    # columns a program, Qwen3-30B-A3B's top-8 and DeepSeek-V3's 9 slots.
    for model, top_k, k_pow2, down_n in (
        ("qwen3-30b-a3b", 8, 8, 16),
        ("qwen3-30b-a3b", 8, 8, 32),
        ("deepseek-v3", 9, 16, 16),
    ):
        add(
            f"small_down_combine_kernel bf16 {model} dot {down_n}x256 s3",
            fused_moe_small.small_down_combine_kernel,
            {
                **{name: "*bf16" for name in ("act", "w2", "out", "topk_weights")},
                "topk_ids": "*i64",
            },
            {
                **{"TOP_K": top_k, "K_POW2": k_pow2, "BLOCK_N": down_n, "BLOCK_K": 256},
                **{"DOT": True, "PRECISION": "tf32"},
            },
            divisible=("act", "w2", "out", *sizes),
            num_warps=4,
            num_stages=3,
        )
    # The down launch that routes again and preloads its first K step (`ROUTED_TILES`, the
    # default where the kernels route for experts under `DOT_MIN_INTER` columns): softmax
    # routing (Qwen3-30B-A3B) and grouped (a narrow DeepSeek-style model, shared experts fused).
    routed_tiles = fused_moe_small.ROUTED_TILES
    down_n, down_k = routed_tiles.down_n, routed_tiles.down_k
    for model, top_k, route, (groups, per_group, topk_groups, shared) in (
        ("qwen3-30b-a3b", 8, softmax, (1, 1, 1, 0)),
        ("moonlight", 8, grouped, (1, 64, 1, 2)),
    ):
        is_grouped = route == grouped
        add(
            f"small_down_preload_kernel bf16 {model} {down_n}x{down_k}",
            fused_moe_small.small_down_preload_kernel,
            {
                **{name: "*bf16" for name in ("act", "w2", "out")},
                "topk_weights": "*fp32" if is_grouped else "*bf16",
                "router_logits": "*fp32" if is_grouped else "*bf16",
                "correction_bias": "*fp32",
            },
            {
                **{"TOP_K": top_k, "K_POW2": 8, "E_POW2": 1 if is_grouped else 128},
                **{"ROUTE": route, "RENORMALIZE": True, "NUM_GROUPS": groups},
                **{"PER_GROUP": per_group, "TOPK_GROUPS": topk_groups},
                **{"NUM_SHARED": shared if is_grouped else 0, "G_POW2": groups},
                **{"P_POW2": per_group if is_grouped else 1, "BLOCK_N": down_n},
                "BLOCK_K": down_k,
            },
            floats=("scaling",),
            divisible=("act", "w2", "out", "router_logits", "stride_lt", *sizes),
            num_warps=routed_tiles.num_warps,
        )
    if arch != 90:
        return  # the trial below was an H200 one
    add(
        "small_gate_up_kernel bf16 qwen3-30b-a3b route=1 dot 64x128 s4",
        fused_moe_small.small_gate_up_kernel,
        {
            **{name: "*bf16" for name in ("x", "w13", "act", "router_logits", "topk_weights")},
            "topk_ids": "*i64",
            "correction_bias": "*fp32",
        },
        {
            **{"TOP_K": 8, "K_POW2": 8, "E_POW2": 128, "ROUTE": softmax, "RENORMALIZE": True},
            **{"NUM_GROUPS": 1, "PER_GROUP": 1, "TOPK_GROUPS": 1, "NUM_SHARED": 0},
            **{"G_POW2": 1, "P_POW2": 1, "BLOCK_N": 64, "BLOCK_K": 128, "DOT": True},
            "PRECISION": "tf32",
        },
        floats=("scaling",),
        divisible=("x", "w13", "act", "router_logits", "stride_xt", "stride_lt", *sizes),
        num_warps=4,
        num_stages=4,
    )


def add_skinny_tma(
    add: Callable[..., None], dtype: str, block_m: int, tiles: Any, gated: bool
) -> None:
    """The TMA skinny GEMM at one launch shape (its tiles come through descriptors)."""
    add(
        f"skinny_gemm {dtype} BLOCK_M={block_m} {tiles.label()}{' gated' if gated else ''}",
        skinny_gemm._skinny_gemm_tma_kernel,
        {
            "x_desc": f"tensordesc<{dtype}[{block_m}, {tiles.block_k}]>",
            "w_desc": f"tensordesc<{dtype}[{tiles.block_n}, {tiles.block_k}]>",
            "bias_ptr": f"*{dtype}",
            "y_ptr": f"*{dtype}",
            "part_ptr": "*fp32",
        },
        {
            "BLOCK_M": block_m,
            "BLOCK_N": tiles.block_n,
            "BLOCK_K": tiles.block_k,
            "PRECISION": "ieee" if dtype == "fp32" else "tf32",
            "HAS_BIAS": False,
            "DIRECT": tiles.split_k == 1,
            "GATED": gated,
            "PDL": 2,
        },
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        launch_pdl=True,
    )


# The pointer kernels' arguments a launch passes as multiples of 16.
SKINNY_DIVISIBLE = ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "part_ptr", "K", "N", "split_len",
                    "stride_xm", "stride_wn", "stride_ym", "stride_ps", "stride_pm")  # fmt: skip

# The other preloading tiles `session.sh` times (a program's whole tile held in registers: 64
# KB at 8 warps, 128 KB at 16; 80-82 registers a thread at one row); `TUNED`'s own are
# compiled with its rows.
PRELOAD_TRIALS = (
    skinny_gemm.SkinnyTiles(16, 4096, dot=False, num_warps=16, preload=True),
    skinny_gemm.SkinnyTiles(16, 2048, dot=False, num_warps=8, preload=True),
    skinny_gemm.SkinnyTiles(8, 4096, dot=False, num_warps=8, preload=True),
    skinny_gemm.SkinnyTiles(8, 2048, dot=False, num_warps=4, preload=True),
)


def add_skinny_preload(
    add: Callable[..., None], dtype: str, tiles: skinny_gemm.SkinnyTiles
) -> None:
    """`skinny_gemm._preload_gemv_kernel` with `tiles`."""
    add(
        f"skinny_gemm {dtype} {tiles.label()}",
        skinny_gemm._preload_gemv_kernel,
        {ptr: f"*{dtype}" for ptr in ("x_ptr", "w_ptr", "bias_ptr", "y_ptr")}
        | {"part_ptr": "*fp32"},
        {
            "BLOCK_N": tiles.block_n,
            "BLOCK_K": tiles.block_k,
            "HAS_BIAS": False,
            "DIRECT": tiles.split_k == 1,
            "ONE_ROW": True,
            "PDL": 1,
        },
        divisible=SKINNY_DIVISIBLE,
        num_warps=tiles.num_warps,
        num_stages=1,
        launch_pdl=True,
    )


NORM_DIVISIBLE = ("x_ptr", "res_ptr", "res_out_ptr", "norm_w_ptr", "w_ptr", "y_ptr", "K", "N",
                  "stride_wn")  # fmt: skip


def add_skinny_preload_norm(add: Callable[..., None]) -> None:
    """`skinny_gemm._preload_norm_gemv_kernel` (the input norm in the first projection's
    launch, `NORM_IN_PRELOAD`, on trial) on the one-row preloading tiles that hold K whole."""
    for tiles in (skinny_gemm.PRELOAD_2048, skinny_gemm.PRELOAD_4096):
        add(
            f"skinny_gemm norm bf16 {tiles.label()}",
            skinny_gemm._preload_norm_gemv_kernel,
            {p: "*bf16" for p in ("x_ptr", "res_ptr", "res_out_ptr", "norm_w_ptr", "w_ptr")}
            | {"bias_ptr": "*bf16", "y_ptr": "*bf16"},
            {"BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k, "HAS_BIAS": False, "PDL": 1},
            floats=("eps",),
            divisible=NORM_DIVISIBLE,
            num_warps=tiles.num_warps,
            num_stages=1,
            launch_pdl=True,
        )


def add_skinny_gemm(add: Callable[..., None], all_configs: bool, hopper: bool = True) -> None:
    """The skinny GEMM's launches that `pick_tiles` makes for Llama-3-8B's projections (and a
    narrow one that splits K) at 1 to 64 rows, with every argument a multiple of 16 as there;
    gated (silu(gate) * up in the epilogue) for the gate-up projection's tiles and, on
    `hopper` (where `--gemm-backend auto` takes them), those of `skinny_gemm.TUNED` and the
    trials; with `all_configs`, every entry of `TILE_CONFIGS` and `WIDE_TILES` too
    (bfloat16)."""
    shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096))
    gate_up = (28672, 4096)
    launches = set()

    def launch(dtype: str, m: int, tiles: skinny_gemm.SkinnyTiles, gated: bool = False) -> None:
        # The split count is a run-time argument: one kernel for every count above one.
        tiles = dataclasses.replace(tiles, split_k=min(tiles.split_k, 2))
        launches.add((dtype, skinny_gemm.rows_per_program(m, tiles), tiles, gated))

    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for m in (1, 2, 4, 16, 32, 64):
            for n, k in (*shapes, (1024, 4096)):
                launch(dtype, m, skinny_gemm.pick_tiles(m, n, k, torch_dtype))
                if (n, k) == gate_up:
                    gated_tiles = skinny_gemm.pick_tiles(m, n, k, torch_dtype, gated=True)
                    launch(dtype, m, gated_tiles, gated=True)
        if all_configs and dtype == "bf16":
            for tiles in skinny_gemm.TILE_CONFIGS:
                for m in (1, 4, 16) if not tiles.dot else (16,):
                    launch(dtype, m, tiles)
            for tiles in skinny_gemm.WIDE_TILES:  # the 128-256 row candidates
                launch(dtype, 256, tiles)
    for tiles in skinny_gemm.TILE_CONFIGS:  # the prefetching CUDA-core tiles, still on trial
        if tiles.prefetch and hopper:
            for dtype in ("bf16", "fp32"):
                launch(dtype, 1, tiles)
    for (kind, _, _, dtype_name), rows in skinny_gemm.TUNED.items() if hopper else ():
        dtype = {"bfloat16": "bf16", "float32": "fp32"}[dtype_name]
        for max_rows, tuned in rows:
            for m in (1, 16, max_rows):
                if tuned is not None:  # None: cuBLAS
                    launch(dtype, m, tuned, gated=kind == "gate_up")
    for tiles in PRELOAD_TRIALS if hopper else ():  # the other preloading tiles timed
        launch("bf16", 1, tiles)
    add_skinny_preload_norm(add)
    for dtype, block_m, tiles, gated in sorted(launches, key=repr):
        if tiles.tma:
            add_skinny_tma(add, dtype, block_m, tiles, gated)
            continue
        if tiles.preload:
            add_skinny_preload(add, dtype, tiles)
            continue
        add(
            f"skinny_gemm {dtype} BLOCK_M={block_m} {tiles.label()}{' gated' if gated else ''}",
            skinny_gemm._skinny_gemm_kernel,
            {ptr: f"*{dtype}" for ptr in ("x_ptr", "w_ptr", "bias_ptr", "y_ptr")}
            | {"part_ptr": "*fp32"},
            {
                "BLOCK_M": block_m,
                "BLOCK_N": tiles.block_n,
                "BLOCK_K": tiles.block_k,
                "DOT": tiles.dot,
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                "EVEN_K": True,
                "HAS_BIAS": False,
                "DIRECT": tiles.split_k == 1,
                "GATED": gated,
                "PREFETCH": tiles.prefetch,
                "PDL": 2,  # what a launch with PDSERVE_PDL=early compiles; no other cost
            },
            divisible=SKINNY_DIVISIBLE,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
            launch_pdl=True,
        )
    add(
        "skinny_gemm split sum",
        skinny_gemm._split_sum_kernel,
        {"part_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16"},
        {"SPLIT_K": 4, "BLOCK": 1024, "HAS_BIAS": True, "GATED": True, "PDL": 2},
        num_warps=4,
        launch_pdl=True,
    )
    for tokens in (1, 16):  # a decode step's one token a program, a prefill's 16
        add(
            f"rope {tokens} token(s) a program",
            fused._rope_kernel,
            {p: "*bf16" for p in ("x_ptr", "out_ptr")}
            | {"pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"},
            {"HALF": 32, "BLOCK": 32, "INTERLEAVED": False, "TOKENS": tokens},
            num_warps=1,
        )
        add(
            f"rope_store_kv {tokens} token(s) a program",
            fused._rope_store_kv_kernel,
            {p: "*bf16" for p in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_cache_ptr",
                                  "v_cache_ptr", "q_norm_ptr", "k_norm_ptr")}
            | {"pos_ptr": "*i64", "slots_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"},
            {"HQ": 32, "HALF": 64, "BLOCK": 64, "DV": 128, "BLOCK_DV": 128,
             "INTERLEAVED": False, "NORM": True, "TOKENS": tokens},
            floats=("eps",),
            num_warps=1,
        )  # fmt: skip
    for dtype, interleaved in (("bf16", True), ("bf16", False), ("fp32", True)):
        # DeepSeek-V3/Kimi-K2/Moonlight: latent 512, rotary 64 (interleaved in their configs);
        # decode (one token a program) and prefill (16, the normed latent returned).
        for return_kv, tokens in ((False, 1), (True, 1), (True, 16)):
            add(
                f"mla_latent_rope_store {dtype}{' interleaved' if interleaved else ''}"
                f"{' return_kv' if return_kv else ''} {tokens} token(s) a program",
                fused._mla_latent_kernel,
                {
                    **{p: f"*{dtype}" for p in ("q_pe_ptr", "c_kv_ptr", "k_pe_ptr", "q_out_ptr")},
                    **{p: f"*{dtype}" for p in ("c_out_ptr", "k_out_ptr", "norm_ptr")},
                    **{p: f"*{dtype}" for p in ("latent_cache_ptr", "pe_cache_ptr")},
                    **{p: "*i64" for p in ("pos_ptr", "slots_ptr")},
                    **{p: "*fp32" for p in ("cos_ptr", "sin_ptr")},
                },
                {
                    "HQ": 16,
                    "HALF": 32,
                    "BLOCK": 32,
                    "BLOCK_R": 512,
                    "INTERLEAVED": interleaved,
                    "RETURN_KV": return_kv,
                    "TOKENS": tokens,
                },
                floats=("eps",),
                num_warps=1,
            )
    plain = {"PENDING": 0, "HAS_PW": False, "HAS_IDS": False}
    # A pending sum (engine.layers.pending): Llama-3-8B's down split in four (float32
    # partials), a MoE layer's top-8 expert outputs with their weights and ids.
    split = {"PENDING": 4, "HAS_PW": False, "HAS_IDS": False}
    moe = {"PENDING": 8, "HAS_PW": True, "HAS_IDS": True}
    for label, consts, parts, block in (
        ("", plain, "*bf16", 4096),
        (", split-K partials", split, "*fp32", 4096),
        (", MoE top-8", moe, "*bf16", 2048),
    ):
        add(
            f"rms_norm (PDL){label}",
            fused._rms_norm_kernel,
            {p: "*bf16" for p in ("res_ptr", "w_ptr", "out_ptr")}
            | {"x_ptr": parts, "pw_ptr": "*fp32", "ids_ptr": "*i64"},
            {"HAS_RESIDUAL": True, "BLOCK": block, "PDL": 2, **consts},
            floats=("eps",),
            num_warps=fused.norm_warps(block),
            launch_pdl=True,
        )
    # The norm with the gate's logits (`fused.rms_norm_gate`): Qwen3-30B-A3B's (O's split-K
    # partials in, bfloat16 logits), DeepSeek-V3's (hidden 7168, float32 logits) and
    # Moonlight's (float32 logits, its O from cuBLAS).
    for label, consts, parts, block, logits in (
        ("Qwen3-30B-A3B, split-K partials", split, "*fp32", 2048, "*bf16"),
        ("DeepSeek-V3", plain, "*bf16", 8192, "*fp32"),
        ("Moonlight, split-K partials", split, "*fp32", 2048, "*fp32"),
    ):
        add(
            f"rms_norm_gate (PDL), {label}",
            fused._rms_norm_gate_kernel,
            {p: "*bf16" for p in ("res_ptr", "res_out_ptr", "w_ptr", "out_ptr", "gate_ptr")}
            | {"x_ptr": parts, "pw_ptr": "*fp32", "ids_ptr": "*i64", "logits_ptr": logits},
            {"BLOCK": block, "BLOCK_E": fused.GATE_BLOCK_E, "PDL": 2, **consts},
            floats=("eps",),
            num_warps=fused.norm_warps(block),
            launch_pdl=True,
        )


# Kernels whose spills `--fail-on-spill` reports without failing: configurations measured
# fastest on the device, spills and all. (Until the thirty-second session this compile took
# every pointer and stride as unaligned, which a launch does not: the K/V loads of the decode
# and extend kernels came out as one 2-byte load an element, and the tuned grouped GEMMs, the
# per-head and one-chain MLA decode kernels and the MLA extend kernel reported spills that the
# launches do not have. Those entries are gone.)
MEASURED_SPILLS = (
    # The small MoE's down with its combine at 4 columns a program: 8 B. (At 8 columns the
    # earlier compile reported 16 B; it took 26.8 / 33.1 µs at one token on the H200 against
    # 30.0 / 39.7.)
    "small_down_combine_kernel bf16",
    # The quartered MLA decode kernel (its four accumulators): 32-288 B here, measured faster
    # than the one-chain kernel at every shape tried on the H200 (16 heads, 256 x 128 23.4 ->
    # 19.8 µs; 128 heads at 64 a program, 64 x 2,048 414 -> 187).
    "mla_decode_quarters_kernel bf16",
    # The extend kernel's 128 x 128 bf16 tiles at head dim 128: 40 B here, the fastest of the
    # sweep in `bench.extend_kernel` (2x the 64 x 64 tiles).
    "extend_kernel bf16 head dim 128",
    # The MoE align's prefix sums at the widest tile (32,768 counts, 8 warps): 256-744 B here,
    # 152-768 B with Triton 3.6 (the device's).
    # Half the tile would not spill, but doubles the chain of tiles a long prefill waits on;
    # wide tiles measured faster than 16 chunks a tile on the H200 (`offsets_chunk_block`);
    # half this one was not timed.
    "align_offsets_kernel",
    # Not tuned, spilling in every tile tried: the extend kernel in float32 (the exact checks
    # only).
    "extend_kernel fp32",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--all-configs", action="store_true", help="every tuner candidate too")
    parser.add_argument("--fail-on-spill", action="store_true")
    parser.add_argument("--only", help="compile only kernels whose name contains this")
    args = parser.parse_args(argv)
    failures = []
    for name, job in jobs(args.all_configs, args.arch):
        if args.only and args.only not in name:
            continue
        try:
            usage = job(args.arch)
        except Exception as exc:  # report every kernel, then fail
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        spill = usage.stack > 0
        over = usage.shared > SHARED_LIMIT.get(args.arch, 1 << 30) and not args.all_configs
        print(("SMEM  " if over else "SPILL " if spill else "ok    ") + usage.line(), flush=True)
        if spill and args.fail_on_spill and not name.startswith(MEASURED_SPILLS):
            failures.append(f"{name}: {usage.stack} B of spill stack")
        if over:  # it would not launch (the tuner's candidates may: it skips those)
            failures.append(f"{name}: {usage.shared} B of shared memory, more than an SM has")
    print(f"\n{len(failures)} failure(s)" + "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
