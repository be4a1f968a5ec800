"""bench/mla_kernel.py's decode options on the CPU: `--splits` and `--tiles` parse (and refuse
what the kernel cannot launch), and the gather + SDPA reference taken in chunks of sequences
(how the bench checks the cases whose whole-batch baseline does not fit the device) equals the
whole batch's. The timed decode table itself needs a GPU (`bench/gpu/session.sh`)."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench.args import split_list
from bench.mla_kernel import RANK, ROPE, Case, tiles_list


def test_splits_and_tiles_parse() -> None:
    assert split_list("0,1,2,4") == (0, 1, 2, 4)
    assert tiles_list("32x0x2,64x4x3") == ((32, 0, 2, False), (64, 4, 3, False))
    assert tiles_list("32x4x3a") == ((32, 4, 3, True),)
    for bad in ("", "-1", "a"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            split_list(bad)
    for bad in ("32x4", "8x4x2", "32x4x0", "32xax2", "", "32x4x3b", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            tiles_list(bad)


def test_chunked_reference_equals_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(0)
    batch, page_size, pages = 20, 16, 2
    num_pages = batch * pages
    caches = [
        (
            torch.randn(num_pages, page_size, 1, RANK, generator=g),
            torch.randn(num_pages, page_size, 1, ROPE, generator=g),
        )
        for _ in range(2)
    ]
    table = torch.randperm(num_pages, generator=g).view(batch, pages)
    case = Case(
        caches,
        table,
        torch.full((batch,), page_size * pages),
        torch.randn(batch, 4, RANK, generator=g) * 0.05,
        torch.randn(batch, 4, ROPE, generator=g) * 0.05,
        torch.empty(batch, 4, RANK),
        16,
    )
    whole = case.baseline()
    chunked = torch.cat([case.baseline(slice(i, i + 16)) for i in range(0, batch, 16)])
    assert whole.shape == (batch, 4, RANK)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_quarters_option_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--quarters 0,1` reaches the decode table (0 was refused once, on the GPU)."""
    import bench.mla_kernel as mla_kernel

    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mla_kernel, "bench_decode", seen.append)
    mla_kernel.main(["--mode", "decode", "--quarters", "0,1", "--tiles", "64x0x2"])
    mla_kernel.main(["--mode", "decode"])
    assert [a.quarters for a in seen] == [(0, 1), ()]
    assert mla_kernel.QUARTERS_LABEL == {None: "", 0: " 1c", 1: " q"}


def test_mla_absorb_products_match_the_reference() -> None:
    """bench/mla_absorb.py's two products through both backends (the Triton one under the
    interpreter) against its float32 reference, on the model's views of one weight."""
    from bench.mla_absorb import NOPE, RANK, V, absorb, reference
    from engine.layers.attention import TorchAttentionBackend
    from engine.layers.triton_attention import TritonAttentionBackend

    g = torch.Generator().manual_seed(0)
    heads, rows = 2, 3
    w_uk, w_uv = (
        (torch.randn(heads * (NOPE + V), RANK, generator=g) * RANK**-0.5)
        .view(heads, NOPE + V, RANK)
        .split([NOPE, V], dim=1)
    )
    q = torch.randn(rows, heads, NOPE + 64, generator=g)
    latent = torch.randn(rows, heads, RANK, generator=g)
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        for kind, a in (("query", q[:, :, :NOPE]), ("output", latent)):
            got = absorb(backend, kind, a, (w_uk, w_uv))
            torch.testing.assert_close(got, reference(kind, a, (w_uk, w_uv)), rtol=1e-5, atol=1e-5)
