"""Shared-expert fusion (DeepSeek-V3): the shared MLP stacked after the routed experts in w13/w2
as extra experts every token takes with weight 1.0, loaded from the checkpoint's shared MLP
(gate/up rows and down columns split by the loader), on the Triton MoE backend with expert
parallelism off. Against the separate MLP in float32, and where the engine turns it on."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

from bench.engine import model_cost, pdserve_state_as_hf
from bench.moe_shapes import ExpertTouches
from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.eplb import initial_placement
from engine.kernels.fused_moe import fused_moe_grouped_routed
from engine.kernels.fused_moe_configs import kernel_config
from engine.kernels.fused_moe_small import small_batch_moe, small_batch_moe_grouped_routed
from engine.kernels.moe_routing import grouped_topk, router_logits
from engine.layers.attention import make_attention_backend
from engine.layers.ep_moe import ExpertParallelExperts, shard_experts
from engine.layers.moe import (
    FusedExperts,
    MoEBackend,
    TorchMoEBackend,
    TritonMoEBackend,
    select_experts_grouped,
    set_moe_backend,
)
from engine.loader import WeightTarget, load_dummy_weights, load_weights
from engine.models.deepseek_v3 import DeepseekMoE, DeepseekV3ForCausalLM
from engine.parallel import ParallelConfig
from engine.sampling import SamplingParams
from tests.engine.test_deepseek import hf_config

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter cases; bench.check_moe_gpu on GPUs"
)


def model_pair(num_shared: int) -> tuple[DeepseekV3ForCausalLM, DeepseekV3ForCausalLM]:
    """The same random weights in a model with the separate shared MLP and in one with it
    fused, the latter loaded through its weight map from the former's checkpoint tensors."""
    raw = hf_config(first_k_dense_replace=0, num_hidden_layers=1, n_shared_experts=num_shared)
    config = ModelConfig.from_hf(raw)
    attention = make_attention_backend("torch", "cpu", True)
    separate = DeepseekV3ForCausalLM(config, attention)
    fused = DeepseekV3ForCausalLM(config, attention, fuse_shared_experts=True)
    load_dummy_weights(separate, seed=3)
    with torch.no_grad():
        for name, p in separate.named_parameters():
            if "norm" not in name:  # order-1 outputs: the tolerance means what it says
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
        load_weights(fused, iter(pdserve_state_as_hf(separate).items()))
    return separate, fused


def moe_layers(model: DeepseekV3ForCausalLM) -> list[DeepseekMoE]:
    return [m for m in model.modules() if isinstance(m, DeepseekMoE)]


@pytest.mark.parametrize(
    "backend", [TorchMoEBackend(), TritonMoEBackend()], ids=["torch", "triton"]
)
@pytest.mark.parametrize("num_shared", [1, 2])
def test_fused_shared_experts_equal_the_separate_mlp(backend: MoEBackend, num_shared: int) -> None:
    """float32, random weights: the fused layer equals routed experts + shared MLP to 1e-5, at
    one token (Triton: the small path, routing in its gate-up kernel) and at 12 (the grouped
    path)."""
    separate, fused = model_pair(num_shared)
    for model in (separate, fused):
        set_moe_backend(model, backend)
    for ours, theirs in zip(moe_layers(fused), moe_layers(separate), strict=True):
        assert ours.shared_experts is None and ours.experts.num_shared == num_shared
        assert ours.experts.w13.shape[0] == 8 + num_shared
        assert theirs.shared_experts is not None and theirs.experts.num_shared == 0
        for tokens in (0, 1, 12):
            x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
            with torch.no_grad():
                got, want = ours(x), theirs(x)
            assert got.shape == (tokens, 64)
            if tokens:
                assert want.abs().max() > 0.5
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_checkpoint_maps_back_to_the_same_tensors() -> None:
    """The fused model's weight map read backwards gives the checkpoint it was loaded from
    (what `bench.engine` hands transformers)."""
    separate, fused = model_pair(2)
    want, got = pdserve_state_as_hf(separate), pdserve_state_as_hf(fused)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # The shared MLP's down columns [I, 2I) are the second stacked shared expert.
    down = want["model.layers.0.mlp.shared_experts.down_proj.weight"]
    assert torch.equal(moe_layers(fused)[0].experts.w2[9], down[:, 32:])


