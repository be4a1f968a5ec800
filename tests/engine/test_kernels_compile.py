"""The Triton kernels compile for the GPU (sm_90) without register spills, on this CPU host.

The interpreter tests check what the kernels compute, not that Triton's compiler accepts them:
this runs `bench/compile_kernels.py` (Triton ships `ptxas`) in a process without the
interpreter, at the shapes and block sizes the engine uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90_without_spills() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_kernels", "--fail-on-spill"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failure(s)" in proc.stdout
    assert proc.stdout.count("\nok ") >= 25, proc.stdout


_PREFETCH_PTX = r"""
from bench.compile_kernels import decode_attention_ptx
print(decode_attention_ptx(False).count("prefetch.global.L2"),
      decode_attention_ptx(True).count("prefetch.global.L2"))
"""


def test_decode_attention_prefetch_compiles_to_l2_prefetches() -> None:
    """`--l2-prefetch`: the decode split kernel compiled for sm_90 with PREFETCH holds the PTX
    prefetch (ptxas accepts it), and without it none (the asm is not dropped as unused)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _PREFETCH_PTX], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    without, with_prefetch = (int(v) for v in proc.stdout.split())
    assert without == 0 and with_prefetch >= 1, proc.stdout
