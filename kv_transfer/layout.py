"""KV page layouts and pool descriptors: what a page is, and where each page of a pool lives.

A KV pool is, per layer, a K and a V tensor of `[num_pages, page_size, kv_heads, head_dim]`;
page `p` of layer `l` starts at `base[l] + p * page_bytes`. Two workers may exchange pages only
if their layouts are equal; `check_compatible` says loudly which fields differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

# Bytes per element by dtype name (torch's names without the "torch." prefix).
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


class LayoutMismatchError(ValueError):
    """Two KV layouts that must be equal (to pair two workers) are not."""


@dataclass(frozen=True)
class KVLayout:
    """The shape of one page of K and of V in one layer, plus the model it belongs to.

    V pages are as wide as K pages unless `v_head_dim` says otherwise: a multi-head latent
    attention pool keeps the latent in "K" and the rotary key in "V".
    """

    model: str
    dtype: str  # a key of DTYPE_ITEMSIZE, e.g. "bfloat16"
    page_size: int  # tokens per page
    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    # The weights' identity (see worker.convert.weights_identity): KV computed with
    # other weights is other KV, so it belongs in the fingerprint. "": not stated.
    weights: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_ITEMSIZE:
            known = ", ".join(DTYPE_ITEMSIZE)
            raise ValueError(f"unknown KV dtype {self.dtype!r}; known dtypes: {known}")
        for name in ("page_size", "num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.v_head_dim is not None and self.v_head_dim < 1:
            raise ValueError(f"KVLayout.v_head_dim must be >= 1 or None, got {self.v_head_dim}")

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def k_page_bytes(self) -> int:
        """Bytes of one page of K in one layer."""
        return self.page_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def v_page_bytes(self) -> int:
        """Bytes of one page of V in one layer."""
        v_dim = self.head_dim if self.v_head_dim is None else self.v_head_dim
        return self.page_size * self.num_kv_heads * v_dim * self.itemsize

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K (or of V) in one layer, when the two are the same size."""
        if self.k_page_bytes != self.v_page_bytes:
            raise ValueError(
                f"K and V pages differ ({self.k_page_bytes} vs {self.v_page_bytes} bytes); "
                "use k_page_bytes / v_page_bytes"
            )
        return self.k_page_bytes

    @property
    def fingerprint(self) -> str:
        """16 hex digits of a SHA-256 over every field; equal layouts, equal fingerprints."""
        canonical = ";".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"model={self.model} dtype={self.dtype} page_size={self.page_size} "
            f"layers={self.num_layers} kv_heads={self.num_kv_heads} head_dim={self.head_dim}"
            + ("" if self.v_head_dim is None else f" v_head_dim={self.v_head_dim}")
        )


def check_compatible(
    local: KVLayout,
    remote: KVLayout,
    *,
    local_label: str = "local",
    remote_label: str = "remote",
) -> None:
    """Raise `LayoutMismatchError` naming both values of every differing field, and both
    fingerprints, unless the two layouts are equal."""
    differences = [
        f"{f.name} {getattr(local, f.name)!r} ({local_label}) vs "
        f"{getattr(remote, f.name)!r} ({remote_label})"
        for f in fields(KVLayout)
        if getattr(local, f.name) != getattr(remote, f.name)
    ]
    if differences:
        raise LayoutMismatchError(
            f"KV layouts differ: {'; '.join(differences)}; fingerprints "
            f"{local.fingerprint} ({local_label}) vs {remote.fingerprint} ({remote_label})"
        )


@dataclass(frozen=True)
class KVPoolDescriptor:
    """Where one worker's KV pool lives: per layer, the address of page 0 of K and of V.

    Page `p` of layer `l` occupies `[base[l] + p * page_bytes, base[l] + (p + 1) * page_bytes)`
    in K (`k_base_addrs`) and in V (`v_base_addrs`). Plain ints, so it pickles and serializes.
    """

    layout: KVLayout
    k_base_addrs: tuple[int, ...]
    v_base_addrs: tuple[int, ...]
    num_pages: int

    def __post_init__(self) -> None:
        n = self.layout.num_layers
        for name in ("k_base_addrs", "v_base_addrs"):
            addrs = getattr(self, name)
            if len(addrs) != n:
                raise ValueError(
                    f"KVPoolDescriptor.{name} has {len(addrs)} addresses, the layout has {n} layers"
                )
            for addr in addrs:
                if not isinstance(addr, int) or addr <= 0:
                    raise ValueError(f"KVPoolDescriptor.{name} holds a bad address {addr!r}")
        if not isinstance(self.num_pages, int) or self.num_pages < 1:
            raise ValueError(f"KVPoolDescriptor.num_pages must be >= 1, got {self.num_pages!r}")

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's K (or V) tensor, when the two are the same size."""
        return self.num_pages * self.layout.page_bytes

    def k_page_addr(self, layer: int, page: int) -> int:
        return self.k_base_addrs[layer] + page * self.layout.k_page_bytes

    def v_page_addr(self, layer: int, page: int) -> int:
        return self.v_base_addrs[layer] + page * self.layout.v_page_bytes

    def regions(self) -> list[tuple[int, int]]:
        """`(addr, length)` of every K and V tensor, layer by layer: what to `register_memory`."""
        k_len = self.num_pages * self.layout.k_page_bytes
        v_len = self.num_pages * self.layout.v_page_bytes
        return [
            region
            for k, v in zip(self.k_base_addrs, self.v_base_addrs, strict=True)
            for region in ((k, k_len), (v, v_len))
        ]


class TensorLike(Protocol):
    """What `descriptor_from_tensors` reads from a tensor (a `torch.Tensor` qualifies)."""

    @property
    def shape(self) -> Sequence[int]: ...

    @property
    def dtype(self) -> object: ...

    def data_ptr(self) -> int: ...

    def is_contiguous(self) -> bool: ...


def descriptor_from_tensors(
    layout: KVLayout, k_tensors: Sequence[TensorLike], v_tensors: Sequence[TensorLike]
) -> KVPoolDescriptor:
    """The descriptor of a pool held as per-layer contiguous K and V tensors
    `[num_pages, page_size, kv_heads, head_dim]` of the layout's dtype."""
    if len(k_tensors) != layout.num_layers or len(v_tensors) != layout.num_layers:
        raise ValueError(
            f"expected {layout.num_layers} K and V tensors (one per layer), "
            f"got {len(k_tensors)} K and {len(v_tensors)} V"
        )
    num_pages = int(k_tensors[0].shape[0])
    v_dim = layout.head_dim if layout.v_head_dim is None else layout.v_head_dim
    for name, tensors, dim in (("K", k_tensors, layout.head_dim), ("V", v_tensors, v_dim)):
        expected = (num_pages, layout.page_size, layout.num_kv_heads, dim)
        for layer, t in enumerate(tensors):
            shape = tuple(int(d) for d in t.shape)
            if shape != expected:
                raise ValueError(f"{name} of layer {layer} has shape {shape}, expected {expected}")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype != layout.dtype:
                raise ValueError(
                    f"{name} of layer {layer} has dtype {dtype}, the layout says {layout.dtype}"
                )
            if not t.is_contiguous():
                raise ValueError(f"{name} of layer {layer} is not contiguous")
    return KVPoolDescriptor(
        layout=layout,
        k_base_addrs=tuple(int(t.data_ptr()) for t in k_tensors),
        v_base_addrs=tuple(int(t.data_ptr()) for t in v_tensors),
        num_pages=num_pages,
    )
