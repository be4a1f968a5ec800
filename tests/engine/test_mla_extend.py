"""MLA prefill/extend in the non-absorbed form: the Triton kernel against a float64 reference,
and the Triton backend's `forward_mla_expanded` (and its `_rope` form) against the torch
backend's absorbed `forward_mla` over a paged pool (prefix hits, page sizes 1 and 16).

On this CPU host the kernels run under Triton's interpreter (tests/conftest.py). Tolerances:
float32 (exact dots, `input_precision="ieee"`) 1e-5; float16 2e-2 absolute on outputs of order
1 (probabilities rounded to float16 before the value product, as in any flash kernel);
bfloat16 3e-2 (8 bits of mantissa), compiled on a GPU only: the interpreter's `tl.dot`
mis-multiplies bfloat16 (numpy has no bfloat16).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.config import RopeConfig
from engine.forward_batch import ForwardBatch
from engine.kernels.attention import extend_blocks
from engine.kernels.mla_extend import Tiles, mla_extend_attention
from engine.kv_cache import KVCache, KVCacheSpec
from engine.layers.attention import TorchAttentionBackend
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.layers.triton_attention import TritonAttentionBackend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter's bfloat16 dot"),
    ),
]


def reference(q_nope, q_pe, k_nope, k_pe, v, prefix, ext, scale):
    """Each sequence's causal attention over its context, in float64."""
    outs, t, kv = [], 0, 0
    for p, n in zip(prefix, ext, strict=True):
        ctx = slice(kv, kv + p + n)
        s = torch.einsum("mhd,nhd->hmn", q_nope[t : t + n].double(), k_nope[ctx].double())
        s += torch.einsum("mhd,nd->hmn", q_pe[t : t + n].double(), k_pe[ctx].double())
        q_pos = torch.arange(p, p + n, device=DEVICE)[:, None]
        s = s.masked_fill(torch.arange(p + n, device=DEVICE)[None, :] > q_pos, float("-inf"))
        outs.append(torch.einsum("hmn,nhd->mhd", (s * scale).softmax(-1), v[ctx].double()))
        t, kv = t + n, kv + p + n
    return torch.cat(outs)


# Sequences: a fresh prompt, one new token after a prefix (decode-like), a prefix hit, and a
# chunk longer than a query block after a prefix (chunked prefill).
PREFIX = [0, 5, 16, 9]
EXT = [7, 1, 19, 70]


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "d_nope", "d_rope", "d_v", "block", "block_n"),
    # The tiny model's dims; odd ones in small tiles; query blocks longer and shorter than key
    # tiles (the unmasked loop over the keys before a block, and the diagonal across tiles).
    [
        (2, 16, 8, 16, 64, 64),
        (3, 32, 16, 24, 16, 16),
        (3, 32, 16, 24, 32, 16),
        (2, 16, 8, 16, 16, 32),
    ],
)
def test_kernel_matches_reference(heads, d_nope, d_rope, d_v, block, block_n, dtype, tma) -> None:
    """The pointer loads and the TMA descriptors (tiles past L and past an odd head dim
    zero-filled; the diagonal's tiles reaching into the next sequence's rows masked)."""
    g = torch.Generator().manual_seed(heads + d_v)
    t, ctx = sum(EXT), sum(PREFIX) + sum(EXT)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    # k_nope and v as views into one up-projection, as the backend passes them.
    kv = randn(ctx, heads, d_nope + d_v)
    k_nope, v = kv.split([d_nope, d_v], dim=-1)
    q_nope, q_pe, k_pe = randn(t, heads, d_nope), randn(t, heads, d_rope), randn(ctx, 1, d_rope)
    scale = (d_nope + d_rope) ** -0.5

    def dev(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, device=DEVICE)

    tiles = Tiles(block, block_n, 4, tma=tma)
    seqs, firsts = extend_blocks(EXT, block)
    q_starts = dev([sum(EXT[:b]) for b in range(len(EXT))])
    kv_starts = dev([sum(PREFIX[:b]) + sum(EXT[:b]) for b in range(len(EXT))])
    out = mla_extend_attention(
        q_nope, q_pe, k_nope, k_pe, v, dev(PREFIX), dev(EXT), q_starts, kv_starts,
        dev(seqs), dev(firsts), scale, tiles=tiles,
    )  # fmt: skip
    assert out.shape == (t, heads, d_v) and out.dtype == dtype
    want = reference(q_nope, q_pe, k_nope, k_pe[:, 0], v, PREFIX, EXT, scale)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


