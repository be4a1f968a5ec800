"""The fused MoE Triton kernels against the pure-torch experts, under Triton's interpreter.

Tolerances: float32 runs the dots exactly (`input_precision="ieee"`), so the kernel matches the
reference to rounding: `rtol = atol = 1e-5` on outputs of order 1. float16 keeps the
intermediate activation and the per-expert outputs in float16 like the reference does, but
rounds at different points (float32 accumulation of the SiLU product and of the combine):
`rtol = atol = 2e-2` against the float32 reference on the same float16 weights. (bfloat16 is
checked on the GPU by `bench/check_moe_gpu.py`: the interpreter's dot does not support it.)

The small-batch path (`engine.kernels.fused_moe_small`) rounds where the grouped path does, so
against it float32 agrees to `1e-5` and float16 to about two float16 steps (`2e-3`: a float32
sum in another order can round the activation or a pair's output the other way).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import cast

import pytest
import torch

# Triton picks the interpreter when it is imported: tests/conftest.py sets TRITON_INTERPRET for
# the whole session on hosts without CUDA. These cases run on CPU tensors; on a GPU host
# `python -m bench.check_moe_gpu` checks the kernels compiled, at full model shapes.
pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

import triton
import triton.language as tl

from engine.config import EngineConfig
from engine.engine import Engine
from engine.eplb import initial_placement
from engine.kernels import fused_moe as fused_moe_module
from engine.kernels import fused_moe_small, moe_routing
from engine.kernels.fused_moe import (
    FOLDED_OFFSETS_MAX_CHUNKS,
    PARALLEL_CHUNK,
    SINGLE_PROGRAM_PAIRS,
    SMALL_BATCH_PAIRS,
    align_block_size,
    fused_moe,
    fused_moe_grouped_routed,
    fused_moe_routed,
    route_and_count,
)
from engine.kernels.fused_moe_configs import (
    TUNED,
    MoEKernelConfig,
    default_config,
    kernel_config,
)
from engine.kernels.fused_moe_small import (
    ROUTE_GROUPED,
    ROUTE_SOFTMAX,
    Routing,
    SmallBatchTiles,
    small_batch_moe,
    small_batch_moe_routed,
)
from engine.kernels.moe_routing import grouped_topk, softmax_topk
from engine.layers.ep_moe import ExpertParallelExperts
from engine.layers.moe import (
    FusedExperts,
    TorchMoEBackend,
    TritonMoEBackend,
    moe_backend_for,
    select_experts,
    select_experts_grouped,
    set_moe_backend,
)
from engine.parallel import ParallelConfig
from engine.sampling import SamplingParams
from tests.engine.reference import MAX_NEW_TOKENS, reference

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter cases; bench.check_moe_gpu on GPUs"
)

# The model-level cases' decode steps (each launch's programs run one by one in the interpreter).
STEPS = MAX_NEW_TOKENS // 2
GREEDY = SamplingParams(temperature=0, max_new_tokens=STEPS, ignore_eos=True)
TINY = MoEKernelConfig(block_m=16, block_n=16, block_k=16)


def make_experts(num_experts: int, hidden: int, inter: int, seed: int) -> FusedExperts:
    g = torch.Generator().manual_seed(seed)
    experts = FusedExperts(num_experts, hidden, inter)
    with torch.no_grad():
        # Scaled so that outputs are of order 1 and the tolerances above mean what they say.
        experts.w13.copy_(torch.randn(experts.w13.shape, generator=g) / hidden**0.5)
        experts.w2.copy_(torch.randn(experts.w2.shape, generator=g) / inter**0.5)
    return experts


def route(kind: str, tokens: int, num_experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(tokens, num_experts, generator=g)
    if kind == "qwen":
        return select_experts(logits, top_k, renormalize=True)
    # DeepSeek: 4 groups, the best 2 eligible, a correction bias; float32 weights, scaled.
    bias = torch.randn(num_experts, generator=g) * 0.1
    return select_experts_grouped(logits, bias, top_k, 4, 2, True, 2.5)


def check(tokens, num_experts, top_k, routing, dtype, hidden=40, inter=24, cfg=TINY, seed=0):
    """The grouped-GEMM path (whatever the token count) against the torch experts."""
    experts = make_experts(num_experts, hidden, inter, seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 2))
    weights, ids = route(routing, tokens, num_experts, top_k, seed)
    w13, w2 = experts.w13.detach().to(dtype), experts.w2.detach().to(dtype)
    got = fused_moe(x.to(dtype), w13, w2, weights, ids, cfg, small_batch=False)
    # The reference in float32 on the same (rounded) weights and inputs.
    want = TorchMoEBackend().experts(x.to(dtype).float(), w13.float(), w2.float(), weights, ids)
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("routing", ["qwen", "deepseek"])
@pytest.mark.parametrize("top_k", [1, 3, 8])
@pytest.mark.parametrize("tokens", [0, 1, 3, 19])
def test_fused_moe_matches_torch_float32(tokens, top_k, routing):
    # 16 experts: with 1 or 3 tokens most of them get no pair.
    check(tokens, 16, top_k, routing, torch.float32)


def test_fused_moe_chunked_align(monkeypatch):
    """The chunked align kernels (prefill-sized steps) feed the GEMMs alike; ids with
    experts that get no pair and strays outside [0, E) included."""
    monkeypatch.setattr(fused_moe_module, "SINGLE_PROGRAM_PAIRS", 0)
    check(45, 16, 6, "qwen", torch.float32)
    test_fused_moe_skips_ids_outside_the_experts(small_batch=False)


@pytest.mark.parametrize("tokens,top_k", [(1, 8), (19, 2), (19, 8)])
def test_fused_moe_matches_torch_float16(tokens, top_k):
    check(tokens, 16, top_k, "qwen", torch.float16)


@pytest.mark.parametrize(
    "cfg",
    [
        MoEKernelConfig(16, 32, 32, group_m=4),  # tiles wider than I and H's tail
        MoEKernelConfig(32, 16, 16, group_m=2),  # taller blocks: more padding rows
        # The tensor-memory-accelerator kernel: tiles past an expert's columns read the next
        # expert's rows (never stored), K's tail zero-filled, the activation in sorted order.
        MoEKernelConfig(16, 32, 32, group_m=4, tma=True),
        MoEKernelConfig(32, 16, 16, group_m=2, tma=True),
        # The down GEMM on its own launch (same rows, other columns, K tiles and warps).
        MoEKernelConfig(16, 16, 16, down=MoEKernelConfig(16, 32, 32, group_m=4, num_warps=8)),
        MoEKernelConfig(16, 16, 16, tma=True, down=MoEKernelConfig(16, 64, 16, tma=True)),
        # The prefill rows' form: a down tile twice the gate-up's width, past H's end here.
        MoEKernelConfig(16, 64, 16, tma=True, down=MoEKernelConfig(16, 128, 16, tma=True)),
    ],
)
def test_fused_moe_tile_shapes(cfg):
    check(21, 8, 4, "qwen", torch.float32, hidden=72, inter=40, cfg=cfg)


def test_down_config_shares_the_alignment_and_layout():
    """A down config must keep block_m (the pairs' alignment) and tma (the activation's layout
    between the GEMMs), and cannot nest."""
    inner = MoEKernelConfig(16, 32, 32)
    assert MoEKernelConfig(16, 16, 16, down=inner).down_config is inner
    assert MoEKernelConfig(16, 16, 16).down_config == MoEKernelConfig(16, 16, 16)
    for bad in (
        MoEKernelConfig(32, 32, 32),
        MoEKernelConfig(16, 32, 32, tma=True),
        MoEKernelConfig(16, 32, 32, down=inner),
    ):
        with pytest.raises(ValueError, match="down GEMM"):
            MoEKernelConfig(16, 16, 16, down=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,top_k", [(1, 8), (19, 3)])
def test_fused_moe_tma_kernel(tokens, top_k, dtype):
    """The TMA kernel on DeepSeek's routing (experts with no pair, a float32 weight dtype)
    and its chunked align."""
    check(tokens, 16, top_k, "deepseek", dtype, cfg=MoEKernelConfig(16, 16, 16, tma=True))


@pytest.mark.parametrize("small_batch", [False, True])
def test_fused_moe_skips_ids_outside_the_experts(small_batch):
    """Expert parallelism marks pairs another rank computes with an id outside [0, E)."""
    experts = make_experts(8, 32, 16, 3)
    x = torch.randn(5, 32)
    weights, ids = select_experts(torch.randn(5, 8), 3, renormalize=False)
    masked = ids.clone()
    masked[::2, 0] = -1
    masked[1, 2] = 8
    keep = (masked >= 0) & (masked < 8)
    w13, w2 = experts.w13.detach(), experts.w2.detach()
    got = fused_moe(x, w13, w2, weights, masked, TINY, small_batch=small_batch)
    # The reference on the kept pairs only: a zero weight on the dropped ones.
    want = TorchMoEBackend().experts(x, w13, w2, weights * keep, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# Tiles narrower than the test's sizes, none dividing them: H = 44 and I = 24 take partial
# column blocks (16 of I, 8 of H) and several reduction steps with a partial last one (16).
SMALL_TILES = SmallBatchTiles(gate_up_n=16, gate_up_k=16, down_n=8, down_k=16)


def check_small(tokens, top_k, dtype, num_experts=16, hidden=44, inter=24, ids=None, seed=0):
    """The small-batch path against the torch experts and against the grouped path (module
    docstring: tolerances). `ids` overrides the routing's choices (weights stay)."""
    experts = make_experts(num_experts, hidden, inter, seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    weights, routed = route("qwen", tokens, num_experts, top_k, seed)
    ids = routed if ids is None else ids
    w13, w2 = experts.w13.detach().to(dtype), experts.w2.detach().to(dtype)
    got = small_batch_moe(x, w13, w2, weights, ids, SMALL_TILES)
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    keep = (ids >= 0) & (ids < num_experts)
    want = TorchMoEBackend().experts(x.float(), w13.float(), w2.float(), weights * keep, ids)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    grouped = fused_moe(x, w13, w2, weights, ids, TINY, small_batch=False)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), grouped.float(), rtol=tol, atol=tol)
    # The default tiles, through fused_moe's choice of path (one K step of H and I here).
    if tokens * top_k <= SMALL_BATCH_PAIRS:
        torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids), got, rtol=tol, atol=tol)


