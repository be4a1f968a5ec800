"""The Triton MLA decode kernel against the torch attention backend's `forward_mla`, under
Triton's interpreter on the CPU.

Tolerances: float32 runs its dots exactly (`input_precision="ieee"`) and matches to
`rtol = atol = 1e-5`; float16 rounds the probabilities to float16 before the value product
(as any flash kernel does), `rtol = atol = 5e-3` on outputs of order 1. bfloat16 is checked on
the GPU by `bench/check_moe_gpu.py` (the interpreter's dot does not support it).
"""

from __future__ import annotations

import pytest
import torch

# Triton picks the interpreter when it is imported: tests/conftest.py sets TRITON_INTERPRET for
# the whole session on hosts without CUDA. These cases build their pools on the CPU; on a GPU
# host `python -m bench.check_moe_gpu` checks the kernel compiled, at full model shapes.
pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

from engine.config import RopeConfig
from engine.forward_batch import ForwardBatch
from engine.kernels.mla_decode import default_num_kv_splits, default_num_warps, mla_decode
from engine.kv_cache import KVCache, KVCacheSpec
from engine.layers.attention import TorchAttentionBackend
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.layers.triton_attention import TritonAttentionBackend

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter cases; bench.check_moe_gpu on GPUs"
)


def decode_batch(lens, rank, rope, page_size, dtype, g):
    """A pool of random latents and a decode batch over sequences whose contexts (before the
    new token) are `lens`, their pages scattered over the pool."""
    batch = len(lens)
    pages_per_seq = [(n + 1 + page_size - 1) // page_size for n in lens]
    num_pages = sum(pages_per_seq) + 2
    cache = KVCache(1, num_pages, page_size, KVCacheSpec(1, rank, rope), dtype, torch.device("cpu"))
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    perm = torch.randperm(num_pages, generator=g).tolist()
    table = torch.zeros(batch, max(pages_per_seq), dtype=torch.int32)
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    prefix = torch.tensor(lens)
    out_slots = torch.stack(
        [table[b, n // page_size] * page_size + n % page_size for b, n in enumerate(lens)]
    ).long()
    batch_ = ForwardBatch(
        input_ids=torch.zeros(batch, dtype=torch.long),
        positions=prefix.clone(),
        out_slots=out_slots,
        page_table=table,
        req_rows=torch.arange(batch),
        prefix_lens=prefix,
        extend_lens=torch.ones(batch, dtype=torch.long),
        logits_indices=torch.arange(batch),
        max_extend_len=1,
        max_seq_len=max(lens) + 1,
        kv_cache=cache,
        is_decode=True,
    )
    return batch_, cache, table, prefix


def decode_case(lens, heads, rank, rope, page_size, dtype, seed=0):
    """A decode step over sequences whose contexts (before the new token) are `lens`, their
    pages scattered over the pool; returns the kernel's inputs and the reference output."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lens)
    batch_, cache, table, prefix = decode_batch(lens, rank, rope, page_size, dtype, g)
    q_latent = (torch.randn(batch, heads, rank, generator=g) * 0.3).to(dtype)
    q_pe = (torch.randn(batch, heads, rope, generator=g) * 0.3).to(dtype)
    c_kv = torch.randn(batch, 1, rank, generator=g).to(dtype)
    k_pe = torch.randn(batch, 1, rope, generator=g).to(dtype)
    scale = (rank + rope) ** -0.5
    backend = TorchAttentionBackend()
    backend.prepare(batch_)
    # Writes the new token's latent and rope key into the pool, then attends (the reference).
    want = backend.forward_mla(q_latent, q_pe, c_kv, k_pe, 0, batch_, scale)
    seq_lens = (prefix + 1).to(torch.int32)
    return q_latent, q_pe, cache, table, seq_lens, scale, want


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("heads", [1, 16, 20])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_mla_decode_matches_torch_backend(page_size, heads, splits):
    # Lengths: only the new token, page boundaries, and a long one.
    lens = [0, page_size - 1, page_size, 45]
    q_latent, q_pe, cache, table, seq_lens, scale, want = decode_case(
        lens, heads, 32, 8, page_size, torch.float32
    )
    out = torch.empty_like(q_latent)
    mla_decode(q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, out, splits, 16)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("page_size", [1, 16])
def test_mla_decode_reads_the_batch_rows_of_the_whole_table(page_size):
    """With `req_rows` the kernel reads each sequence's pages from its row of the engine's
    whole page table (rows of other sequences around it): no gather of the batch's rows."""
    q_latent, q_pe, cache, table, seq_lens, scale, want = decode_case(
        [0, page_size, 37], 16, 32, 8, page_size, torch.float32, seed=11
    )
    rows = torch.tensor([4, 0, 2])
    whole = torch.full((6, table.shape[1] + 2), -7, dtype=torch.int32)
    whole[rows, : table.shape[1]] = table
    out = torch.empty_like(q_latent)
    mla_decode(
        q_latent, q_pe, cache.k[0], cache.v[0], whole, seq_lens, scale, out, 4, 16,
        req_rows=rows,
    )  # fmt: skip
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_mla_decode_wider_head_blocks():
    """32 heads sharing each tile read (DeepSeek-V3's 128 heads in 4 programs per range), in
    16-bit types; float32 keeps 16 (32 spills registers on the GPU)."""
    q_latent, q_pe, cache, table, seq_lens, scale, want = decode_case(
        [3, 21], 40, 32, 8, 4, torch.float16, seed=7
    )
    out = torch.empty_like(q_latent)
    mla_decode(q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, out, 2, 16, 32)
    torch.testing.assert_close(out.float(), want.float(), rtol=5e-3, atol=5e-3)
    with pytest.raises(ValueError, match="powers of two"):
        mla_decode(q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, out, 2, 16, 24)
    q32, pe32, out32 = q_latent.float(), q_pe.float(), out.float()
    with pytest.raises(ValueError, match="block_h=16"):
        mla_decode(q32, pe32, cache.k[0], cache.v[0], table, seq_lens, scale, out32, 2, 16, 32)


def test_mla_decode_float16_and_odd_widths():
    # A latent width that is not a power of two, and more ranges than some contexts fill.
    q_latent, q_pe, cache, table, seq_lens, scale, want = decode_case(
        [2, 30, 9], 4, 24, 8, 4, torch.float16, seed=3
    )
    out = torch.empty_like(q_latent)
    mla_decode(q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, out, 8, 16)
    torch.testing.assert_close(out.float(), want.float(), rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("splits", [1, 2])
def test_mla_decode_padding_rows_and_empty_batch(splits):
    """A graph-sized batch pads with rows of length 0: they get zeros; real rows are exact.
    One range writes the output from the split kernel itself (no combine), so both paths."""
    q_latent, q_pe, cache, table, seq_lens, scale, want = decode_case(
        [5, 12], 4, 32, 8, 4, torch.float32, seed=5
    )
    seq_lens[1] = 0
    out = torch.full_like(q_latent, float("nan"))
    mla_decode(q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, out, splits, 16)
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    empty = q_latent[:0]
    result = mla_decode(
        empty, q_pe[:0], cache.k[0], cache.v[0], table[:0], seq_lens[:0], scale, empty
    )
    assert result.shape == (0, 4, 32)


def test_default_splits_fill_one_wave_and_are_fixed_per_batch():
    # Two programs an SM at 4 warps (264 on 132 SMs), one at 8; at most 16 ranges.
    assert default_num_kv_splits(1, 16) == 16
    assert default_num_kv_splits(256, 128) == 1
    assert default_num_kv_splits(64, 16) == 4 and default_num_kv_splits(64, 16, num_warps=8) == 2
    assert default_num_kv_splits(256, 16) == 1 and default_num_kv_splits(132, 16) == 2
    assert default_num_kv_splits(8, 16) == default_num_kv_splits(8, 16)
    # Another GPU's SM count (an H20's 78): one wave of its 156 slots.
    assert default_num_kv_splits(64, 16, num_sms=78) == 2


def test_default_warps():
    # 8 where every head block's 16 ranges fit one program an SM, in float32 and for 32-head
    # blocks; else 4.
    assert default_num_warps(torch.bfloat16, 1, 16) == 8
    assert default_num_warps(torch.bfloat16, 1, 128) == 8  # 8 head blocks x 16 ranges
    assert default_num_warps(torch.bfloat16, 16, 16) == 4
    assert default_num_warps(torch.bfloat16, 2, 128) == 4
    assert default_num_warps(torch.float32, 256, 16) == 8
    assert default_num_warps(torch.bfloat16, 256, 128, block_h=32) == 8


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_backend_fused_latent_side_matches_torch_backend(page_size, interleaved):
    """The Triton backend's `forward_mla_rope` (the latent's norm, both rotations and the cache
    write in one launch, then the decode kernel) against the torch backend's, which norms and
    rotates with the torch layers: the same output and the same cache."""
    heads, rank, rope = 4, 32, 8
    g = torch.Generator().manual_seed(page_size + 2 * interleaved)
    lens = [0, page_size - 1, 2 * page_size + 3]
    batch, cache, _, _ = decode_batch(lens, rank, rope, page_size, torch.float32, g)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), rope, 64, interleaved=interleaved)
    norm = RMSNorm(rank, 1e-6)
    norm.weight.data = 1 + 0.1 * torch.randn(rank, generator=g)
    # The raw projection's parts: views of one wider tensor, as MLAttention makes them.
    proj = torch.randn(len(lens), heads * (16 + rope) + rank + rope, generator=g)
    q_pe = proj[:, : heads * (16 + rope)].view(len(lens), heads, 16 + rope)[..., 16:]
    c_kv = proj[:, heads * (16 + rope) : -rope][:, None, :]
    k_pe = proj[:, -rope:][:, None, :]
    q_latent = torch.randn(len(lens), heads, rank, generator=g) * 0.3
    scale = (rank + rope) ** -0.5
    before = cache.k[0].clone(), cache.v[0].clone()
    outs, caches = [], []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend(mla=True)):
        cache.k[0].copy_(before[0])
        cache.v[0].copy_(before[1])
        backend.prepare(batch)
        with torch.no_grad():
            outs.append(
                backend.forward_mla_rope(q_latent, q_pe, c_kv, k_pe, norm, rotary, 0, batch, scale)
            )
        caches.append((cache.k[0].clone(), cache.v[0].clone()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(caches[1], caches[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(caches[0][0], before[0])  # the new latents were written


@pytest.mark.parametrize("page_size", [1, 16])
def test_absorption_with_the_latent_side_is_the_backend_unfused(page_size, monkeypatch):
    """`forward_mla_absorbed_rope` with `MLA_ABSORB_WITH_LATENT` (the query's W_UK product and
    the latent side in one launch) against the same backend with it off, bit for bit, and
    against the torch backend; past `HEAD_BMM_MAX_ROWS` rows it takes the two launches."""
    from engine.kernels import head_bmm as head_bmm_module
    from engine.layers import triton_attention

    heads, nope, rank, rope = 4, 16, 32, 8
    g = torch.Generator().manual_seed(page_size)
    lens = [0, page_size - 1, 2 * page_size + 3]
    batch, cache, _, _ = decode_batch(lens, rank, rope, page_size, torch.float32, g)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), rope, 64)
    norm = RMSNorm(rank, 1e-6)
    norm.weight.data = 1 + 0.1 * torch.randn(rank, generator=g)
    proj = torch.randn(len(lens), heads * (nope + rope) + rank + rope, generator=g)
    q = proj[:, : heads * (nope + rope)].view(len(lens), heads, nope + rope)
    c_kv = proj[:, heads * (nope + rope) : -rope][:, None, :]
    k_pe = proj[:, -rope:][:, None, :]
    w_uk = (torch.randn(heads, nope + 16, rank, generator=g) * 0.2)[:, :nope]
    scale = (rank + rope) ** -0.5
    fused_calls: list[int] = []
    launch = head_bmm_module.absorb_query_and_latent

    def counted(*args, **kwargs):
        fused_calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "absorb_query_and_latent", counted)
    before = cache.k[0].clone(), cache.v[0].clone()
    results = []
    for backend, on, max_rows in (
        (TorchAttentionBackend(), False, 64),
        (TritonAttentionBackend(mla=True), False, 64),
        (TritonAttentionBackend(mla=True), True, 64),
        (TritonAttentionBackend(mla=True), True, 2),  # 3 rows: the two launches
    ):
        monkeypatch.setattr(triton_attention, "MLA_ABSORB_WITH_LATENT", on)
        monkeypatch.setattr(triton_attention, "HEAD_BMM_MAX_ROWS", max_rows)
        cache.k[0].copy_(before[0])
        cache.v[0].copy_(before[1])
        backend.prepare(batch)
        with torch.no_grad():
            out = backend.forward_mla_absorbed_rope(
                q[..., :nope], w_uk, q[..., nope:], c_kv, k_pe, norm, rotary, 0, batch, scale
            )
        results.append((out, cache.k[0].clone(), cache.v[0].clone()))
    assert len(fused_calls) == 1  # only the third took the one launch
    for got, want in zip(results[2], results[1], strict=True):
        assert torch.equal(got, want)
    # The torch backend, and past the row limit cuBLAS's W_UK product: another summation order.
    for other in (results[0], results[3]):
        for got, want in zip(other, results[1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(results[2][1], before[0])  # the new latents were written


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("heads", [1, 16, 20])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("pages_ahead", [False, True])
def test_mla_decode_quarters_match_torch_backend(page_size, heads, splits, pages_ahead):
    """The kernel with the latent in four column quarters (independent score products): the
    same results as the one-chain kernel's reference, at rank 64 (quarters of 16); with each
    tile's page ids read a step ahead too (the last step's read of the page ids past the range
    masked off)."""
    lens = [0, page_size - 1, page_size, 45]
    q_latent, q_pe, cache, table, seq_lens, scale, want = decode_case(
        lens, heads, 64, 8, page_size, torch.float32
    )
    out = torch.empty_like(q_latent)
    mla_decode(
        q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, out, splits, 16,
        quarters=True, pages_ahead=pages_ahead,
    )  # fmt: skip
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if pages_ahead:
        with pytest.raises(ValueError, match="pages_ahead"):
            mla_decode(
                q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, out, splits, 16,
                quarters=False, pages_ahead=True,
            )  # fmt: skip
    with pytest.raises(ValueError, match="quarters"):
        q32, pe32, cache32, table32, lens32, _, _ = decode_case(lens, 1, 32, 8, 1, torch.float32)
        mla_decode(
            q32, pe32, cache32.k[0], cache32.v[0], table32, lens32, scale, q32.clone(), 1, 16,
            quarters=True,
        )  # fmt: skip


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("quarters", [False, True])
def test_mla_decode_metadata_before_the_wait_changes_nothing(
    page_size, splits, quarters, monkeypatch
):
    """`attention.METADATA_BEFORE_WAIT` (the length and page-table row read before the PDL
    wait, `mla_decode._range_metadata`): both kernels' output bit for bit the plain ones',
    with empty ranges (8 splits of short contexts) and a padding row (length 0, zeros)."""
    from engine.kernels import attention

    lens = [0, page_size - 1, page_size, 45]
    q_latent, q_pe, cache, table, seq_lens, scale, want = decode_case(
        lens, 16, 64, 8, page_size, torch.float32
    )
    seq_lens = torch.cat([seq_lens, torch.zeros(1, dtype=seq_lens.dtype)])
    q_latent, q_pe = (torch.cat([t, t[:1]]) for t in (q_latent, q_pe))
    outs = []
    for early in (False, True):
        monkeypatch.setattr(attention, "METADATA_BEFORE_WAIT", early)
        out = torch.full_like(q_latent, float("nan"))
        mla_decode(
            q_latent, q_pe, cache.k[0], cache.v[0], torch.cat([table, table[:1]]), seq_lens,
            scale, out, splits, 16, quarters=quarters,
        )  # fmt: skip
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1][:-1], want, rtol=1e-5, atol=1e-5)
    assert not outs[1][-1].any()


@pytest.mark.parametrize("heads", [64, 80])
def test_mla_decode_quarters_wide_head_blocks(heads):
    """64 heads a program (what `default_block_h` picks for DeepSeek-V3's 128 heads from batch
    8 up), over a head count that leaves the last block part-empty, in float16."""
    lens = [0, 15, 16, 45]
    q_latent, q_pe, cache, table, seq_lens, scale, want = decode_case(
        lens, heads, 64, 8, 16, torch.float16
    )
    out = torch.empty_like(q_latent)
    mla_decode(q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, out, 2, 16, 64)
    torch.testing.assert_close(out, want, rtol=5e-3, atol=5e-3)


def test_default_block_h():
    from engine.kernels.mla_decode import default_block_h

    # DeepSeek-V3's 128 heads: 16 a program at batch 1 (64 would leave two programs a range),
    # 64 from batch 8; Kimi-K2's 64 heads likewise; Moonlight's 16 always 16; float32 16.
    assert [default_block_h(torch.bfloat16, b, 128, 132) for b in (1, 2, 4, 8, 64, 256)] == [
        16, 16, 32, 64, 64, 64,
    ]  # fmt: skip
    assert [default_block_h(torch.bfloat16, b, 64, 132) for b in (1, 8, 16)] == [16, 32, 64]
    assert {default_block_h(torch.bfloat16, b, 16, 132) for b in (1, 64, 256)} == {16}
    assert default_block_h(torch.float32, 64, 128, 132) == 16
    # An A100's 163 KB of shared memory a program holds 64 heads at 64-key tiles, an L40S's 99
    # KB only 16 (`shared_bytes`; `bench.compile_kernels --arch 89` compiles what they choose).
    assert default_block_h(torch.bfloat16, 256, 128, 108, shared=166912) == 64
    assert default_block_h(torch.bfloat16, 256, 128, 142, shared=101376) == 16


def test_default_block_n_fits_the_shared_memory():
    from engine.kernels.mla_decode import H200_SHARED_MEMORY, default_block_n, shared_bytes

    assert default_block_n(True, 64) == 64 and default_block_n(False, 16) == 32
    assert default_block_n(False, 16, 576, 4) == 32  # float32 on the H200
    l40s = 101376
    assert default_block_n(True, 16, 576, 2, l40s) == 64
    assert default_block_n(False, 16, 576, 4, l40s) == 16  # float32: 110 KB at 32 keys
    for quarters, block_h, size in ((True, 16, 2), (False, 16, 2), (False, 16, 4)):
        block_n = default_block_n(quarters, block_h, 576, size, l40s)
        assert shared_bytes(block_h, block_n, 576, size, quarters) <= l40s < H200_SHARED_MEMORY
    # The 16-bit one-chain kernel pipelines two key tiles: 32 heads take 16-key tiles there.
    assert default_block_n(False, 32, 576, 2, l40s) == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3, 16])
