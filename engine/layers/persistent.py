"""Batch-1 decode steps of a Llama-family model through one persistent launch a layer
(`engine.kernels.persistent_layer`), where `PERSISTENT_DECODE` is on.

A decode step of one sequence is a chain of small launches, each paying its ramp and tail; the
persistent kernel runs a layer's attention half (the input norm, QKV, RoPE with the KV write,
the decode attention, O) and, for a Qwen3-MoE layer, its MoE half too (the norm with the
router's logits, the routing, the chosen experts' products and their weighted sum) as one
launch. A dense layer's MLP runs as before, after it. The step's results are those of the
same kernels launched one after another (the dense products on the kernel's GEMV tiles, not
cuBLAS's: a different order of float32 sums, so the token-exact check is against transformers,
as for every fast path).

It applies to a decode step of exactly one sequence (the batch-1 graph, or an eager step of
one) on the Triton attention backend, for models whose every layer it can run: no QKV or O
biases, q and k norms both or neither, one norm epsilon, and MoE layers with softmax top-k
routing on the fused Triton experts, all local, none shared (`plan` says why not otherwise).
Every other step, and every other model, takes the layers' own path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from engine.models.llama import LlamaForCausalLM

# Off until timed on the GPU (`bash bench/gpu/session.sh b3`: bench.persistent_layer against
# the engine's launches, then this path in the engine).
PERSISTENT_DECODE = False
# Programs of each launch a SM (at most the layer's items): the attention half compiles to
# three resident a SM, a whole MoE layer to two (engine.kernels.persistent_layer).
PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class Plan:
    """What a model's persistent decode needs, found once: each layer's MoE half or None (a
    dense MLP, run after the launch), and the launch's counters (`[layers, SCRATCH_SIZE]`
    int32, zero between launches: each launch leaves its own zero)."""

    experts: tuple[object | None, ...]  # per layer: the kernel's `Experts`, or None
    scratch: torch.Tensor


def plan(model: LlamaForCausalLM) -> Plan | str:
    """The model's `Plan`, or why the persistent path cannot run it."""
    from engine.kernels import persistent_layer as kernel
    from engine.layers.moe import FusedExperts, TritonMoEBackend
    from engine.models.llama import MLP, SparseMoeBlock

    layers: list[Any] = list(model.layers)
    if not layers:
        return "no layers"
    experts: list[object | None] = []
    eps = {layer.input_layernorm.eps for layer in layers}
    eps |= {layer.post_attention_layernorm.eps for layer in layers}
    if len(eps) != 1:
        return f"the norms' epsilons differ: {sorted(eps)}"
    dtype = model.embed_tokens.weight.dtype
    for layer in layers:
        attn = layer.self_attn
        if attn.qkv_proj.bias is not None or attn.o_proj.bias is not None:
            return "QKV or O has a bias"
        if (attn.q_norm is None) != (attn.k_norm is None):
            return "q and k norms must come together"
        if attn.scale != attn.head_dim**-0.5:
            return f"attention scale {attn.scale} is not head_dim ** -0.5"
        mlp = layer.mlp
        if isinstance(mlp, MLP):
            experts.append(None)
            continue
        if not isinstance(mlp, SparseMoeBlock) or not isinstance(mlp.experts, FusedExperts):
            return f"{type(mlp).__name__} layers (expert-parallel, or not Qwen3-MoE's)"
        if mlp.experts.num_shared or not isinstance(mlp.experts.backend, TritonMoEBackend):
            return "MoE layers on the fused Triton experts only, without shared experts"
        if mlp.gate.weight.dtype != dtype:
            return f"the router's weights are {mlp.gate.weight.dtype}, not {dtype}"
        experts.append(
            kernel.Experts(
                layer.post_attention_layernorm.weight,
                mlp.gate.weight,
                mlp.experts.w13,
                mlp.experts.w2,
                mlp.top_k,
                mlp.renormalize,
            )
        )
    scratch = torch.zeros(
        len(layers), kernel.SCRATCH_SIZE, dtype=torch.int32, device=model.embed_tokens.weight.device
    )
    return Plan(tuple(experts), scratch)


def applies(model: LlamaForCausalLM, batch: ForwardBatch) -> bool:
    """Whether this step goes through the persistent launches."""
    if not PERSISTENT_DECODE or not batch.is_decode or batch.batch_size != 1:
        return False
    from engine.layers.triton_attention import TritonAttentionBackend, _DecodeMetadata

    if not isinstance(batch.attn_metadata, _DecodeMetadata):
        return False
    first: Any = model.layers[0]
    backend = first.self_attn.backend
    if not isinstance(backend, TritonAttentionBackend) or backend.mla:
        return False
    return isinstance(_cached_plan(model), Plan)


def _cached_plan(model: LlamaForCausalLM) -> Plan | str:
    found = model.__dict__.get("_persistent_plan")
    if found is None:
        found = plan(model)
        model.__dict__["_persistent_plan"] = found  # not a module attribute: no state dict
    return found


def forward(model: LlamaForCausalLM, batch: ForwardBatch) -> torch.Tensor:
    """The model's final hidden state `[1, hidden]` for a step `applies` says it takes."""
    from engine.kernels import persistent_layer as kernel
    from engine.kernels.sms import sm_count

    found = _cached_plan(model)
    assert isinstance(found, Plan)
    meta = batch.attn_metadata
    cache = batch.kv_cache
    rotary = model.rotary
    step = kernel.Step(
        batch.page_table, batch.req_rows, meta.seq_lens, batch.positions, batch.out_slots,
        rotary.cos, rotary.sin, rotary.interleaved, cache.page_size, meta.num_splits,
    )  # fmt: skip
    x = model.embed_tokens(batch.input_ids)
    # The stream starts at zero: the first norm's `residual += x` makes it x, exactly.
    residual, other = torch.zeros_like(x), torch.empty_like(x)
    sms = sm_count(x.device)
    layers: list[Any] = list(model.layers)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        k_cache, v_cache = cache.slots(attn.layer_id)
        qk = attn.q_norm is not None and attn.k_norm is not None
        weights = kernel.Attention(
            layer.input_layernorm.weight, attn.qkv_proj.weight, attn.o_proj.weight, k_cache,
            v_cache, attn.num_heads, layer.input_layernorm.eps,
            attn.q_norm.weight if qk else None, attn.k_norm.weight if qk else None,
            attn.q_norm.eps if qk else 0.0,
        )  # fmt: skip
        experts = found.experts[i]
        assert experts is None or isinstance(experts, kernel.Experts)
        items = kernel.item_count(
            x.shape[1], attn.qkv_proj.weight.shape[0], attn.num_heads, attn.num_kv_heads,
            meta.num_splits, experts,
        )  # fmt: skip
        programs = min(PROGRAMS_PER_SM * sms, items)
        out = kernel.decode_layer(
            x, residual, weights, step, found.scratch[i], programs, experts, other
        )
        if experts is not None:
            residual, other = other, residual
            x = out
        else:
            h, residual = layer.post_attention_layernorm.forward_residual(out, residual)
            x = layer.mlp(h)
    return model.norm.forward_residual(x, residual)[0]
