"""The Triton attention backend: paged decode (flash-decoding) and extend attention kernels.

Decode metadata is computed on the device from the batch's static tensors, with shapes that
depend only on the batch size and the longest context served, so a decode step can be
captured in a CUDA graph and replayed with new lengths.

MLA models (DeepSeek-V3, Kimi-K2, Moonlight) decode in the absorbed form with
`engine.kernels.mla_decode`, and prefill/extend in the non-absorbed form: each sequence's
context latents (the cached prefix's gathered from the pool, then the new tokens') are
up-projected to per-head keys and values and `engine.kernels.mla_extend` attends over them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.device import StagedUpload
from engine.forward_batch import ForwardBatch
from engine.kernels import attention as kernels
from engine.kernels import fused, mla_extend
from engine.kernels.head_bmm import absorb_query_and_latent, combine_head_bmm, head_bmm
from engine.kernels.mla_decode import env_launch, mla_decode
from engine.kernels.sms import shared_memory, sm_count
from engine.layers.attention import AttentionBackend
from engine.layers.norm import RMSNorm
from engine.layers.pending import PendingCombine
from engine.layers.rotary import RotaryEmbedding

HEAD_BMM_MAX_ROWS = 64  # MLA's query absorption on the Triton kernel up to this many rows
# MLA's output absorption (W_UV: K 512, N 128) on the Triton kernel up to this many rows.
# Alone cuBLAS's is faster (3.9-4.2 against 4.4-5.0 µs on the H200), but it is outside
# programmatic dependent launch: at batch 1 its launch ends the chain of early triggers
# (`pdl.TRIGGER_FIRST_MAX_ROWS`) that lets Moonlight's O projection, on preloading tiles, load
# its weight while the MLA decode runs; `head_bmm` keeps the chain. Moonlight 1 x 128 on an
# H100, back to back, alternating (`bash bench/gpu/session.sh b16`, the twentieth session):
# 2.52 / 2.52 / 2.52 ms on cuBLAS against 2.49 / 2.48 / 2.47 on head_bmm (b13: 2.52 / 2.48).
HEAD_BMM_OUTPUT_MAX_ROWS = 1
# At those rows, the MLA decode's combine in the output absorption's launch
# (`head_bmm.combine_head_bmm`: each program combines its head's ranges as it reads them, its
# slab of W_UV loaded before its wait): one launch a layer fewer in the batch-1 chain, the same
# combined values, the product summed in another order (within a bf16 rounding of head_bmm's
# output: `bench.check_moe_gpu`). Expected a link and the combine's own run, about 2 µs a
# layer; got about 1.5: Moonlight 1 x 128 on an H100, alternating four times (the twenty-
# fourth session, `--repeats 5`), back to back 2.44 / 2.42 / 2.42 / 2.38 ms off against 2.41 /
# 2.39 / 2.36 / 2.34 on, the step alone 2.36-2.37 against 2.32-2.33. The tiny DeepSeek-V3's
# greedy tokens stay transformers' (float32, a prompt at a time, graphs on and off).
# `PDSERVE_MLA_COMBINE_IN_OUTPUT=0` turns it off.
MLA_COMBINE_IN_OUTPUT = os.environ.get("PDSERVE_MLA_COMBINE_IN_OUTPUT", "1") != "0"


# Decode steps fold RoPE (with any q/k norms) and the KV write into the decode attention's
# launch (`kernels.decode_attention` of a `DecodeRope`: one launch a layer fewer, the same
# results bit for bit but for Qwen3's q/k norms, whose sums of squares its warps reduce in
# another order). Off: on an H100 (`bash bench/gpu/session.sh Z`) Llama-3-8B's decode was level
# with it (1 x 128 5.74 ms both, 64 x 128 6.69 -> 6.67) and Qwen3-30B-A3B's batch 1 slower (3.28
# -> 3.43 ms: each split's program rotated its group's queries head after head into memory,
# then read them back). Since the twenty-fourth session a head of power-of-two halves keeps
# the group's rotated queries in registers (`fused.rotate_group`, one round of loads; the
# same values), untimed: `bash bench/gpu/session.sh b30`. `PDSERVE_DECODE_ROPE_IN_ATTENTION=1`
# turns it on.
DECODE_ROPE_IN_ATTENTION = os.environ.get("PDSERVE_DECODE_ROPE_IN_ATTENTION", "0") == "1"

# MLA decode steps of up to ABSORB_WITH_LATENT_MAX rows x heads run the query's absorption
# (W_UK) and the latent side (its norm, the rotations, the cache write) in one launch
# (`head_bmm.absorb_query_and_latent`: one launch a layer fewer, the same code, so the same
# results bit for bit but for the latent's RMS sum, reduced over 4 warps instead of 1).
# Measured on an H100 (`bench.mla_absorb --with-latent`, µs, two launches -> one): 16 heads
# at 1, 16 and 64 rows 3.9 -> 2.8, 4.8 -> 3.3, 5.5 -> 4.1; 128 heads at 1 and 16 rows 9.7 ->
# 8.3, 11.6 -> 9.9, but at 64 rows 17.6 -> 25.1 (past 2,048 rows x heads the two launches
# stay). Moonlight's batch-1 step 2.78 -> 2.75 ms back to back, 64 x 128 12.23 -> 12.21.
MLA_ABSORB_WITH_LATENT = True
ABSORB_WITH_LATENT_MAX = 2048


@dataclass(frozen=True)
class _DecodeMetadata:
    seq_lens: torch.Tensor  # [B] int32: context length including the new token
    num_splits: int


@dataclass(frozen=True)
class _ExtendMetadata:
    q_starts: torch.Tensor  # [B] index into [T] of each sequence's first new token
    block_seq: torch.Tensor  # [blocks] sequence of each query block
    block_first: torch.Tensor  # [blocks] first query (within its sequence) of each block
    tiles: kernels.ExtendTiles  # the kernel's launch; the blocks are of its block_m queries


@dataclass(frozen=True)
class _MLAExtendMetadata:
    q_starts: torch.Tensor  # [B] index into [T] of each sequence's first new token
    kv_starts: torch.Tensor  # [B] index into the context [L] of each sequence's first token
    block_seq: torch.Tensor  # [blocks] sequence of each query block
    block_first: torch.Tensor  # [blocks] first query (within its sequence) of each block
    # [L] flat cache slot of every context token, sequence after sequence; None when no
    # sequence has a cached prefix, so that the context is the step's new tokens themselves.
    context_slots: torch.Tensor | None


def _mla_extend_metadata(batch: ForwardBatch, staging: StagedUpload) -> _MLAExtendMetadata:
    ext = batch.host_extend_lens
    # Built by the model runner with the host's prefix lengths; a hand-built batch pays a sync.
    prefix = batch.host_prefix_lens or tuple(batch.prefix_lens.tolist())
    device = batch.input_ids.device
    block_m = mla_extend.default_tiles(batch.kv_cache.dtype, shared_memory(device)).block_m
    seqs, firsts = kernels.extend_blocks(list(ext), block_m)
    blocks = staging.upload_lists(seqs, firsts)
    q_starts = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens
    if not any(prefix):
        return _MLAExtendMetadata(q_starts, q_starts, blocks[0], blocks[1], None)
    ctx_lens = batch.prefix_lens + batch.extend_lens
    kv_starts = torch.cumsum(ctx_lens, 0) - ctx_lens
    total = sum(prefix) + sum(ext)
    seq_of = torch.repeat_interleave(
        torch.arange(batch.batch_size, device=device), ctx_lens, output_size=total
    )
    pos = torch.arange(total, device=device) - kv_starts[seq_of]  # [L] position in its sequence
    ps = batch.kv_cache.page_size
    pages = batch.page_table[batch.req_rows[seq_of], pos // ps]
    return _MLAExtendMetadata(
        q_starts, kv_starts, blocks[0], blocks[1], pages.long() * ps + pos % ps
    )


class TritonAttentionBackend(AttentionBackend):
    graph_safe = True

    def decode_writes_kv_first(self) -> bool:
        # With RoPE in the decode attention, each row writes its own KV in the attention launch.
        return not DECODE_ROPE_IN_ATTENTION

    def __init__(self, mla: bool = False) -> None:
        self._mla = mla
        self._staging: StagedUpload | None = None  # the extend blocks' uploads, on first use

    def _blocks_staging(self, device: torch.device) -> StagedUpload:
        """The extend kernel's query blocks (`kernels.extend_blocks`, int32) go up through
        reused pinned buffers: a fresh pinned copy each step was about 0.1 ms of a prefill's
        host time while its device waited."""
        if self._staging is None or self._staging.device != device:
            self._staging = StagedUpload(device, dtype=torch.int32)
        return self._staging

    @property
    def mla(self) -> bool:
        """Built for multi-head latent attention (DeepSeek/Kimi) rather than per-head K/V."""
        return self._mla

    def prepare(self, batch: ForwardBatch) -> None:
        cache = batch.kv_cache
        if self._mla and not batch.is_decode:
            batch.attn_metadata = _mla_extend_metadata(
                batch, self._blocks_staging(batch.input_ids.device)
            )
            return
        if batch.is_decode:
            # Decode: one query per sequence, at position prefix_len; it sees prefix_len + 1 keys.
            seq_lens = (batch.positions + 1).to(torch.int32)
            splits = kernels.decode_splits(
                batch.batch_size, cache.num_kv_heads, batch.max_seq_len, kernels.DECODE_BLOCK_N,
                sm_count(seq_lens.device), kernels.split_rule()[0],
            )  # fmt: skip
            batch.attn_metadata = _DecodeMetadata(seq_lens, splits)
            return
        # The queries come in the cache's dtype (the model's).
        shared = shared_memory(batch.input_ids.device)
        tiles = kernels.extend_tiles(cache.k_dim, cache.dtype, batch.max_extend_len, shared)
        seqs, firsts = kernels.extend_blocks(list(batch.host_extend_lens), tiles.block_m)
        blocks = self._blocks_staging(batch.input_ids.device).upload_lists(seqs, firsts)
        q_starts = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens
        batch.attn_metadata = _ExtendMetadata(q_starts, blocks[0], blocks[1], tiles)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache = batch.kv_cache.slots(layer_id)
        kernels.store_kv(k, v, k_cache, v_cache, batch.out_slots)
        return self._attend(q.contiguous(), k_cache, v_cache, batch, scale)

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
        # The q/k norms, rotary embedding of q and k and the KV write in one launch (three
        # before, five with the norms).
        k_cache, v_cache = batch.kv_cache.slots(layer_id)
        norms = None
        if qk_norm is not None:
            q_norm, k_norm = qk_norm
            if q_norm.eps != k_norm.eps:
                raise ValueError(f"q and k norms differ in eps: {q_norm.eps} != {k_norm.eps}")
            norms = (q_norm.weight, k_norm.weight, q_norm.eps)
        meta = batch.attn_metadata
        if DECODE_ROPE_IN_ATTENTION and isinstance(meta, _DecodeMetadata):
            rope = kernels.DecodeRope(
                q, k, v, batch.positions, batch.out_slots, rotary.cos, rotary.sin,
                rotary.interleaved, norms,
            )  # fmt: skip
            return kernels.decode_attention(
                rope, k_cache, v_cache, batch.page_table, batch.req_rows, meta.seq_lens,
                batch.kv_cache.page_size, scale, meta.num_splits,
            )  # fmt: skip
        q = fused.rope_store_kv(
            q, k, v, batch.positions, rotary.cos, rotary.sin, rotary.interleaved,
            k_cache, v_cache, batch.out_slots, norms,
        )  # fmt: skip
        return self._attend(q, k_cache, v_cache, batch, scale)

    def _attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        meta = batch.attn_metadata
        ps = batch.kv_cache.page_size
        if isinstance(meta, _DecodeMetadata):
            return kernels.decode_attention(
                q, k_cache, v_cache, batch.page_table, batch.req_rows, meta.seq_lens, ps,
                scale, meta.num_splits,
            )  # fmt: skip
        return kernels.extend_attention(
            q, k_cache, v_cache, batch.page_table, batch.req_rows, batch.prefix_lens,
            batch.extend_lens, meta.q_starts, meta.block_seq, meta.block_first, ps, scale,
            tiles=meta.tiles,
        )  # fmt: skip

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
        meta = self._decode_metadata(batch)
        latent_slots, pe_slots = batch.kv_cache.slots(layer_id)
        kernels.store_kv(c_kv, k_pe, latent_slots, pe_slots, batch.out_slots)
        return self._mla_decode(meta, q_latent, q_pe, layer_id, batch, scale)

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
        # The latent's norm, both rotations and the cache write in one launch (four before).
        meta = self._decode_metadata(batch)
        latent_slots, pe_slots = batch.kv_cache.slots(layer_id)
        q_pe, _, _ = fused.mla_latent_rope_store(
            q_pe, c_kv, k_pe, batch.positions, rotary.cos, rotary.sin, rotary.interleaved,
            kv_norm.weight, kv_norm.eps, latent_slots, pe_slots, batch.out_slots,
        )  # fmt: skip
        return self._mla_decode(meta, q_latent, q_pe, layer_id, batch, scale)

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
        rows, heads = q_nope.shape[0], q_nope.shape[1]
        if (
            not MLA_ABSORB_WITH_LATENT
            or rows > HEAD_BMM_MAX_ROWS
            or rows * heads > ABSORB_WITH_LATENT_MAX
        ):
            return super().forward_mla_absorbed_rope(
                q_nope, w_uk, q_pe, c_kv, k_pe, kv_norm, rotary, layer_id, batch, scale
            )
        meta = self._decode_metadata(batch)
        latent_slots, pe_slots = batch.kv_cache.slots(layer_id)
        latent = fused.MLALatentLaunch.of(
            q_pe, c_kv, k_pe, batch.positions, rotary.cos, rotary.sin, rotary.interleaved,
            kv_norm.weight, kv_norm.eps, latent_slots, pe_slots, batch.out_slots,
        )  # fmt: skip
        q_latent, q_pe = absorb_query_and_latent(q_nope, w_uk, latent)
        defer = MLA_COMBINE_IN_OUTPUT and rows <= HEAD_BMM_OUTPUT_MAX_ROWS
        return self._mla_decode_ranges(meta, q_latent, q_pe, layer_id, batch, scale, defer)

    def _decode_metadata(self, batch: ForwardBatch) -> _DecodeMetadata:
        if not self._mla:
            raise RuntimeError("this TritonAttentionBackend was built for per-head attention")
        meta = batch.attn_metadata
        if not isinstance(meta, _DecodeMetadata):
            raise RuntimeError("MLA extend runs in the non-absorbed form: forward_mla_expanded")
        return meta

    def _mla_decode(
        self,
        meta: _DecodeMetadata,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        result = self._mla_decode_ranges(meta, q_latent, q_pe, layer_id, batch, scale, False)
        assert isinstance(result, torch.Tensor)
        return result

    def _mla_decode_ranges(
        self,
        meta: _DecodeMetadata,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
        defer_combine: bool,
    ) -> torch.Tensor | PendingCombine:
        """`_mla_decode`, with `defer_combine` the ranges' partials for `mla_absorb_output`
        to combine (`MLA_COMBINE_IN_OUTPUT`)."""
        cache = batch.kv_cache
        out = q_latent.new_empty(q_latent.shape)
        # The kernel reads each sequence's row of the whole page table through req_rows: no
        # gather of the batch's rows (a launch per layer before).
        return mla_decode(
            q_latent, q_pe, cache.k[layer_id], cache.v[layer_id], batch.page_table,
            meta.seq_lens, scale, out, req_rows=batch.req_rows, defer_combine=defer_combine,
            **env_launch(q_latent),  # PDSERVE_MLA_DECODE_TILES: an A/B of the kernel's tiles
        )  # fmt: skip

    def mla_absorb_query(self, q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
        """Up to `HEAD_BMM_MAX_ROWS` rows `engine.kernels.head_bmm` (one launch taking part in
        PDL), beyond them cuBLAS's. On the H200 (`bench.mla_absorb`, µs per layer, 16 / 128
        heads): 2.7-3.0 against 3.5-3.7 at 1-64 rows at 16 heads, level at 128 heads, slower
        at 256 rows with 128 heads (24.8 against 20.5). The output's absorption (K 512, N 128)
        goes to cuBLAS past `HEAD_BMM_OUTPUT_MAX_ROWS` (alone, cuBLAS was faster at every size:
        3.9-4.2 against 4.4-5.0 µs)."""
        if q_nope.shape[0] > HEAD_BMM_MAX_ROWS:
            return super().mla_absorb_query(q_nope, w_uk)
        out = q_nope.new_empty(q_nope.shape[0], w_uk.shape[0], w_uk.shape[2])
        return head_bmm(q_nope, w_uk, out)

    def mla_absorb_output(
        self, out: torch.Tensor | PendingCombine, w_uv: torch.Tensor
    ) -> torch.Tensor:
        """Up to `HEAD_BMM_OUTPUT_MAX_ROWS` rows `engine.kernels.head_bmm` (in the PDL chain
        between the MLA decode and O), beyond them cuBLAS's; a decode's uncombined partials
        (`MLA_COMBINE_IN_OUTPUT`) through `head_bmm.combine_head_bmm`."""
        if isinstance(out, PendingCombine):
            attn = torch.empty(
                out.shape[0], w_uv.shape[0], w_uv.shape[1], dtype=out.dtype,
                device=out.mid_out.device,
            )  # fmt: skip
            return combine_head_bmm(out, w_uv.transpose(1, 2), attn)
        if out.shape[0] > HEAD_BMM_OUTPUT_MAX_ROWS:
            return super().mla_absorb_output(out, w_uv)
        attn = out.new_empty(out.shape[0], w_uv.shape[0], w_uv.shape[1])
        return head_bmm(out, w_uv.transpose(1, 2), attn)

    def mla_expands(self, batch: ForwardBatch) -> bool:
        """Prefill/extend in the non-absorbed form (fewer FLOPs over many new tokens); decode
        absorbed (one latent read per context token)."""
        return self._mla and not batch.is_decode

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
        meta = self._extend_metadata(batch)
        latent_slots, pe_slots = batch.kv_cache.slots(layer_id)  # [slots, 1, R], [slots, 1, P]
        kernels.store_kv(c_kv, k_pe, latent_slots, pe_slots, batch.out_slots)
        return self._mla_extend(meta, q_nope, q_pe, c_kv, k_pe, kv_up_proj, layer_id, batch, scale)

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
        meta = self._extend_metadata(batch)
        latent_slots, pe_slots = batch.kv_cache.slots(layer_id)
        # The new tokens' normed latents and rotated keys come back only when they are the
        # whole context; over a cached prefix the context is read from the cache.
        q_pe, normed, rotated = fused.mla_latent_rope_store(
            q_pe, c_kv, k_pe, batch.positions, rotary.cos, rotary.sin, rotary.interleaved,
            kv_norm.weight, kv_norm.eps, latent_slots, pe_slots, batch.out_slots,
            return_kv=meta.context_slots is None,
        )  # fmt: skip
        return self._mla_extend(
            meta, q_nope, q_pe, normed, rotated, kv_up_proj, layer_id, batch, scale
        )

    @staticmethod
    def _extend_metadata(batch: ForwardBatch) -> _MLAExtendMetadata:
        meta = batch.attn_metadata
        if not isinstance(meta, _MLAExtendMetadata):
            raise RuntimeError("forward_mla_expanded runs extend batches of an MLA backend only")
        return meta

    def _mla_extend(
        self,
        meta: _MLAExtendMetadata,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor | None,
        k_pe: torch.Tensor | None,
        kv_up_proj: Callable[[torch.Tensor], torch.Tensor],
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """Attention of the new tokens over their context, the step's latents already in the
        cache; `c_kv`, `k_pe` (normed, rotated) are read only when there is no cached prefix."""
        latent_slots, pe_slots = batch.kv_cache.slots(layer_id)
        if meta.context_slots is None:
            if c_kv is None or k_pe is None:
                raise RuntimeError("a batch without cached prefixes attends to its own latents")
            latent, rope_key = c_kv, k_pe
        else:
            latent = latent_slots.index_select(0, meta.context_slots)
            rope_key = pe_slots.index_select(0, meta.context_slots)
        num_heads, d_nope = q_nope.shape[1], q_nope.shape[2]
        # kv: [L, H, Dn + Dv], per head its no-rope key then its value
        kv = kv_up_proj(latent.flatten(1)).view(latent.shape[0], num_heads, -1)
        k_nope, v = kv.split([d_nope, kv.shape[2] - d_nope], dim=-1)
        return mla_extend.mla_extend_attention(
            q_nope, q_pe, k_nope, rope_key, v, batch.prefix_lens, batch.extend_lens,
            meta.q_starts, meta.kv_starts, meta.block_seq, meta.block_first, scale,
        )  # fmt: skip