def test_combine_in_the_output_absorption_is_the_combine_then_the_product(dtype, splits):
    """`mla_decode(..., defer_combine=True)` leaves the ranges uncombined (`PendingCombine`,
    whose torch `materialize` is the combine launch's output) and
    `head_bmm.combine_head_bmm` combines them as it multiplies by W_UV (a strided view of
    `kv_b_proj`'s weight, transposed, as the model passes it): the combine launch's values,
    then `head_bmm`'s product up to float32 summation order (float16: the output rounds once,
    2e-3). A padding row of length 0 gets zeros; one range has no partials, so the decode
    returns its output as before."""
    from engine.kernels.head_bmm import combine_head_bmm, head_bmm
    from engine.layers.pending import PendingCombine

    heads, rank, nope, v_dim = 3, 64, 16, 24
    q_latent, q_pe, cache, table, seq_lens, scale, _ = decode_case(
        [0, 7, 45, 20], heads, rank, 8, 4, dtype, seed=splits
    )
    seq_lens[3] = 0  # a graph's padding row
    g = torch.Generator().manual_seed(5)
    kv_b = (torch.randn(heads * (nope + v_dim), rank, generator=g) * rank**-0.5).to(dtype)
    w_uv_t = kv_b.view(heads, nope + v_dim, rank)[:, nope:].transpose(1, 2)  # [H, R, v]
    args = (q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale)
    latent = mla_decode(*args, torch.empty_like(q_latent), splits, 16)
    want = head_bmm(latent, w_uv_t, torch.empty(4, heads, v_dim, dtype=dtype))
    pending = mla_decode(*args, torch.empty_like(q_latent), splits, 16, defer_combine=True)
    if splits == 1:
        assert isinstance(pending, torch.Tensor) and torch.equal(pending, latent)
        return
    assert isinstance(pending, PendingCombine) and pending.shape == latent.shape
    # The torch form of the combine (what the torch backend's W_UV product takes it as).
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(pending.materialize(), latent, rtol=tol, atol=tol)
    got = combine_head_bmm(pending, w_uv_t, torch.full((4, heads, v_dim), 7.0, dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(got[3], torch.zeros_like(got[3]))
    with pytest.raises(ValueError, match="do not match"):
        combine_head_bmm(pending, w_uv_t[:2], torch.empty(4, 2, v_dim, dtype=dtype))
    with pytest.raises(ValueError, match="unit stride"):
        combine_head_bmm(pending, w_uv_t.contiguous(), torch.empty(4, heads, v_dim, dtype=dtype))
    other = torch.float16 if dtype == torch.float32 else torch.float32
    with pytest.raises(ValueError, match="decode's output"):
        combine_head_bmm(pending, w_uv_t, torch.empty(4, heads, v_dim, dtype=other))
    assert combine_head_bmm(
        PendingCombine(pending.mid_out[:0], pending.mid_lse[:0], dtype), w_uv_t,
        torch.empty(0, heads, v_dim, dtype=dtype),
    ).shape == (0, heads, v_dim)  # fmt: skip


def test_mla_decode_tiles_from_the_environment(monkeypatch):
    """`PDSERVE_MLA_DECODE_TILES` (an engine A/B of the quartered kernel's launch): parsed into
    `mla_decode`'s keywords where the queries take the quartered kernel (16-bit, rank a power
    of two >= 64), none in float32 or at rank 16; a bad value names the form."""
    from engine.config import mla_decode_tiles_from_env
    from engine.kernels import mla_decode as module

    bf16 = torch.zeros(1, 16, 512, dtype=torch.bfloat16)
    monkeypatch.setenv("PDSERVE_MLA_DECODE_TILES", "32,0,3,1")
    module._env_tiles.cache_clear()
    try:
        assert module.env_launch(bf16) == {
            "block_n": 32, "num_warps": None, "num_stages": 3, "pages_ahead": True,
        }  # fmt: skip
        assert module.env_launch(bf16.float()) == {}
        assert module.env_launch(bf16[..., :16]) == {}
    finally:
        monkeypatch.delenv("PDSERVE_MLA_DECODE_TILES")
        module._env_tiles.cache_clear()
    assert module.env_launch(bf16) == {}
    for bad in ("32,4,3", "48,4,3,1", "32,3,3,1", "32,4,0,1", "32,4,3,2", "a"):
        monkeypatch.setenv("PDSERVE_MLA_DECODE_TILES", bad)
        with pytest.raises(ValueError, match="PDSERVE_MLA_DECODE_TILES"):
            mla_decode_tiles_from_env()


def test_default_pages_ahead():
    """The quartered kernel reads its page ids a tile ahead by default at 16 heads a program and
    4 warps (where it was timed), in 32-key tiles at 3 stages; not at 8 warps (batch 1), wider
    head blocks, or the one-chain kernel. An explicit launch (`block_n` or `num_stages`) keeps
    the plain loop unless asked."""
    from engine.kernels.mla_decode import (
        AHEAD_BLOCK_N,
        AHEAD_STAGES,
        default_num_warps,
        default_pages_ahead,
    )

    assert (AHEAD_BLOCK_N, AHEAD_STAGES) == (32, 3)
    warps = [default_num_warps(torch.bfloat16, b, 16, 132) for b in (1, 16, 64, 256)]
    assert warps == [8, 4, 4, 4]
    assert [default_pages_ahead(True, 16, w) for w in warps] == [False, True, True, True]
    assert not default_pages_ahead(True, 64, 4) and not default_pages_ahead(False, 16, 4)


def test_mla_decode_rule_takes_pages_ahead_in_16_bit(monkeypatch):
    """The rule's launch at rank 64 in a 16-bit type, 16 heads over 9 sequences (4 warps on a
    132-SM device: two programs an SM), is the pages-ahead one, and its output matches the
    reference and the plain loop's within the type's rounding. float16: Triton's interpreter
    gets bfloat16 wrong in every form of this kernel (numpy has no bfloat16)."""
    dtype = torch.float16
    from engine.kernels import mla_decode as module

    launches: list[dict] = []
    kernel = module.mla_decode_quarters_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "mla_decode_quarters_kernel", Spy())
    lens = [0, 15, 16, 45, 3, 70, 1, 33, 64]
    q_latent, q_pe, cache, table, seq_lens, scale, want = decode_case(lens, 16, 64, 8, 16, dtype)
    out = torch.empty_like(q_latent)
    mla_decode(q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, out)
    plain = torch.empty_like(q_latent)
    mla_decode(
        q_latent, q_pe, cache.k[0], cache.v[0], table, seq_lens, scale, plain, block_n=64,
        num_stages=2,
    )  # fmt: skip
    assert [(k["AHEAD"], k["BLOCK_N"], k["num_stages"], k["num_warps"]) for k in launches] == [
        (True, 32, 3, 4), (False, 64, 2, 4),
    ]  # fmt: skip
    torch.testing.assert_close(out, want, rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(out, plain, rtol=5e-3, atol=5e-3)
