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
    assert tiles_list("32x0x2,64x4x3") == ((32, 0, 2), (64, 4, 3))
    for bad in ("", "-1", "a"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            split_list(bad)
    for bad in ("32x4", "8x4x2", "32x4x0", "32xax2", ""):
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
