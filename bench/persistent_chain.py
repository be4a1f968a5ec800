"""Is one persistent kernel per decode step worth building? A chain of dependent GEMVs, timed
as one launch each and as one persistent launch.

    python -m bench.persistent_chain                    # QKV- and O-sized products, 48 layers
    python -m bench.persistent_chain --shapes 5120x2048,2048x5120 --layers 48 --programs-per-sm 2,4

At batch 1 a decode step is a chain of dependent products, each a stream of its weight. Run
one kernel each (in a CUDA graph, with programmatic dependent launch), every product pays a
ramp (its first loads in flight) and a tail (its last programs finishing alone): on the H200
Qwen3-30B-A3B's 16-21 MB projections run at 1.3-1.6x their bytes, and its batch-1 step is
1.83-1.94x its floor with every launch of a layer already fused that could be. A persistent
kernel runs the whole chain in one launch: its programs take tiles from a counter in chain
order, and a tile's program loads its first weights before it waits for the product the tile
reads (the weights do not depend on it), so the next product's weights stream during the
last one's tail. This times the same GEMV tile code both ways, and cuBLAS's chain, over
`--layers` repetitions of `--shapes` (`NxK` products, each N the next one's K), every product
with its own weight (gigabytes: from memory, not the L2), against the floor of the weights'
bytes at the copy bandwidth measured in the same run. If the persistent chain runs near the
floor where the launches do not, a persistent decode step is the way to batch 1's 1.5x.

The kernels are this experiment's own (the GEMV tile and the counter wait are
`bench.persistent_kernel`'s): the persistent one's counters follow the reverted one-launch
small MoE path's (a tile waits only for tiles with lower numbers, which running programs hold,
so no deadlock whatever is resident; the last program zeroes the counters). Both forms run the
same tile code, so their outputs are equal bit for bit (checked here, and under the
interpreter in tests/bench/test_persistent_chain.py).

On an H100 the persistent chain lost: 1,428-1,656 µs (2.07-2.40x the bytes) at 1-4 programs
an SM against 931-954 µs (1.35-1.38x) for one launch each, and cuBLAS's 1,067 (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bench.moe_kernel import time_graph
from bench.persistent_kernel import _DONE, _FINISHED, _TICKET, _gemv_tile
from engine.kernels import pdl


@triton.jit
def gemv_kernel(
    w, x, y, n, k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    DOT: tl.constexpr = False, PRECISION: tl.constexpr = "tf32",
):  # fmt: skip
    """One product of the chain, one program a tile."""
    _gemv_tile(
        w, x, y, tl.program_id(0), n, k, y, 0, BLOCK_N, BLOCK_K, False, PDL, 0, DOT, PRECISION
    )


@triton.jit
def chain_kernel(
    weights,  # every product's weight, flat
    bufs,  # [2, width]: product p reads row p % 2 and writes the other
    width,
    w_offsets,  # [P] int64: product p's weight in `weights`
    ns,  # [P] int32
    ks,  # [P] int32
    tiles,  # [P] int32: product p's tile count
    item_product,  # [items] int32: tile i of the chain is of this product
    item_tile,  # [items] int32: and this tile of it
    scratch,  # [2 + P] int32, zero at launch and left zero: _TICKET, _FINISHED, _DONE + p
    num_items,
    SCRATCH_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPIN_NS: tl.constexpr,
    DOT: tl.constexpr = False,
    PRECISION: tl.constexpr = "tf32",
):
    """The whole chain in one launch: programs take tiles from a counter in chain order; a
    tile waits for every tile of the product before its own (lower numbers: no deadlock)."""
    item = tl.atomic_add(scratch + _TICKET, 1)
    while item < num_items:
        following = tl.atomic_add(scratch + _TICKET, 1)  # in flight while this tile runs
        p = tl.load(item_product + item)
        # Sizes and offsets read from memory carry no alignment the compiler can see: without
        # these hints the weights load 2 bytes at a time (`Chain` keeps them multiples of 16).
        n = tl.multiple_of(tl.load(ns + p), 16)
        k = tl.multiple_of(tl.load(ks + p), 16)
        offset = tl.multiple_of(tl.load(w_offsets + p), 16)
        before = tl.maximum(p - 1, 0)
        need = tl.where(p > 0, tl.load(tiles + before), 0)
        x = bufs + (p % 2) * width
        y = bufs + ((p + 1) % 2) * width
        _gemv_tile(
            weights + offset, x, y, tl.load(item_tile + item), n, k,
            scratch + _DONE + before, need, BLOCK_N, BLOCK_K, True, 0, SPIN_NS, DOT, PRECISION,
        )  # fmt: skip
        tl.debug_barrier()  # every thread's stores before the release
        tl.atomic_add(scratch + _DONE + p, 1, sem="release")
        item = following
    finished = tl.atomic_add(scratch + _FINISHED, 1, sem="acq_rel")
    if finished == tl.num_programs(0) - 1:
        # Every tile is done and every program has taken its last number.
        slots = tl.arange(0, SCRATCH_BLOCK)
        tl.store(scratch + slots, tl.zeros([SCRATCH_BLOCK], dtype=tl.int32))


@dataclass
class Chain:
    """`products` `(N, K)` in order, each N the next one's K, with their weights (scaled so
    that the vector keeps its size along the chain), the two buffers and the tables."""

    shapes: list[tuple[int, int]]
    weights: torch.Tensor
    offsets: list[int]
    bufs: torch.Tensor
    block_n: int
    block_k: int
    # > 0: the tiles' products on the tensor cores, their weight loads pipelined this deep
    # (`_gemv_tile`'s DOT; block_n >= 16); 0: on the CUDA cores, two K steps in registers.
    dot_stages: int = 0

    @staticmethod
    def build(
        shapes: list[tuple[int, int]],
        dtype: torch.dtype,
        device: str,
        block_n: int = 8,
        block_k: int = 512,
        seed: int = 0,
        dot_stages: int = 0,
    ) -> Chain:
        if dot_stages and min(block_n, block_k) < 16:
            raise ValueError(f"tensor-core tiles need 16 or more rows and columns: {block_n}")
        for (n, _), (_, k_next) in itertools.pairwise(shapes):
            if n != k_next:
                raise ValueError(f"each product's N must be the next one's K: {shapes}")
        if any(n % 16 or k % 16 for n, k in shapes):
            raise ValueError(f"sizes must be multiples of 16 (the kernel's hints): {shapes}")
        g = torch.Generator(device=device).manual_seed(seed)
        offsets, at = [], 0
        for n, k in shapes:
            offsets.append(at)
            at += n * k
        weights = torch.empty(at, dtype=dtype, device=device)
        for (n, k), off in zip(shapes, offsets, strict=True):
            part = torch.randn(n, k, device=device, generator=g) * k**-0.5
            weights[off : off + n * k] = part.flatten().to(dtype)
        width = max(max(n, k) for n, k in shapes)
        bufs = torch.zeros(2, width, dtype=dtype, device=device)
        bufs[0, : shapes[0][1]] = torch.randn(shapes[0][1], device=device, generator=g).to(dtype)
        return Chain(shapes, weights, offsets, bufs, block_n, block_k, dot_stages)

    def tile_args(self) -> dict[str, object]:
        """The tile's launch keywords: its sizes, the products' form and the pipeline depth."""
        from engine.kernels.attention import dot_precision

        return {
            "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "DOT": self.dot_stages > 0,
            "PRECISION": dot_precision(self.bufs), "num_stages": max(1, self.dot_stages),
        }  # fmt: skip

    def weight(self, p: int) -> torch.Tensor:
        n, k = self.shapes[p]
        return self.weights[self.offsets[p] : self.offsets[p] + n * k].view(n, k)

    def output(self) -> torch.Tensor:
        """The last product's output (in the buffer it wrote)."""
        return self.bufs[len(self.shapes) % 2, : self.shapes[-1][0]]

    def reset(self, x0: torch.Tensor) -> None:
        self.bufs.zero_()
        self.bufs[0, : x0.numel()] = x0

    def weight_bytes(self) -> int:
        return self.weights.numel() * self.weights.element_size()


