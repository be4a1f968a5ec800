"""The Triton attention backend: paged decode (flash-decoding) and extend attention kernels.

Decode metadata is computed on the device from the batch's static tensors, with shapes that
depend only on the batch size and the longest context served, so a decode step can be
captured in a CUDA graph and replayed with new lengths.

MLA models (DeepSeek-V3, Kimi-K2, Moonlight) decode with `engine.kernels.mla_decode`; their
prefill still runs the torch backend's padded attention (a paged MLA extend kernel is not
written yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.forward_batch import ForwardBatch
from engine.kernels import attention as kernels
from engine.kernels.mla_decode import mla_decode
from engine.layers.attention import AttentionBackend, TorchAttentionBackend


@dataclass(frozen=True)
class _DecodeMetadata:
    seq_lens: torch.Tensor  # [B] int32: context length including the new token
    num_splits: int


@dataclass(frozen=True)
class _ExtendMetadata:
    q_starts: torch.Tensor  # [B] index into [T] of each sequence's first new token
    block_seq: torch.Tensor  # [blocks] sequence of each query block
    block_first: torch.Tensor  # [blocks] first query (within its sequence) of each block


class TritonAttentionBackend(AttentionBackend):
    graph_safe = True

    def __init__(self, mla: bool = False) -> None:
        # MLA prefill: the reference's padded attention until a paged MLA extend kernel exists.
        self._mla_extend = TorchAttentionBackend() if mla else None

    @property
    def mla(self) -> bool:
        """Built for multi-head latent attention (DeepSeek/Kimi) rather than per-head K/V."""
        return self._mla_extend is not None

    def prepare(self, batch: ForwardBatch) -> None:
        cache = batch.kv_cache
        if self._mla_extend is not None and not batch.is_decode:
            self._mla_extend.prepare(batch)
            return
        if batch.is_decode:
            # Decode: one query per sequence, at position prefix_len; it sees prefix_len + 1 keys.
            seq_lens = (batch.positions + 1).to(torch.int32)
            splits = kernels.decode_splits(
                batch.batch_size, cache.num_kv_heads, batch.max_seq_len, kernels.DECODE_BLOCK_N
            )
            batch.attn_metadata = _DecodeMetadata(seq_lens, splits)
            return
        seqs, firsts = kernels.extend_blocks(
            list(batch.host_extend_lens), kernels.extend_block_m(cache.k_dim)
        )
        blocks = torch.tensor([seqs, firsts], dtype=torch.int32)
        blocks = blocks.to(batch.input_ids.device, non_blocking=True)
        q_starts = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens
        batch.attn_metadata = _ExtendMetadata(q_starts, blocks[0], blocks[1])

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
        q = q.contiguous()
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
        if self._mla_extend is None:
            raise RuntimeError("this TritonAttentionBackend was built for per-head attention")
        meta = batch.attn_metadata
        if not isinstance(meta, _DecodeMetadata):
            return self._mla_extend.forward_mla(q_latent, q_pe, c_kv, k_pe, layer_id, batch, scale)
        cache = batch.kv_cache
        latent_slots, pe_slots = cache.slots(layer_id)
        kernels.store_kv(c_kv, k_pe, latent_slots, pe_slots, batch.out_slots)
        out = q_latent.new_empty(q_latent.shape)
        return mla_decode(
            q_latent, q_pe, cache.k[layer_id], cache.v[layer_id],
            batch.page_table.index_select(0, batch.req_rows), meta.seq_lens, scale, out,
        )  # fmt: skip
