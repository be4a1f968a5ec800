"""Triton attention kernels against a pure-torch reference, and the Triton backend end to end.

On this CPU host the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET), in float32, where they match the reference to 1e-4. On the GPU the same
tests run compiled (`pytest tests/engine/test_triton_attention.py` there); in bfloat16 the
outputs match the float32 reference within 2e-2 absolute (bf16 inputs, float32 softmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kernels import attention as kernels
from engine.kernels.sms import shared_memory, sm_count
from engine.sampling import SamplingParams
from tests.engine.greedy import assert_greedy_matches
from tests.engine.reference import MAX_NEW_TOKENS, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Greedy tokens equal transformers' exactly on the CPU. On a GPU, where cuBLAS reduces in other
# orders for the engine's shapes than for transformers', a flip is allowed only between two
# tokens whose float32 reference logits are this close.
NEAR_TIE = 1e-4 if DEVICE == "cuda" else 0.0
TOL = 1e-4


@dataclass
class Paged:
    """A random paged pool with a page-table row per sequence."""

    k: torch.Tensor  # [slots, Hkv, D]
    v: torch.Tensor
    table: torch.Tensor  # [R, W] int32
    rows: list[int]
    page_size: int


def make_pool(lens: list[int], page_size: int, hkv: int, d: int, gen: torch.Generator) -> Paged:
    width = max(-(-n // page_size) for n in lens) + 1
    num_rows = len(lens) + 2
    num_pages = num_rows * width + 3
    perm = torch.randperm(num_pages, generator=gen)[: num_rows * width]
    table = perm.reshape(num_rows, width).to(torch.int32)
    rows = torch.randperm(num_rows, generator=gen)[: len(lens)].tolist()
    slots = num_pages * page_size
    k = torch.randn(slots, hkv, d, generator=gen)
    v = torch.randn(slots, hkv, d, generator=gen)
    return Paged(k.to(DEVICE), v.to(DEVICE), table.to(DEVICE), rows, page_size)


def slots_of(pool: Paged, row: int, positions: range) -> torch.Tensor:
    pos = torch.tensor(list(positions), dtype=torch.int64)
    pages = pool.table[row].cpu().long()[pos // pool.page_size]
    return (pages * pool.page_size + pos % pool.page_size).to(DEVICE)


def reference_attention(
    q: torch.Tensor, pool: Paged, prefix: list[int], ext: list[int], scale: float
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its context, in float64."""
    outs, t = [], 0
    group = q.shape[1] // pool.k.shape[1]
    for b, (p, n) in enumerate(zip(prefix, ext, strict=True)):
        slots = slots_of(pool, pool.rows[b], range(p + n))
        keys = pool.k[slots].double().repeat_interleave(group, 1)  # [L, Hq, D]
        values = pool.v[slots].double().repeat_interleave(group, 1)
        s = torch.einsum("mhd,nhd->hmn", q[t : t + n].double(), keys) * scale
        q_pos = torch.arange(p, p + n, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(p + n, device=q.device)[None, :] > q_pos, float("-inf"))
        outs.append(torch.einsum("hmn,nhd->mhd", s.softmax(-1), values))
        t += n
    return torch.cat(outs) if outs else q.new_zeros(0, *q.shape[1:]).double()


SHAPES = [  # page size, query heads, KV heads, head dim
    (1, 4, 4, 64),
    (16, 8, 2, 128),
    (64, 8, 1, 64),
    (16, 6, 2, 80),
    (4, 4, 4, 256),
    (16, 16, 2, 96),
]


# Besides each shape's default tiles: tiles narrower than the keys before a block (the unmasked
# loop runs), query blocks shorter and longer than key tiles (the causal diagonal crosses one or
# several key tiles), on three of the shapes.
TILED: list[tuple[int, int, int, int, kernels.ExtendTiles | None]] = [
    (*SHAPES[1], kernels.ExtendTiles(16, 16, 4, 1)),
    (*SHAPES[2], kernels.ExtendTiles(32, 16, 4, 2)),
    (*SHAPES[3], kernels.ExtendTiles(16, 32, 4, 2)),
]


