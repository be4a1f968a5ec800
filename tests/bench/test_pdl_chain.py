"""bench/pdl_chain.py under the interpreter: each link adds one to what the link before wrote,
and the benchmark's table comes out (PDL modes other than 0 need Hopper: left out here)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from bench.pdl_chain import main, run_chain


@pytest.mark.parametrize("links", [1, 4, 5])
def test_each_link_reads_the_last_ones_output(links: int) -> None:
    a, b = torch.zeros(3 * 16), torch.zeros(3 * 16)
    run_chain(a, b, links, programs=3, block=16, mode=0)
    assert torch.equal(b if links % 2 else a, torch.full_like(a, float(links)))


def test_the_table_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cpu", "--programs", "1,2", "--links", "3", "--block", "16",
                 "--reps", "1"]) == 0  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| programs") and len(rows) == 2 + 2  # header, rule, 2 rows
