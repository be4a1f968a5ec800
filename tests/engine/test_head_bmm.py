"""The head-batched product of MLA's weight absorptions (`engine.kernels.head_bmm`) against
torch's bmm, under Triton's interpreter on the CPU: strided views as the model passes them
(the no-rope part of the query rows, W_UK and W_UV transposed as views of `kv_b_proj`'s
weight), row counts around the tiles, empty batches. float32 is exact to rounding
(`input_precision="ieee"`, rtol = atol = 1e-5); float16 rounds once from float32 (rtol = atol =
2e-3 on outputs of order 1). bfloat16 runs on the GPU (`bench.mla_absorb` checks it there)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

from engine.kernels.head_bmm import head_bmm, head_bmm_tiles

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
