"""The persistent decode layer's kernel (`bench.persistent_layer`) under Triton's interpreter:
a stack of layers (attention halves, or whole MoE layers) in one launch a layer gives the same
bytes as the kernels it replaces launched one after another (their own code), writes the same
KV cache, stays near the float32 reference, and leaves its counters zero for the next launch (a
CUDA graph replays it as it is)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

from bench.persistent_layer import Persistent, Shape, Stack, reference, run_launches
from engine.kernels.fused_moe_small import SmallBatchTiles

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter cases; the benchmark itself on GPUs"
)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "qk_norm", "splits", "context", "programs", "experts"),
    [
        (4, 2, True, 1, 10, 1, 0),  # one split: the splits write the output, no combine items
        (4, 2, True, 3, 10, 2, 0),  # three splits, a combine item a head
        (4, 4, False, 2, 9, 3, 0),  # no GQA, no q/k norms, the new token first in its page
        (4, 2, True, 1, 10, 2, 8),  # whole layers: 8 experts, top-2
        (4, 2, True, 3, 10, 3, 6),  # 6 experts (a gate item of one), top-3
        (4, 2, True, 2, 10, 2, -8),  # whole layers, the dense products on the tensor cores
    ],
)
def test_persistent_layer_equals_the_launches(
    heads: int,
    kv_heads: int,
    qk_norm: bool,
    splits: int,
    context: int,
    programs: int,
    experts: int,
) -> None:
    gemv_dot = experts < 0
    experts = abs(experts)
    top_k = {0: 0, 8: 2, 6: 3}[experts]
    shape = Shape(
        hidden=48, heads=heads, kv_heads=kv_heads, head_dim=16, qk_norm=qk_norm,
        experts=experts, top_k=top_k, inter=24,
    )  # fmt: skip
    # GEMV tiles of 16 x 32: ragged last tiles in N (QKV's 128 or 192 rows, O's 48) and K (48);
    # the experts' intermediate size (24) ragged in the small path's 16-column gate-up blocks.
    stack = Stack.build(
        shape, 2, context, torch.float32, "cpu", page_size=4, num_splits=splits,
        block_n=16, block_k=32, seed=heads + splits,
        moe_tiles=SmallBatchTiles(gate_up_k=16, down_n=16, down_k=16),  # K in steps
        gemv_dot=gemv_dot,
    )  # fmt: skip
    stack.reset()
    want = reference(stack)
    run_launches(stack)
    each = stack.output().clone()
    caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in stack.layers]
    torch.testing.assert_close(each, want, rtol=1e-4, atol=1e-5)
    persistent = Persistent.build(stack, programs)
    for _ in range(2):  # twice: the counters are zero again after a launch
        stack.reset()
        persistent.run()
        assert torch.equal(stack.output(), each)
        for layer, (k, v) in zip(stack.layers, caches, strict=True):
            assert torch.equal(layer.k_cache, k) and torch.equal(layer.v_cache, v)
        assert not persistent.scratch.any()


@pytest.mark.parametrize("experts", [0, 8])
def test_the_engine_launches_agree_with_the_reference(experts: int) -> None:
    # The benchmark's baseline row: the engine's kernels (RoPE in its own launch, the products
    # on the GEMM backend `auto` picks; cuBLAS's here, off Hopper; the MoE's small path).
    shape = Shape(
        hidden=48, heads=4, kv_heads=2, head_dim=16, qk_norm=True, experts=experts,
        top_k=2 if experts else 0, inter=24,
    )  # fmt: skip
    stack = Stack.build(shape, 2, 10, torch.float32, "cpu", page_size=4, num_splits=2)
    stack.reset()
    want = reference(stack)
    run_launches(stack, engine_gemm=True)
    torch.testing.assert_close(stack.output(), want, rtol=1e-4, atol=1e-5)


def test_the_benchmark_table_runs_on_the_cpu() -> None:
    # The rows `session.sh b3` prints, at a tiny shape (eager timing off CUDA): every form's
    # output within float32 rounding of the reference, ours the same bytes as our launches.
    from bench.persistent_layer import table_rows

    shape = Shape(
        hidden=48, heads=4, kv_heads=2, head_dim=16, qk_norm=True, experts=4, top_k=2, inter=16
    )
    rows = table_rows(
        shape, 1, 70, "cpu", torch.float32, sms=1, bandwidth=1e11, programs_per_sm=[2],
        stages=[1], reps=1, block_n=16, block_k=32,
    )  # fmt: skip
    assert len(rows) == 3
    assert "same bytes as ours" in rows[2]
    for row in rows:
        err = float(row.rsplit("err ", 1)[1].split()[0])
        assert err < 1e-5, row
