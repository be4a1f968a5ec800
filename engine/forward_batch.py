"""What one model step computes: B sequences, T new tokens in all, over the paged KV pool."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kv_cache import KVCache


@dataclass
class ForwardBatch:
    """Device tensors for one step. Built by the `ModelRunner`, read by the model and attention.

    Sequence `b` has `prefix_lens[b]` tokens already in the cache and computes
    `extend_lens[b]` new ones (1 in decode); its new tokens occupy a contiguous run of the
    flattened `[T]` inputs, in batch order. Its pages are row `req_rows[b]` of `page_table`
    (the device page table of every live sequence, see `DevicePageTable`).

    A decode batch may be a CUDA graph's static buffers: then only the device tensors are
    meaningful per replay, and the host-side fields describe the captured bounds
    (`max_seq_len` is the longest context the graph serves).
    """

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] flat KV slot (page * page_size + offset) of each new token
    page_table: torch.Tensor  # [R, W] int32 page ids of every live sequence, one per row
    req_rows: torch.Tensor  # [B] row of `page_table` holding sequence b's pages
    prefix_lens: torch.Tensor  # [B] on the device
    extend_lens: torch.Tensor  # [B] on the device
    logits_indices: torch.Tensor  # [B] index into [T] of each sequence's last new token
    max_extend_len: int
    max_seq_len: int
    kv_cache: KVCache
    is_decode: bool
    # The same extend and prefix lengths on the host, for kernels that split work per
    # sequence (empty where the builder does not know them: a decode batch's prefixes).
    host_extend_lens: tuple[int, ...] = ()
    host_prefix_lens: tuple[int, ...] = ()
    attn_metadata: Any = field(default=None)
    # While a prefill's pieces are captured (engine/piecewise_graph.py): what `attend` hands
    # each attention call to, so that the capture splits there.
    pieces: Any = field(default=None)

    @property
    def batch_size(self) -> int:
        return int(self.req_rows.shape[0])

    def sequence_pages(self) -> torch.Tensor:
        """`[B, W]` page ids of the batch's sequences (a gather: reference paths only)."""
        return self.page_table[self.req_rows].long()

    def attend(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """`fn(self, *inputs)`: a model's attention call, whose token-major `inputs` `[T, ...]`
        are all the step's tensors it reads (everything else it uses depends on no step),
        returning `[T, ...]`. A piecewise capture runs it between its graphs."""
        if self.pieces is not None:
            return self.pieces.attend(fn, self, inputs)
        return fn(self, *inputs)