@pytest.mark.parametrize(
    ("page_size", "hq", "hkv", "d", "tiles"), [*((*s, None) for s in SHAPES), *TILED]
)
def test_extend_matches_reference(
    page_size: int, hq: int, hkv: int, d: int, tiles: kernels.ExtendTiles | None
) -> None:
    gen = torch.Generator().manual_seed(page_size * 1000 + hq * 10 + d)
    # Cases: a fresh prompt, a one-token extend after a prefix (decode-like), a prefix hit
    # ending on a page boundary, and a prompt longer than one query block.
    prefix = [0, 5, 2 * page_size, page_size - 1]
    ext = [7, 1, page_size + 3, 70]
    pool = make_pool([p + n for p, n in zip(prefix, ext, strict=True)], page_size, hkv, d, gen)
    t = sum(ext)
    q = torch.randn(t, hq, d, generator=gen).to(DEVICE)
    k_new = torch.randn(t, hkv, d, generator=gen).to(DEVICE)
    v_new = torch.randn(t, hkv, d, generator=gen).to(DEVICE)
    out_slots = torch.cat(
        [slots_of(pool, r, range(p, p + n)) for r, p, n in zip(pool.rows, prefix, ext, strict=True)]
    )
    kernels.store_kv(k_new, v_new, pool.k, pool.v, out_slots)
    assert torch.equal(pool.k[out_slots], k_new) and torch.equal(pool.v[out_slots], v_new)
    scale = d**-0.5
    # The kernel's default tiles are chosen for the device's shared memory: so are the blocks.
    tiles = tiles or kernels.extend_tiles(d, q.dtype, shared=shared_memory(q.device))
    block_m = tiles.block_m
    blocks = kernels.extend_blocks(ext, block_m)
    starts = torch.tensor([sum(ext[:b]) for b in range(len(ext))], device=DEVICE)

    def dev(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, device=DEVICE)

    out = torch.full_like(q, float("nan"))
    kernels.extend_attention(
        q, pool.k, pool.v, pool.table, dev(pool.rows), dev(prefix), dev(ext), starts,
        dev(blocks[0]), dev(blocks[1]), page_size, scale, out=out, tiles=tiles,
    )  # fmt: skip
    ref = reference_attention(q, pool, prefix, ext, scale)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize(("page_size", "hq", "hkv", "d"), SHAPES)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_matches_reference(
    page_size: int, hq: int, hkv: int, d: int, num_splits: int
) -> None:
    gen = torch.Generator().manual_seed(page_size * 7 + hq + d + num_splits)
    # Lengths of 1, a full page, a page and one, and longer than a decode block.
    lens = [1, page_size, page_size + 1, 150]
    pool = make_pool(lens, page_size, hkv, d, gen)
    q = torch.randn(len(lens), hq, d, generator=gen).to(DEVICE)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    kernels.decode_attention(
        q, pool.k, pool.v, pool.table, torch.tensor(pool.rows, device=DEVICE),
        torch.tensor(lens, dtype=torch.int32, device=DEVICE), page_size, scale, num_splits, out=out,
    )  # fmt: skip
    ref = reference_attention(q, pool, [n - 1 for n in lens], [1] * len(lens), scale)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=TOL)


