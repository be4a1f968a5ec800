"""The Triton kernels compile for the GPU (sm_90) without register spills, and for the A100
(sm_80, without PDL, spills allowed: untuned there), the L40S and the RTX Blackwell cards
(sm_89, sm_120: in the tiles that fit their shared memory), on this CPU host.

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


def uninterpreted(*argv: str) -> subprocess.CompletedProcess[str]:
    """`python ARGV` in a process without the interpreter."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def compile_kernels(*args: str) -> subprocess.CompletedProcess[str]:
    """`bench.compile_kernels ARGS` in a process without the interpreter."""
    return uninterpreted("-m", "bench.compile_kernels", *args)


def test_kernels_compile_for_sm90_without_spills() -> None:
    proc = compile_kernels("--fail-on-spill")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failure(s)" in proc.stdout
    assert proc.stdout.count("\nok ") >= 25, proc.stdout


def test_kernels_compile_for_sm80() -> None:
    """The A100 runs the same kernels without PDL (`pdl._mode` is 0 before sm_90): each
    compiles and fits its shared memory (164 KB a block)."""
    proc = compile_kernels("--arch", "80")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failure(s)" in proc.stdout
    assert "griddepcontrol" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("arch", ["89", "120"])
def test_kernels_compile_for_99_kb_of_shared_memory(arch: str) -> None:
    """The L40S, L4 and A10 (sm_86/89) and the RTX Blackwell cards (sm_120) give a program 99
    KB of shared memory: the tile rules that read the device's (float32's MoE stages and
    extend tiles, the MLA decode's keys and head blocks) choose tiles that fit, and every
    launch compiles."""
    proc = compile_kernels("--arch", arch)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failure(s)" in proc.stdout
    assert "extend_kernel fp32 head dim 128 32x64" in proc.stdout
    assert "mla_decode_split_kernel fp32 block_h=16 block_n=16" in proc.stdout
    assert "block_h=64" not in proc.stdout


ALIGNED = """
from bench.compile_kernels import compile_kernel, decode_attention_launch, resource_usage
(kernel, pointers, constants), options = decode_attention_launch()
compiled = compile_kernel(90, kernel, pointers, constants, **options)
ptx = compiled.asm["ptx"]
usage = resource_usage("decode", compiled)
print(usage.registers, ptx.count("cp.async"), ptx.count("ld.global.b16"))
"""


def test_compile_specializes_as_a_launch() -> None:
    """The report compiles each launch as Triton's launch specializes it (16-byte aligned
    tensors, strides divisible by 16): the decode split kernel's K and V tiles are copied
    asynchronously in 16-byte pieces, not loaded 2 bytes an element at 255 registers as an
    unaligned compile makes them (which the report showed until the thirty-second session)."""
    proc = uninterpreted("-c", ALIGNED)
    assert proc.returncode == 0, proc.stderr[-4000:]
    registers, async_copies, scalar_loads = (int(x) for x in proc.stdout.split()[-3:])
    assert registers < 160 and async_copies > 0 and scalar_loads == 0, proc.stdout
