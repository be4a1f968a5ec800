"""The Triton MoE and MLA kernels against the pure-torch reference at full model shapes, on CUDA.

    python -m bench.check_moe_gpu            # exits 1 on any mismatch, printing each check

`make test` checks the kernels at small shapes under Triton's interpreter; this runs them compiled,
in bfloat16, at the published sizes of Qwen3-30B-A3B, Moonlight-16B-A3B and DeepSeek-V3 (one layer
each; Kimi-K2 with `--shape kimi-k2`), over token counts 0, 1, 4, 7, 64, 257 and 4096 (1 and 4 take
the small-batch path); MLA decode and extend at 16 and 128 heads. For the DeepSeek shapes also
shared-expert fusion: the router's logits kernel from bfloat16 against float32 logits (max abs error
<= 1e-5 of the largest), and the fused layer (shared experts stacked after the routed ones, one
combine) against the float32 reference with MOE_TOL, printing how far it lies from routed experts +
a separate shared MLP, in bfloat16 steps at the output's RMS.

Tolerances (bfloat16): the fused experts against the torch experts run in float32 on the same
bfloat16 weights (widened an expert at a time: a layer fits an 80 GB card), max abs error <= 2e-2 of
the largest reference value (bfloat16 keeps 8 bits: the output and the intermediate activation each
round by up to 2^-9 relative). Routing from float32 logits: the same experts per token (ties aside),
weights within 1e-5. MLA decode against the torch backend's formula in float32, and MLA extend
(non-absorbed, head dims 128 + 64 and 128) against causal attention in float32: max abs error <=
2e-2 of the largest value.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bench.moe_kernel import SHAPES, LayerShape, route
from engine.kernels.fused_moe import fused_moe
from engine.layers.moe import (
    GroupedRouting,
    TorchMoEBackend,
    TritonMoEBackend,
    select_experts_grouped,
)

TOKENS = (0, 1, 4, 7, 64, 256, 257, 4096)
MOE_TOL = 2e-2
ROUTING_TOL = 1e-5
MLA_TOL = 2e-2


def check_moe(shape: LayerShape, tokens: Sequence[int]) -> list[str]:
    failures = []
    g = torch.Generator(device="cuda").manual_seed(0)
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    # Drawn in bfloat16 (no float32 copy of a layer: DeepSeek-V3's is 45 GB).
    w13 = torch.randn(e, 2 * i, h, device="cuda", generator=g, dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(e, h, i, device="cuda", generator=g, dtype=torch.bfloat16) * i**-0.5
    bias = torch.randn(e, device="cuda", generator=g) * 0.1
    reference, fast = TorchMoEBackend(), TritonMoEBackend()
    for t in tokens:
        x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
        logits = torch.randn(t, e, device="cuda", generator=g)
        # Routing: float32 logits, so that exact ties (which either may break) do not occur.
        want_w, want_ids = route(shape, logits, bias, reference)
        got_w, got_ids = route(shape, logits, bias, fast)
        want_sorted, want_order = want_ids.sort(dim=-1)
        got_sorted, got_order = got_ids.sort(dim=-1)
        same_ids = torch.equal(want_sorted, got_sorted)
        w_err = (
            (got_w.gather(1, got_order).float() - want_w.gather(1, want_order).float())
            .abs()
            .max()
            .item()
            if t and same_ids
            else 0.0
        )
        ok = same_ids and w_err <= ROUTING_TOL
        print(f"routing {shape.name} T={t}: same experts {same_ids}, weight err {w_err:.1e}")
        if not ok:
            failures.append(f"routing {shape.name} T={t}")
        got = fused_moe(x, w13, w2, want_w, want_ids)
        want = reference.experts(x.float(), w13, w2, want_w, want_ids)  # widened per expert
        scale = want.abs().max().item() if t else 1.0
        err = (got.float() - want).abs().max().item() if t else 0.0
        ok = got.dtype == torch.bfloat16 and got.shape == (t, h) and err <= MOE_TOL * scale
        print(f"fused MoE {shape.name} T={t}: max err {err:.2e} (largest value {scale:.2f})")
        if not ok:
            failures.append(f"fused MoE {shape.name} T={t}: {err:.2e} of {scale:.2f}")
        # The routed entry (routing folded into the small path's gate-up, or past one align
        # program into the align's count), against the reference on the reference's routing.
        if shape.grouped:
            routing = GroupedRouting(
                shape.top_k, shape.groups, shape.topk_groups, True, shape.scaling
            )
            routed = fast.routed_experts_grouped(x, logits, bias, w13, w2, routing)
        else:
            routed = fast.routed_experts(x, logits, w13, w2, shape.top_k, True)
        err = (routed.float() - want).abs().max().item() if t else 0.0
        print(f"routed MoE {shape.name} T={t}: max err {err:.2e}")
        if routed.shape != (t, h) or err > MOE_TOL * scale:
            failures.append(f"routed MoE {shape.name} T={t}: {err:.2e} of {scale:.2f}")
        if 0 < t <= 4 and not shape.grouped:
            failures += check_down_preload(shape, x, logits.bfloat16(), w13, w2)
        if 0 < t <= 8:
            failures += check_small_routing(shape, x, logits, bias, w13, w2, got_w, got_ids)
    return failures


def check_small_routing(
    shape: LayerShape,
    x: torch.Tensor,
    logits: torch.Tensor,
    bias: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    want_w: torch.Tensor,
    want_ids: torch.Tensor,
) -> list[str]:
    """The small path's routing (each gate-up program routes its token: `moe_routing.
    route_token`, inside a warp up to 512 experts) against the routing kernel's, compiled: the
    same experts in the same order, weights within ROUTING_TOL."""
    from engine.kernels.fused_moe_small import (
        small_batch_moe_grouped_routed,
        small_batch_moe_routed,
    )

    if shape.grouped:
        _, got_w, got_ids = small_batch_moe_grouped_routed(
            x, w13, w2, logits.float(), bias, shape.top_k, shape.groups, shape.topk_groups,
            True, shape.scaling,
        )  # fmt: skip
    else:
        _, got_w, got_ids = small_batch_moe_routed(x, w13, w2, logits, shape.top_k, True)
    same = torch.equal(got_ids, want_ids)
    err = (got_w.float() - want_w.float()).abs().max().item() if same else float("inf")
    print(
        f"small-path routing {shape.name} T={x.shape[0]}: same experts {same}, weight err {err:.1e}"
    )
    ok = same and err <= ROUTING_TOL
    return [] if ok else [f"small-path routing {shape.name} T={x.shape[0]}"]


def check_routing_geometry(shape: LayerShape, tokens: Sequence[int]) -> list[str]:
    """`check_small_routing` alone at `shape`'s experts, groups and top-k, on experts of 512 x
    256 (the routing reads the logits only; DeepSeek-V3's and Kimi-K2's full layers would need
    their whole 256 and 384 experts' weights), against the routing kernel."""
    narrow = dataclasses.replace(shape, hidden=512, intermediate=256)
    g = torch.Generator(device="cuda").manual_seed(1)
    e, h, i = narrow.experts, narrow.hidden, narrow.intermediate
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=g) * h**-0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device="cuda", generator=g) * i**-0.5).bfloat16()
    bias = torch.randn(e, device="cuda", generator=g) * 0.1
    failures = []
    for t in tokens:
        x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
        logits = torch.randn(t, e, device="cuda", generator=g)
        want_w, want_ids = route(narrow, logits, bias, TritonMoEBackend())
        failures += check_small_routing(narrow, x, logits, bias, w13, w2, want_w, want_ids)
    return failures


def check_down_preload(
    shape: LayerShape, x: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> list[str]:
    """The small path's down preloading its first K step before its PDL wait
    (`fused_moe_small.ROUTED_TILES`) against the down that reads the gate-up's ids
    (`DEFAULT_TILES` at ROUTED_TILES' down tiles), compiled: bit for bit."""
    import dataclasses

    from engine.kernels.fused_moe_small import ROUTED_TILES, small_batch_moe_routed

    plain = dataclasses.replace(ROUTED_TILES, down_preload=False)
    want = small_batch_moe_routed(x, w13, w2, logits, shape.top_k, True, plain)
    got = small_batch_moe_routed(x, w13, w2, logits, shape.top_k, True, ROUTED_TILES)
    same = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    print(f"down preloaded {shape.name} T={x.shape[0]}: bit for bit {same}")
    return [] if same else [f"down preloaded {shape.name} T={x.shape[0]}"]


def mla_reference(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Per sequence, float32: softmax(scale * (q_latent . c + q_pe . k_pe)) @ c."""
    page_size = latent_cache.shape[1]
    outs = []
    for b, length in enumerate(seq_lens.tolist()):
        pos = torch.arange(length, device=q_latent.device)
        pages = page_table[b, pos // page_size]
        c = latent_cache[pages, pos % page_size, 0].float()  # [L, R]
        k_pe = pe_cache[pages, pos % page_size, 0].float()  # [L, P]
        scores = (q_latent[b].float() @ c.T + q_pe[b].float() @ k_pe.T) * scale  # [H, L]
        outs.append(torch.softmax(scores, dim=-1) @ c)
    return torch.stack(outs)


def check_mla() -> list[str]:
    from engine.kernels.mla_decode import mla_decode

    failures = []
    g = torch.Generator(device="cuda").manual_seed(1)
    # Moonlight (16 heads) and DeepSeek-V3 (128 heads): latent 512, rope key 64.
    for heads in (16, 128):
        for page_size in (1, 16, 64):
            lens = [1, 17, 300, 2048, 4097]
            batch = len(lens)
            pages_per_seq = [math.ceil(n / page_size) for n in lens]
            num_pages = sum(pages_per_seq) + 3
            perm = torch.randperm(num_pages, device="cuda", generator=g)
            table = torch.zeros(batch, max(pages_per_seq), dtype=torch.int32, device="cuda")
            used = 0
            for b, n in enumerate(pages_per_seq):
                table[b, :n] = perm[used : used + n]
                used += n
            latent = torch.randn(num_pages, page_size, 1, 512, device="cuda", generator=g)
            pe = torch.randn(num_pages, page_size, 1, 64, device="cuda", generator=g)
            q_latent = torch.randn(batch, heads, 512, device="cuda", generator=g) * 0.05
            q_pe = torch.randn(batch, heads, 64, device="cuda", generator=g) * 0.05
            latent, pe = latent.bfloat16(), pe.bfloat16()
            q_latent, q_pe = q_latent.bfloat16(), q_pe.bfloat16()
            seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
            scale = 192**-0.5
            want = mla_reference(q_latent, q_pe, latent, pe, table, seq_lens, scale)
            largest = want.abs().max().item()
            # The rule's ranges, and one range, through both kernels.
            for splits, quarters in itertools.product((None, 1), (True, False)):
                out = torch.empty(batch, heads, 512, dtype=torch.bfloat16, device="cuda")
                mla_decode(
                    q_latent, q_pe, latent, pe, table, seq_lens, scale, out, splits,
                    quarters=quarters,
                )  # fmt: skip
                err = (out.float() - want).abs().max().item()
                kind = "quarters" if quarters else "one chain"
                name = (
                    f"MLA decode ({kind}) heads={heads} page={page_size} splits={splits or 'rule'}"
                )
                print(f"{name}: max err {err:.2e} of {largest:.2f}")
                if err > MLA_TOL * largest:
                    failures.append(f"{name}: {err:.2e}")
            if page_size == 16:
                failures += check_combine_in_output(
                    q_latent, q_pe, latent, pe, table, seq_lens, scale, g
                )
    return failures


def check_combine_in_output(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    pe: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    g: torch.Generator,
) -> list[str]:
    """The MLA decode's combine in the W_UV product (`head_bmm.combine_head_bmm`) against the
    combine launch then `head_bmm`, compiled: within a bfloat16 rounding of the output (the
    combined values are the same; the product sums in another order)."""
    from engine.kernels.head_bmm import combine_head_bmm, head_bmm
    from engine.kernels.mla_decode import mla_decode
    from engine.layers.pending import PendingCombine

    heads = q_latent.shape[1]
    w_uv = (torch.randn(heads, 128, 512, device="cuda", generator=g) * 512**-0.5).bfloat16()
    args = (q_latent, q_pe, latent, pe, table, seq_lens, scale)
    combined = mla_decode(*args, torch.empty_like(q_latent))
    want = head_bmm(combined, w_uv.transpose(1, 2), q_latent.new_empty(len(seq_lens), heads, 128))
    pending = mla_decode(*args, torch.empty_like(q_latent), defer_combine=True)
    assert isinstance(pending, PendingCombine)
    got = combine_head_bmm(pending, w_uv.transpose(1, 2), torch.empty_like(want))
    err = (got.float() - want.float()).abs().max().item()
    largest = want.float().abs().max().item()
    name = f"MLA combine in the W_UV product heads={heads}"
    print(f"{name}: max err {err:.2e} of {largest:.2f} (bf16 rounding {largest / 128:.2e})")
    return [f"{name}: {err:.2e}"] if err > largest / 128 else []


def check_mla_extend() -> list[str]:
    from engine.kernels.attention import extend_blocks
    from engine.kernels.mla_extend import default_tiles, mla_extend_attention

    failures = []
    g = torch.Generator(device="cuda").manual_seed(2)
    # (prefix, new tokens): fresh prompts, decode-like, prefix hits and chunks.
    prefix, ext = [0, 0, 512, 2048, 100, 7], [1, 300, 64, 1, 2048, 129]
    t, ctx = sum(ext), sum(prefix) + sum(ext)
    for heads in (16, 128):

        def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, device="cuda", generator=g) * std).bfloat16()

        q_nope, q_pe = randn(t, heads, 128, std=0.3), randn(t, heads, 64, std=0.3)
        kv = randn(ctx, heads, 256)
        k_nope, v = kv.split([128, 128], dim=-1)
        k_pe = randn(ctx, 64)
        seqs, firsts = extend_blocks(ext, default_tiles(torch.bfloat16).block_m)

        def dev(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, device="cuda")

        q_starts = dev([sum(ext[:b]) for b in range(len(ext))])
        kv_starts = dev([sum(prefix[:b]) + sum(ext[:b]) for b in range(len(ext))])
        scale = 192**-0.5
        out = mla_extend_attention(
            q_nope, q_pe, k_nope, k_pe, v, dev(prefix), dev(ext), q_starts, kv_starts,
            dev(seqs), dev(firsts), scale,
        )  # fmt: skip
        wants = []
        for b, (p, n) in enumerate(zip(prefix, ext, strict=True)):
            q = slice(sum(ext[:b]), sum(ext[:b]) + n)
            k = slice(kv_starts[b].item(), kv_starts[b].item() + p + n)
            s = torch.einsum("mhd,nhd->hmn", q_nope[q].float(), k_nope[k].float())
            s += torch.einsum("mhd,nd->hmn", q_pe[q].float(), k_pe[k].float())
            causal = (
                torch.arange(p + n, device="cuda")[None, :]
                > torch.arange(p, p + n, device="cuda")[:, None]
            )
            s = (s * scale).masked_fill(causal, float("-inf")).softmax(-1)
            wants.append(torch.einsum("hmn,nhd->mhd", s, v[k].float()))
        want = torch.cat(wants)
        err = (out.float() - want).abs().max().item()
        largest = want.abs().max().item()
        print(f"MLA extend heads={heads}: max err {err:.2e} of {largest:.2f}")
        if err > MLA_TOL * largest:
            failures.append(f"MLA extend heads={heads}: {err:.2e}")
    return failures


# Shared experts per DeepSeek-class shape (the published configs' n_shared_experts).
SHARED_EXPERTS = {"moonlight-16b-a3b": 2, "deepseek-v3": 1, "kimi-k2": 1, "tiny": 2}
# 4,096 tokens take the fused tables' prefill row (its 128 x 256 down).
SHARED_TOKENS = (1, 4, 64, 128, 256, 257, 4096)


def check_shared_fusion(
    shape: LayerShape,
    tokens: Sequence[int],
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> list[str]:
    """Shared-expert fusion at `shape` (see the module docstring); [] when it passes."""
    failures = []
    shared = SHARED_EXPERTS[shape.name]
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    g = torch.Generator(device=device).manual_seed(1)

    def randn(*size: int, std: float) -> torch.Tensor:
        return torch.randn(*size, device=device, generator=g, dtype=dtype).mul_(std)

    w13, w2 = randn(e + shared, 2 * i, h, std=h**-0.5), randn(e + shared, h, i, std=i**-0.5)
    gate, bias = randn(e, h, std=h**-0.5), torch.randn(e, device=device, generator=g) * 0.1
    # The same shared experts as one MLP: gate rows, then up rows; down columns side by side.
    gate_up = torch.cat((w13[e:, :i].reshape(-1, h), w13[e:, i:].reshape(-1, h)))
    down = w2[e:].permute(1, 0, 2).reshape(h, shared * i)
    fast, reference = TritonMoEBackend(), TorchMoEBackend()
    routing = GroupedRouting(shape.top_k, shape.groups, shape.topk_groups, True, shape.scaling)
    for t in tokens:
        x = randn(t, h, std=1.0)
        logits = fast.router_logits(x, gate)
        want_logits = F.linear(x.float(), gate.float())
        logit_err = (logits - want_logits).abs().max().item() / want_logits.abs().max().item()
        fused = fast.routed_experts_grouped(x, logits, bias, w13, w2, routing, shared)
        routed = fast.routed_experts_grouped(x, logits, bias, w13[:e], w2[:e], routing)
        gu = F.linear(x, gate_up)
        separate = routed + F.linear(F.silu(gu[:, : shared * i]) * gu[:, shared * i :], down)
        r = routing
        weights, ids = select_experts_grouped(
            logits, bias, r.top_k, r.num_groups, r.topk_groups, True, r.scaling_factor, shared
        )
        want = reference.experts(x.float(), w13, w2, weights, ids)  # widened per expert
        scale = want.abs().max().item()
        err = (fused.float() - want).abs().max().item()
        err_separate = (separate.float() - want).abs().max().item()
        # bfloat16's spacing at the output's RMS (8 significant bits).
        step = 2.0 ** (math.floor(math.log2(want.pow(2).mean().sqrt().item())) - 7)
        diff = (fused.float() - separate.float()).abs()
        print(
            f"shared fusion {shape.name} T={t}: logits err {logit_err:.1e}; fused max err "
            f"{err:.2e}, separate {err_separate:.2e} (largest value {scale:.2f}); fused - "
            f"separate: max {diff.max().item() / step:.1f}, mean {diff.mean().item() / step:.2f} "
            f"bf16 steps at the RMS"
        )
        if logit_err > ROUTING_TOL or err > MOE_TOL * scale or fused.dtype != dtype:
            failures.append(f"shared fusion {shape.name} T={t}: {err:.2e} of {scale:.2f}")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES))
    parser.add_argument("--skip-mla", action="store_true")
    parser.add_argument("--mla-only", action="store_true", help="only the MLA kernels' checks")
    parser.add_argument(
        "--routing-shape",
        action="append",
        default=[],
        choices=sorted(SHAPES),
        help="the small path's routing alone at this shape's experts and groups (repeatable)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("bench.check_moe_gpu needs a CUDA device")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    failures = []
    for name in args.routing_shape:
        failures += check_routing_geometry(SHAPES[name], (1, 2, 8))
    shapes = args.shape or (
        ()
        if args.routing_shape or args.mla_only
        else ("qwen3-30b-a3b", "moonlight-16b-a3b", "deepseek-v3")
    )
    for name in shapes:
        failures += check_moe(SHAPES[name], TOKENS)
        if name in SHARED_EXPERTS:
            failures += check_shared_fusion(SHAPES[name], SHARED_TOKENS)
        torch.cuda.empty_cache()
    if not args.skip_mla:
        failures += check_mla() + check_mla_extend()
    print("\nall checks passed" if not failures else "\nFAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
