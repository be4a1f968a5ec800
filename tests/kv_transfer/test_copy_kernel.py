"""The `cuda_ipc` copy kernel (`kv_transfer/copy_kernel.py`) byte for byte: random byte ranges
between two buffers, at every word width, misaligned, empty, long (several blocks, several
programs, programs looping over blocks) and many; every byte outside the ranges untouched.
Here on host memory under Triton's interpreter (tests/conftest.py sets `TRITON_INTERPRET=1`
without CUDA; the interpreter casts the int64 addresses to pointers as the compiled kernel
does); tests/gpu/test_cuda_ipc.py runs `check_writes` compiled on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kv_transfer import copy_kernel
from kv_transfer.copy_kernel import WriteCopier, launch_shape, word_bytes

BUFFER = 256 << 10


def check_writes(device: str, lengths: list[int], word: int, seed: int = 0) -> int:
    """Copy ranges of `lengths` bytes from random places of one buffer to places of another
    (in order, apart by random gaps; every address and length a multiple of `word`, which
    must be the widest word dividing them all) with one launch, and compare the whole
    destination buffer with a copy made in numpy. Returns the writes' word width."""
    rng = np.random.default_rng(seed)
    src = torch.from_numpy(rng.integers(0, 256, BUFFER, dtype=np.uint8)).to(device)
    dst = torch.zeros(BUFFER, dtype=torch.uint8, device=device)
    src_off, dst_off, at = [], [], 0
    for n in lengths:
        at += word * int(rng.integers(0, 40))
        dst_off.append(at)
        at += n
        src_off.append(word * int(rng.integers(0, (BUFFER - n) // word)))
    if at > BUFFER:
        raise ValueError(f"{at} bytes of writes do not fit the {BUFFER}-byte buffer")
    # Both buffers start 16-byte aligned (torch allocates at 64 bytes or more).
    s = np.array(src_off, dtype=np.int64) + src.data_ptr()
    d = np.array(dst_off, dtype=np.int64) + dst.data_ptr()
    length = np.array(lengths, dtype=np.int64)
    WriteCopier(torch.device(device)).copy(s, d, length)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    want = np.zeros(BUFFER, dtype=np.uint8)
    host_src = src.cpu().numpy()
    for so, do, count in zip(src_off, dst_off, lengths, strict=True):
        want[do : do + count] = host_src[so : so + count]
    got = dst.cpu().numpy()
    wrong = np.flatnonzero(got != want)
    assert not len(wrong), f"{len(wrong)} bytes differ, the first at {int(wrong[0])}"
    return word_bytes(s, d, length)


# Lengths the brief of the kernel names: 1, 15, 16, 2 KB, 32 KB + 3 (three blocks, a masked
# tail), empty writes, and odd ones.
ODD = [1, 15, 16, 2048, 32768 + 3, 0, 7, 0, 4095, 16384]


def test_odd_lengths_at_misaligned_places() -> None:
    assert check_writes("cpu", ODD, word=1) == 1


@pytest.mark.parametrize("word", [16, 8, 4, 2])
def test_each_word_width(word: int) -> None:
    # Lengths of `word` bytes and up, one of them an odd multiple (so no wider word fits).
    lengths = [word * k for k in (1, 3, 2048 // word, (32768 + 48) // word, 0, 5)]
    assert check_writes("cpu", lengths, word) == word


def test_programs_loop_over_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two programs per write (a launch aiming at 4): each copies every other 16 KB block of
    its write, the last also the tail."""
    monkeypatch.setattr(copy_kernel, "TARGET_PROGRAMS", 4)
    lengths = [5 * copy_kernel.BLOCK_BYTES + 48, 2 * copy_kernel.BLOCK_BYTES]
    assert launch_shape(np.array(lengths), 8) == (copy_kernel.BLOCK_BYTES // 8, 2)
    assert check_writes("cpu", lengths, word=16, seed=1) == 16


def test_many_short_writes() -> None:
    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 300, 400).tolist()
    assert check_writes("cpu", lengths, word=1, seed=3) == 1


def test_no_writes_launch_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copy_kernel, "copy_writes_kernel", None)  # a launch would raise
    buf = torch.arange(64, dtype=torch.uint8)
    addr = np.array([buf.data_ptr()], dtype=np.int64)
    WriteCopier(torch.device("cpu")).copy(addr + 8, addr, np.zeros(1, dtype=np.int64))
    empty = np.zeros(0, dtype=np.int64)
    WriteCopier(torch.device("cpu")).copy(empty, empty, empty)
    assert buf.tolist() == list(range(64))


def test_launch_shape_for_the_h200_cases() -> None:
    """Llama-3-8B, 2,048-token prompt: contiguous 16-token pages are 64 writes of 4 MB; every
    other 1-token page 131,072 writes of 2 KB; 16-token pages 8,192 of 32 KB."""
    block = copy_kernel.BLOCK_BYTES // 8
    assert launch_shape(np.full(64, 4 << 20), 8) == (block, 128)  # 8,192 programs, 2 blocks
    assert launch_shape(np.full(131_072, 2048), 8) == (block, 1)
    assert launch_shape(np.full(8192, 32 << 10), 8) == (block, 1)  # 2 blocks each
    assert launch_shape(np.array([1]), 1) == (copy_kernel.MAX_BLOCK, 1)


# Compiles the kernel for sm_90 and prints the global loads and stores of its PTX, per word.
_PTX_OPS = r"""
import re
from bench.compile_kernels import copy_kernel_ptx
for word in (16, 1):
    ptx = copy_kernel_ptx(word)
    ops = sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)))
    print(word, " ".join(ops))
"""


def test_aligned_writes_move_16_bytes_per_access_compiled() -> None:
    """The kernel compiled for the H200 (sm_90; Triton ships ptxas, no GPU needed), in a
    process without the interpreter: with 16-byte words every access of the copy is a
    16-byte vector (the int64 table reads aside); with 1-byte words, bytes."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _PTX_OPS], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = {int(w): set(rest.split()) for w, _, rest in
           (line.partition(" ") for line in proc.stdout.splitlines())}  # fmt: skip
    assert ops[16] == {"ld.global.b64", "ld.global.v2.b64", "st.global.v2.b64"}, ops
    assert {"ld.global.b8", "st.global.b8"} <= ops[1], ops
