"""bench/sampling.py's table on the CPU (the measurements themselves need a GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from bench import sampling


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("|")[1:-1]]


def test_a_row_fills_the_header() -> None:
    row = sampling.Row(
        "flat", "top-p 0.9", 64, "auto (4)", floor_s=8e-6, torch_s=1.4e-3, kernel_s=1e-4,
        device_s=8e-5, passes=10.0, kept_differ=0, tokens_differ=1,
    )  # fmt: skip
    header, rule = sampling.HEADER.splitlines()
    assert len(cells(row.line())) == len(cells(header)) == len(cells(rule))
    assert cells(row.line()) == [
        "flat", "top-p 0.9", "64", "auto (4)", "8.0", "1400.0", "100.0", "80.0", "10.0x",
        "14.0x", "10.0", "0", "1",
    ]  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a GPU")
def test_without_a_gpu_it_says_so() -> None:
    with pytest.raises(SystemExit, match="CUDA"):
        sampling.main(["--batches", "1"])