def run_launches(chain: Chain, pdl_mode: int = 0) -> None:
    """The chain as one `gemv_kernel` launch per product."""
    width = chain.bufs.shape[1]
    flat = chain.bufs.view(-1)
    extra: dict[str, int | bool] = {"PDL": pdl_mode}
    if pdl_mode:
        extra["launch_pdl"] = True
    for p, (n, k) in enumerate(chain.shapes):
        x = flat[(p % 2) * width :]
        y = flat[((p + 1) % 2) * width :]
        gemv_kernel[(triton.cdiv(n, chain.block_n),)](
            chain.weight(p), x, y, n, k, num_warps=4, **chain.tile_args(), **extra
        )


@dataclass
class Persistent:
    """`chain_kernel`'s tables for a chain, and its scratch (zero between launches)."""

    chain: Chain
    programs: int
    tables: dict[str, torch.Tensor]
    scratch: torch.Tensor
    num_items: int
    spin_ns: int = 0  # sleep between a waiting program's reads (0: none; the GPU only)

    @staticmethod
    def build(chain: Chain, programs: int, spin_ns: int = 0) -> Persistent:
        device = chain.bufs.device
        tiles = [triton.cdiv(n, chain.block_n) for n, _ in chain.shapes]
        item_product = [p for p, t in enumerate(tiles) for _ in range(t)]
        item_tile = [i for t in tiles for i in range(t)]

        def ints(values: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        tables = {
            "w_offsets": ints(chain.offsets, torch.int64),
            "ns": ints([n for n, _ in chain.shapes]),
            "ks": ints([k for _, k in chain.shapes]),
            "tiles": ints(tiles),
            "item_product": ints(item_product),
            "item_tile": ints(item_tile),
        }
        scratch_size = triton.next_power_of_2(int(_DONE) + len(tiles))
        scratch = torch.zeros(scratch_size, dtype=torch.int32, device=device)
        return Persistent(chain, programs, tables, scratch, len(item_product), spin_ns)

    def run(self) -> None:
        c, t = self.chain, self.tables
        chain_kernel[(self.programs,)](
            c.weights, c.bufs, c.bufs.shape[1], t["w_offsets"], t["ns"], t["ks"], t["tiles"],
            t["item_product"], t["item_tile"], self.scratch, self.num_items,
            SCRATCH_BLOCK=self.scratch.numel(), SPIN_NS=self.spin_ns, num_warps=4,
            **c.tile_args(),
        )  # fmt: skip


def reference(chain: Chain, x0: torch.Tensor) -> torch.Tensor:
    """The chain in float32, from the weights as stored."""
    x = x0.float()
    for p in range(len(chain.shapes)):
        x = chain.weight(p).float() @ x
    return x


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        n, _, k = part.strip().lower().partition("x")
        shapes.append((int(n), int(k)))
    return shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("5120x2048,2048x5120"))
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--programs-per-sm", default="1,2,4")
    p.add_argument("--block-n", type=int, default=8)
    p.add_argument("--block-k", type=int, default=512)
    p.add_argument(
        "--dot-stages", type=int, default=0,
        help="> 0: the tiles on the tensor cores, weight loads pipelined this deep (block-n 16+)",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--spin-ns", type=int, default=200, help="also time waits that sleep this long (0: no)"
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (tests/bench/test_persistent_chain.py runs it on the CPU)")
    from bench.ceiling import copy_bandwidth

    bandwidth = copy_bandwidth()
    shapes = args.shapes * args.layers
    chain = Chain.build(
        shapes, torch.bfloat16, "cuda", args.block_n, args.block_k, dot_stages=args.dot_stages
    )
    x0 = chain.bufs[0, : shapes[0][1]].clone()
    floor_us = chain.weight_bytes() / bandwidth * 1e6
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(
        f"\n## A chain of {len(shapes)} dependent GEMVs ({args.layers} x "
        f"{','.join(f'{n}x{k}' for n, k in args.shapes)}, "
        f"{chain.weight_bytes() / 1e9:.2f} GB of bfloat16 weights): "
        f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e12:.2f} TB/s, floor "
        f"{floor_us:.0f} µs; tiles {args.block_n} x {args.block_k}"
        + (f" on the tensor cores, {args.dot_stages} stages" if args.dot_stages else "")
        + ".\n\n"
        "| form | chain µs | µs a product | TB/s | x floor | output |\n"
        "| :--- | ---: | ---: | ---: | ---: | :--- |"
    )
    want = reference(chain, x0)
    baseline: list[torch.Tensor] = []

    def row(name: str, fn: Callable[[], object]) -> None:
        seconds = time_graph(fn, args.reps)
        chain.reset(x0)
        fn()
        torch.cuda.synchronize()
        got = chain.output().clone()
        if not baseline:
            baseline.append(got)
        err = (got.float() - want).abs().max().item() / want.abs().max().item()
        same = "same as one launch each" if torch.equal(got, baseline[0]) else "differs"
        us = seconds * 1e6
        print(
            f"| {name} | {us:.0f} | {us / len(shapes):.2f} | "
            f"{chain.weight_bytes() / seconds / 1e12:.2f} | {us / floor_us:.2f} "
            f"| {same}, err {err:.1e} |",
            flush=True,
        )

    row("one launch each", lambda: run_launches(chain))
    if pdl.launch_args(chain.bufs)["PDL"]:
        row("one launch each, PDL", lambda: run_launches(chain, pdl_mode=1))
    row("cuBLAS, one each", lambda: cublas_chain(chain))
    for per_sm in (int(v) for v in args.programs_per_sm.split(",")):
        for spin_ns in (0, args.spin_ns) if args.spin_ns else (0,):
            persistent = Persistent.build(chain, per_sm * sms, spin_ns)
            sleep = f", {spin_ns} ns sleeps" if spin_ns else ""
            row(f"persistent, {per_sm} a SM{sleep}", persistent.run)


def cublas_chain(chain: Chain) -> None:
    width = chain.bufs.shape[1]
    flat = chain.bufs.view(-1)
    for p, (n, k) in enumerate(chain.shapes):
        x = flat[(p % 2) * width : (p % 2) * width + k]
        y = flat[((p + 1) % 2) * width : ((p + 1) % 2) * width + n]
        torch.mv(chain.weight(p), x, out=y)


if __name__ == "__main__":
    main()
