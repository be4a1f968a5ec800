"""What one model step computes: B sequences, T new tokens in all, over the paged KV pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kv_cache import KVCache


@dataclass
class ForwardBatch:
    """Device tensors for one step. Built by the `ModelRunner`, read by the model and attention.

    Sequence `b` has `prefix_lens[b]` tokens already in the cache and computes
    `extend_lens[b]` new ones (1 in decode); its new tokens occupy a contiguous run of the
    flattened `[T]` inputs, in batch order.
    """

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] flat KV slot (page * page_size + offset) of each new token
    page_table: torch.Tensor  # [B, max_pages] page ids, padded with 0
    prefix_lens: torch.Tensor  # [B] on the device
    extend_lens: torch.Tensor  # [B] on the device
    logits_indices: torch.Tensor  # [B] index into [T] of each sequence's last new token
    max_extend_len: int
    max_seq_len: int
    kv_cache: KVCache
    is_decode: bool
    attn_metadata: Any = field(default=None)

    @property
    def batch_size(self) -> int:
        return int(self.logits_indices.shape[0])