def test_source_slice_outside_the_tensor_is_named() -> None:
    target = WeightTarget(
        "layers.0.mlp.experts.w2", 8, source_dim=1, source_offset=32, source_size=32
    )
    with pytest.raises(ValueError, match=r"\[32:64\] along dim 1 .* shape \(64, 48\)"):
        target.source(torch.zeros(64, 48))
    with pytest.raises(ValueError, match="size >= 1"):
        WeightTarget("w", source_size=0)


def test_routing_appends_the_shared_experts() -> None:
    """The grouped routing kernel and the reference give every token ids E.. with weight 1.0
    after its routed choices (neither renormalised nor scaled); the router's logits kernel
    equals the float32 reference up to summation order, from bfloat16 too."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 64, generator=g)
    # 5 tokens through the kernel, 12 through the reference's cuBLAS product.
    for x in (torch.randn(5, 64, generator=g), torch.randn(12, 64, generator=g)):
        for dtype in (torch.float32, torch.bfloat16):
            got = router_logits(x.to(dtype), weight.to(dtype))
            want = torch.nn.functional.linear(x.to(dtype).float(), weight.to(dtype).float())
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            # Qwen3-MoE's gate (TritonMoEBackend.gate_logits): the sums rounded once to x's
            # dtype, as F.linear in that dtype rounds them (one bfloat16 step apart at most
            # where the summation orders round to either side).
            got = router_logits(x.to(dtype), weight.to(dtype), out_dtype=dtype)
            assert got.dtype == dtype
            step = 2**-7 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=step, atol=step)
            backend = TritonMoEBackend()
            got = backend.gate_logits(x.to(dtype), weight.to(dtype))
            want = torch.nn.functional.linear(x.to(dtype), weight.to(dtype))
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want.float(), rtol=step, atol=step)
    x = torch.randn(5, 64, generator=g)
    logits, bias = torch.randn(5, 16, generator=g), torch.randn(16, generator=g) * 0.1
    args = (bias, 3, 4, 2, True, 2.5, 2)
    got_w, got_ids = grouped_topk(logits, *args)
    want_w, want_ids = select_experts_grouped(logits, *args)
    assert got_ids.shape == want_ids.shape == (5, 5)
    for ids, w in ((got_ids, got_w), (want_ids, want_w)):
        assert ids[:, 3:].tolist() == [[16, 17]] * 5 and w[:, 3:].eq(1.0).all()
        torch.testing.assert_close(w[:, :3].sum(dim=1), torch.full((5,), 2.5))
    assert torch.equal(got_ids[:, :3].sort(dim=1).values, want_ids[:, :3].sort(dim=1).values)


def fused_layers(engine: Engine) -> list[FusedExperts]:
    model = cast(nn.Module, engine.runner.model)
    return [m for m in model.modules() if isinstance(m, FusedExperts)]


def test_engine_fuses_on_the_triton_backend_only(tiny_models: dict[str, Path]) -> None:
    path = str(tiny_models["deepseek-v3"])
    # Triton, EP 1: fused (the greedy test in test_fused_moe.py checks its tokens).
    assert all(
        m.num_shared == 1 for m in fused_layers(Engine(EngineConfig(path, moe_backend="triton")))
    )
    # The reference backend, and the flag: the separate MLP.
    for config in (
        EngineConfig(path, moe_backend="torch"),
        EngineConfig(path, moe_backend="triton", disable_shared_experts_fusion=True),
    ):
        engine = Engine(config)
        assert all(m.num_shared == 0 for m in fused_layers(engine))
        model = cast(nn.Module, engine.runner.model)
        assert all(
            m.shared_experts is not None for m in model.modules() if isinstance(m, DeepseekMoE)
        )


def test_expert_parallelism_refuses_fused_layers() -> None:
    """Sharding stacks only routed experts: a fused layer is refused by name (the runner
    builds the model unfused when EP > 1: the next test)."""
    _, fused = model_pair(1)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts stacks 1 shared"):
        shard_experts(fused, ParallelConfig(2, 0), initial_placement(8, 2, 0))


def test_expert_parallelism_builds_unfused(tiny_models: dict[str, Path]) -> None:
    """EP 2 with the Triton MoE backend: every rank keeps the shared experts a separate MLP
    (fusion skipped, not refused) and shards the routed ones. (Building a rank needs no peer;
    `test_expert_parallel.py` runs ranks together, and `test_fused_moe.py` the Triton backend's
    expert-parallel compute.)"""
    config = EngineConfig(str(tiny_models["deepseek-v3"]), ep_size=2, moe_backend="triton")
    model = cast(nn.Module, Engine(config, rank=1).runner.model)
    layers = [m for m in model.modules() if isinstance(m, DeepseekMoE)]
    assert layers and all(m.shared_experts is not None for m in layers)
    assert all(isinstance(m.experts, ExpertParallelExperts) for m in layers)
    assert all(isinstance(m.experts.backend, TritonMoEBackend) for m in layers)
    assert all(m.num_shared == 0 for m in model.modules() if isinstance(m, FusedExperts))


def test_bench_floor_counts_the_shared_experts_once(tiny_models: dict[str, Path]) -> None:
    """`bench.engine.model_cost` (the MoE floor): fused shared experts are read every step, as
    the separate MLP is, not counted as routed experts."""
    path = str(tiny_models["deepseek-v3"])
    fused = model_cost(Engine(EngineConfig(path, moe_backend="triton")))
    separate = model_cost(Engine(EngineConfig(path, moe_backend="torch")))
    assert fused == separate
    # The tiny checkpoint: an expert is 3 x 64 x 32 float32 weights.
    assert (fused.expert_bytes, fused.num_experts, fused.moe_layers) == (3 * 64 * 32 * 4, 8, 2)


def test_expert_touches_leave_out_fused_shared_experts(tiny_models: dict[str, Path]) -> None:
    """`bench.moe_shapes.ExpertTouches` (the measured MoE floor) records routed experts only."""
    engine = Engine(EngineConfig(str(tiny_models["deepseek-v3"]), moe_backend="triton"))
    touches = ExpertTouches(cast(nn.Module, engine.runner.model))
    params = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    with touches:
        engine.generate([[5, 6, 7, 8]], params)
    assert len(touches.calls) == 2 and all(len(layer) >= 2 for layer in touches.calls)
    calls = [ids for layer in touches.calls for ids in layer]  # prefill, then decode steps
    assert all(ids.shape[1] == 2 and ids.min() >= 0 and ids.max() < 8 for ids in calls)


@pytest.mark.parametrize("tokens,num_shared", [(1, 2), (3, 0)])
def test_small_path_routes_as_grouped_topk(tokens: int, num_shared: int) -> None:
    """The small path's gate-up kernel routes exactly as `grouped_topk` (the same code), shared
    experts appended; its output is the small path's on those choices, bit for bit."""
    g = torch.Generator().manual_seed(tokens)
    experts = 16
    w13 = torch.randn(experts + num_shared, 48, 40, generator=g) / 40**0.5
    w2 = torch.randn(experts + num_shared, 40, 24, generator=g) / 24**0.5
    x, logits = torch.randn(tokens, 40, generator=g), torch.randn(tokens, experts, generator=g)
    bias = torch.randn(experts, generator=g) * 0.1
    args = (3, 4, 2, True, 2.5, num_shared)
    out, weights, ids = small_batch_moe_grouped_routed(x, w13, w2, logits, bias, *args)
    want_w, want_ids = grouped_topk(logits, bias, *args)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)
    assert torch.equal(out, small_batch_moe(x, w13, w2, want_w, want_ids))
    # fused_moe_grouped_routed's grouped path (routing kernel, then the grouped GEMMs) agrees.
    got = fused_moe_grouped_routed(x, w13, w2, logits, bias, *args, small_batch=False)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)


def test_fused_moonlight_keeps_its_tuned_blocks() -> None:
    for tokens in (1, 4, 16, 64):
        fused = kernel_config(tokens, 64 + 2, 2048, 1408, 6 + 2, torch.bfloat16)
        assert fused == kernel_config(tokens, 64, 2048, 1408, 6, torch.bfloat16)
