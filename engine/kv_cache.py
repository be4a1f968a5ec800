"""The paged KV pool: per layer, a K tensor `[num_pages, page_size, kv_heads, k_dim]` and a V
tensor `[num_pages, page_size, kv_heads, v_dim]`.

The model declares what a token's cache entry is (`KVCacheSpec`): for grouped-query attention
K and V are `num_kv_heads x head_dim` each; for multi-head latent attention (DeepSeek) the "K"
tensor holds the compressed latent `c_kv` (`kv_heads=1, k_dim=kv_lora_rank`) and the "V" tensor
the shared rotary key `k_pe` (`kv_heads=1, v_dim=qk_rope_head_dim`).

Page `p` of layer `l` starts at `k[l].data_ptr() + p * k_page_bytes` (and `v[l].data_ptr() +
p * v_page_bytes`); the transfer layer relies on that layout. Which pages are in use is the
`PagePool`'s business, not this module's. One page more than `num_pages` is allocated, at the
end: the scratch page (`scratch_page`), never handed out, which padded entries of a captured
decode step write into and read from so that they touch no request's pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def page_bytes(page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one page of a `[page_size, num_kv_heads, head_dim]` cache tensor."""
    return page_size * num_kv_heads * head_dim * dtype.itemsize


@dataclass(frozen=True)
class KVCacheSpec:
    """One token's entry in one layer: K `[num_kv_heads, k_dim]`, V `[num_kv_heads, v_dim]`."""

    num_kv_heads: int
    k_dim: int
    v_dim: int

    def __post_init__(self) -> None:
        for name in ("num_kv_heads", "k_dim", "v_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVCacheSpec.{name} must be >= 1, got {getattr(self, name)}")

    def page_bytes(self, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page of K plus one page of V, in one layer."""
        return page_bytes(page_size, self.num_kv_heads, self.k_dim + self.v_dim, dtype)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        spec: KVCacheSpec,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.spec = spec
        self.num_kv_heads = spec.num_kv_heads
        self.k_dim = spec.k_dim
        self.v_dim = spec.v_dim
        self.dtype = dtype
        self.scratch_page = num_pages
        k_shape = (num_pages + 1, page_size, spec.num_kv_heads, spec.k_dim)
        v_shape = (num_pages + 1, page_size, spec.num_kv_heads, spec.v_dim)
        self.k = [torch.zeros(k_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def head_dim(self) -> int:
        """The K and V head width, for layouts where they are equal (every GQA model)."""
        if self.k_dim != self.v_dim:
            raise ValueError(
                f"this KV pool has different K and V widths (k_dim={self.k_dim}, "
                f"v_dim={self.v_dim}, e.g. MLA's latent and rope key); use k_dim and v_dim"
            )
        return self.k_dim

    @property
    def k_page_bytes(self) -> int:
        """Bytes of one page of K in one layer."""
        return page_bytes(self.page_size, self.num_kv_heads, self.k_dim, self.dtype)

    @property
    def v_page_bytes(self) -> int:
        """Bytes of one page of V in one layer."""
        return page_bytes(self.page_size, self.num_kv_heads, self.v_dim, self.dtype)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K (or of V) in one layer, for layouts where they are equal."""
        if self.k_page_bytes != self.v_page_bytes:
            raise ValueError(
                f"K and V pages differ in size ({self.k_page_bytes} vs {self.v_page_bytes} "
                "bytes); use k_page_bytes and v_page_bytes"
            )
        return self.k_page_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * (self.num_pages + 1) * (self.k_page_bytes + self.v_page_bytes)

    def slots(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as `[(num_pages + 1) * page_size, kv_heads, k_dim | v_dim]`
        views (the scratch page included)."""
        n = (self.num_pages + 1) * self.page_size
        return (
            self.k[layer_id].view(n, self.num_kv_heads, self.k_dim),
            self.v[layer_id].view(n, self.num_kv_heads, self.v_dim),
        )
