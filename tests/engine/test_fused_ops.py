"""The fused Triton element-wise kernels against the layers' pure-torch paths.

On this CPU host they run under Triton's interpreter (tests/conftest.py); on a GPU compiled.
float32 agrees to 1e-5. bfloat16 agrees on the GPU to one bf16 ulp (2**-7 relative): the
kernels round where torch rounds, and only the RMS sum's order differs. Triton's interpreter
truncates float32 -> bfloat16 casts instead of rounding to nearest, so on the CPU bfloat16 is
held to a few ulps (2**-5).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from engine.config import RopeConfig
from engine.kernels import fused
from engine.layers.norm import RMSNorm
from engine.layers.pending import PendingSum
from engine.layers.rotary import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        ulps = 2**-7 if DEVICE == "cuda" else 2**-5
        scale = max(1.0, float(want.detach().float().abs().max())) if want.numel() else 1.0
        torch.testing.assert_close(got.float(), want.float(), rtol=ulps, atol=ulps * scale)


def torch_norm(dim: int, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dim"), [(0, 64), (1, 64), (5, 96), (3, 320)])
def test_rms_norm_and_residual_match_torch(dtype: torch.dtype, rows: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(rows * dim)
    norm = torch_norm(dim, dtype, gen)
    x = (3 * torch.randn(rows, dim, generator=gen)).to(dtype)
    res = torch.randn(rows, dim, generator=gen).to(dtype)
    close(fused.rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), norm.eps).cpu(), norm(x))
    want, want_res = norm.forward_residual(x, res)
    res_dev = res.to(DEVICE)
    got = fused.rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), norm.eps, residual=res_dev)
    close(got.cpu(), want)
    close(res_dev.cpu(), want_res)  # the stream is updated in place


def test_rms_norm_of_a_strided_slice() -> None:
    """MLA normalises the latent part of a wider projection: a view with a row stride."""
    gen = torch.Generator().manual_seed(1)
    norm = torch_norm(48, torch.float32, gen)
    wide = torch.randn(4, 64, generator=gen)
    got = fused.rms_norm(wide.to(DEVICE)[:, :48], norm.weight.to(DEVICE), norm.eps)
    close(got.cpu(), norm(wide[:, :48]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "n"), [(0, 16), (1, 16), (3, 200), (2, 1500)])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, rows: int, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = (2 * torch.randn(rows, 2 * n, generator=gen)).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    close(fused.silu_and_mul(x.to(DEVICE)).cpu(), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("heads", "dim"), [(1, 16), (4, 64), (3, 128)])
def test_rope_matches_torch(dtype: torch.dtype, interleaved: bool, heads: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(heads * dim)
    rope = RotaryEmbedding(
        RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64),
        dim, 256, interleaved=interleaved,
    )  # fmt: skip
    positions = torch.tensor([0, 1, 63, 64, 255])
    # q and k as the attention layer makes them: views into one wider projection.
    qkv = torch.randn(5, (heads + 2) * dim + 8, generator=gen).to(dtype)
    q = qkv[:, : heads * dim].view(5, heads, dim)
    k = qkv[:, heads * dim : (heads + 1) * dim].view(5, 1, dim)
    want_q, want_k = rope(positions, q, k)
    dev = qkv.to(DEVICE)
    got_q = fused.rope(dev[:, : heads * dim].view(5, heads, dim), positions.to(DEVICE),
                       rope.cos.to(DEVICE), rope.sin.to(DEVICE), interleaved)  # fmt: skip
    got_k = fused.rope(dev[:, heads * dim : (heads + 1) * dim].view(5, 1, dim),
                       positions.to(DEVICE), rope.cos.to(DEVICE), rope.sin.to(DEVICE),
                       interleaved)  # fmt: skip
    close(got_q.cpu(), want_q)
    close(got_k.cpu(), want_k)
    assert fused.rope(q[:0], positions[:0], rope.cos, rope.sin).shape == (0, heads, dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("hq", "hkv", "dim"), [(4, 1, 64), (8, 2, 128), (2, 2, 32)])
def test_rope_and_kv_store_in_one_launch_equal_the_two_steps(
    dtype: torch.dtype, interleaved: bool, hq: int, hkv: int, dim: int
) -> None:
    from engine.kernels import attention

    gen = torch.Generator().manual_seed(hq * dim)
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), dim, 64, interleaved=interleaved)
    cos, sin = rope.cos.to(DEVICE), rope.sin.to(DEVICE)
    tokens = 5
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim + 8, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)
    k = qkv[:, hq * dim : (hq + hkv) * dim].view(tokens, hkv, dim)
    v = qkv[:, (hq + hkv) * dim : (hq + 2 * hkv) * dim].view(tokens, hkv, dim)
    positions = torch.tensor([0, 7, 8, 40, 63], device=DEVICE)
    slots = torch.tensor([3, -1, 0, 9, 5], device=DEVICE)  # -1: a padded row, not written
    caches = [torch.full((12, hkv, dim), 7.0, dtype=dtype, device=DEVICE) for _ in range(4)]
    want_q = fused.rope(q, positions, cos, sin, interleaved)
    want_k = fused.rope(k, positions, cos, sin, interleaved)
    attention.store_kv(want_k, v, caches[0], caches[1], slots)
    got_q = fused.rope_store_kv(q, k, v, positions, cos, sin, interleaved, caches[2], caches[3],
                                slots)  # fmt: skip
    assert torch.equal(got_q, want_q)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    assert torch.equal(caches[2][3], want_k[0]) and (caches[2][[1, 2, 4]] == 7.0).all()
    empty = fused.rope_store_kv(q[:0], k[:0], v[:0], positions[:0], cos, sin, interleaved,
                                caches[2], caches[3], slots[:0])  # fmt: skip
    assert empty.shape == (0, hq, dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_qk_norm_rope_and_kv_store_in_one_launch_match_torch(
    dtype: torch.dtype, interleaved: bool
) -> None:
    """Qwen3's per-head q/k RMSNorm folded into the same launch, against the torch path."""
    hq, hkv, dim, tokens = 4, 2, 64, 3
    gen = torch.Generator().manual_seed(5)
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), dim, 32, interleaved=interleaved)
    q_norm, k_norm = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)
    with torch.no_grad():
        q_norm.weight.copy_(torch.rand(dim, generator=gen) + 0.5)
        k_norm.weight.copy_(torch.rand(dim, generator=gen) + 0.5)
    q_norm, k_norm = q_norm.to(dtype), k_norm.to(dtype)
    qkv = 3 * torch.randn(tokens, (hq + 2 * hkv) * dim, generator=gen).to(dtype)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)
    k = qkv[:, hq * dim : (hq + hkv) * dim].view(tokens, hkv, dim)
    v = qkv[:, (hq + hkv) * dim :].view(tokens, hkv, dim)
    positions = torch.tensor([0, 5, 31])
    want_q, want_k = rope(positions, q_norm(q), k_norm(k))  # the torch path, on the CPU
    slots = torch.tensor([2, 0, -1])
    dq, dk, dv, dpos, dslots, cos, sin = (
        t.to(DEVICE) for t in (q, k, v, positions, slots, rope.cos, rope.sin)
    )
    k_cache = torch.zeros(4, hkv, dim, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros(4, hkv, dim, dtype=dtype, device=DEVICE)
    norms = (q_norm.weight.to(DEVICE), k_norm.weight.to(DEVICE), 1e-6)
    got_q = fused.rope_store_kv(dq, dk, dv, dpos, cos, sin, interleaved, k_cache, v_cache,
                                dslots, norms)  # fmt: skip
    close(got_q.cpu(), want_q)
    close(k_cache[[2, 0]].cpu(), want_k[:2])
    assert torch.equal(v_cache[[2, 0]].cpu(), v[:2]) and not k_cache[[1, 3]].any()


@pytest.mark.skipif(DEVICE == "cuda", reason="flips a compiled kernel's switch: interpreter only")
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_rope_and_kv_store_with_metadata_before_the_wait(
    monkeypatch: pytest.MonkeyPatch, interleaved: bool, norm: bool
) -> None:
    """`fused.METADATA_BEFORE_WAIT` (a decode token's position, slot and cos/sin rows read
    before the PDL wait): the rotated queries and both caches bit for bit as without it, a
    padded row (slot -1) writing nothing, with and without Qwen3's q/k norms."""
    hq, hkv, dim, tokens = 4, 2, 64, 4
    gen = torch.Generator().manual_seed(11)
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), dim, 32, interleaved=interleaved)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim, generator=gen).to(torch.bfloat16)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)
    k = qkv[:, hq * dim : (hq + hkv) * dim].view(tokens, hkv, dim)
    v = qkv[:, (hq + hkv) * dim :].view(tokens, hkv, dim)
    positions, slots = torch.tensor([0, 5, 31, 9]), torch.tensor([2, 0, -1, 5])
    weights = (torch.rand(dim, generator=gen) + 0.5).to(torch.bfloat16)
    norms = (weights, weights.flip(0), 1e-6) if norm else None
    results = []
    for early in (False, True):
        monkeypatch.setattr(fused, "METADATA_BEFORE_WAIT", early)
        caches = [torch.full((6, hkv, dim), 7.0, dtype=torch.bfloat16) for _ in range(2)]
        got_q = fused.rope_store_kv(q, k, v, positions, rope.cos, rope.sin, interleaved,
                                    caches[0], caches[1], slots, norms)  # fmt: skip
        results.append((got_q, *caches))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert (results[1][1][[1, 3, 4]] == 7.0).all()  # only slots 2, 0 and 5 written


