"""Programmatic dependent launch (`engine.kernels.pdl`): the launch keywords, and where the
compiled kernels let their successor be scheduled. Compiled for sm_90 on this CPU host in a
process without the interpreter (Triton ships `ptxas`), as test_kernels_compile does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

from engine.kernels import pdl

ROOT = Path(__file__).resolve().parents[2]

ORDER = """
from bench.compile_kernels import compile_kernel, decode_attention_launch
(kernel, pointers, constants), options = decode_attention_launch()
for mode in (1, 2, 3):
    ptx = compile_kernel(90, kernel, pointers, {**constants, "PDL": mode}, launch_pdl=True,
                         **options).asm["ptx"]
    print(mode, ptx.find("griddepcontrol.launch_dependents"), ptx.find("griddepcontrol.wait"))
"""


def test_launch_keywords_off_cuda() -> None:
    """Off CUDA (and under the interpreter) PDL is off whatever is asked; the batch rule."""
    x = torch.zeros(1)
    assert pdl.launch_args(x) == {"PDL": 0}
    assert pdl.launch_args(x, trigger_first=True) == {"PDL": 0}
    assert pdl.launch_args(x, trigger_after_wait=True) == {"PDL": 0}
    assert pdl.trigger_first(pdl.TRIGGER_FIRST_MAX_ROWS)
    assert not pdl.trigger_first(pdl.TRIGGER_FIRST_MAX_ROWS + 1)


def test_more_trigger_first_is_a_switch_on_the_batch_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """`MORE_TRIGGER_FIRST` (RoPE with the KV write and the norm with the gate's logits) adds
    early triggers only where the batch rule has them, and none while off."""
    monkeypatch.setattr(pdl, "MORE_TRIGGER_FIRST", False)
    assert not pdl.more_trigger_first(1)
    monkeypatch.setattr(pdl, "MORE_TRIGGER_FIRST", True)
    assert pdl.more_trigger_first(pdl.TRIGGER_FIRST_MAX_ROWS)
    assert not pdl.more_trigger_first(pdl.TRIGGER_FIRST_MAX_ROWS + 1)


def test_trigger_first_schedules_the_successor_before_the_wait() -> None:
    """Mode 1 (wait) has no early trigger, 2 triggers after the wait, 3 (TRIGGER_FIRST)
    before it: the decode attention's split kernel as compiled for sm_90."""
    proc = subprocess.run(
        [sys.executable, "-c", ORDER],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    at = {
        int(m): (int(t), int(w)) for m, t, w in (ln.split() for ln in proc.stdout.split("\n") if ln)
    }
    assert at[1][0] == -1 and at[1][1] >= 0
    assert 0 <= at[2][1] < at[2][0]
    assert 0 <= at[3][0] < at[3][1]
