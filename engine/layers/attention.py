"""Paged attention. The pure-torch backend is the reference every faster backend matches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.device import check_triton_backend, triton_runs
from engine.forward_batch import ForwardBatch
from engine.layers.norm import RMSNorm
from engine.layers.pending import PendingCombine
from engine.layers.rotary import RotaryEmbedding


class AttentionBackend(ABC):
    """Attention over a paged KV cache.

    Contract: `prepare(batch)` runs once per step before the forward pass and may attach
    metadata to `batch.attn_metadata`. `forward` (grouped-query attention) first writes the
    step's new K/V into layer `layer_id` of `batch.kv_cache` at `batch.out_slots`, then attends
    every new query to its own sequence's context (cached prefix plus new tokens, causal) and
    returns `[T, Hq, D]`; `forward_rope` is `forward` after rotary embedding of q and k (a
    backend may fuse the two). `forward_mla` is the same for multi-head latent attention, in its
    weight-absorbed form (see its docstring); a model uses one of the two. An MLA model asks
    `mla_expands(batch)` each step: when True it calls `forward_mla_expanded` (the
    non-absorbed form) instead of `forward_mla`. The `_rope` forms of the two take the
    latent before its norm and the rotary parts before RoPE, as `forward_rope` does.

    `graph_safe`: a decode step through this backend may be captured in a CUDA graph. Such a
    backend's `prepare` of a decode batch runs device operations only, whose shapes depend on
    nothing but the batch size and `batch.max_seq_len` (the capture's bound), so the runner
    captures `prepare` and the forward pass together and replays them with new inputs.
    """

    graph_safe: bool = False

    def decode_writes_kv_first(self) -> bool:
        """Whether a decode step writes every row's new KV before any row attends (in stream
        order), so that rows of one sequence at consecutive positions attend causally to each
        other: a short prefill may then run as decode rows (`ModelRunner.runs_as_decode`)."""
        return True

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor: ...

    def forward_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: RotaryEmbedding,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
        qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> torch.Tensor:
        """`forward` of q and k rotated by `rotary` at `batch.positions`; with `qk_norm`,
        each head of q and k is first normalised by its norm (Qwen3)."""
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        q, k = rotary(batch.positions, q, k)
        return self.forward(q, k, v, layer_id, batch, scale)

    @abstractmethod
    def forward_mla(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """Multi-head latent attention over the compressed cache, weights already absorbed.

        Inputs: `q_latent` `[T, H, R]` (each head's no-rope query projected into the latent
        space, `R = kv_lora_rank`), `q_pe` `[T, H, P]` (its rotary query, `P =
        qk_rope_head_dim`), and the new tokens' normalised latent `c_kv` `[T, 1, R]` and
        rotary key `k_pe` `[T, 1, P]`. Writes `c_kv` into layer `layer_id`'s K tensor and
        `k_pe` into its V tensor at `batch.out_slots`, then computes, per head, causal
        attention over the sequence's context with scores `scale * (q_latent . c_kv + q_pe .
        k_pe)` and values `c_kv`; returns `[T, H, R]`. This is multi-query attention with key
        `[c_kv; k_pe]` and value `c_kv`; the caller up-projects the result per head.
        """

    def forward_mla_rope(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        kv_norm: RMSNorm,
        rotary: RotaryEmbedding,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """`forward_mla` of the latent before `kv_norm` and of `q_pe`, `k_pe` before `rotary`
        at `batch.positions` (a backend may fuse the norm, the rotations and the cache write)."""
        q_pe, c_kv, k_pe = mla_latent_torch(q_pe, c_kv, k_pe, kv_norm, rotary, batch)
        return self.forward_mla(q_latent, q_pe, c_kv, k_pe, layer_id, batch, scale)

    def forward_mla_absorbed_rope(
        self,
        q_nope: torch.Tensor,
        w_uk: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        kv_norm: RMSNorm,
        rotary: RotaryEmbedding,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor | PendingCombine:
        """`forward_mla_rope` of the latent queries `mla_absorb_query(q_nope, w_uk)`: the
        absorbed form's whole attention before its output absorption (a backend may compute
        the queries' absorption and the latent side in one launch, and may leave the decode's
        ranges uncombined for its `mla_absorb_output`: a `PendingCombine`)."""
        q_latent = self.mla_absorb_query(q_nope, w_uk)
        return self.forward_mla_rope(
            q_latent, q_pe, c_kv, k_pe, kv_norm, rotary, layer_id, batch, scale
        )

    def mla_absorb_query(self, q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
        """The absorbed form's latent queries `[T, H, R]`: each head's no-rope query `q_nope`
        `[T, H, nope]` times its W_UK `w_uk` `[H, nope, R]` (a view of `kv_b_proj`'s weight).
        Here cuBLAS's batched product over heads, on the strided views as they are."""
        return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)

    def mla_absorb_output(
        self, out: torch.Tensor | PendingCombine, w_uv: torch.Tensor
    ) -> torch.Tensor:
        """The absorbed form's per-head values `[T, H, v]`, contiguous (o_proj reads them
        flattened): the latent attention output `out` `[T, H, R]` (or its uncombined ranges)
        times each head's W_UV transposed (`w_uv` `[H, v, R]`, a view of `kv_b_proj`'s
        weight). Here cuBLAS's batched product over heads, written through a transposed view
        of the result (bmm's out= form refuses operands that require grad, as the weights do
        outside inference mode)."""
        if isinstance(out, PendingCombine):
            out = out.materialize()
        attn = out.new_empty(out.shape[0], w_uv.shape[0], w_uv.shape[1])
        with torch.no_grad():
            torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2), out=attn.transpose(0, 1))
        return attn

    def mla_expands(self, batch: ForwardBatch) -> bool:
        """Whether this step's MLA runs in the non-absorbed form (`forward_mla_expanded`)
        rather than the absorbed one (`forward_mla`). The base backend always absorbs."""
        return False

    def forward_mla_expanded(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        kv_up_proj: Callable[[torch.Tensor], torch.Tensor],
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """Multi-head latent attention in the non-absorbed form (per-head keys and values).

        Inputs: `q_nope` `[T, H, Dn]` and `q_pe` `[T, H, P]` (the heads' no-rope and rotary
        queries), `c_kv` `[T, 1, R]` and `k_pe` `[T, 1, P]` as in `forward_mla`, and
        `kv_up_proj` (`kv_b_proj`): latents `[L, R]` to `[L, H * (Dn + Dv)]`, per head its
        no-rope key then its value. Writes `c_kv` and `k_pe` into the cache as `forward_mla`
        does, then computes, per head, causal attention over the sequence's context with
        scores `scale * (q_nope . k_nope + q_pe . k_pe)` and values `v`, where `[k_nope; v]`
        is the up-projected latent of every context token; returns `[T, H, Dv]`. Called only
        when `mla_expands(batch)`.
        """
        raise NotImplementedError(f"{type(self).__name__} runs MLA in the absorbed form only")

    def forward_mla_expanded_rope(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        kv_norm: RMSNorm,
        rotary: RotaryEmbedding,
        kv_up_proj: Callable[[torch.Tensor], torch.Tensor],
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """`forward_mla_expanded` of the latent before `kv_norm` and of `q_pe`, `k_pe` before
        `rotary`, as `forward_mla_rope`."""
        q_pe, c_kv, k_pe = mla_latent_torch(q_pe, c_kv, k_pe, kv_norm, rotary, batch)
        return self.forward_mla_expanded(
            q_nope, q_pe, c_kv, k_pe, kv_up_proj, layer_id, batch, scale
        )


def mla_latent_torch(
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    kv_norm: RMSNorm,
    rotary: RotaryEmbedding,
    batch: ForwardBatch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(rotary(q_pe), kv_norm(c_kv), rotary(k_pe))`: MLA's latent side, one layer at a time."""
    q_pe, k_pe = rotary(batch.positions, q_pe, k_pe)
    return q_pe, kv_norm(c_kv), k_pe