@pytest.mark.parametrize("per_program", [3, 16])
def test_rope_with_several_tokens_a_program_equals_one_a_program(
    monkeypatch: pytest.MonkeyPatch, per_program: int
) -> None:
    """A prefill's RoPE programs take several tokens each (`rope_tokens_per_program`), the
    last program a partial share: the same bytes as one token a program."""
    from engine.kernels import attention

    hq, hkv, dim, tokens = 3, 2, 32, 37
    gen = torch.Generator().manual_seed(37)
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), dim, 64)
    cos, sin = rope.cos.to(DEVICE), rope.sin.to(DEVICE)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim, generator=gen).to(torch.bfloat16).to(DEVICE)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)
    k = qkv[:, hq * dim : (hq + hkv) * dim].view(tokens, hkv, dim)
    v = qkv[:, (hq + hkv) * dim :].view(tokens, hkv, dim)
    positions = torch.randint(0, 64, (tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(tokens + 3, generator=gen)[:tokens].to(DEVICE)
    slots[5] = -1  # a padded row
    caches = [torch.zeros(tokens + 3, hkv, dim, dtype=torch.bfloat16, device=DEVICE)
              for _ in range(4)]  # fmt: skip
    want_q = fused.rope(q, positions, cos, sin)
    want_k = fused.rope(k, positions, cos, sin)
    attention.store_kv(want_k, v, caches[0], caches[1], slots)
    monkeypatch.setattr(fused, "rope_tokens_per_program", lambda n: per_program)
    assert torch.equal(fused.rope(q, positions, cos, sin), want_q)
    got_q = fused.rope_store_kv(q, k, v, positions, cos, sin, False, caches[2], caches[3], slots)
    assert torch.equal(got_q, want_q)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("page_size", [1, 16])
def test_mla_latent_in_one_launch_matches_torch(
    dtype: torch.dtype, interleaved: bool, page_size: int
) -> None:
    """MLA's latent side (the latent's RMSNorm, RoPE of the rotary query and key, the cache
    write) in one launch, against the torch layers and a plain cache write; with
    `return_kv` also the normed latent and rotated key, for extend."""
    heads, nope, rope_dim, rank, tokens = 3, 16, 8, 24, 5
    gen = torch.Generator().manual_seed(page_size + interleaved)
    rope = RotaryEmbedding(
        RopeConfig(rope_type="yarn", theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                   original_max_position_embeddings=16),
        rope_dim, 64, interleaved=interleaved,
    )  # fmt: skip
    norm = torch_norm(rank, dtype, gen)
    # q_pe, c_kv and k_pe as MLA makes them: views into one wider projection.
    width = heads * (nope + rope_dim)
    proj = (2 * torch.randn(tokens, width + rank + rope_dim, generator=gen)).to(dtype)
    q_pe = proj[:, :width].view(tokens, heads, nope + rope_dim)[..., nope:]
    c_kv = proj[:, width : width + rank][:, None, :]
    k_pe = proj[:, width + rank :][:, None, :]
    positions = torch.tensor([0, 3, 17, 40, 63])
    slots = torch.tensor([5, -1, 0, 2 * page_size + 4, 3])  # -1: a padded row, not written
    want_q, want_k = rope(positions, q_pe, k_pe)  # the torch path, on the CPU
    want_c = norm(c_kv)
    num_slots = 3 * page_size + 6
    latent = torch.full((num_slots, 1, rank), 7.0, dtype=dtype, device=DEVICE)
    pe = torch.full((num_slots, 1, rope_dim), 7.0, dtype=dtype, device=DEVICE)
    dev = proj.to(DEVICE)
    args = (
        dev[:, :width].view(tokens, heads, nope + rope_dim)[..., nope:],
        dev[:, width : width + rank][:, None, :],
        dev[:, width + rank :][:, None, :],
        positions.to(DEVICE), rope.cos.to(DEVICE), rope.sin.to(DEVICE), interleaved,
        norm.weight.to(DEVICE), norm.eps, latent, pe, slots.to(DEVICE),
    )  # fmt: skip
    got_q, got_c, got_k = fused.mla_latent_rope_store(*args, return_kv=True)
    assert got_c is not None and got_k is not None
    close(got_q.cpu(), want_q)
    close(got_c.cpu(), want_c)
    close(got_k.cpu(), want_k)
    written = [0, 2, 3, 4]
    close(latent[slots[written]].cpu(), want_c[written])
    close(pe[slots[written]].cpu(), want_k[written])
    # The cache holds exactly what the kernel returns; no other slot was touched.
    assert torch.equal(latent[slots[written]], got_c[written])
    assert torch.equal(pe[slots[written]], got_k[written])
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots[written]] = False
    assert (latent[untouched] == 7.0).all() and (pe[untouched] == 7.0).all()
    # Decode's form returns only the rotated queries, the same values.
    again_q, none_c, none_k = fused.mla_latent_rope_store(*args)
    assert none_c is None and none_k is None and torch.equal(again_q, got_q)
    d_q, d_c, d_k, d_pos = (a[:0] for a in (args[0], args[1], args[2], positions.to(DEVICE)))
    empty = fused.mla_latent_rope_store(
        d_q, d_c, d_k, d_pos, rope.cos.to(DEVICE), rope.sin.to(DEVICE), interleaved,
        norm.weight.to(DEVICE), norm.eps, latent, pe, slots[:0].to(DEVICE), return_kv=True,
    )  # fmt: skip
    assert empty[0].shape == (0, heads, rope_dim) and empty[1] is not None
    assert empty[1].shape == (0, 1, rank)


@pytest.mark.parametrize("per_program", [3, 16])
def test_mla_latent_with_several_tokens_a_program_equals_one_a_program(
    monkeypatch: pytest.MonkeyPatch, per_program: int
) -> None:
    """A prefill's programs take several tokens each, the last a partial share: the same
    bytes as one token a program, in the outputs and the cache."""
    heads, rope_dim, rank, tokens = 2, 8, 16, 7
    gen = torch.Generator().manual_seed(per_program)
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), rope_dim, 32, interleaved=True)
    proj = torch.randn(tokens, heads * rope_dim + rank + rope_dim, generator=gen).to(DEVICE)
    q_pe = proj[:, : heads * rope_dim].view(tokens, heads, rope_dim)
    c_kv = proj[:, heads * rope_dim : -rope_dim][:, None, :]
    k_pe = proj[:, -rope_dim:][:, None, :]
    positions = torch.arange(3, 3 + tokens, device=DEVICE)
    slots = torch.tensor([4, 0, -1, 9, 2, 7, 5], device=DEVICE)
    weight = (1 + 0.1 * torch.randn(rank, generator=gen)).to(DEVICE)
    results = []
    for share in (1, per_program):
        monkeypatch.setattr(fused, "rope_tokens_per_program", lambda n, share=share: share)
        latent = torch.zeros(10, 1, rank, device=DEVICE)
        pe = torch.zeros(10, 1, rope_dim, device=DEVICE)
        outs = fused.mla_latent_rope_store(
            q_pe, c_kv, k_pe, positions, rope.cos.to(DEVICE), rope.sin.to(DEVICE), True,
            weight, 1e-6, latent, pe, slots, return_kv=True,
        )  # fmt: skip
        results.append((*outs, latent, pe))
    for got, want in zip(results[1], results[0], strict=True):
        assert got is not None and want is not None and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_takes_a_pending_sum(
    dtype: torch.dtype, weighted: bool, with_residual: bool
) -> None:
    """A `PendingSum` (a split-K product's float32 partials, or a MoE layer's weighted expert
    outputs with ids outside [0, E) skipped) normalised by the kernel as its sum is; the torch
    path (CPU, NPU) sums it first."""
    gen = torch.Generator().manual_seed(7 + weighted + 2 * with_residual)
    rows, slices, dim, experts = 5, 3, 96, 4
    norm = torch_norm(dim, dtype, gen)
    if weighted:  # MoE: expert outputs in the model's dtype, one slot marked for another rank
        parts = (2 * torch.randn(rows, slices, dim, generator=gen)).to(dtype)
        weights = torch.rand(rows, slices, generator=gen)
        ids = torch.randint(0, experts, (rows, slices), generator=gen)
        ids[1, 2], ids[3, 0] = -1, experts
        parts[1, 2] = float("nan")  # a skipped slot is never read
        host = PendingSum(parts, dtype, weights, ids, experts)
        pending = PendingSum(parts.to(DEVICE), dtype, weights.to(DEVICE), ids.to(DEVICE), experts)
    else:  # split-K: float32 partials [split, M, N] seen as [M, split, N]
        parts = torch.randn(slices, rows, dim, generator=gen)
        host = PendingSum(parts.transpose(0, 1), dtype)
        pending = PendingSum(parts.to(DEVICE).transpose(0, 1), dtype)
    summed = pending.materialize()
    assert not summed.isnan().any()
    weight = norm.weight.to(DEVICE)
    if not with_residual:
        want = fused.rms_norm(summed, weight, norm.eps)
        close(fused.rms_norm(pending, weight, norm.eps).cpu(), want.cpu())
        return
    res = torch.randn(rows, dim, generator=gen).to(dtype)
    res_got, res_want = res.clone().to(DEVICE), res.clone().to(DEVICE)
    got = fused.rms_norm(pending, weight, norm.eps, residual=res_got)
    want = fused.rms_norm(summed, weight, norm.eps, residual=res_want)
    close(got.cpu(), want.cpu())
    close(res_got.cpu(), res_want.cpu())
    got_torch, got_res = norm.forward_residual(host, res.clone())
    want_torch, want_res = norm.forward_residual(host.materialize(), res.clone())
    assert torch.equal(got_torch, want_torch) and torch.equal(got_res, want_res)