@pytest.mark.skipif(DEVICE == "cuda", reason="flips a compiled kernel's switch: interpreter only")
@pytest.mark.parametrize(("page_size", "hq", "hkv", "d"), SHAPES[:3])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_metadata_before_the_wait_changes_nothing(
    page_size: int, hq: int, hkv: int, d: int, num_splits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`attention.METADATA_BEFORE_WAIT` (the length and page-table row read before the PDL
    wait): the output bit for bit the plain kernel's, at lengths of 1, a page, a page and one
    and several tiles, ranges that are empty (8 splits of a 1-token context), and a padding
    row (length 0)."""
    from engine.kernels import attention

    gen = torch.Generator().manual_seed(page_size + hq + num_splits)
    lens = [1, page_size, page_size + 1, 150, 0]
    pool = make_pool([max(n, 1) for n in lens], page_size, hkv, d, gen)
    q = torch.randn(len(lens), hq, d, generator=gen).to(DEVICE)
    outs = []
    for early in (False, True):
        monkeypatch.setattr(attention, "METADATA_BEFORE_WAIT", early)
        out = torch.full_like(q, float("nan"))
        kernels.decode_attention(
            q, pool.k, pool.v, pool.table, torch.tensor(pool.rows, device=DEVICE),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE), page_size, d**-0.5,
            num_splits, out=out,
        )  # fmt: skip
        outs.append(out)
    assert torch.equal(outs[0][:-1], outs[1][:-1])  # the padding row's output is undefined
    assert not outs[1][:-1].isnan().any()


@pytest.mark.parametrize(("page_size", "hq", "hkv", "d"), SHAPES[:4])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "norm", "interleaved"])
def test_decode_with_rope_folded_in_equals_rope_then_decode(
    page_size: int, hq: int, hkv: int, d: int, num_splits: int, variant: str
) -> None:
    """`decode_attention` of a `DecodeRope` (RoPE, the q/k norms and the KV write in its kernel)
    against `fused.rope_store_kv` then `decode_attention`: the output and both caches bit for
    bit (compiled with the norms, to float32 rounding: the sums of squares reduce over other
    warps), a padded entry (slot -1) writing nothing; lengths of 1, a page and one, and longer
    than a decode block."""
    from engine.kernels import fused

    gen = torch.Generator().manual_seed(page_size + hq * 3 + d + num_splits)
    lens = [1, page_size + 1, 150, 7]
    pool = make_pool(lens, page_size, hkv, d, gen)
    bsz = len(lens)
    q, k = torch.randn(bsz, hq, d, generator=gen), torch.randn(bsz, hkv, d, generator=gen)
    v = torch.randn(bsz, hkv, d, generator=gen)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    positions = torch.tensor([n - 1 for n in lens], device=DEVICE)
    slots = torch.cat([slots_of(pool, pool.rows[b], range(n - 1, n)) for b, n in enumerate(lens)])
    slots[3] = -1  # a graph's padded entry
    angles = torch.arange(256)[:, None] * torch.rand(d // 2, generator=gen)[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(DEVICE)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(DEVICE)
    norms = None
    if variant == "norm":
        weights = torch.rand(2, d, generator=gen).to(DEVICE) + 0.5
        norms = (weights[0], weights[1], 1e-6)
    interleaved = variant == "interleaved"
    rows = torch.tensor(pool.rows, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = d**-0.5
    k_want, v_want = pool.k.clone(), pool.v.clone()
    q_rot = fused.rope_store_kv(
        q, k, v, positions, cos, sin, interleaved, k_want, v_want, slots, norms
    )
    want = kernels.decode_attention(
        q_rot, k_want, v_want, pool.table, rows, seq_lens, page_size, scale, num_splits
    )
    k_got, v_got = pool.k.clone(), pool.v.clone()
    rope = kernels.DecodeRope(q, k, v, positions, slots, cos, sin, interleaved, norms)
    got = kernels.decode_attention(
        rope, k_got, v_got, pool.table, rows, seq_lens, page_size, scale, num_splits
    )
    assert not torch.equal(k_got, pool.k)  # the new keys were written
    if DEVICE == "cuda" and variant == "norm":
        # Compiled, the decode kernel's 4 warps reduce the q/k norms' sums of squares in
        # another order than rope_store_kv's 1 warp: float32 rounding apart.
        for got_t, want_t in ((k_got, k_want), (v_got, v_want), (got, want)):
            torch.testing.assert_close(got_t, want_t, rtol=1e-6, atol=1e-6)
        return
    assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)
    if DEVICE == "cuda":
        # Compiled, the rotated query stays in registers and the compiler contracts its
        # rotation and the scores into other FMAs than rope_store_kv's store then load: the
        # output a float32 rounding apart (measured on an H100: the last digit of a few
        # elements), the caches still bit for bit.
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return
    assert torch.equal(got, want)


def test_empty_batches_launch_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    pool = make_pool([4], 4, 2, 64, gen)
    q = torch.zeros(0, 4, 64, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert (
        kernels.decode_attention(q, pool.k, pool.v, pool.table, empty, empty, 4, 1.0, 2).numel()
        == 0
    )
    kernels.store_kv(q[:, :2], q[:, :2], pool.k, pool.v, empty)
    out = kernels.extend_attention(
        q, pool.k, pool.v, pool.table, empty, empty, empty, empty, empty, empty, 4, 1.0
    )
    assert out.shape == (0, 4, 64)


def test_negative_slots_are_not_written() -> None:
    k_cache = torch.zeros(8, 2, 16, device=DEVICE)
    v_cache = torch.zeros(8, 2, 16, device=DEVICE)
    k = torch.randn(2, 2, 16, device=DEVICE)
    kernels.store_kv(k, k, k_cache, v_cache, torch.tensor([3, -1], device=DEVICE))
    assert torch.equal(k_cache[3], k[0]) and k_cache.count_nonzero() == k[0].count_nonzero()


def test_decode_splits_fill_the_device_and_stay_within_the_context() -> None:
    assert kernels.decode_splits(1, 8, 8192, 64) == 33
    assert kernels.decode_splits(1, 8, 100, 64) == 2
    assert kernels.decode_splits(256, 8, 8192, 64) == 1
    # Another GPU's SM count (an H20's 78): about two programs a SM there too.
    assert kernels.decode_splits(1, 8, 8192, 64, num_sms=78) == 20
    # Off CUDA (the interpreter here) the rules take the H200's count they were measured on.
    assert sm_count(torch.device("cpu")) == 132
    # An idle expert-parallel rank's step has no sequences: one split, no division by zero.
    assert kernels.decode_splits(0, 8, 8192, 64) == 1
    from engine.kernels.mla_decode import default_num_kv_splits

    assert default_num_kv_splits(0, 16) == 1


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
def test_a_step_on_no_tokens_through_the_triton_backends(
    tiny_models: dict[str, Path], family: str
) -> None:
    """What an idle expert-parallel rank runs to join its MoE collectives
    (`ModelRunner.forward_idle`) through the Triton attention, MoE and GEMM backends: it runs,
    and the tokens and pages after it are as they were. (On a GPU with its graphs:
    tests/gpu/test_expert_parallel_nccl.py.)"""
    ref = reference(tiny_models[family], device=DEVICE)
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models[family]), num_pages=64, attention_backend="triton",
            moe_backend="triton", gemm_backend="triton", dtype="float32",
        )
    )  # fmt: skip
    engine.runner.forward_idle()
    n = 3
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    out = engine.generate([ref.prompts[1]], params)[0].output_ids
    engine.runner.forward_idle()
    few = ref.first(n, slice(1, 2))
    assert_greedy_matches([out], few, NEAR_TIE)
    assert engine.num_free_pages == engine.pool.num_pages


# -- the backend in the engine: greedy tokens equal transformers' --------------------------


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)


GREEDY = greedy(MAX_NEW_TOKENS)
# Under the interpreter a model-level case pays for every program of every launch, one after
# another: there, fewer decode steps (still past a 16-token page boundary for the prompts of
# 27 and 44 tokens) and fewer prompts, which keep the cases' shapes (chunks, shared prefixes).
INTERPRETED = DEVICE != "cuda"
STEPS = 6 if INTERPRETED else MAX_NEW_TOKENS


# Each family once, page sizes split between them: under the interpreter each case takes ~20 s.
@pytest.mark.parametrize(
    ("family", "page_size"), [("llama", 16), ("qwen2", 1), ("qwen3", 16), ("qwen3-moe", 1)]
)
def test_triton_backend_matches_transformers(
    tiny_models: dict[str, Path], family: str, page_size: int
) -> None:
    ref = reference(tiny_models[family], device=DEVICE)
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models[family]),
            num_pages=256,
            page_size=page_size,
            chunked_prefill_size=8,
            attention_backend="triton",
            dtype="float32",
        )
    )
    assert type(engine.runner.attention).__name__ == "TritonAttentionBackend"
    # Under the interpreter the first four prompts (1 to 40 tokens: chunks of 8 across pages),
    # the three that share a prefix coming next.
    first = ref.first(STEPS, slice(None, 4) if INTERPRETED else slice(None))
    results = engine.generate(first.prompts, greedy(STEPS))
    assert_greedy_matches([r.output_ids for r in results], first, NEAR_TIE)
    # Again, one by one: the shared prompt prefixes now come from the cache (under the
    # interpreter the three prompts that share one, for a few tokens: the first of them
    # computes the prefix the other two find).
    again_ref = ref.first(3, slice(-3, None)) if INTERPRETED else ref
    params = greedy(len(again_ref.tokens[0]))
    again = [engine.generate([p], params)[0] for p in again_ref.prompts]
    assert_greedy_matches([r.output_ids for r in again], again_ref, NEAR_TIE)
    assert sum(r.num_cached_tokens for r in again) > 0
    assert engine.num_free_pages == engine.pool.num_pages


@pytest.mark.parametrize(("family", "page_size"), [("qwen3-moe", 16), ("deepseek-v3", 4)])
def test_prefills_as_decode_rows_keep_transformers_tokens(
    tiny_models: dict[str, Path], family: str, page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefills run as decode rows (`short_prefill_tokens`, what the decode graphs replay on a
    GPU): the Triton decode kernels (MLA's absorbed form for DeepSeek-V3) attend causally
    within a step, chunks of 8 from where the one before ended included; the greedy tokens
    stay transformers'. With RoPE in the decode attention (each row writing its own KV in the
    attention's launch) prefills take the extend path."""
    from engine.layers import triton_attention

    ref = reference(tiny_models[family], device=DEVICE)
    n = 4
    # Prompts of 5 and 17 tokens (chunks of 8, 8 and 1), and on a GPU 40 and 33 too.
    few = ref.first(n, slice(1, 3 if INTERPRETED else 5))
    config = EngineConfig(
        model_path=str(tiny_models[family]), num_pages=256, page_size=page_size,
        chunked_prefill_size=8, attention_backend="triton", dtype="float32",
        short_prefill_tokens=256,
    )  # fmt: skip
    engine = Engine(config)
    assert engine.runner.short_prefill_tokens == 256
    extends: list[object] = []  # the extend path's inputs, prepared (none expected)
    prepare = engine.runner.prepare

    def counted(batch: object) -> object:
        extends.append(batch)
        return prepare(batch)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.runner, "prepare", counted)
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    results = engine.generate(few.prompts, params)
    assert_greedy_matches([r.output_ids for r in results], few, NEAR_TIE)
    assert not extends  # every prefill went through the decode kernels
    assert engine.num_free_pages == engine.pool.num_pages
    monkeypatch.setattr(triton_attention, "DECODE_ROPE_IN_ATTENTION", True)
    assert Engine(config).runner.short_prefill_tokens == 0


