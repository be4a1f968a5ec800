"""bench/cuda_ipc_host.py at tiny sizes: every case and copy mode timed, the copies it counts
checked against the batch (the bench raises if they miss or repeat a byte)."""

from __future__ import annotations

import pytest

from bench import cuda_ipc_host


def test_cuda_ipc_host_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cuda_ipc_host.main(["--layers", "2", "--prompt-tokens", "64", "--warmup", "1",
                               "--reps", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 4 * 5  # the header, then 4 cases x 5 copy modes
    assert "every case checked" in printed
    cells = {(r.split("|")[1].strip(), r.split("|")[2].strip(), r.split("|")[4].strip()):
             [c.strip() for c in r.split("|")[1:-1]] for r in rows[1:]}  # fmt: skip
    # 2 layers x K and V: 4 writes contiguous, one region pair each; memcpy issues one call
    # per write, rows one row copy per region pair, batch one call for all, kernel one launch.
    assert cells[("16", "contiguous", "memcpy")][6] == "4"
    assert cells[("1", "every-other", "memcpy")][6] == "256"
    assert cells[("1", "every-other", "rows")][7] == "4"
    assert cells[("1", "every-other", "batch")][6:10] == ["0", "0", "1", "0"]
    assert cells[("1", "every-other", "kernel")][6:10] == ["0", "0", "0", "1"]
    # auto, with a driver that has the batch call and Triton: one launch for short writes
    # (128 KB contiguous runs at this size, 2 KB pages).
    assert cells[("16", "contiguous", "auto")][6:10] == ["0", "0", "0", "1"]
    assert cells[("1", "every-other", "auto")][6:10] == ["0", "0", "0", "1"]


def test_canonical_merges_runs_and_tells_different_copies_apart() -> None:
    a = cuda_ipc_host.canonical([(100, 10, 4), (104, 14, 4), (200, 50, 0)])
    b = cuda_ipc_host.canonical([(100, 10, 8)])
    assert a.tolist() == b.tolist() == [[100, 10, 8]]
    c = cuda_ipc_host.canonical([(104, 14, 4), (100, 11, 4)])  # source not continued
    assert c.tolist() == [[100, 11, 4], [104, 14, 4]]