def test_pending_sum_refuses_misfit_weights() -> None:
    with pytest.raises(ValueError, match="weights"):
        PendingSum(torch.zeros(2, 3, 4), torch.float32, torch.zeros(2, 2))


@pytest.mark.parametrize(
    ("dtype", "logits_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, None)],
)
@pytest.mark.parametrize(("rows", "pending"), [(1, False), (1, True), (8, True), (3, False)])
def test_rms_norm_gate_equals_the_norm_then_the_router_kernel(
    dtype: torch.dtype, logits_dtype: torch.dtype | None, rows: int, pending: bool
) -> None:
    """The norm with its residual add and the gate's logits in one launch
    (`fused.rms_norm_gate`): the output and the new residual bit for bit the norm kernel's,
    the logits the router kernel's on that output up to summation order (float32 logits,
    DeepSeek's, to 1e-5; logits in x's dtype, Qwen3-MoE's, to a bf16 ulp); the residual
    passed in is left as it was. 7 gate rows (a tail past 2-row programs), a hidden size
    past a power of two."""
    from engine.kernels.moe_routing import router_logits

    gen = torch.Generator().manual_seed(rows + 10 * pending)
    dim, experts = 96, 7
    logits_dtype = logits_dtype or dtype
    norm = torch_norm(dim, dtype, gen)
    if pending:  # a split-K product's float32 partials
        parts = torch.randn(3, rows, dim, generator=gen).to(DEVICE)
        x: torch.Tensor | PendingSum = PendingSum(parts.transpose(0, 1), dtype)
    else:
        x = (3 * torch.randn(rows, dim, generator=gen)).to(dtype).to(DEVICE)
    res = torch.randn(rows, dim, generator=gen).to(dtype).to(DEVICE)
    gate = (torch.randn(experts, dim, generator=gen) / dim**0.5).to(dtype).to(DEVICE)
    weight = norm.weight.to(DEVICE)
    before = res.clone()
    fused_out = fused.rms_norm_gate(x, weight, norm.eps, res, gate, logits_dtype)
    assert fused_out is not None
    got, got_res, got_logits = fused_out
    assert torch.equal(res, before)
    want_res = res.clone()
    want = fused.rms_norm(x, weight, norm.eps, residual=want_res)
    assert torch.equal(got, want) and torch.equal(got_res, want_res)
    want_logits = router_logits(want, gate, out_dtype=logits_dtype)
    assert got_logits.dtype == logits_dtype and got_logits.shape == (rows, experts)
    if logits_dtype == torch.float32:
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    else:
        ulp = 2**-7 if DEVICE == "cuda" else 2**-5
        torch.testing.assert_close(got_logits.float(), want_logits.float(), rtol=ulp, atol=ulp)


def test_rms_norm_gate_declines_what_it_does_not_fuse() -> None:
    """More rows than the router kernel takes (cuBLAS's product there), or a norm whose
    output dtype is not x's: None, and the residual untouched."""
    dim = 32
    res = torch.zeros(9, dim).to(DEVICE)
    w, gate = torch.ones(dim).to(DEVICE), torch.ones(4, dim).to(DEVICE)
    x = torch.ones(9, dim).to(DEVICE)
    assert fused.rms_norm_gate(x, w, 1e-6, res, gate, torch.float32) is None
    half = x[:2].bfloat16()
    assert fused.rms_norm_gate(half, w, 1e-6, res[:2].bfloat16(), gate, torch.float32) is None
    assert torch.equal(res, torch.zeros(9, dim).to(DEVICE))
