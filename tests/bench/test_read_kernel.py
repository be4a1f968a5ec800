"""bench/read_kernel.py under the interpreter: each program sums exactly its share of the
buffer (ragged shares and a last program with nothing left included), and the table and the
chain's line come out."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from bench.read_kernel import launch_read, main


@pytest.mark.parametrize("words,programs,block,unroll", [(1000, 3, 64, 2), (96, 4, 32, 1)])
def test_each_program_sums_its_share(words: int, programs: int, block: int, unroll: int) -> None:
    x = torch.arange(words, dtype=torch.int32)
    out = torch.full((programs,), -1, dtype=torch.int32)
    launch_read(x, out, programs, block, unroll, warps=4)
    share = math.ceil(math.ceil(words / programs) / block) * block  # whole blocks a program
    want = [int(x[p * share : (p + 1) * share].sum()) for p in range(programs)]
    assert out.tolist() == want
    assert int(out.sum()) == int(x.sum())


def test_the_table_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--device",
        "cpu",
        "--sizes-mb",
        "1",
        "--programs-per-sm",
        "1",
        "--num-warps",
        "4",
        "--block",
        "4096",
        "--unroll",
        "1,2",
        "--layers",
        "1",
        "--reps",
        "1",
        "--chain",
        "1,1",
    ]
    assert main(args) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| MB") and len(rows) == 1 + 2  # header, two configs
    assert "best a size: 1 MB" in out and "chain 1 + 1 MB" in out
