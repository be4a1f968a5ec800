"""One MoE layer on the GPU: the fused Triton kernels against the pure-torch experts.

    python -m bench.moe_kernel                                    # both shapes, T = 1..4096
    python -m bench.moe_kernel --shape qwen3-30b-a3b --tokens 1,64,256
    python -m bench.moe_kernel --tune --shape qwen3-30b-a3b       # block sizes for the table
    python -m bench.moe_kernel --tokens 1,2,4,8 --path small      # force one path (or grouped)

Each shape's published sizes (bfloat16, random weights scaled to unit-size outputs). Routing
is the model's own (softmax top-k for Qwen3-MoE, grouped sigmoid with a random correction bias
for Moonlight/DeepSeek) on random logits, computed outside the timed call. `-fused` shapes
stack the shared experts after the routed ones and give every token them too (weight 1.0), as
the engine's shared-expert fusion does; `--tune` prints their rows under the stacked key.

Times are per layer call. `--layers L` copies of the layer's weights are cycled so that
consecutive calls read different memory (one layer's experts exceed the 50 MB L2 at batch 1
only a little, and repeated reads of the same experts would otherwise be served from it).
The fused path is timed as a CUDA graph of L calls (as the engine replays decode) and eagerly;
the reference eagerly (it waits on the host for the per-expert counts: no graph).

`fused_moe` takes its two-launch small-batch path up to `SMALL_BATCH_PAIRS` (token, expert)
pairs and the grouped GEMMs beyond; `--path small|grouped` forces one at every token count
(`--small-tiles` sets the small path's tiles), `--tune` always times the grouped GEMMs.
`--path routed` times `fused_moe_routed` (softmax routing shapes only), which routes inside the
small path's first kernel: its time includes the routing, which the other paths' exclude.

Floor: the bytes one call must move, over the device-to-device copy bandwidth measured in the
same run (bytes read + written per second): the weights of the distinct experts the routing
touched (gate, up and down: `3 * H * I` elements each) plus the activations (x read, output
written). Routing is timed alone in its own column (fused kernel, as a graph).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch

from bench.args import int_list
from bench.ceiling import copy_bandwidth
from engine.kernels.fused_moe import _grouped_gemm, align_block_size, fused_moe, fused_moe_routed
from engine.kernels.fused_moe_configs import MoEKernelConfig, candidates, kernel_config
from engine.kernels.fused_moe_small import (
    SmallBatchTiles,
    small_batch_moe,
    small_batch_moe_grouped_routed,
    small_batch_moe_routed,
)
from engine.kernels.sms import shared_memory
from engine.layers.moe import MoEBackend, TorchMoEBackend, TritonMoEBackend


@dataclass(frozen=True)
class LayerShape:
    name: str
    experts: int
    hidden: int
    intermediate: int
    top_k: int
    grouped: bool  # DeepSeek routing (sigmoid, groups, bias) instead of softmax top-k
    groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0
    # Shared experts fused into the routed kernels (as the engine stacks them): `shared` more
    # experts after the routed ones, every token's last `shared` pairs, weight 1.0.
    shared: int = 0

    @property
    def stacked(self) -> int:
        """Experts in the weights: the routed ones, then the fused shared ones."""
        return self.experts + self.shared

    @property
    def pairs(self) -> int:
        """(token, expert) pairs a token: its routed choices and the shared experts."""
        return self.top_k + self.shared

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return 3 * self.hidden * self.intermediate * dtype.itemsize


SHAPES = {
    s.name: s
    for s in (
        LayerShape("qwen3-30b-a3b", 128, 2048, 768, 8, grouped=False),
        LayerShape("moonlight-16b-a3b", 64, 2048, 1408, 6, True, 1, 1, 2.446),
        # Moonlight as the engine runs it by default: its 2 shared experts fused.
        LayerShape("moonlight-16b-a3b-fused", 64, 2048, 1408, 6, True, 1, 1, 2.446, 2),
        LayerShape("deepseek-v3", 256, 7168, 2048, 8, True, 8, 4, 2.5),
        LayerShape("kimi-k2", 384, 7168, 2048, 8, True, 1, 1, 2.827),
        # Both as the engine runs them by default: the one shared expert fused.
        LayerShape("deepseek-v3-fused", 256, 7168, 2048, 8, True, 8, 4, 2.5, 1),
        LayerShape("kimi-k2-fused", 384, 7168, 2048, 8, True, 1, 1, 2.827, 1),
        # For a smoke run on the CPU under TRITON_INTERPRET=1 (--device cpu --dtype float32).
        LayerShape("tiny", 8, 64, 32, 2, True, 4, 2, 2.5),
        LayerShape("tiny-fused", 8, 64, 32, 2, True, 4, 2, 2.5, 2),
    )
}
DEFAULT_SHAPES = ("qwen3-30b-a3b", "moonlight-16b-a3b")
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Layer:
    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]


def make_layers(
    shape: LayerShape, count: int, device: torch.device, dtype: torch.dtype
) -> list[Layer]:
    g = torch.Generator(device=device).manual_seed(0)
    e, h, i = shape.stacked, shape.hidden, shape.intermediate
    layers = []
    for _ in range(count):
        w13 = torch.randn(e, 2 * i, h, device=device, generator=g, dtype=dtype)
        w2 = torch.randn(e, h, i, device=device, generator=g, dtype=dtype)
        layers.append(Layer(w13.mul_(h**-0.5), w2.mul_(i**-0.5)))
    return layers


def route(
    shape: LayerShape, logits: torch.Tensor, bias: torch.Tensor, backend: MoEBackend
) -> tuple[torch.Tensor, torch.Tensor]:
    if shape.grouped:
        return backend.select_experts_grouped(
            logits.float(), bias, shape.top_k, shape.groups, shape.topk_groups, True, shape.scaling
        )
    return backend.select_experts(logits, shape.top_k, True)


def time_eager(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of `fn` over `reps` runs (each between two events)."""
    fn()
    if not torch.cuda.is_available():  # the CPU smoke run
        times = []
        for _ in range(reps):
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_graph(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of one replay of a CUDA graph of `fn` (warmed up on a side stream)."""
    if not torch.cuda.is_available():
        return time_eager(fn, reps)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_eager(graph.replay, reps)


@dataclass(frozen=True)
class Step:
    """One token count's inputs for each of the L layers, routed by the reference."""

    layers: list[Layer]
    xs: list[torch.Tensor]  # [T, H] per layer
    logits: list[torch.Tensor]  # [T, E] per layer
    routed: list[tuple[torch.Tensor, torch.Tensor]]  # (weights, ids) [T, k] per layer
    shape: LayerShape
    bias: torch.Tensor  # grouped routing's correction bias

    def fused(
        self,
        outs: list[torch.Tensor],
        config: MoEKernelConfig | None = None,
        path: str = "auto",
        tiles: SmallBatchTiles | None = None,
    ) -> None:
        """Every layer through `fused_moe` ("auto": its choice of path; "grouped": the grouped
        GEMMs, tiled by `config`), the small-batch path at `tiles` ("small"; "small-routed":
        routing from the logits in its kernels, as a decode step runs it), or
        `fused_moe_routed` on the logits ("routed": softmax top-k, renormalized)."""
        outs.clear()
        for layer, x, lg, (w, ids) in zip(
            self.layers, self.xs, self.logits, self.routed, strict=True
        ):
            if path == "routed":
                outs.append(fused_moe_routed(x, layer.w13, layer.w2, lg, ids.shape[1], True))
            elif path == "small":
                outs.append(small_batch_moe(x, layer.w13, layer.w2, w, ids, tiles))
            elif path == "small-routed":
                outs.append(self.small_routed(layer, x, lg, tiles))
            else:
                small = False if path == "grouped" else None
                outs.append(fused_moe(x, layer.w13, layer.w2, w, ids, config, small_batch=small))

    def small_routed(
        self, layer: Layer, x: torch.Tensor, logits: torch.Tensor, tiles: SmallBatchTiles | None
    ) -> torch.Tensor:
        """The small-batch path with the routing in its kernels (the reference's choices: the
        same routing rule, ties aside)."""
        s = self.shape
        if not s.grouped:
            return small_batch_moe_routed(x, layer.w13, layer.w2, logits, s.top_k, True, tiles)[0]
        return small_batch_moe_grouped_routed(
            x, layer.w13, layer.w2, logits.float(), self.bias, s.top_k, s.groups,
            s.topk_groups, True, s.scaling, s.shared, tiles,
        )[0]  # fmt: skip

    def reference(self) -> None:
        backend = TorchMoEBackend()
        for layer, x, (w, ids) in zip(self.layers, self.xs, self.routed, strict=True):
            backend.experts(x, layer.w13, layer.w2, w, ids)


def table_config(shape: LayerShape, tokens: int, layers: list[Layer]) -> MoEKernelConfig:
    """The engine's config at `tokens` (`kernel_config` on the layers' device)."""
    w13 = layers[0].w13
    args = (shape.stacked, shape.hidden, shape.intermediate, shape.pairs, w13.dtype)
    return kernel_config(tokens, *args, shared_memory(w13.device))


def make_step(
    shape: LayerShape, tokens: int, layers: list[Layer], bias: torch.Tensor, seed: int
) -> Step:
    w = layers[0].w13
    g = torch.Generator(device=w.device).manual_seed(seed)
    xs, logits = [], []
    for _ in layers:
        xs.append(torch.randn(tokens, shape.hidden, device=w.device, generator=g).to(w.dtype))
        lg = torch.randn(tokens, shape.experts, device=w.device, generator=g).to(w.dtype)
        logits.append(lg)
    routed = [with_shared(shape, *route(shape, lg, bias, TorchMoEBackend())) for lg in logits]
    return Step(layers, xs, logits, routed, shape, bias)


def with_shared(
    shape: LayerShape, weights: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed choices `[T, k]` with the fused shared experts appended (ids E, E + 1, ...,
    weight 1.0), as the engine's grouped routing appends them."""
    if not shape.shared:
        return weights, ids
    tokens = ids.shape[0]
    shared_ids = torch.arange(shape.experts, shape.stacked, device=ids.device)
    return (
        torch.cat([weights, weights.new_ones(tokens, shape.shared)], dim=1),
        torch.cat([ids, shared_ids.to(ids.dtype).expand(tokens, -1)], dim=1),
    )


@dataclass(frozen=True)
class Row:
    tokens: int
    distinct: float  # experts touched per call, mean over the L layers' routings
    floor_us: float
    graph_us: float
    eager_us: float
    reference_us: float
    routing_us: float
    max_err: float

    def line(self) -> str:
        return (
            f"| {self.tokens} | {self.distinct:.1f} | {self.floor_us:.1f} | {self.graph_us:.1f} "
            f"| {self.graph_us / self.floor_us:.2f} | {self.eager_us:.1f} "
            f"| {self.reference_us:.1f} | {self.reference_us / self.graph_us:.1f} "
            f"| {self.routing_us:.1f} | {self.max_err:.2e} |"
        )


HEADER = (
    "| tokens | experts touched | floor µs | fused µs (graph) | fused / floor | fused µs (eager) "
    "| reference µs | reference / fused | routing µs (fused, graph) | max rel err |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def bench_shape(
    shape: LayerShape,
    tokens: Sequence[int],
    layers: list[Layer],
    bandwidth: float,
    reps: int,
    path: str = "auto",
    tiles: SmallBatchTiles | None = None,
) -> list[Row]:
    bias = torch.randn(shape.experts, device=layers[0].w13.device) * 0.1
    triton_backend = TritonMoEBackend()
    dtype = layers[0].w13.dtype
    rows = []
    for t in tokens:
        step = make_step(shape, t, layers, bias, seed=t)
        distinct = statistics.mean(ids.unique().numel() for _, ids in step.routed)
        floor_bytes = (distinct * shape.expert_bytes(dtype)) + 2 * t * shape.hidden * dtype.itemsize
        outs: list[torch.Tensor] = []
        n = len(layers)
        fused = partial(step.fused, outs, None, path, tiles)
        graph_s = time_graph(fused, reps) / n
        eager_s = time_eager(fused, reps) / n
        reference_s = time_eager(step.reference, max(3, reps // 4)) / n

        def routing(step: Step = step) -> None:
            for lg in step.logits:
                route(shape, lg, bias, triton_backend)

        routing_s = time_graph(routing, reps) / n
        fused()
        err = 0.0
        for layer, x, (w, ids), got in zip(layers, step.xs, step.routed, outs, strict=True):
            want = TorchMoEBackend().experts(x.float(), layer.w13, layer.w2, w, ids)
            scale = want.abs().max().clamp_min(1e-6)
            err = max(err, float((got.float() - want).abs().max() / scale))
        rows.append(
            Row(
                t,
                distinct,
                floor_bytes / bandwidth * 1e6,
                graph_s * 1e6,
                eager_s * 1e6,
                reference_s * 1e6,
                routing_s * 1e6,
                err,
            )
        )
    return rows


# Above this many (token, expert) rows an expert, `--tune` also searches each GEMM's launch
# alone (`candidates()` takes its prefill list there too).
PREFILL_ROWS_PER_EXPERT = 64


def tune_shape(
    shape: LayerShape,
    tokens: Sequence[int],
    layers: list[Layer],
    reps: int,
    extra: Sequence[MoEKernelConfig] = (),
    search: bool = True,
) -> None:
    """Time every candidate config per token count (as a graph); print the table rows. The
    engine's config now and the `extra` ones are timed first, for comparison (alone without
    `search`)."""
    bias = torch.randn(shape.experts, device=layers[0].w13.device) * 0.1
    best_rows: list[tuple[int, MoEKernelConfig, float]] = []
    for t in tokens:
        step = make_step(shape, t, layers, bias, seed=t)
        outs: list[torch.Tensor] = []
        best: tuple[float, MoEKernelConfig] | None = None
        best_by_kind: dict[bool, float] = {}  # the fastest without and with TMA loads

        def layer_seconds(
            cfg: MoEKernelConfig, step: Step = step, outs: list[torch.Tensor] = outs
        ) -> float:
            """One layer's grouped path on `cfg`, as a graph."""
            return time_graph(partial(step.fused, outs, cfg, "grouped"), reps) / len(layers)

        # The engine's config now (its table's row, else `default_config`), for the gain.
        for label, cfg in [("the table's", table_config(shape, t, layers))] + [
            ("given", c) for c in extra
        ]:
            try:
                seconds = layer_seconds(cfg)
            except Exception as exc:  # a config the compiler or the device refuses
                print(f"  T={t}: {label} {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            print(f"  T={t}: {label} {seconds * 1e6:.1f} µs with {cfg}", file=sys.stderr)
        if not search:
            continue
        for cfg in candidates(t * shape.pairs / shape.stacked):
            if cfg.block_m > 16 and t * shape.pairs < cfg.block_m:
                continue  # every block mostly padding
            try:
                seconds = layer_seconds(cfg)
            except Exception as exc:  # a config the compiler or the device refuses
                print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            if best is None or seconds < best[0]:
                best = (seconds, cfg)
            best_by_kind[cfg.tma] = min(seconds, best_by_kind.get(cfg.tma, seconds))
        if len(best_by_kind) == 2:
            print(
                f"  T={t}: pointer loads {best_by_kind[False] * 1e6:.1f} µs, TMA "
                f"{best_by_kind[True] * 1e6:.1f} µs",
                file=sys.stderr,
            )
        if best is not None and t * shape.pairs / shape.stacked > PREFILL_ROWS_PER_EXPERT:
            # A prefill's GEMMs are searched apart from there: the down's one accumulator
            # takes tiles the gate-up's two cannot (128 x 256 ran the down 13-26% faster on
            # Qwen3-30B-A3B and Moonlight at 8,192-16,384 tokens).
            cfg = best[1]
            for which in ("down", "gate_up"):
                base_us, best_us, cfg = refine_gemm(step, shape, cfg, reps, which)
                print(f"  T={t} {which} alone: {base_us:.1f} -> {best_us:.1f} µs", file=sys.stderr)
            best = (layer_seconds(cfg), cfg)
        if best is not None:
            print(f"  T={t}: {best[0] * 1e6:.1f} µs with {best[1]}", file=sys.stderr)
            best_rows.append((t, best[1], best[0]))
    if not search:
        return
    dtype = str(layers[0].w13.dtype).removeprefix("torch.")
    key = (shape.stacked, shape.hidden, shape.intermediate, shape.pairs, dtype)
    name = device_name()
    print(f"    # {shape.name}, tuned on {name} by `python -m bench.moe_kernel --tune`")
    print(f"    {key}: (")
    for t, cfg, seconds in best_rows:
        print(f"        ({t}, {cfg!r}),  # {seconds * 1e6:.1f} µs")
    print("    ),")


def kernel_tiles(text: str) -> MoEKernelConfig:
    """BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,WARPS,STAGES[,tma]: one grouped-GEMM config."""
    *numbers, last = text.split(",")
    try:
        tma = last == "tma"
        values = [int(v) for v in (numbers if tma else [*numbers, last])]
        if len(values) != 6:
            raise ValueError
        m, n, k, group_m, warps, stages = values
        return MoEKernelConfig(m, n, k, group_m, warps, stages, tma)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,WARPS,STAGES[,tma] like 64,128,32,8,8,3, "
            f"got {text!r}"
        ) from e


def small_tiles(text: str) -> SmallBatchTiles:
    """GATE_UP_N,GATE_UP_K,DOWN_N,DOWN_K,WARPS[,DOT_STAGES[,DOWN_DOT_STAGES]]: DOT_STAGES > 0
    puts the gate-up products on the tensor cores with that many pipeline stages,
    DOWN_DOT_STAGES > 0 the down products."""
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) not in (5, 6, 7):
            raise ValueError
        gate_up_n, gate_up_k, down_n, down_k, num_warps = values[:5]
        stages = values[5] if len(values) > 5 else 0
        down_stages = values[6] if len(values) > 6 else 0
        return SmallBatchTiles(
            gate_up_n,
            gate_up_k,
            down_n,
            down_k,
            num_warps,
            gate_up_dot=stages > 0,
            gate_up_stages=stages if stages > 0 else 4,
            down_dot=down_stages > 0,
            down_stages=down_stages if down_stages > 0 else 3,
        )
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            "expected GATE_UP_N,GATE_UP_K,DOWN_N,DOWN_K,WARPS[,DOT_STAGES[,DOWN_DOT_STAGES]] like "
            f"16,256,8,256,4 or 64,128,8,256,4,4 or 16,256,16,256,4,0,3, got {text!r}"
            + (f": {e}" if str(e) else "")
        ) from None


@dataclass(frozen=True)
class GemmInputs:
    """One layer's inputs to the grouped path's launches, aligned for `config`."""

    x: torch.Tensor
    layer: Layer
    ids: torch.Tensor
    aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    act: torch.Tensor
    y: torch.Tensor


def gemm_inputs(step: Step, shape: LayerShape, config: MoEKernelConfig) -> list[GemmInputs]:
    out = []
    for layer, x, (_, ids) in zip(step.layers, step.xs, step.routed, strict=True):
        ids = ids.contiguous()
        aligned = align_block_size(ids, shape.stacked, config.block_m)
        act_rows = aligned[0].numel() if config.tma else ids.numel()
        act = x.new_empty(act_rows, shape.intermediate)
        out.append(GemmInputs(x, layer, ids, aligned, act, x.new_empty(ids.numel(), shape.hidden)))
    return out


def run_gemm(inputs: list[GemmInputs], shape: LayerShape, cfg: MoEKernelConfig, which: str) -> None:
    """Every layer's "align", "gate_up" or "down" launch(es) at `cfg`."""
    for g in inputs:
        if which == "align":
            align_block_size(g.ids, shape.stacked, cfg.block_m)
        elif which == "gate_up":
            _grouped_gemm(g.x, g.layer.w13, g.act, g.aligned, shape.pairs, True, cfg, g.ids.numel())
        else:
            _grouped_gemm(g.act, g.layer.w2, g.y, g.aligned, shape.pairs, False, cfg, g.ids.numel())


def gemm_floors_us(step: Step, shape: LayerShape, bandwidth: float) -> tuple[float, float]:
    """The gate-up and down GEMMs' floors: the distinct experts' weights over the bandwidth."""
    distinct = statistics.mean(ids.unique().numel() for _, ids in step.routed)
    size = step.layers[0].w13.dtype.itemsize * shape.hidden * shape.intermediate * distinct
    return 2 * size / bandwidth * 1e6, size / bandwidth * 1e6


def split_times(
    shape: LayerShape, tokens: Sequence[int], layers: list[Layer], bandwidth: float, reps: int
) -> None:
    """The grouped path's launches timed apart at the table's config (`kernel_config`): the
    align, the gate-up GEMM and the down GEMM, each GEMM against its weights' floor."""
    bias = torch.randn(shape.experts, device=layers[0].w13.device) * 0.1
    print(
        "| tokens | config | align µs | gate-up µs | floor µs | x floor | down µs | floor µs "
        "| x floor |\n| ---: | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for t in tokens:
        step = make_step(shape, t, layers, bias, seed=t)
        cfg = table_config(shape, t, layers)
        inputs = gemm_inputs(step, shape, cfg)
        n = len(layers)
        us = {
            which: time_graph(partial(run_gemm, inputs, shape, cfg, which), reps) / n * 1e6
            for which in ("align", "gate_up", "down")
        }
        gate_floor, down_floor = gemm_floors_us(step, shape, bandwidth)
        print(
            f"| {t} | {cfg!r} | {us['align']:.1f} | {us['gate_up']:.1f} | {gate_floor:.1f} "
            f"| {us['gate_up'] / gate_floor:.2f} | {us['down']:.1f} | {down_floor:.1f} "
            f"| {us['down'] / down_floor:.2f} |",
            flush=True,
        )


def gemm_candidates(base: MoEKernelConfig, which: str) -> list[MoEKernelConfig]:
    """`base` with one GEMM's launch varied (block_n, block_k, warps, stages; block_m, group_m
    and tma kept: the alignment and the activation's layout stay): for "down" as `base.down`,
    for "gate_up" as the top level (the down GEMM keeping its launch)."""
    down = base.down_config
    out = []
    for block_n in (64, 128, 256):
        for block_k in (64, 128):
            for warps in (4, 8):
                for stages in (3, 4, 5):
                    if which == "down":
                        tiles = replace(down, block_n=block_n, block_k=block_k,
                                        num_warps=warps, num_stages=stages)  # fmt: skip
                        out.append(replace(base, down=tiles))
                    else:
                        out.append(replace(base, block_n=block_n, block_k=block_k,
                                           num_warps=warps, num_stages=stages,
                                           down=replace(down, down=None)))  # fmt: skip
    return out


def refine_gemm(
    step: Step, shape: LayerShape, base: MoEKernelConfig, reps: int, which: str
) -> tuple[float, float, MoEKernelConfig]:
    """One GEMM's launch ("down" or "gate_up") searched alone from `base`
    (`gemm_candidates`): `(base µs, best µs, best config)`, µs per layer."""
    inputs = gemm_inputs(step, shape, base)
    n = len(step.layers)
    base_us = time_graph(partial(run_gemm, inputs, shape, base, which), reps) / n * 1e6
    best = (base_us, base)
    for cfg in gemm_candidates(base, which):
        try:
            us = time_graph(partial(run_gemm, inputs, shape, cfg, which), reps) / n * 1e6
        except Exception as exc:  # a launch the compiler or the device refuses
            print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        if us < best[0]:
            best = (us, cfg)
    return base_us, best[0], best[1]


def tune_gemm(
    shape: LayerShape, tokens: Sequence[int], layers: list[Layer], reps: int, which: str
) -> None:
    """One GEMM's launches (`gemm_candidates`) timed alone from the table's config; prints
    the best for each token count as a table row."""
    bias = torch.randn(shape.experts, device=layers[0].w13.device) * 0.1
    for t in tokens:
        step = make_step(shape, t, layers, bias, seed=t)
        base = table_config(shape, t, layers)
        base_us, best_us, best = refine_gemm(step, shape, base, reps, which)
        print(f"  T={t} {which}: table's {base_us:.1f} µs, best {best_us:.1f} µs")
        print(f"        ({t}, {best!r}),")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", action="append", choices=sorted(SHAPES), help="repeatable; default: both"
    )
    parser.add_argument("--tokens", type=int_list, default=DEFAULT_TOKENS)
    parser.add_argument("--layers", type=int, default=4, help="weight copies cycled per call")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--tune", action="store_true", help="print block-size table rows")
    parser.add_argument(
        "--config",
        type=kernel_tiles,
        action="append",
        default=[],
        help="time BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,WARPS,STAGES[,tma] on the grouped path beside "
        "the engine's config (repeatable); with --tune, before its search",
    )
    parser.add_argument(
        "--split-times",
        action="store_true",
        help="the grouped path's align, gate-up and down launches timed apart, with floors",
    )
    parser.add_argument(
        "--tune-gemm",
        choices=("gate_up", "down"),
        help="vary one GEMM's launch from the table's config, timed alone",
    )
    parser.add_argument(
        "--path",
        default="auto",
        choices=("auto", "small", "small-routed", "grouped", "routed"),
        help="auto: fused_moe's choice (small-batch path up to SMALL_BATCH_PAIRS pairs)",
    )
    parser.add_argument(
        "--small-tiles",
        type=small_tiles,
        action="append",
        help="the small path's GATE_UP_N,GATE_UP_K,DOWN_N,DOWN_K,WARPS (powers of two), and "
        "DOT_STAGES (> 0: the gate-up products on the tensor cores, pipelined that deep), "
        "DOWN_DOT_STAGES (the same for the down products); "
        "repeat it to time several on the same layers (default: the engine's, default_tiles)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: a smoke run of this script under TRITON_INTERPRET=1 (no meaningful times)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; the kernels are Triton on CUDA (--device cpu smokes)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu needs TRITON_INTERPRET=1 in the environment")
    if args.layers < 1 or args.reps < 1:
        parser.error("--layers and --reps must be >= 1")
    if args.config and (args.split_times or args.tune_gemm):
        parser.error("--config is timed alone or with --tune, not with --split-times/--tune-gemm")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    bandwidth = copy_bandwidth() if args.device == "cuda" else 1e12
    print(
        f"{device_name()}, torch {torch.__version__}; device-to-device copy "
        f"{bandwidth / 1e12:.2f} TB/s (read + write); {args.dtype}; {args.layers} weight "
        f"copies cycled; median of {args.reps}."
    )
    for name in args.shape or DEFAULT_SHAPES:
        shape = SHAPES[name]
        if args.path == "routed" and (shape.grouped or shape.shared):
            print(
                f"\n## {name}: skipped (--path routed folds softmax routing; it routes by groups)"
            )
            continue
        layers = make_layers(shape, args.layers, device, dtype)
        print(
            f"\n## {name}: {shape.experts} experts"
            + (f" and {shape.shared} shared (fused)" if shape.shared else "")
            + f", top-{shape.top_k}, hidden {shape.hidden}, "
            f"expert intermediate {shape.intermediate} "
            f"({shape.expert_bytes(dtype) / 2**20:.1f} MiB per expert); path {args.path}" + "\n"
        )
        if args.tune or args.config:
            tune_shape(shape, args.tokens, layers, args.reps, args.config, search=args.tune)
        elif args.split_times:
            split_times(shape, args.tokens, layers, bandwidth, args.reps)
        elif args.tune_gemm:
            tune_gemm(shape, args.tokens, layers, args.reps, args.tune_gemm)
        else:
            for tiles in args.small_tiles or [None]:
                if args.path != "grouped":
                    print(f"### {tiles or 'the default tiles (fused_moe_small.default_tiles)'}\n")
                print(HEADER)
                rows = bench_shape(
                    shape, args.tokens, layers, bandwidth, args.reps, args.path, tiles
                )
                for row in rows:
                    print(row.line(), flush=True)
                print()
        del layers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(
        "\nfloor: (distinct experts touched x 3 H I + 2 T H) elements' bytes over the copy "
        "bandwidth above. max rel err: the fused output against the torch experts in float32 "
        "on the same weights, over the largest reference value."
    )


if __name__ == "__main__":
    main()
