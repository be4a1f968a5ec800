"""Layer outputs left to the next norm (`engine.layers.pending`): the fused MoE's combine and
the model's plumbing. (The skinny GEMM's split sum: tests/engine/test_skinny_gemm.py; the
norm kernel's own cases: tests/engine/test_fused_ops.py.)

On this CPU host the kernels run under Triton's interpreter (tests/conftest.py). Each deferred
path is compared with the launch it replaces followed by the same norm, bit for bit: the same
kernels, the same sums in the same order.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels import fused
from engine.kernels.fused_moe import fused_moe
from engine.layers.moe import (
    GroupedRouting,
    TorchMoEBackend,
    TritonMoEBackend,
    select_experts,
)
from engine.layers.norm import RMSNorm
from engine.layers.pending import PendingSum, materialize

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter cases; bench.check_moe_gpu on GPUs"
)

HIDDEN, INTER = 40, 24


def weights(num_experts: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=g) / INTER**0.5
    return w13.to(dtype), w2.to(dtype)


def normalised(x: torch.Tensor | PendingSum, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The fused norm kernel with the residual add, on `x` (a tensor or a pending sum)."""
    g = torch.Generator().manual_seed(5)
    res = torch.randn(x.shape[0], HIDDEN, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype)
    out = fused.rms_norm(x, w, 1e-6, residual=res)
    return out, res


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_combine_left_to_the_norm(dtype: torch.dtype) -> None:
    """Ids outside [0, E) (expert parallelism's) included: their rows are never read."""
    w13, w2 = weights(8, dtype)
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    topk_w, ids = select_experts(
        torch.randn(7, 8, generator=torch.Generator().manual_seed(2)), 3, True
    )
    ids[::3, 1] = -1
    ids[2, 0] = 8
    pending = fused_moe(x, w13, w2, topk_w, ids, small_batch=False, defer=True)
    assert isinstance(pending, PendingSum) and pending.shape == (7, HIDDEN)
    combined = fused_moe(x, w13, w2, topk_w, ids, small_batch=False)
    got, want = normalised(pending, dtype), normalised(combined, dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    if dtype == torch.float32:  # the torch sum is the combine's (the interpreter truncates
        assert torch.equal(pending.materialize(), combined)  # 16-bit casts: float32 only)
    # The small path has no combine launch to save: a tensor.
    small = fused_moe(x[:1], w13, w2, topk_w[:1], ids[:1], defer=True)
    assert isinstance(small, torch.Tensor)


def test_backends_defer_only_where_they_can() -> None:
    """The Triton backend defers on its grouped path (routed and grouped-routed, fused shared
    experts included); the torch backend and the small path give tensors."""
    w13, w2 = weights(10, torch.float32, seed=3)  # 8 routed + 2 shared
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(4))
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(6))
    bias = torch.zeros(8)
    routing = GroupedRouting(top_k=2, num_groups=2, topk_groups=1, renormalize=True,
                             scaling_factor=1.5)  # fmt: skip
    triton_backend, torch_backend = TritonMoEBackend(), TorchMoEBackend()
    for args in ((x, logits, w13[:8], w2[:8], 2, True),):
        got = triton_backend.routed_experts_pending(*args)
        assert isinstance(got, PendingSum)
        assert torch.equal(materialize(got), triton_backend.routed_experts(*args))
        assert isinstance(torch_backend.routed_experts_pending(*args), torch.Tensor)
    grouped = (x, logits, bias, w13, w2, routing, 2)
    got = triton_backend.routed_experts_grouped_pending(*grouped)
    assert isinstance(got, PendingSum) and got.parts.shape == (5, 4, HIDDEN)
    assert torch.equal(materialize(got), triton_backend.routed_experts_grouped(*grouped))
    one = triton_backend.routed_experts_grouped_pending(x[:1], logits[:1], *grouped[2:])
    assert isinstance(one, torch.Tensor)


def test_norm_forward_residual_sums_a_pending_sum_on_the_torch_path() -> None:
    norm = RMSNorm(HIDDEN, 1e-6)
    parts = torch.randn(3, 2, HIDDEN)
    res = torch.randn(3, HIDDEN)
    got = norm.forward_residual(PendingSum(parts, torch.float32), res.clone())
    want = norm.forward_residual(parts[:, 0] + parts[:, 1], res.clone())
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
