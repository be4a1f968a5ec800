"""The head-batched product of MLA's weight absorptions (`engine.kernels.head_bmm`) against
torch's bmm, under Triton's interpreter on the CPU: strided views as the model passes them
(the no-rope part of the query rows, W_UK and W_UV transposed as views of `kv_b_proj`'s
weight), row counts around the tiles, empty batches. float32 is exact to rounding
(`input_precision="ieee"`, rtol = atol = 1e-5); float16 rounds once from float32 (rtol = atol =
2e-3 on outputs of order 1). bfloat16 runs on the GPU (`bench.mla_absorb` checks it there)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

from engine.config import RopeConfig
from engine.kernels import fused
from engine.kernels.head_bmm import absorb_query_and_latent, head_bmm, head_bmm_tiles
from engine.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter cases; bench.mla_absorb on GPUs"
)


def absorb_views(t: int, heads: int, nope: int, v: int, rank: int, dtype: torch.dtype):
    """The model's operands: q_nope and the latent output, W_UK and W_UV from one weight."""
    g = torch.Generator().manual_seed(t * 31 + heads)
    q = torch.randn(t, heads, nope + 16, generator=g).to(dtype)  # nope + rope parts
    q_nope = q[:, :, :nope]
    weight = (torch.randn(heads * (nope + v), rank, generator=g) * rank**-0.5).to(dtype)
    w_kv = weight.view(heads, nope + v, rank)
    w_uk, w_uv = w_kv.split([nope, v], dim=1)
    latent_out = torch.randn(t, heads, rank, generator=g).to(dtype)
    return q_nope, w_uk, latent_out, w_uv