@pytest.mark.parametrize(("family", "page_size"), [("llama", 16), ("qwen3", 1)])
def test_rope_folded_into_decode_keeps_transformers_tokens(
    tiny_models: dict[str, Path], family: str, page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`DECODE_ROPE_IN_ATTENTION` on (RoPE, Qwen3's q/k norms and the KV write in the decode
    kernel's launch): every decode step takes it, and the greedy tokens stay transformers'."""
    from engine.layers import triton_attention

    calls: list[bool] = []  # per decode-attention launch: whether RoPE was folded in
    decode = kernels.decode_attention

    def counted(q: torch.Tensor | kernels.DecodeRope, *args: object, **kwargs: object) -> object:
        calls.append(isinstance(q, kernels.DecodeRope))
        return decode(q, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_attention, "DECODE_ROPE_IN_ATTENTION", True)
    monkeypatch.setattr(kernels, "decode_attention", counted)
    ref = reference(tiny_models[family], device=DEVICE)
    # Three prompts, six tokens each: the kernel itself is checked bit for bit above, and the
    # interpreter takes about 2 s a decode step here.
    n = 6
    few = ref.first(n, slice(None, 3))
    config = EngineConfig(
        model_path=str(tiny_models[family]), num_pages=256, page_size=page_size,
        attention_backend="triton", dtype="float32",
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    results = Engine(config).generate(few.prompts, params)
    assert_greedy_matches([r.output_ids for r in results], few, NEAR_TIE)
    assert len(calls) >= n - 1 and all(calls)  # every decode step went through it


def test_mla_absorption_with_latent_keeps_transformers_tokens(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`MLA_ABSORB_WITH_LATENT` on (the query's W_UK product and the latent side of every MLA
    decode step in one launch): every decode layer takes it, and DeepSeek-V3's greedy tokens
    stay transformers'. Three prompts, six tokens: the kernel is checked bit for bit in
    test_head_bmm and test_mla_decode."""
    from engine.layers import triton_attention

    monkeypatch.setattr(triton_attention, "MLA_ABSORB_WITH_LATENT", True)
    _deepseek_greedy_through(tiny_models, monkeypatch, "absorb_query_and_latent")


def _deepseek_greedy_through(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, launch_name: str
) -> None:
    """The tiny DeepSeek-V3's greedy tokens (three prompts, six tokens; under the interpreter
    two, of 5 and 17 tokens, and four) through the Triton backend equal transformers', with
    `triton_attention.<launch_name>` run by every decode step's every layer; every page freed
    after."""
    from engine.layers import triton_attention

    calls: list[int] = []
    launch = getattr(triton_attention, launch_name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_attention, launch_name, counted)
    ref = reference(tiny_models["deepseek-v3"], device=DEVICE)
    n = 4 if INTERPRETED else 6
    few = ref.first(n, slice(1, 3) if INTERPRETED else slice(None, 3))
    config = EngineConfig(
        model_path=str(tiny_models["deepseek-v3"]), num_pages=256, page_size=16,
        attention_backend="triton", dtype="float32",
    )  # fmt: skip
    engine = Engine(config)
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    results = engine.generate(few.prompts, params)
    assert_greedy_matches([r.output_ids for r in results], few, NEAR_TIE)
    assert len(calls) >= (n - 1) * engine.model_config.num_layers
    assert engine.num_free_pages == engine.pool.num_pages


@pytest.mark.parametrize("rows", [1, 5])
def test_mla_output_absorption_on_head_bmm(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """`HEAD_BMM_OUTPUT_MAX_ROWS` on: the W_UV product (a strided view of `kv_b_proj`'s weight,
    as the model passes it) is `head_bmm`'s, equal to cuBLAS's up to float32 summation order,
    contiguous; past the limit, the torch backend's itself."""
    from engine.layers import triton_attention
    from engine.layers.attention import AttentionBackend

    torch.manual_seed(rows)
    heads, nope, v_dim, rank = 4, 24, 16, 64
    kv_b = torch.randn(heads * (nope + v_dim), rank, device=DEVICE)
    w_uv = kv_b.view(heads, nope + v_dim, rank)[:, nope:]  # [H, v, R], strided
    out = torch.randn(rows, heads, rank, device=DEVICE)
    backend = triton_attention.TritonAttentionBackend.__new__(
        triton_attention.TritonAttentionBackend
    )
    want = AttentionBackend.mla_absorb_output(backend, out, w_uv)
    monkeypatch.setattr(triton_attention, "HEAD_BMM_OUTPUT_MAX_ROWS", 4)
    got = backend.mla_absorb_output(out, w_uv)
    assert got.is_contiguous() and got.shape == (rows, heads, v_dim)
    if rows <= 4:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


def test_mla_output_absorption_on_head_bmm_keeps_transformers_tokens(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the W_UV product on `head_bmm` at every decode batch of the test (a batch of three,
    two under the interpreter, and as prompts end fewer; the combine its own launch),
    DeepSeek-V3's greedy tokens stay transformers'."""
    from engine.layers import triton_attention

    monkeypatch.setattr(triton_attention, "HEAD_BMM_OUTPUT_MAX_ROWS", 64)
    monkeypatch.setattr(triton_attention, "MLA_COMBINE_IN_OUTPUT", False)
    _deepseek_greedy_through(tiny_models, monkeypatch, "head_bmm")


def test_mla_combine_in_the_output_absorption_keeps_transformers_tokens(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`MLA_COMBINE_IN_OUTPUT` on at every decode batch of the test: each MLA decode leaves
    its ranges uncombined and the W_UV product combines them (`combine_head_bmm`, every
    decode step's every layer); DeepSeek-V3's greedy tokens stay transformers'."""
    from engine.layers import triton_attention

    monkeypatch.setattr(triton_attention, "MLA_COMBINE_IN_OUTPUT", True)
    monkeypatch.setattr(triton_attention, "HEAD_BMM_OUTPUT_MAX_ROWS", 64)
    _deepseek_greedy_through(tiny_models, monkeypatch, "combine_head_bmm")


@pytest.mark.parametrize("family", ["qwen2", "deepseek-v3"])
def test_skinny_gemm_backend_matches_transformers(
    tiny_models: dict[str, Path], family: str
) -> None:
    """Every linear layer of up to 64 rows on the skinny Triton GEMM (`--gemm-backend
    triton`: prefill chunks of 8 tokens and the decode steps; the gate-up projection with
    silu(gate) * up in its epilogue), on Qwen2 (QKV bias) and DeepSeek-V3 (MLA's query,
    latent and output projections): greedy tokens equal transformers'. Three prompts (the 5- and
    17-token ones under the interpreter, which runs a program per few output columns), four
    tokens each."""
    ref = reference(tiny_models[family], device=DEVICE)
    n = 4
    few = ref.first(n, slice(1, 3) if INTERPRETED else slice(None, 3))
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models[family]),
            num_pages=256,
            chunked_prefill_size=8,
            attention_backend="triton",
            gemm_backend="triton",
            dtype="float32",
        )
    )
    assert engine.runner.gemm_backend.name == "triton"
    if family == "deepseek-v3":  # MLA's projections are the backend's too
        attn = engine.runner.model.layers[0].self_attn  # type: ignore[attr-defined]
        assert attn.fused_qkv_a_proj.gemm is attn.o_proj.gemm is engine.runner.gemm_backend
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    results = engine.generate(few.prompts, params)
    assert_greedy_matches([r.output_ids for r in results], few, NEAR_TIE)
    assert engine.num_free_pages == engine.pool.num_pages


@pytest.mark.parametrize("family", ["llama", "qwen3-moe", "deepseek-v3"])
def test_norm_folded_into_the_qkv_projection_keeps_transformers_tokens(
    tiny_models: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`skinny_gemm.NORM_IN_PRELOAD` on, every one-row product on preloading tiles: each
    decode step (a prompt at a time: one row) runs every layer's input norm but the first
    inside its QKV projection's launch (MLA's fused query-and-latent product), and the greedy
    tokens stay transformers'."""
    from engine.kernels import skinny_gemm

    ref = reference(tiny_models[family], device=DEVICE)
    n = 3 if INTERPRETED else 4
    rule, folded = skinny_gemm.pick_tiles, skinny_gemm.preload_norm_linear
    calls = []

    def preloading(m: int, rows: int, k: int, dtype: torch.dtype, gated: bool = False):
        if m == 1 and not gated:
            return skinny_gemm.SkinnyTiles(8, 1 << (k - 1).bit_length(), dot=False,
                                           num_warps=4, preload=True)  # fmt: skip
        return rule(m, rows, k, dtype, gated)

    def counted(*args, **kwargs):
        out = folded(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(skinny_gemm, "pick_tiles", preloading)
    monkeypatch.setattr(skinny_gemm, "preload_norm_linear", counted)
    monkeypatch.setattr(skinny_gemm, "NORM_IN_PRELOAD", True)
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models[family]), num_pages=128, attention_backend="triton",
            gemm_backend="triton", dtype="float32",
        )
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    few = ref.first(n, slice(None, 2))
    outs = [engine.generate([p], params)[0].output_ids for p in few.prompts]
    assert_greedy_matches(outs, few, NEAR_TIE)
    layers = engine.model_config.num_layers
    # Every decode step's layers but the first (prefill's rows are more than one: never asked).
    assert all(calls) and len(calls) >= 2 * (n - 1) * (layers - 1)
    assert engine.num_free_pages == engine.pool.num_pages