@dataclass(frozen=True)
class _PaddedLayout:
    q_index: torch.Tensor  # [B, N] index into [T] (padding points at 0)
    out_index: torch.Tensor  # [T] index into the flattened [B * N] of each real query
    kv_slots: torch.Tensor  # [B, L] flat slot of every context position (padding: slot 0)
    mask: torch.Tensor  # [B, 1, N, L] bool, True where the query may attend


class TorchAttentionBackend(AttentionBackend):
    """Pads the batch to `[B, max_extend, max_context]` and runs one masked SDPA per layer."""

    def prepare(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        page_size = batch.kv_cache.page_size
        n, length = batch.max_extend_len, batch.max_seq_len
        i = torch.arange(n, device=device)[None, :]  # [1, N]
        j = torch.arange(length, device=device)[None, :]  # [1, L]
        starts = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens  # [B]
        q_valid = i < batch.extend_lens[:, None]
        q_index = torch.where(q_valid, starts[:, None] + i, torch.zeros_like(i))
        kv_slots = batch.sequence_pages().gather(1, (j // page_size).expand(batch.batch_size, -1))
        kv_slots = kv_slots * page_size + j % page_size
        # Query i of sequence b sits at position prefix_b + i and sees keys 0..prefix_b + i.
        mask = j[:, None, :] <= (batch.prefix_lens[:, None] + i)[:, :, None]  # [B, N, L]
        # A padded query row attends to slot 0 only, so its (discarded) softmax is finite.
        mask = torch.where(q_valid[:, :, None], mask, j[:, None, :] == 0)
        # Token t of sequence b sits at row b * N + (t - start_b); integer indices avoid a
        # device-to-host sync per layer that boolean masking would cost.
        tokens = torch.arange(batch.input_ids.shape[0], device=device)
        seq_of = torch.repeat_interleave(
            torch.arange(batch.batch_size, device=device), batch.extend_lens
        )
        out_index = seq_of * n + (tokens - starts[seq_of])
        batch.attn_metadata = _PaddedLayout(q_index, out_index, kv_slots, mask[:, None])

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        layout: _PaddedLayout = batch.attn_metadata
        k_slots, v_slots = batch.kv_cache.slots(layer_id)
        k_slots[batch.out_slots] = k
        v_slots[batch.out_slots] = v
        # k, v: [B, Hkv, L, D]
        kp = k_slots[layout.kv_slots].transpose(1, 2)
        vp = v_slots[layout.kv_slots].transpose(1, 2)
        return _attend(q, kp, vp, layout, scale)

    def forward_mla(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        layout: _PaddedLayout = batch.attn_metadata
        latent_slots, pe_slots = batch.kv_cache.slots(layer_id)
        latent_slots[batch.out_slots] = c_kv
        pe_slots[batch.out_slots] = k_pe
        # One shared KV head: key [c_kv; k_pe] [B, 1, L, R + P], value c_kv [B, 1, L, R].
        latent = latent_slots[layout.kv_slots].transpose(1, 2)
        kp = torch.cat((latent, pe_slots[layout.kv_slots].transpose(1, 2)), dim=-1)
        return _attend(torch.cat((q_latent, q_pe), dim=-1), kp, latent, layout, scale)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: _PaddedLayout, scale: float
) -> torch.Tensor:
    """Masked SDPA of the step's queries `[T, Hq, Dk]` over padded context `k` `[B, Hkv, L,
    Dk]`, `v` `[B, Hkv, L, Dv]`; returns `[T, Hq, Dv]`."""
    qp = q[layout.q_index].transpose(1, 2)  # [B, Hq, N, Dk]
    out = F.scaled_dot_product_attention(
        qp, k, v, attn_mask=layout.mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2).flatten(0, 1)[layout.out_index]


def make_attention_backend(name: str, device_kind: str, is_mla: bool) -> AttentionBackend:
    """The backend `name` (`auto`: Triton on a CUDA device it runs on, `triton_runs`, else
    torch).

    Triton is imported only here and only when chosen, so hosts without it run the torch path.
    """
    if name == "auto":
        name = "triton" if triton_runs(device_kind) else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    check_triton_backend("attention-backend", device_kind)
    from engine.layers.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend(mla=is_mla)
