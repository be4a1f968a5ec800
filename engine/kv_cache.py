"""The paged KV pool: per layer, K and V tensors of `[num_pages, page_size, kv_heads, head_dim]`.

Page `p` of layer `l` starts at `k[l].data_ptr() + p * page_bytes`; the transfer layer relies on
that layout. Which pages are in use is the `PagePool`'s business, not this module's.
"""

from __future__ import annotations

import torch


def page_bytes(page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one page of K (or of V) in one layer."""
    return page_size * num_kv_heads * head_dim * dtype.itemsize


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def page_bytes(self) -> int:
        return page_bytes(self.page_size, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def total_bytes(self) -> int:
        return 2 * self.num_layers * self.num_pages * self.page_bytes

    def slots(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as `[num_pages * page_size, kv_heads, head_dim]` views."""
        flat = (self.num_pages * self.page_size, self.num_kv_heads, self.head_dim)
        return self.k[layer_id].view(flat), self.v[layer_id].view(flat)