def test_triton_backend_runs_mla_like_transformers(tiny_models: dict[str, Path]) -> None:
    """DeepSeek-V3's MLA: decode through the Triton MLA kernel (absorbed), prefill and extend
    through the non-absorbed extend kernel, in chunks of 8 tokens (chunked prefill), then
    again over the prefix cache; greedy tokens equal transformers'. (The MoE experts stay on
    the torch backend here: test_fused_moe runs this model with the Triton experts.)"""
    ref = reference(tiny_models["deepseek-v3"], device=DEVICE)
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models["deepseek-v3"]),
            num_pages=256,
            page_size=16,
            chunked_prefill_size=8,
            attention_backend="triton",
            dtype="float32",
        )
    )
    assert engine.runner.attention.mla  # type: ignore[attr-defined]
    # Under the interpreter, two prompts (17 tokens, and 33 that seed the shared prefix): its
    # chunks of 8 through the extend kernel are most of the case's time.
    first = ref.first(STEPS, slice(2, 5, 2) if INTERPRETED else slice(None))
    results = engine.generate(first.prompts, greedy(STEPS))
    assert_greedy_matches([r.output_ids for r in results], first, NEAR_TIE)
    # The prompts sharing a prefix again, one by one, their prefixes from the cache (a few
    # tokens each: the interpreter is slow, and the extend over a cached prefix is the point).
    n = 3
    shared = ref.first(n, slice(-3, None))
    few = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    again = [engine.generate([p], few)[0] for p in shared.prompts]
    assert_greedy_matches([r.output_ids for r in again], shared, NEAR_TIE)
    assert all(r.num_cached_tokens >= 16 for r in again)
    assert engine.num_free_pages == engine.pool.num_pages