@pytest.mark.parametrize("t", [0, 1, 5, 16, 17, 40, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_bmm_matches_torch_on_the_models_views(t, dtype):
    heads, nope, v, rank = 3, 32, 16, 64
    q_nope, w_uk, latent_out, w_uv = absorb_views(t, heads, nope, v, rank, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3

    q_latent = head_bmm(q_nope, w_uk, torch.empty(t, heads, rank, dtype=dtype))
    want = torch.bmm(q_nope.float().transpose(0, 1), w_uk.float()).transpose(0, 1)
    torch.testing.assert_close(q_latent.float(), want, rtol=tol, atol=tol)

    attn = head_bmm(latent_out, w_uv.transpose(1, 2), torch.empty(t, heads, v, dtype=dtype))
    want = torch.bmm(latent_out.float().transpose(0, 1), w_uv.float().transpose(1, 2))
    torch.testing.assert_close(attn.float(), want.transpose(0, 1), rtol=tol, atol=tol)


def test_head_bmm_refuses_mismatched_shapes_and_strides():
    q_nope, w_uk, _, _ = absorb_views(4, 2, 32, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        head_bmm(q_nope, w_uk, torch.empty(4, 2, 32))
    with pytest.raises(ValueError, match="unit stride"):
        head_bmm(q_nope.transpose(1, 2).contiguous().transpose(1, 2), w_uk, torch.empty(4, 2, 64))


def test_head_bmm_tiles_fill_the_device_at_one_row():
    # Moonlight at one row: W_UK's 16 heads x 512 columns, W_UV's 16 x 128.
    assert head_bmm_tiles(1, 16, 512, 132) == (16, 32)
    assert head_bmm_tiles(1, 16, 128, 132) == (16, 32)
    assert head_bmm_tiles(256, 16, 512, 132) == (64, 64)  # 4 x 16 x 4 = 256 < 264 programs
    assert head_bmm_tiles(64, 128, 512, 132) == (64, 128)


def latent_side(
    t: int, heads: int, nope: int, rope: int, rank: int, dtype, interleaved, seed
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], tuple[torch.Tensor, torch.Tensor], Any]:
    """A decode step's MLA operands as the model makes them (views of one projection), the
    latent's norm and the rotary tables, and a cache of 2 x t + 3 slots (filled with 7) with
    the tokens' slots, the second a padded row (-1)."""
    g = torch.Generator().manual_seed(seed)
    width = heads * (nope + rope)
    proj = (2 * torch.randn(t, width + rank + rope, generator=g)).to(dtype)
    q = proj[:, :width].view(t, heads, nope + rope)
    weight = (torch.randn(heads * (nope + 16), rank, generator=g) * rank**-0.5).to(dtype)
    w_uk = weight.view(heads, nope + 16, rank)[:, :nope]
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), rope, 128, interleaved=interleaved)
    norm_weight = (1 + 0.1 * torch.randn(rank, generator=g)).to(dtype)
    slots = torch.arange(t) * 2 + 1
    if t > 1:
        slots[1] = -1
    positions = torch.randint(0, 100, (t,), generator=g)
    latent_args = {
        "q_pe": q[..., nope:],
        "c_kv": proj[:, width : width + rank][:, None, :],
        "k_pe": proj[:, width + rank :][:, None],
        "positions": positions,
        "cos": rotary.cos,
        "sin": rotary.sin,
        "interleaved": interleaved,
        "norm_weight": norm_weight,
        "eps": 1e-6,
    }
    caches = (
        torch.full((2 * t + 3, 1, rank), 7.0, dtype=dtype),
        torch.full((2 * t + 3, 1, rope), 7.0, dtype=dtype),
    )
    return q[..., :nope], w_uk, latent_args, caches, slots


@pytest.mark.parametrize("t", [0, 1, 5, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_absorption_and_latent_side_in_one_launch_are_the_two_launches(t, dtype, interleaved):
    """`absorb_query_and_latent` runs head_bmm's programs and mla_latent_rope_store's in one
    launch: the same latent queries, rotated rotary queries and cache bytes, bit for bit, and
    nothing written at a padded row's slot or any other."""
    heads, nope, rope, rank = 3, 32, 8, 64
    q_nope, w_uk, latent_args, caches, slots = latent_side(
        t, heads, nope, rope, rank, dtype, interleaved, seed=t + 7 * interleaved
    )
    want_caches = tuple(c.clone() for c in caches)
    want_q = head_bmm(q_nope, w_uk, torch.empty(t, heads, rank, dtype=dtype))
    want_pe, _, _ = fused.mla_latent_rope_store(
        **latent_args, latent_cache=want_caches[0], pe_cache=want_caches[1], slots=slots
    )
    launch = fused.MLALatentLaunch.of(
        **latent_args, latent_cache=caches[0], pe_cache=caches[1], slots=slots
    )
    got_q, got_pe = absorb_query_and_latent(q_nope, w_uk, launch)
    assert torch.equal(got_q, want_q) and torch.equal(got_pe, want_pe)
    for got, want in zip(caches, want_caches, strict=True):
        assert torch.equal(got, want)
    # Token i's slot is 2i + 1; the even slots, and the padded row's 3, are nobody's.
    assert (caches[0][0::2] == 7.0).all() and (caches[1][0::2] == 7.0).all()
    if t > 1:
        assert (caches[0][3] == 7.0).all() and (caches[1][3] == 7.0).all()


@pytest.mark.parametrize("t", [1, 5])
def test_absorption_and_latent_side_with_metadata_before_the_wait(t, monkeypatch):
    """`fused.METADATA_BEFORE_WAIT` (the latent programs read their token's position, slot
    and cos/sin rows before the PDL wait): the same latent queries, rotated rotary queries and
    cache bytes, bit for bit, in the one launch and in `mla_latent_rope_store`'s."""
    results = []
    for early in (False, True):
        monkeypatch.setattr(fused, "METADATA_BEFORE_WAIT", early)
        q_nope, w_uk, latent_args, caches, slots = latent_side(
            t, 3, 32, 8, 64, torch.bfloat16, True, seed=t
        )
        launch = fused.MLALatentLaunch.of(
            **latent_args, latent_cache=caches[0], pe_cache=caches[1], slots=slots
        )
        got_q, got_pe = absorb_query_and_latent(q_nope, w_uk, launch)
        alone = tuple(c.clone().fill_(7.0) for c in caches)
        alone_pe, _, _ = fused.mla_latent_rope_store(
            **latent_args, latent_cache=alone[0], pe_cache=alone[1], slots=slots
        )
        results.append((got_q, got_pe, *caches, alone_pe, *alone))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_absorption_with_latent_refuses_an_extend_launch_and_other_rows():
    q_nope, w_uk, latent_args, caches, slots = latent_side(4, 2, 32, 8, 64, torch.float32, False, 1)
    extend = fused.MLALatentLaunch.of(
        **latent_args, latent_cache=caches[0], pe_cache=caches[1], slots=slots, return_kv=True
    )
    with pytest.raises(ValueError, match="return_kv"):
        absorb_query_and_latent(q_nope, w_uk, extend)
    decode = fused.MLALatentLaunch.of(
        **latent_args, latent_cache=caches[0], pe_cache=caches[1], slots=slots
    )
    with pytest.raises(ValueError, match="3 query rows"):
        absorb_query_and_latent(q_nope[:3], w_uk, decode)
