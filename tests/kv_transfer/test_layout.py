"""KV layouts: page sizes, fingerprints, mismatch errors, descriptors from real tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kv_transfer import (
    KVLayout,
    KVPoolDescriptor,
    LayoutMismatchError,
    check_compatible,
    descriptor_from_tensors,
)

LAYOUT = KVLayout(
    model="tiny-llama", dtype="float32", page_size=4, num_layers=2, num_kv_heads=2, head_dim=8
)


def test_page_bytes_per_dtype() -> None:
    assert LAYOUT.page_bytes == 4 * 2 * 8 * 4
    llama = KVLayout("llama-3-8b", "bfloat16", 16, 32, 8, 128)
    assert llama.page_bytes == 32 * 1024
    assert dataclasses.replace(llama, dtype="float8_e4m3fn").page_bytes == 16 * 1024


def test_layout_validation_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match="'int4'"):
        dataclasses.replace(LAYOUT, dtype="int4")
    with pytest.raises(ValueError, match="page_size must be a positive int, got 0"):
        dataclasses.replace(LAYOUT, page_size=0)


def test_fingerprint_is_stable_and_field_sensitive() -> None:
    same = KVLayout("tiny-llama", "float32", 4, 2, 2, 8)
    assert same.fingerprint == LAYOUT.fingerprint
    assert len(LAYOUT.fingerprint) == 16
    int(LAYOUT.fingerprint, 16)
    for change in (
        {"model": "other"},
        {"dtype": "bfloat16"},
        {"page_size": 1},
        {"num_layers": 3},
        {"num_kv_heads": 4},
        {"head_dim": 16},
    ):
        assert dataclasses.replace(LAYOUT, **change).fingerprint != LAYOUT.fingerprint, change


def test_describe() -> None:
    assert LAYOUT.describe() == (
        "model=tiny-llama dtype=float32 page_size=4 layers=2 kv_heads=2 head_dim=8"
    )


def test_compatible_layouts_pass() -> None:
    check_compatible(LAYOUT, KVLayout("tiny-llama", "float32", 4, 2, 2, 8))


def test_mismatch_names_both_values_and_both_fingerprints() -> None:
    decode = dataclasses.replace(LAYOUT, page_size=1, dtype="bfloat16")
    with pytest.raises(LayoutMismatchError) as info:
        check_compatible(LAYOUT, decode, local_label="prefill", remote_label="decode")
    message = str(info.value)
    assert "page_size 4 (prefill) vs 1 (decode)" in message
    assert "dtype 'float32' (prefill) vs 'bfloat16' (decode)" in message
    assert LAYOUT.fingerprint in message and decode.fingerprint in message
    assert "model" not in message.split("; fingerprints")[0]  # equal fields are not named
    assert isinstance(info.value, ValueError)


def _pool(num_pages: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (num_pages, LAYOUT.page_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    k = [torch.zeros(shape, dtype=torch.float32) for _ in range(LAYOUT.num_layers)]
    v = [torch.zeros(shape, dtype=torch.float32) for _ in range(LAYOUT.num_layers)]
    return k, v


def test_descriptor_from_tensors_addresses_pages() -> None:
    k, v = _pool(num_pages=16)
    desc = descriptor_from_tensors(LAYOUT, k, v)
    assert desc.num_pages == 16
    assert desc.k_base_addrs == (k[0].data_ptr(), k[1].data_ptr())
    assert desc.v_base_addrs == (v[0].data_ptr(), v[1].data_ptr())
    assert desc.layer_bytes == k[0].nbytes
    # page p of layer l is the tensor's row p
    assert desc.k_page_addr(1, 5) == k[1][5].data_ptr()
    assert desc.v_page_addr(0, 15) == v[0][15].data_ptr()
    assert desc.regions() == [
        (k[0].data_ptr(), k[0].nbytes),
        (v[0].data_ptr(), v[0].nbytes),
        (k[1].data_ptr(), k[1].nbytes),
        (v[1].data_ptr(), v[1].nbytes),
    ]


def test_descriptor_from_tensors_rejects_bad_tensors() -> None:
    k, v = _pool(num_pages=4)
    with pytest.raises(ValueError, match="2 K and V tensors"):
        descriptor_from_tensors(LAYOUT, k[:1], v)
    with pytest.raises(ValueError, match=r"V of layer 1 has shape \(4, 4, 2, 4\)"):
        descriptor_from_tensors(LAYOUT, k, [v[0], torch.zeros(4, 4, 2, 4)])
    with pytest.raises(ValueError, match="K of layer 0 has dtype bfloat16"):
        descriptor_from_tensors(LAYOUT, [k[0].bfloat16(), k[1]], v)
    strided = torch.zeros(4, 4, 8, 2).transpose(2, 3)
    with pytest.raises(ValueError, match="K of layer 1 is not contiguous"):
        descriptor_from_tensors(LAYOUT, [k[0], strided], v)


def test_descriptor_validates_lengths() -> None:
    with pytest.raises(ValueError, match="k_base_addrs has 1 addresses, the layout has 2 layers"):
        KVPoolDescriptor(LAYOUT, (4096,), (8192, 12288), num_pages=4)
    with pytest.raises(ValueError, match="num_pages"):
        KVPoolDescriptor(LAYOUT, (4096, 8192), (12288, 16384), num_pages=0)


def test_weights_identity_is_part_of_the_fingerprint() -> None:
    """Issue 20, bug 5: KV computed with other weights is other KV."""
    a = KVLayout(
        "m", "float32", page_size=4, num_layers=2, num_kv_heads=2, head_dim=8, weights="w1"
    )
    b = dataclasses.replace(a, weights="w2")
    assert a.fingerprint != b.fingerprint
    with pytest.raises(LayoutMismatchError, match="weights 'w1' \\(prefill\\) vs 'w2'"):
        check_compatible(a, b, local_label="prefill", remote_label="decode")