def extend_step(prefix, ext, page_size, heads, rank, rope, d_nope, d_v, dtype, seed=0):
    """A pool whose sequences hold `prefix` random cached tokens, an extend batch of `ext` new
    tokens each, and the MLA inputs of one layer: `(batch, q_nope, q_pe, c_kv, k_pe, w_kv)`."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-(p + n) // page_size) for p, n in zip(prefix, ext, strict=True)]
    num_pages = sum(pages_per_seq) + 3
    spec = KVCacheSpec(1, rank, rope)
    cache = KVCache(1, num_pages, page_size, spec, dtype, torch.device(DEVICE))
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    # Two spare rows in a shuffled page table: sequences do not sit at rows 0..B-1.
    rows = torch.randperm(len(prefix) + 2, generator=g)[: len(prefix)]
    table = torch.zeros(len(prefix) + 2, max(pages_per_seq), dtype=torch.int32)
    perm = torch.randperm(num_pages, generator=g).tolist()
    for row, n in zip(rows.tolist(), pages_per_seq, strict=True):
        table[row, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix, ext, strict=True)])
    token_rows = torch.repeat_interleave(rows, torch.tensor(ext))
    out_slots = table[token_rows, positions // page_size].long() * page_size
    out_slots += positions % page_size
    t = sum(ext)
    batch = ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.long, device=DEVICE),
        positions=positions.to(DEVICE),
        out_slots=out_slots.to(DEVICE),
        page_table=table.to(DEVICE),
        req_rows=rows.to(DEVICE),
        prefix_lens=torch.tensor(prefix, device=DEVICE),
        extend_lens=torch.tensor(ext, device=DEVICE),
        logits_indices=(torch.cumsum(torch.tensor(ext), 0) - 1).to(DEVICE),
        max_extend_len=max(ext),
        max_seq_len=max(p + n for p, n in zip(prefix, ext, strict=True)),
        kv_cache=cache,
        is_decode=False,
        host_extend_lens=tuple(ext),
        host_prefix_lens=tuple(prefix),
    )

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(DEVICE, dtype)

    w_kv = randn(heads * (d_nope + d_v), rank, std=rank**-0.5)
    return (
        batch,
        randn(t, heads, d_nope),
        randn(t, heads, rope),
        randn(t, 1, rank),
        randn(t, 1, rope),
        w_kv,
    )


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(
    ("prefix", "ext"),
    [([0, 0, 0], [1, 9, 66]), ([0, 7, 16, 3], [12, 1, 5, 40])],  # fresh prompts; prefix hits
)
# The latent normed and rotated by the caller (None), or raw, normed and rotated by the
# backends' `_rope` forms (the Triton one in one launch with the cache write), pairs
# interleaved or not.
@pytest.mark.parametrize("raw_interleaved", [None, False, True])
def test_backend_matches_absorbed_reference(page_size, prefix, ext, raw_interleaved) -> None:
    heads, rank, rope, d_nope, d_v = 2, 16, 8, 16, 16
    dtype = torch.float32
    batch, q_nope, q_pe, c_kv, k_pe, w_kv = extend_step(
        prefix, ext, page_size, heads, rank, rope, d_nope, d_v, dtype, seed=page_size
    )
    scale = (d_nope + rope) ** -0.5
    latent_before = batch.kv_cache.k[0].clone()
    pe_before = batch.kv_cache.v[0].clone()
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), rope, 128, bool(raw_interleaved))
    norm = RMSNorm(rank, 1e-6).to(DEVICE)
    norm.weight.data.uniform_(0.5, 1.5)

    triton_backend = TritonAttentionBackend(mla=True)
    assert triton_backend.mla_expands(batch)
    triton_backend.prepare(batch)
    up = torch.nn.Linear(rank, heads * (d_nope + d_v), bias=False, device=DEVICE, dtype=dtype)
    up.weight.data.copy_(w_kv)
    with torch.no_grad():
        if raw_interleaved is None:
            out = triton_backend.forward_mla_expanded(
                q_nope, q_pe, c_kv, k_pe, up, 0, batch, scale
            )  # [T, H, Dv]
        else:
            out = triton_backend.forward_mla_expanded_rope(
                q_nope, q_pe, c_kv, k_pe, norm, rotary.to(DEVICE), up, 0, batch, scale
            )
    latent_after, pe_after = batch.kv_cache.k[0].clone(), batch.kv_cache.v[0].clone()

    # The reference: the torch backend's absorbed form, from the same pool before the step.
    batch.kv_cache.k[0].copy_(latent_before)
    batch.kv_cache.v[0].copy_(pe_before)
    w_uk, w_uv = w_kv.view(heads, d_nope + d_v, rank).split([d_nope, d_v], dim=1)
    torch_backend = TorchAttentionBackend()
    assert not torch_backend.mla_expands(batch)
    torch_backend.prepare(batch)
    q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
    with torch.no_grad():
        if raw_interleaved is None:
            want = torch_backend.forward_mla(q_latent, q_pe, c_kv, k_pe, 0, batch, scale)
        else:
            want = torch_backend.forward_mla_rope(
                q_latent, q_pe, c_kv, k_pe, norm, rotary.to(DEVICE), 0, batch, scale
            )
    want = torch.einsum("thr,hvr->thv", want, w_uv)

    # Both wrote the new tokens' latent and rope key into the same slots.
    if raw_interleaved is None:
        assert torch.equal(latent_after, batch.kv_cache.k[0])
        assert torch.equal(pe_after, batch.kv_cache.v[0])
    else:  # the Triton norm's sum and torch's mean round apart
        torch.testing.assert_close(latent_after, batch.kv_cache.k[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pe_after, batch.kv_cache.v[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, want, atol=TOL[dtype], rtol=TOL[dtype])


def test_empty_extend_launches_nothing() -> None:
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    q = torch.zeros(0, 2, 16, device=DEVICE)
    out = mla_extend_attention(
        q, q[..., :8], q, q[:, 0, :8], q, empty, empty, empty, empty, empty, empty, 1.0
    )
    assert out.shape == (0, 2, 16)


def test_default_tiles_fit_the_shared_memory():
    """The 16-bit default tiles need 172 KB a program on sm_90 and 128 KB on sm_89 (as the
    launch compiles, `bench.compile_kernels`): a device of 99 KB a program takes 128 x 32 keys
    in three stages (88 KB there), keeping the 128-query blocks the step's block list uses."""
    from engine.kernels.mla_extend import SMALL_SHARED_TILES, default_tiles
    from engine.kernels.sms import H200_SHARED_MEMORY

    big = default_tiles(torch.bfloat16)
    assert big == default_tiles(torch.bfloat16, H200_SHARED_MEMORY) == Tiles(128, 64, 8, 3)
    assert default_tiles(torch.bfloat16, 166912) == big  # an A100
    small = default_tiles(torch.float16, 101376)  # an L40S, A10 or RTX card
    assert small == SMALL_SHARED_TILES and small.block_m == big.block_m
    assert default_tiles(torch.float32, 101376) == default_tiles(torch.float32)