@pytest.mark.parametrize("top_k", [1, 2, 6, 8])
@pytest.mark.parametrize("tokens", [0, 1, 2, 3, "threshold"])
def test_small_batch_matches_torch_and_grouped_float32(tokens, top_k):
    if tokens == "threshold":
        tokens = SMALL_BATCH_PAIRS // top_k  # the most that fused_moe sends this way
    check_small(tokens, top_k, torch.float32)


@pytest.mark.parametrize("tokens,top_k", [(1, 8), (2, 6), (3, 2), (SMALL_BATCH_PAIRS // 8, 8)])
def test_small_batch_matches_torch_and_grouped_float16(tokens, top_k):
    check_small(tokens, top_k, torch.float16)


def random_layer(
    experts: int, hidden: int, inter: int, tokens: int, dtype: torch.dtype, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random expert weights (w13, w2, scaled by their fan-in), tokens and router logits."""
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    return w13, w2, x, torch.randn(tokens, experts, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,top_k,inter", [(1, 8, 40), (3, 2, 24)])
def test_tile_loads_change_nothing(tokens, top_k, inter, dtype, monkeypatch):
    """`fused_moe_small.TILE_LOADS_GATE_UP` and `TILE_LOADS_DOWN`, each and both (the gate-up's
    token row and the preloading down's activations loaded in their weight tile's shape): the
    same routing, weights and output bit for bit, the K steps ragged (40 in steps of 16) and
    narrower than a step (24 in one of 32)."""
    g = torch.Generator().manual_seed(tokens * 5 + inter)
    experts, hidden = 12, 36
    w13, w2, x, logits = random_layer(experts, hidden, inter, tokens, dtype, g)
    step = 16 if inter == 40 else 32
    tiles = SmallBatchTiles(16, 16, 8, step, 4, down_preload=True)
    got = {}
    for gate_up, down in itertools.product((False, True), repeat=2):
        monkeypatch.setattr(fused_moe_small, "TILE_LOADS_GATE_UP", tl.constexpr(gate_up))
        monkeypatch.setattr(fused_moe_small, "TILE_LOADS_DOWN", tl.constexpr(down))
        got[gate_up, down] = small_batch_moe_routed(x, w13, w2, logits, top_k, True, tiles)
    for on in ((False, True), (True, False), (True, True)):
        for a, b in zip(got[on], got[False, False], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("one_sum", [False, True])
@pytest.mark.parametrize("tokens,top_k,dtype", [(1, 8, torch.float32), (3, 6, torch.float16)])
def test_small_batch_combine_in_one_sum(tokens, top_k, dtype, one_sum, monkeypatch):
    """`fused_moe_small.COMBINE_ONE_SUM` each way (the down's weighted pairs summed in one
    reduction, or pair by pair): the reference and the grouped path within the same
    tolerances."""
    monkeypatch.setattr(fused_moe_small, "COMBINE_ONE_SUM", tl.constexpr(one_sum))
    check_small(tokens, top_k, dtype)


def test_small_batch_shared_experts_and_ids_outside():
    """Tokens that share experts (each reads them itself), and expert parallelism's -1 (and an
    id past E) on some pairs, a whole token's pairs included."""
    ids = torch.tensor([[3, 5, 0, -1], [5, 3, 7, 1], [-1, -1, -1, -1], [7, -1, 16, 3]])
    check_small(4, 4, torch.float32, num_experts=16, ids=ids)
    check_small(4, 4, torch.float16, num_experts=16, ids=ids)


# Renormalized and not, each on shapes of its own (the 3-token top-6 of 60 is both): under the
# interpreter each case costs seconds.
@pytest.mark.parametrize(
    "tokens,num_experts,top_k,renormalize",
    [(0, 16, 2, False), (1, 16, 8, True), (1, 12, 1, False), (3, 60, 6, True), (3, 60, 6, False),
     (SMALL_BATCH_PAIRS // 2, 16, 2, True)],
)  # fmt: skip
@pytest.mark.parametrize("warp", [False, True])
def test_small_batch_routing_folded_into_gate_up(
    tokens, num_experts, top_k, renormalize, warp, monkeypatch
):
    """The gate-up kernel's routing makes softmax_topk's choices and weights exactly (the same
    code; `warp`, `moe_routing.WARP_ROUTE`: the choices, the weights to float32 rounding), and
    the experts' output is the small path's on those choices, bit for bit."""
    monkeypatch.setattr(moe_routing, "WARP_ROUTE", tl.constexpr(warp))
    experts = make_experts(num_experts, 44, 24, tokens)
    g = torch.Generator().manual_seed(tokens + 7)
    x = torch.randn(tokens, 44, generator=g)
    for dtype in (torch.float32, torch.float16):
        logits = torch.randn(tokens, num_experts, generator=g).to(dtype)
        if tokens > 1:
            logits[1] = logits[1, 0]  # all tied: the lowest ids win
        w13, w2 = experts.w13.detach().to(dtype), experts.w2.detach().to(dtype)
        out, weights, ids = small_batch_moe_routed(
            x.to(dtype), w13, w2, logits, top_k, renormalize, SMALL_TILES
        )
        want_w, want_ids = softmax_topk(logits, top_k, renormalize)
        assert weights.dtype == dtype and torch.equal(ids, want_ids)
        if warp:
            torch.testing.assert_close(weights, want_w, rtol=1e-6 if tokens else 0, atol=0)
            want_w = weights  # the output on the kernel's own weights, below
        else:
            assert torch.equal(weights, want_w)
        if tokens > 1:
            assert ids[1].tolist() == list(range(top_k))
        # Against the reference routing, where nothing ties (torch breaks ties its own way).
        ref_w, ref_ids = select_experts(logits, top_k, renormalize)
        untied = [t for t in range(tokens) if t != 1]
        assert torch.equal(ids[untied], ref_ids[untied])
        torch.testing.assert_close(weights, ref_w, rtol=1e-3, atol=1e-6)
        want = small_batch_moe(x.to(dtype), w13, w2, want_w, want_ids, SMALL_TILES)
        assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,top_k,inter", [(1, 8, 24), (2, 3, 40), (1, 1, 72)])
def test_small_path_gate_up_on_the_tensor_cores(tokens, top_k, inter, dtype):
    """`SmallBatchTiles.gate_up_dot` (the token as row 0 of a 16-row tile, the products on the
    tensor cores) makes the same routing choices and weights, and the output agrees with the
    CUDA-core loop up to float32 summation order (float32: exact products, 1e-5; float16:
    the same rounding of each pair's activation, 2e-3), with routing in the kernel and with
    the ids given (an expert-parallel -1 among them)."""
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    experts, hidden = 12, 44
    w13, w2, x, logits = random_layer(experts, hidden, inter, tokens, dtype, g)
    dot = dataclasses.replace(SMALL_TILES, gate_up_dot=True, gate_up_stages=2)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    want = small_batch_moe_routed(x, w13, w2, logits, top_k, True, SMALL_TILES)
    got = small_batch_moe_routed(x, w13, w2, logits, top_k, True, dot)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    ids = want[2].clone()
    ids[0, 0] = -1  # another rank's pair
    plain = small_batch_moe(x, w13, w2, want[1], ids, SMALL_TILES)
    torch.testing.assert_close(
        small_batch_moe(x, w13, w2, want[1], ids, dot), plain, rtol=tol, atol=tol
    )
    with pytest.raises(ValueError, match="gate_up_dot needs gate_up_n"):
        dataclasses.replace(SMALL_TILES, gate_up_n=8, gate_up_dot=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,top_k,inter", [(1, 8, 40), (2, 3, 24)])
def test_small_path_down_on_the_tensor_cores(tokens, top_k, inter, dtype):
    """`SmallBatchTiles.down_dot` (each pair's activation as row 0 of a 16-row tile against its
    expert's w2 tiles, on the tensor cores): the output agrees with the CUDA-core down up to
    float32 summation order within each pair's product (the same per-pair rounding and
    weighted sum in pair order), with the K step ragged (40 in steps of 16) and an
    expert-parallel -1 among the ids."""
    g = torch.Generator().manual_seed(tokens * 7 + top_k)
    experts, hidden = 10, 36
    w13, w2, x, logits = random_layer(experts, hidden, inter, tokens, dtype, g)
    tiles = SmallBatchTiles(16, 16, 16, 16, 4)
    dot = dataclasses.replace(tiles, down_dot=True, down_stages=2)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    want = small_batch_moe_routed(x, w13, w2, logits, top_k, True, tiles)
    got = small_batch_moe_routed(x, w13, w2, logits, top_k, True, dot)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    ids = want[2].clone()
    ids[-1, 0] = -1  # another rank's pair
    torch.testing.assert_close(
        small_batch_moe(x, w13, w2, want[1], ids, dot),
        small_batch_moe(x, w13, w2, want[1], ids, tiles),
        rtol=tol,
        atol=tol,
    )
    with pytest.raises(ValueError, match="down_dot needs down_n"):
        dataclasses.replace(tiles, down_n=8, down_dot=True)


# Each dtype on the top-8 shape, the others on one dtype each.
@pytest.mark.parametrize(
    "tokens,top_k,inter,grouped,dtype",
    [(1, 8, 40, False, torch.float32), (1, 8, 40, False, torch.float16),
     (3, 2, 24, False, torch.float32), (1, 6, 40, True, torch.float16)],
)  # fmt: skip
@pytest.mark.parametrize("warp", [False, True])
def test_small_path_down_preloaded_is_bit_for_bit(
    tokens, top_k, inter, grouped, dtype, warp, monkeypatch
):
    """`SmallBatchTiles.down_preload` (the down launch routes again and loads its first K
    step before its wait): the same choices, weights and output bit for bit as the down that
    reads the gate-up's ids, with softmax and grouped routing (two fused shared experts, the
    weights in float32), the K step ragged (40 in steps of 16) and narrower than a step (24 in
    one of 32); `warp`: both kernels routing inside a warp (`moe_routing.WARP_ROUTE`) and
    both downs summing their pairs in one reduction (`fused_moe_small.COMBINE_ONE_SUM`)."""
    monkeypatch.setattr(moe_routing, "WARP_ROUTE", tl.constexpr(warp))
    monkeypatch.setattr(fused_moe_small, "COMBINE_ONE_SUM", tl.constexpr(warp))
    from engine.kernels.fused_moe_small import small_batch_moe_grouped_routed

    g = torch.Generator().manual_seed(tokens * 11 + top_k)
    routed_experts, shared, hidden = 12, 2 if grouped else 0, 36
    experts = routed_experts + shared
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(tokens, routed_experts, generator=g)
    bias = torch.randn(routed_experts, generator=g) * 0.1
    step = 16 if inter == 40 else 32
    tiles = SmallBatchTiles(16, 16, 8, step, 4)
    preload = dataclasses.replace(tiles, down_preload=True)
    for chosen in (tiles, preload):
        if grouped:
            # Four groups, two chosen; with `warp` one group (every group eligible).
            groups = (1, 1) if warp else (4, 2)
            got = small_batch_moe_grouped_routed(
                x, w13, w2, logits, bias, top_k, *groups, True, 2.5, shared, chosen
            )
        else:
            got = small_batch_moe_routed(x, w13, w2, logits.to(dtype), top_k, True, chosen)
        if chosen is tiles:
            want = got
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="down_preload is for the CUDA-core down"):
        SmallBatchTiles(16, 16, 16, 16, 4, down_dot=True, down_preload=True)


def test_the_small_path_takes_the_tensor_cores_for_wide_16_bit_experts(monkeypatch):
    """Without tiles given, 16-bit experts of `DOT_MIN_INTER` columns or more take
    `DOT_TILES` (measured faster for Moonlight's 1,408 on an H100), narrower ones (Qwen3-30B-
    A3B's 768) and float32 weights the CUDA-core tiles, with the down preloaded
    (`ROUTED_TILES`) for 16-bit weights where the kernels route."""
    from engine.kernels import fused_moe_small

    assert fused_moe_small.default_tiles(1408, 2) is fused_moe_small.DOT_TILES
    assert fused_moe_small.default_tiles(1408, 2, routed=True) is fused_moe_small.DOT_TILES
    assert fused_moe_small.default_tiles(768, 2) is fused_moe_small.DEFAULT_TILES
    # Routing in the kernels: the down preloads (narrower 16-bit experts only).
    routed = fused_moe_small.default_tiles(768, 2, routed=True)
    assert routed is fused_moe_small.ROUTED_TILES and routed.down_preload
    assert fused_moe_small.default_tiles(2048, 4) is fused_moe_small.DEFAULT_TILES
    assert fused_moe_small.default_tiles(2048, 4, routed=True) is fused_moe_small.DEFAULT_TILES
    # A narrow intermediate here (the interpreter's time) with the threshold lowered to it:
    # a launch without tiles is the launch with DOT_TILES.
    monkeypatch.setattr(fused_moe_small, "DOT_MIN_INTER", 32)
    picked = []
    rule = fused_moe_small.default_tiles

    def recorded(inter: int, element_size: int, routed: bool = False) -> SmallBatchTiles:
        picked.append(rule(inter, element_size, routed))
        return picked[-1]

    monkeypatch.setattr(fused_moe_small, "default_tiles", recorded)
    g = torch.Generator().manual_seed(5)
    experts, hidden, inter = 6, 40, 32
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).half()
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).half()
    x = torch.randn(1, hidden, generator=g).half()
    logits = torch.randn(1, experts, generator=g).half()
    chosen = small_batch_moe_routed(x, w13, w2, logits, 2, True)
    dot = small_batch_moe_routed(x, w13, w2, logits, 2, True, fused_moe_small.DOT_TILES)
    assert picked == [fused_moe_small.DOT_TILES]  # asked once, for the launch without tiles
    assert all(torch.equal(a, b) for a, b in zip(chosen, dot, strict=True))


@pytest.mark.parametrize("small_batch", [None, False])
def test_fused_moe_routed_matches_routing_then_experts(small_batch):
    """`fused_moe_routed` (what TritonMoEBackend.routed_experts runs) on either path."""
    experts = make_experts(16, 40, 24, 11)
    g = torch.Generator().manual_seed(12)
    # Past SINGLE_PROGRAM_PAIRS pairs (40 x 4) the routing kernel counts the align's chunks.
    for tokens in (1, 3, SMALL_BATCH_PAIRS // 4 + 1, 40):
        x, logits = torch.randn(tokens, 40, generator=g), torch.randn(tokens, 16, generator=g)
        w13, w2 = experts.w13.detach(), experts.w2.detach()
        got = fused_moe_routed(x, w13, w2, logits, 4, True, small_batch=small_batch)
        weights, ids = select_experts(logits, 4, renormalize=True)
        want = TorchMoEBackend().experts(x, w13, w2, weights, ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="router logits"):
        fused_moe_routed(x, w13, w2, logits[:, :8], 4, True)


def test_fused_moe_takes_the_small_path_up_to_the_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(
        fused_moe_module, "small_batch_moe", lambda *args: calls.append(args[0].shape[0])
    )
    w13, w2 = torch.zeros(4, 16, 8), torch.zeros(4, 8, 8)
    for tokens in (SMALL_BATCH_PAIRS // 2, SMALL_BATCH_PAIRS // 2 + 1):
        weights, ids = torch.ones(tokens, 2), torch.zeros(tokens, 2, dtype=torch.int64)
        fused_moe(torch.zeros(tokens, 8), w13, w2, weights, ids)
    assert calls == [SMALL_BATCH_PAIRS // 2]


@pytest.mark.parametrize(
    "pairs,num_experts,block_m,parallel",
    [
        *(
            (pairs, e, block_m, parallel)
            for parallel in (False, True)
            for block_m in (16, 32)
            for pairs, e in ((1, 8), (8, 128), (200, 8), (333, 32))
        ),
        # Many chunks: the offsets kernel's prefix sums over tiles of 32 and 128 chunks.
        (128 * 20, 8, 16, True),
        (128 * 200, 67, 64, True),
    ],
)
def test_align_sorts_pairs_into_expert_blocks(pairs, num_experts, block_m, parallel):
    ids = torch.randint(0, num_experts, (pairs,), generator=torch.Generator().manual_seed(pairs))
    sorted_pairs, block_expert, num_rows = align_block_size(ids, num_experts, block_m, parallel)
    counts = torch.bincount(ids, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(num_rows) == int(padded.sum())
    # Sizes depend on the number of pairs only (graph capture).
    assert sorted_pairs.numel() == block_expert.numel() * block_m
    assert sorted_pairs.numel() >= int(num_rows)
    used = sorted_pairs[: int(num_rows)].view(-1, block_m)
    blocks = block_expert[: used.shape[0]]
    assert (block_expert[used.shape[0] :] == -1).all()
    # Each used block holds pairs of its own expert (or padding); experts run in order.
    for block, expert in zip(used.tolist(), blocks.tolist(), strict=True):
        real = [p for p in block if p < pairs]
        assert real, "a block in use holds at least one pair"
        assert all(int(ids[p]) == expert for p in real)
    assert blocks.tolist() == sorted(blocks.tolist())
    # Every pair appears exactly once.
    placed = sorted_pairs[sorted_pairs < pairs].tolist()
    assert sorted(placed) == list(range(pairs))


def align_reference(ids: torch.Tensor, num_experts: int, block_m: int):
    """What every align path returns, in pure torch: each expert's pairs in pair order, its run
    padded to whole blocks; padding rows hold N, blocks past the rows in use -1."""
    pairs = ids.numel()
    max_rows = pairs + min(pairs, num_experts) * (block_m - 1)
    max_blocks = -(-max_rows // block_m)
    sorted_pairs = torch.full((max_blocks * block_m,), pairs, dtype=torch.int32)
    block_expert = torch.full((max_blocks,), -1, dtype=torch.int32)
    row = 0
    for expert in range(num_experts):
        mine = torch.nonzero(ids == expert).flatten()
        sorted_pairs[row : row + mine.numel()] = mine.to(torch.int32)
        padded = -(-mine.numel() // block_m) * block_m
        block_expert[row // block_m : (row + padded) // block_m] = expert
        row += padded
    return sorted_pairs, block_expert, torch.tensor([row], dtype=torch.int32)


def align_ids(pairs: int, num_experts: int, seed: int) -> torch.Tensor:
    """Random choices with every third expert left without a pair and some ids outside [0, E)
    (negative and past the last expert, as expert parallelism marks them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts, (pairs,), generator=g)
    ids = torch.where(ids % 3 == 1, (ids + 1) % num_experts, ids)
    ids[::7] = -1
    ids[3::11] = num_experts
    ids[5::13] = num_experts + 5
    return ids


ALIGN_OUTPUTS = ("sorted_pairs", "block_expert", "num_rows")
# Every align path: one program, the three chunked kernels, the offsets folded into the scatter.
ALIGN_PATHS = {
    "single": {"parallel": False},
    "three": {"parallel": True, "fold_offsets": False},
    "folded": {"parallel": True, "fold_offsets": True},
}


# Every expert count up to 1,000 pairs; beyond (chunks past the single program's reach, seconds
# each under the interpreter) the fewest and most experts and one count not a power of two.
ALIGN_CASES = [(p, e) for p in (1, 127, 128, 129, 1000) for e in (8, 64, 66, 128, 256)] + [
    (2048, 66),
    (2048, 256),
    (7999, 8),
    (7999, 256),
]


@pytest.mark.parametrize(("pairs", "num_experts"), ALIGN_CASES)
def test_align_paths_match_the_reference(pairs, num_experts):
    """Bit for bit on every path: the same rows, pair order within each expert, the same
    padding (N) and -1 past the end; across block sizes (the largest exercising a run of many
    padding rows) and with tiles of the folded sums that hold some of the chunks only."""
    ids = align_ids(pairs, num_experts, seed=pairs * 1000 + num_experts)
    for block_m in (16, 32, 64, 128):
        want = align_reference(ids, num_experts, block_m)
        for path, choice in ALIGN_PATHS.items():
            if path == "single" and pairs > 2048:
                continue  # one program walks the chunks one by one: slow in the interpreter
            got = align_block_size(ids, num_experts, block_m, **choice)
            for name, g, w in zip(ALIGN_OUTPUTS, got, want, strict=True):
                assert torch.equal(g, w), f"{path} {name} at block_m={block_m}"


# (routing, tokens, routed experts, top-k, groups, best groups, shared experts): softmax at
# Qwen3-30B-A3B's top-8 and at top-6 (chunks of 96 pairs); grouped as Moonlight (top-6 and 2
# fused shared experts, one group) and DeepSeek-V3 (top-8 of 8 groups and 1 shared: chunks of
# 8 tokens, 72 pairs) and without shared experts; 17 and 33 tokens end in a part chunk.
ROUTE_COUNT_CASES = [
    ("softmax", 17, 64, 8, 1, 1, 0),
    ("softmax", 200, 128, 8, 1, 1, 0),
    ("softmax", 33, 60, 6, 1, 1, 0),
    ("grouped", 40, 64, 6, 1, 1, 2),
    ("grouped", 33, 64, 8, 8, 3, 1),
    ("grouped", 70, 24, 4, 3, 1, 0),
]


# Each routing on both dtypes, each case on one (alternating).
@pytest.mark.parametrize(
    ("case", "dtype"),
    [(c, (torch.float32, torch.float16)[i % 2]) for i, c in enumerate(ROUTE_COUNT_CASES)],
    ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else str(c).split(".")[-1],
)
def test_route_and_count_equals_routing_then_align(case, dtype):
    """Routing with the align's count in one launch (`route_and_count`, then its scatter, both
    fold choices): the routing kernels' choices and weights, and the reference's aligned rows,
    bit for bit."""
    kind, tokens, routed, top_k, groups, topk_groups, shared = case
    g = torch.Generator().manual_seed(tokens + routed)
    logits = torch.randn(tokens, routed, generator=g).to(dtype)
    bias = torch.randn(routed, generator=g) * 0.5
    width, num_experts = top_k + shared, routed + shared
    if kind == "softmax":
        routing = Routing(ROUTE_SOFTMAX, logits, True)
        want_w, want_ids = softmax_topk(logits, top_k, True)
    else:
        routing = Routing(ROUTE_GROUPED, logits, True, bias, 2.5, groups, topk_groups, shared)
        want_w, want_ids = grouped_topk(logits, bias, top_k, groups, topk_groups, True, 2.5, shared)
    for block_m in (16, 64):
        weights, ids, counted = route_and_count(routing, width, num_experts, block_m)
        assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)
        k_pow2 = 1 << (width - 1).bit_length()
        assert counted.chunk_pairs == PARALLEL_CHUNK // k_pow2 * width  # whole tokens
        want = align_reference(ids.view(-1), num_experts, block_m)
        for fold in (True, False):
            _, _, again = route_and_count(routing, width, num_experts, block_m)
            got = fused_moe_module._scatter_counted(
                ids.view(-1), again, num_experts, block_m, fold_offsets=fold
            )
            for name, got_t, want_t in zip(ALIGN_OUTPUTS, got, want, strict=True):
                assert torch.equal(got_t, want_t), f"{name}, block_m={block_m}, fold={fold}"


@pytest.mark.parametrize("shared", [0, 2])
def test_grouped_routed_past_one_align_program_matches_routing_then_experts(shared):
    """`fused_moe_grouped_routed` where its routing kernel counts the align's chunks (more
    than SINGLE_PROGRAM_PAIRS pairs), shared experts fused or not: the torch experts on
    `select_experts_grouped`'s choices, shared experts with weight 1.0."""
    routed, top_k, tokens = 16, 4, 48
    assert tokens * (top_k + shared) > SINGLE_PROGRAM_PAIRS
    experts = make_experts(routed + shared, 40, 24, 13)
    w13, w2 = experts.w13.detach(), experts.w2.detach()
    g = torch.Generator().manual_seed(14)
    x, logits = torch.randn(tokens, 40, generator=g), torch.randn(tokens, routed, generator=g)
    bias = torch.randn(routed, generator=g) * 0.5
    args = (top_k, 4, 2, True, 2.5, shared)
    got = fused_moe_grouped_routed(x, w13, w2, logits, bias, *args)
    weights, ids = select_experts_grouped(logits, bias, *args)
    want = TorchMoEBackend().experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class LaunchCounter:
    """A kernel stand-in that counts its launches and runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("extra", [0, 1])
def test_align_folds_offsets_up_to_the_threshold(monkeypatch, extra):
    """By default the offsets fold into the scatter up to FOLDED_OFFSETS_MAX_CHUNKS chunks and
    take their own kernel past it; both ways (and the other one forced) give the reference's
    result. At one chunk past, the folded sums take two tiles."""
    offsets = LaunchCounter(fused_moe_module.align_offsets_kernel)
    folded = LaunchCounter(fused_moe_module.align_scatter_folded_kernel)
    monkeypatch.setattr(fused_moe_module, "align_offsets_kernel", offsets)
    monkeypatch.setattr(fused_moe_module, "align_scatter_folded_kernel", folded)
    chunks = FOLDED_OFFSETS_MAX_CHUNKS + extra
    pairs = (chunks - 1) * PARALLEL_CHUNK + 1  # the last chunk holds one pair
    ids = align_ids(pairs, 66, seed=chunks)
    want = align_reference(ids, 66, 32)
    for fold in (None, not extra, bool(extra)):
        got = align_block_size(ids, 66, 32, fold_offsets=fold)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert (offsets.launches, folded.launches) == ((2, 1) if extra else (1, 2))


def test_backend_selection_and_module_path():
    assert isinstance(moe_backend_for("auto", "cpu"), TorchMoEBackend)
    assert isinstance(moe_backend_for("torch", "cuda"), TorchMoEBackend)
    # The interpreter is on in this module, so "triton" is allowed on the CPU here.
    assert isinstance(moe_backend_for("triton", "cpu"), TritonMoEBackend)
    with pytest.raises(ValueError, match="must be one of"):
        moe_backend_for("cutlass", "cuda")
    experts = make_experts(8, 32, 16, 5)
    x = torch.randn(6, 32)
    weights, ids = select_experts(torch.randn(6, 8), 2, renormalize=True)
    with torch.no_grad():
        want = experts(x, weights, ids)
        assert set_moe_backend(torch.nn.Sequential(experts), TritonMoEBackend()) == 1
        got = experts(x, weights, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_backend_is_refused_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="--moe-backend torch"):
        moe_backend_for("triton", "cpu")


def test_kernel_config_table():
    # Decode-sized steps take small row blocks; large ones larger.
    assert default_config(1, 128, 8).block_m == 16
    assert default_config(4096, 128, 8).block_m == 128  # a prefill: the tuned shapes' tiles
    assert default_config(4096, 128, 8, torch.float32).block_m == 64
    assert kernel_config(1, 128, 2048, 768, 8, torch.bfloat16).block_m == 16
    # A tuned shape takes the row above its token count when within 4x of it, else the rule:
    # the decode rows (1, 4, 16, 64, 128, 256, 512) cover 1 to 512 tokens; 513 to 1,024 take
    # the row tuned at 1,024 for prefill; beyond the last row the rule again.
    tuned = dict(TUNED[(128, 2048, 768, 8, "bfloat16")])
    qwen3 = functools.partial(kernel_config, num_experts=128, hidden=2048, intermediate=768,
                              top_k=8, dtype=torch.bfloat16)  # fmt: skip
    assert qwen3(2) == tuned[4] and qwen3(17) == tuned[64] and qwen3(64) == tuned[64]
    assert qwen3(65) == tuned[128] and qwen3(255) == tuned[256] and qwen3(256) == tuned[256]
    assert qwen3(513) == tuned[1024] and qwen3(8192) == tuned[8192]
    assert qwen3(2047) == default_config(2047, 128, 8) and qwen3(2048) == tuned[8192]
    assert qwen3(16385) == default_config(16385, 128, 8)
    with pytest.raises(ValueError, match="power of two"):
        MoEKernelConfig(24, 64, 64)


def test_configs_fit_the_shared_memory():
    """On the H200 (227 KB a program) and the A100 (163 KB) every table row and default is as
    written (the prefill rows' 4-stage 128 x 256 down only as one weight's tiles); where a
    program holds less (an L40S's 99 KB) the stages drop until `shared_bytes` fits, or to two
    (`bench.compile_kernels --arch 89` compiles them)."""
    from engine.kernels.fused_moe_configs import fit_shared, shared_bytes

    rows = [c for table in TUNED.values() for _, c in table]
    rows += [default_config(t, 128, 8) for t in (1, 128, 256, 1024, 4096)]
    defaults = [default_config(t, 128, 8, torch.float32) for t in (1, 64, 256, 4096)]
    for config, size in [(c, 2) for c in rows] + [(c, 4) for c in defaults]:
        assert fit_shared(config, size, 232448) is config
        if size == 2:
            assert fit_shared(config, size, 166912) is config
        small = fit_shared(config, size, 101376)
        assert shared_bytes(small, size) <= 101376 or small.num_stages == 2
        assert small == dataclasses.replace(config, num_stages=small.num_stages, down=small.down)
        if small.down is not None:  # a down launch holds one weight's tiles
            down = small.down
            assert shared_bytes(down, size, weights=1) <= 101376 or down.num_stages == 2
    # float32's one-row default: 4 stages take 120 KB, 3 take 80 KB.
    assert fit_shared(defaults[0], 4, 101376).num_stages == 3
    moonlight_256 = dict(TUNED[(66, 2048, 1408, 8, "bfloat16")])[256]
    assert kernel_config(256, 66, 2048, 1408, 8, torch.bfloat16, 101376).num_stages == 3
    assert kernel_config(256, 66, 2048, 1408, 8, torch.bfloat16) is moonlight_256


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens,num_experts,top_k", [(0, 8, 2), (1, 8, 1), (9, 60, 8)])
def test_softmax_routing_kernel(tokens, num_experts, top_k, renormalize):
    logits = torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(tokens))
    backend = TritonMoEBackend()
    for dtype in (torch.float32, torch.float16):
        got_w, got_ids = backend.select_experts(logits.to(dtype), top_k, renormalize)
        want_w, want_ids = select_experts(logits.to(dtype), top_k, renormalize)
        assert got_w.dtype == want_w.dtype and got_ids.dtype == want_ids.dtype
        # Both come out best first (random logits have no ties).
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("num_experts,top_k", [(60, 8), (128, 8), (16, 6)])
def test_softmax_routing_ties_go_to_the_lower_id(num_experts, top_k, packed, monkeypatch):
    """Logits of a few distinct values, so most experts tie: the kernel (a max and then a min
    over the ids tied at it, or with `PACKED_TOPK` one packed probability-and-id reduction a
    choice) takes the largest probability, then the lowest id among its ties, slot after slot:
    a stable descending sort's order."""
    monkeypatch.setattr(moe_routing, "PACKED_TOPK", tl.constexpr(packed))
    g = torch.Generator().manual_seed(num_experts)
    logits = torch.randint(0, 4, (6, num_experts), generator=g).float()
    logits[0] = 1.0  # all tied
    weights, ids = softmax_topk(logits, top_k, False)
    want_ids = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :top_k]
    assert torch.equal(ids, want_ids)
    want_w = torch.softmax(logits, dim=1).gather(1, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("num_experts,groups,topk_groups,top_k", [(64, 1, 1, 6), (32, 8, 3, 6)])
def test_grouped_routing_ties_go_to_the_lower_id(
    num_experts, groups, topk_groups, top_k, packed, monkeypatch
):
    """Grouped routing over logits of three values (most choices and group scores tie): the
    kernel's choices (either top-k, `PACKED_TOPK` or not) are those of stable descending
    sorts, group by group and expert by expert (ties to the lower id), and its weights the
    chosen sigmoid scores, renormalised."""
    monkeypatch.setattr(moe_routing, "PACKED_TOPK", tl.constexpr(packed))
    g = torch.Generator().manual_seed(num_experts + groups)
    logits = torch.randint(0, 3, (5, num_experts), generator=g).float()
    logits[0] = 0.0  # all tied
    bias = torch.zeros(num_experts)
    weights, ids = grouped_topk(logits, bias, top_k, groups, topk_groups, True, 1.0, 0)
    scores = torch.sigmoid(logits)
    per_group = num_experts // groups
    by_group = scores.view(-1, groups, per_group).sort(dim=2, descending=True, stable=True)
    group_score = by_group.values[:, :, 0] + by_group.values[:, :, 1]
    picked = group_score.sort(dim=1, descending=True, stable=True).indices[:, :topk_groups]
    eligible = torch.zeros(5, groups, dtype=torch.bool).scatter_(1, picked, True)
    choice = scores.masked_fill(~eligible.repeat_interleave(per_group, dim=1), -float("inf"))
    want_ids = choice.sort(dim=1, descending=True, stable=True).indices[:, :top_k]
    assert torch.equal(ids, want_ids)
    want_w = scores.gather(1, want_ids)
    torch.testing.assert_close(weights, want_w / want_w.sum(1, keepdim=True), rtol=1e-6, atol=0)


@triton.jit
def _route_token_kernel(
    logits, bias, weights, ids, stride_t, num_routed, scaling,
    ROUTE: tl.constexpr, WIDTH: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr, NUM_GROUPS: tl.constexpr, PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr, NUM_SHARED: tl.constexpr, G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
):  # fmt: skip
    """`moe_routing.route_token` for program `t`'s token, stored as the routing kernels do."""
    t = tl.program_id(0)
    w, i = moe_routing.route_token(
        logits, t, stride_t, bias, num_routed, scaling, ROUTE, WIDTH, K_POW2, E_POW2,
        RENORMALIZE, NUM_GROUPS, PER_GROUP, TOPK_GROUPS, NUM_SHARED, G_POW2, P_POW2,
    )  # fmt: skip
    slots = tl.arange(0, K_POW2)
    tl.store(weights + t * WIDTH + slots, w, mask=slots < WIDTH)
    tl.store(ids + t * WIDTH + slots, i, mask=slots < WIDTH)


def route_token(logits, bias, top_k, groups=0, topk_groups=0, num_shared=0, scaling=1.0):
    """`route_token` over each row of `logits`: softmax top-k (groups 0), else grouped."""
    tokens, experts = logits.shape
    width = top_k + num_shared
    weights = torch.empty(tokens, width)
    ids = torch.empty(tokens, width, dtype=torch.int64)
    per_group = experts // max(groups, 1)
    _route_token_kernel[(tokens,)](
        logits, bias, weights, ids, logits.stride(0), experts, scaling,
        ROUTE=ROUTE_GROUPED if groups else ROUTE_SOFTMAX, WIDTH=width,
        K_POW2=triton.next_power_of_2(width), E_POW2=triton.next_power_of_2(experts),
        RENORMALIZE=True, NUM_GROUPS=max(groups, 1), PER_GROUP=per_group,
        TOPK_GROUPS=max(topk_groups, 1), NUM_SHARED=num_shared,
        G_POW2=triton.next_power_of_2(max(groups, 1)), P_POW2=triton.next_power_of_2(per_group),
    )  # fmt: skip
    return weights, ids


def random_and_tied_logits(num_experts: int, levels: int, g: torch.Generator) -> torch.Tensor:
    """Six rows of router logits: three random, then three of `levels` distinct values (most
    experts tie), the first of those all tied."""
    tied = torch.randint(0, levels, (3, num_experts), generator=g).float()
    tied[0] = 1.0
    return torch.cat([torch.randn(3, num_experts, generator=g), tied])


@pytest.mark.parametrize("warp", [True, False])
@pytest.mark.parametrize(
    "num_experts,top_k", [(128, 8), (60, 8), (8, 2), (100, 4), (256, 8), (384, 8), (600, 4)]
)
def test_route_token_softmax_equals_the_routing_kernel(num_experts, top_k, warp, monkeypatch):
    """One token's softmax routing as the small MoE path's programs do it (inside a warp up to
    512 experts, else `route_rows`; `warp` False: always `route_rows`): the routing kernel's
    choices, ties to the lower id (rows of few distinct logits, one all tied), and its
    weights to float32 rounding."""
    monkeypatch.setattr(moe_routing, "WARP_ROUTE", tl.constexpr(warp))
    g = torch.Generator().manual_seed(num_experts + top_k)
    logits = random_and_tied_logits(num_experts, 4, g)
    weights, ids = route_token(logits, logits, top_k)
    want_w, want_ids = softmax_topk(logits, top_k, True)
    assert torch.equal(ids, want_ids)
    stable = torch.sort(torch.softmax(logits, 1), dim=1, descending=True, stable=True)
    assert torch.equal(ids[3:], stable.indices[3:, :top_k])
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("warp", [True, False])
@pytest.mark.parametrize(
    "num_experts,groups,topk_groups,top_k,shared",
    [
        (64, 1, 1, 6, 2),  # Moonlight
        (32, 4, 4, 6, 0),
        (100, 1, 1, 8, 1),
        (32, 8, 3, 6, 1),  # groups of 4 experts: route_rows
        (256, 8, 4, 8, 1),  # DeepSeek-V3: groups of one chunk
        (384, 1, 1, 8, 1),  # Kimi-K2
        (256, 4, 2, 8, 0),  # groups of two chunks
        (192, 6, 1, 4, 2),
        (640, 10, 3, 8, 1),  # past WARP_ROUTE_EXPERTS: route_rows
    ],
)
def test_route_token_grouped_equals_the_routing_kernel(
    num_experts, groups, topk_groups, top_k, shared, warp, monkeypatch
):
    """One token's grouped routing as the small MoE path's programs do it (inside a warp up to
    512 experts where every group is eligible or the groups are whole 32-expert chunks, else
    `route_rows`): the grouped routing kernel's choices (ties to the lower id, and between
    groups to the lower group; negative choices from the bias included),
    its scaled weights to float32 rounding, and the shared experts after them."""
    monkeypatch.setattr(moe_routing, "WARP_ROUTE", tl.constexpr(warp))
    g = torch.Generator().manual_seed(num_experts + groups)
    logits = random_and_tied_logits(num_experts, 3, g)
    bias = torch.randn(num_experts, generator=g) - 0.5
    bias[::3] = 0.0
    weights, ids = route_token(logits, bias, top_k, groups, topk_groups, shared, 2.5)
    want_w, want_ids = grouped_topk(logits, bias, top_k, groups, topk_groups, True, 2.5, shared)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("warp", [True, False])
@pytest.mark.parametrize("num_experts,groups,topk_groups", [(256, 8, 4), (256, 4, 2), (192, 6, 5)])
def test_route_token_tied_groups_go_to_the_lower_group(
    num_experts, groups, topk_groups, warp, monkeypatch
):
    """Groups whose scores (their two best choices' sum) all tie while their best experts
    differ: the lower groups are the eligible ones, as `grouped_topk_rows` takes them, so the
    choices are the best experts of those groups only (inside a warp: groups of whole chunks)."""
    monkeypatch.setattr(moe_routing, "WARP_ROUTE", tl.constexpr(warp))
    per_group = num_experts // groups
    # Sigmoid about 2e-35: each choice is its bias, exactly.
    logits = torch.full((2, num_experts), -80.0)
    bias = torch.zeros(num_experts)
    for g in range(groups):  # 1 +- g / 8: every group's two best sum to 2 exactly
        bias[g * per_group + 3] = 1.0 + g / 8
        bias[g * per_group + 7] = 1.0 - g / 8
    logits[1] = torch.linspace(-1.0, 1.0, num_experts)  # and a row with no ties
    want_w, want_ids = grouped_topk(logits, bias, 8, groups, topk_groups, True, 1.0, 0)
    best = max(range(topk_groups), key=lambda g: 1.0 + g / 8)
    assert want_ids[0, 0] == best * per_group + 3  # the reference breaks the tie as stated
    weights, ids = route_token(logits, bias, 8, groups, topk_groups)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "tokens,num_experts,groups,topk_groups,top_k",
    [(0, 16, 4, 2, 2), (1, 16, 4, 2, 8), (7, 64, 8, 3, 6), (5, 24, 3, 1, 4), (4, 12, 1, 1, 3)],
)
def test_grouped_routing_kernel(tokens, num_experts, groups, topk_groups, top_k):
    g = torch.Generator().manual_seed(tokens + num_experts)
    logits = torch.randn(tokens, num_experts, generator=g)
    bias = torch.randn(num_experts, generator=g) * 0.5
    args = (bias, top_k, groups, topk_groups, True, 2.5)
    got_w, got_ids = TritonMoEBackend().select_experts_grouped(logits, *args)
    want_w, want_ids = select_experts_grouped(logits, *args)
    assert got_w.dtype == torch.float32 and got_ids.shape == (tokens, top_k)
    # The reference returns its choices in no particular order: compare per row, sorted.
    got_ids, order = got_ids.sort(dim=-1)
    want_ids, want_order = want_ids.sort(dim=-1)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(
        got_w.gather(1, order), want_w.gather(1, want_order), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
def test_engine_with_triton_moe_matches_transformers(tiny_models, family):
    """The tiny float32 checkpoints, every MoE layer (routing included) on the Triton backend,
    chosen by `EngineConfig.moe_backend` (the interpreter allows it on the CPU): greedy tokens
    equal transformers'. DeepSeek-V3's shared experts are then fused into the routed experts'
    weights (loaded from the checkpoint's shared MLP), with no separate MLP."""
    ref = reference(tiny_models[family])
    config = EngineConfig(model_path=str(tiny_models[family]), num_pages=64, moe_backend="triton")
    engine = Engine(config)
    modules = list(cast(torch.nn.Module, engine.runner.model).modules())
    experts = [m for m in modules if isinstance(m, FusedExperts)]
    assert experts and all(isinstance(m.backend, TritonMoEBackend) for m in experts)
    if family == "deepseek-v3":
        assert all(m.num_shared == 1 and m.w13.shape[0] == 9 for m in experts)
        assert not any(getattr(m, "shared_experts", None) for m in modules)
    prompts = ref.prompts[:3]
    results = engine.generate(prompts, GREEDY)
    assert [r.output_ids for r in results] == [t[:STEPS] for t in ref.tokens[:3]]


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
def test_norm_and_gate_in_one_launch_keeps_transformers_tokens(tiny_models, family, monkeypatch):
    """The post-attention norm with the gate's logits in its launch (`norm_and_gate`, which
    the Triton backend takes on CUDA at a decode step's few tokens), forced on the CPU's
    interpreter here: the decode steps take it, and greedy tokens still equal
    transformers'."""
    from engine.kernels import fused

    calls = []

    def on_cpu_too(self, norm, x, residual, gate, logits_dtype):
        out = fused.rms_norm_gate(x, norm.weight, norm.eps, residual, gate, logits_dtype)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(TritonMoEBackend, "norm_and_gate", on_cpu_too)
    ref = reference(tiny_models[family])
    config = EngineConfig(model_path=str(tiny_models[family]), num_pages=64, moe_backend="triton")
    results = Engine(config).generate(ref.prompts[:3], GREEDY)
    assert [r.output_ids for r in results] == [t[:STEPS] for t in ref.tokens[:3]]
    assert any(calls) and not all(calls)  # decode steps fused, prefills (more rows) not


def test_expert_parallel_local_compute_on_the_triton_backend():
    """An expert-parallel rank computes its received rows (slots -1 where a choice lives on
    another rank) through its backend: the Triton one matches the torch one."""
    placement = initial_placement(8, 2, 2)
    layer = ExpertParallelExperts(8, 32, 16, ParallelConfig(2, 1, 2), placement)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        layer.local.w13.copy_(torch.randn(layer.local.w13.shape, generator=g) / 32**0.5)
        layer.local.w2.copy_(torch.randn(layer.local.w2.shape, generator=g) / 16**0.5)
    rows = torch.randn(6, 32, generator=g)
    slots = torch.randint(-1, placement.slots_per_rank, (6, 4), generator=g, dtype=torch.int32)
    weights = torch.rand(6, 4, generator=g) * (slots >= 0)
    with torch.no_grad():
        want = layer._compute(rows, slots, weights)
        assert set_moe_backend(layer, TritonMoEBackend()) == 2  # the layer and its .local
        got = layer._compute(rows, slots, weights)
        # Told how many slots are here (as the exchange's counts tell a rank), the same sums.
        sized = layer._compute(rows, slots, weights, int((slots >= 0).sum()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sized, want, rtol=1e-5, atol=1e-5)


def test_a_ranks_tiles_follow_its_pairs_not_its_rows_width():
    """An expert-parallel rank's rows carry every choice's column (-1 where it lives
    elsewhere): its tiles are those of the pairs that are here. DeepSeek-V3 at EP 8 (32 local
    experts, top-8): 600 received rows of which 800 pairs are local are 25 rows an expert (64 x
    128 tiles), where the rows' width would say 150 (the prefill tiles)."""
    from engine.kernels.fused_moe import pairs_config

    x = torch.empty(1, dtype=torch.bfloat16).expand(600, 7168)  # shapes only, no memory
    w13 = torch.empty(1, dtype=torch.bfloat16).expand(32, 4096, 7168)
    assert pairs_config(800, x, w13, 8) == default_config(100, 32, 8)
    assert pairs_config(800, x, w13, 8).block_m == 64
    assert default_config(600, 32, 8).block_m == 128
    assert pairs_config(0, x, w13, 8) == default_config(1, 32, 8)


def test_align_offsets_tile_fits_the_shared_memory():
    """The align's prefix-sum tile (4 bytes a count in shared memory, as the launch compiles
    with its aligned pointers) is `OFFSETS_TILE_ELEMENTS` on the H200 and halves on a device
    of 99 KB a program, where 128 KB would not launch (`bench.compile_kernels --arch 89`)."""
    from engine.kernels.fused_moe import (
        OFFSETS_TILE_ELEMENTS,
        offsets_chunk_block,
        offsets_tile_elements,
    )
    from engine.kernels.sms import H200_SHARED_MEMORY

    assert offsets_tile_elements(H200_SHARED_MEMORY) == OFFSETS_TILE_ELEMENTS == 32768
    assert offsets_tile_elements(166912) == 32768  # an A100
    assert offsets_tile_elements(101376) == 16384  # an L40S or A10
    for e_pow2 in (128, 256, 512):
        block = offsets_chunk_block(e_pow2, 1 << 20, 101376)
        assert block * e_pow2 * 4 <= 101376 - 4096
        assert offsets_chunk_block(e_pow2, 1 << 20) >= block