@pytest.mark.skipif(DEVICE == "cuda", reason="counts launches under the interpreter")
@pytest.mark.parametrize("absorb_with_latent", [False, True])
def test_mla_decode_layer_launches(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, absorb_with_latent: bool
) -> None:
    """What a decode step's MLA launches between its projections (the Linears and the
    q-LoRA norm, counted apart): the W_UK and W_UV products, on strided views with no copy,
    the fused latent kernel, and the decode kernel's two; no norm, rotary, cache write or
    page-table gather of their own (four launches more before, and a copy at T > 1). With
    `MLA_ABSORB_WITH_LATENT` the W_UK product and the latent kernel are one launch, and the
    decode's combine is in the W_UV product's (`MLA_COMBINE_IN_OUTPUT`). A batch of one: the
    W_UV product on head_bmm (past `HEAD_BMM_OUTPUT_MAX_ROWS`, cuBLAS's bmm)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    from engine.layers import triton_attention

    monkeypatch.setattr(triton_attention, "MLA_ABSORB_WITH_LATENT", absorb_with_latent)

    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models["deepseek-v3"]), num_pages=64, page_size=16,
            attention_backend="triton", dtype="float32",
        )
    )  # fmt: skip
    attn = engine.runner.model.layers[1].self_attn  # type: ignore[attr-defined]
    launches: collections.Counter[str] = collections.Counter()
    state = {"on": False, "decode": False, "steps": 0}
    no_kernel = {"empty", "new_empty", "empty_like", "empty_strided"}

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            composite = torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), "CompositeImplicitAutograd"
            )
            if state["on"] and not (func.is_view or composite or func._opname in no_kernel):
                launches[str(func)] += 1
            return func(*args, **(kwargs or {}))

    def enter(module, args):
        decode = args[1].is_decode
        state.update(on=decode, decode=decode, steps=state["steps"] + decode)

    attn.register_forward_pre_hook(enter)
    attn.register_forward_hook(lambda m, a, o: state.update(on=False, decode=False))
    for child in attn.children():  # the projections and norms: not this test's business
        child.register_forward_pre_hook(lambda m, a: state.update(on=False))
        child.register_forward_hook(lambda m, a, o: state.update(on=state["decode"]))
    inner_pending = attn.o_proj.forward_pending  # O's product when its sum may be deferred

    def pending(x: torch.Tensor) -> object:
        state.update(on=False)
        try:
            return inner_pending(x)
        finally:
            state.update(on=state["decode"])

    attn.o_proj.forward_pending = pending
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        on = state["on"]
        if on:
            launches[f"triton {self.fn.__name__}"] += 1
        state["on"] = False  # the interpreter's own tensor traffic is no launch
        try:
            return run(self, *args, **kwargs)
        finally:
            state["on"] = on

    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    with pytest.MonkeyPatch.context() as patch, CountOps():
        patch.setattr(InterpretedFunction, "run", counted_run)
        engine.generate([[5, 6, 7, 8, 9]], params)
    steps = state["steps"]
    assert steps >= 2  # (overlapped scheduling may run one more)
    per_step = {name: n / steps for name, n in launches.items()}
    # W_UV at one row (`HEAD_BMM_OUTPUT_MAX_ROWS`), into the buffer o_proj reads: with the
    # latent side in one launch, the decode's combine in it (`MLA_COMBINE_IN_OUTPUT`); else
    # head_bmm after the combine launch.
    expected = collections.Counter({"triton mla_decode_split_kernel": 1})  # rank 16: no quarters
    expected.update(
        {"triton mla_absorb_latent_kernel": 1, "triton combine_head_bmm_kernel": 1}
        if absorb_with_latent
        else {
            "triton head_bmm_kernel": 2,  # W_UK, W_UV
            "triton _mla_latent_kernel": 1,
            "triton mla_decode_combine_kernel": 1,
        }
    )
    assert per_step == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "qwen3-moe", "deepseek-v3"])
def test_graph_replay_equals_eager(tiny_models: dict[str, Path], family: str) -> None:
    """Decode replayed from CUDA graphs gives the tokens of eager decode, and of transformers."""
    ref = reference(tiny_models[family], device=DEVICE)
    outputs = {}
    for disable in (False, True):
        engine = Engine(
            EngineConfig(
                model_path=str(tiny_models[family]),
                num_pages=256,
                page_size=16,
                disable_cuda_graph=disable,
                cuda_graph_max_bs=16,
                dtype="float32",
            )
        )
        assert (engine.runner.graphs is None) == disable
        outputs[disable] = [r.output_ids for r in engine.generate(ref.prompts, GREEDY)]
        assert engine.num_free_pages == engine.pool.num_pages
    assert outputs[False] == outputs[True]
    assert_greedy_matches(outputs[False], ref, NEAR_TIE)


def test_extend_tiles_follow_the_extend_length() -> None:
    long = kernels.extend_tiles(128, torch.bfloat16)
    assert long == kernels.extend_tiles(128, torch.bfloat16, kernels.SHORT_EXTEND + 1)
    short = kernels.extend_tiles(128, torch.bfloat16, kernels.SHORT_EXTEND)
    assert (long.block_m, long.block_n, short.block_m, short.block_n) == (128, 128, 64, 64)
    # float32 (exact checks) and wide heads: one choice whatever the length.
    assert kernels.extend_tiles(128, torch.float32, 1) == kernels.extend_tiles(128, torch.float32)
    assert kernels.extend_tiles(256, torch.bfloat16, 1).block_m == 32
    # Float32's 64 x 64 tiles take 112 KB of shared memory a program: half the queries where a
    # program has less (an L40S's 99 KB); 16-bit tiles stay.
    assert kernels.extend_tiles(128, torch.float32).block_m == 64
    assert kernels.extend_tiles(128, torch.float32, None, 101376).block_m == 32
    assert kernels.extend_tiles(128, torch.bfloat16, None, 101376) == long
