"""The split-row Triton argmax against torch.argmax, ties, NaNs and -inf included.

On this CPU host the kernels run under Triton's interpreter (tests/conftest.py), with small
tiles and chunks so that a row of a few dozen elements crosses the boundaries a 128k
vocabulary crosses on the GPU; on a GPU they run compiled.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.argmax import argmax, chunk_size
from engine.sampler import sample_on_device
from engine.sampling import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF, NAN = float("inf"), float("nan")
KINDS = ("random", "ties", "nans", "all -inf", "max last", "one finite", "signed zeros")


def boundaries(n: int, block: int, chunk: int) -> list[int]:
    """Positions next to the tile and chunk boundaries, and the row's end, inside the row."""
    near = {0, 1, block - 1, block, chunk - 1, chunk, chunk + 1, 2 * chunk - 1, 2 * chunk}
    return sorted(p for p in near | {n - 2, n - 1} if 0 <= p < n)


def make_row(kind: str, n: int, block: int, chunk: int, gen: torch.Generator) -> torch.Tensor:
    row = torch.randn(n, generator=gen)
    spots = torch.tensor(boundaries(n, block, chunk))
    some = spots[torch.randperm(len(spots), generator=gen)[: max(1, len(spots) // 2)]]
    if kind == "ties":  # the maximum at several boundary positions: the first must win
        row[some] = 10.0
    elif kind == "nans":  # NaN beats everything, +inf included: the first NaN must win
        row[int(torch.randint(n, (), generator=gen))] = INF
        row[some] = NAN
    elif kind == "all -inf":
        row.fill_(-INF)
    elif kind == "max last":
        row[-1] = 10.0
    elif kind == "one finite":  # -inf everywhere but one position
        row.fill_(-INF)
        row[some[0]] = -5.0
    elif kind == "signed zeros":  # -0.0 == 0.0: index 0
        row.zero_()
        row[: n // 2] = -0.0
    return row


@pytest.mark.parametrize(
    ("n", "block", "chunk"),
    # Rows of one element, of less than a tile, around one chunk (two tiles), and a
    # vocabulary-like row of 13 chunks of 4 tiles.
    [(1, 8, 16), (7, 8, 16), (15, 8, 16), (16, 8, 16), (17, 8, 16), (50_021, 1024, 4096)],
)
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_argmax_matches_torch(rows: int, n: int, block: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(rows * n)
    for shift in range(0, len(KINDS), rows):  # every kind in some row
        kinds = [KINDS[(shift + r) % len(KINDS)] for r in range(rows)]
        x = torch.stack([make_row(k, n, block, chunk, gen) for k in kinds])
        got = argmax(x.to(DEVICE), block=block, chunk=chunk)
        assert got.dtype == torch.int64 and got.device.type == DEVICE
        want = x.argmax(dim=-1)
        assert got.cpu().tolist() == want.tolist(), kinds


def test_rules_on_hand_made_rows() -> None:
    """The contract spelled out, not only inherited from torch: first maximum, first NaN,
    0 for -inf everywhere; across chunks of two tiles."""
    x = torch.full((4, 40), -1.0)
    x[0, [5, 16, 33]] = 2.0  # a tie across three chunks
    x[1, [30, 3]] = NAN
    x[1, 0] = INF
    x[2] = -INF
    x[3, 39] = 0.5
    assert argmax(x.to(DEVICE), block=8, chunk=16).cpu().tolist() == [5, 3, 0, 39]


def test_default_cut_strided_rows_and_bfloat16() -> None:
    """The engine's call: default tile and chunk; a row-strided view; other float dtypes."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 3000, generator=gen)
    wide[1, 2048:2100] = 7.0
    view = wide.to(DEVICE)[:, :2500]
    assert argmax(view).cpu().tolist() == wide[:, :2500].argmax(-1).tolist()
    half = wide.to(torch.bfloat16)  # bfloat16 rounding makes ties: the first still wins
    assert argmax(half.to(DEVICE)).cpu().tolist() == half.argmax(-1).tolist()


def test_chunk_size_fills_the_gpu_at_batch_one() -> None:
    """A 128k vocabulary is 126 one-tile programs at batch 1 (the H200 has 132 SMs); large
    batches take longer chunks, at most 8 tiles."""
    assert chunk_size(1, 128_256) == 1024
    assert chunk_size(8, 128_256) == 1024
    assert chunk_size(64, 128_256) == 7 * 1024
    assert chunk_size(256, 128_256) == 8 * 1024


def test_empty_batch_and_bad_shapes() -> None:
    assert argmax(torch.empty(0, 10, device=DEVICE)).shape == (0,)
    with pytest.raises(ValueError, match="elements"):
        argmax(torch.empty(2, 0, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        argmax(torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        argmax(torch.zeros(1, 5, device=DEVICE), block=8, chunk=12)
    with pytest.raises(ValueError, match="power of two"):
        argmax(torch.zeros(1, 5, device=DEVICE), block=12, chunk=24)


def test_greedy_sampling_takes_the_first_maximum() -> None:
    """`sample_on_device` picks greedy tokens with this kernel on CUDA (torch's on the CPU):
    tied logits give the lower token id either way."""
    logits = torch.zeros(3, 3000)
    logits[0, [2999, 1500]] = 4.0
    logits[1, [1024, 2048]] = 4.0
    logits[2, 7] = NAN
    greedy = SamplingParams(temperature=0)
    sample = sample_on_device(logits.to(DEVICE), [greedy] * 3, [None] * 3)
    assert sample.result().token_ids == [1500, 1024, 7]
