"""bench/skinny_gemm.py on the CPU under Triton's interpreter: per row count, a torch row and
a row per tile configuration, the rule's marked, all computing the product (float16: the
interpreter's dot does not compute bfloat16)."""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("triton")

from bench import skinny_gemm
from engine.kernels.skinny_gemm import TILE_CONFIGS, WIDE_TILES, SkinnyTiles

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the interpreter smoke run; on a GPU run the bench itself"
)


def table(capsys: pytest.CaptureFixture[str], *extra: str) -> list[list[str]]:
    skinny_gemm.main(["--device", "cpu", "--shapes", "tiny", "--rows", "1,3,16", "--copies",
                      "1", "--reps", "1", "--dtype", "float16", *extra])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    return [
        [c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| tiny")
    ]


def test_table_rows(capsys: pytest.CaptureFixture[str]) -> None:
    rows = table(capsys)
    fma = sum(not t.dot for t in TILE_CONFIGS)
    for m in ("1", "3", "16"):  # CUDA-core tiles only up to 4 rows
        mine = [r for r in rows if r[2] == m]
        assert mine[0][3].startswith("torch")
        assert len(mine) == 1 + len(TILE_CONFIGS) - (fma if m == "16" else 0)
        assert sum(r[3].rstrip("<").endswith("*") for r in mine) == 1
        assert sum(r[3].endswith("<") for r in mine) == 1
        assert all(float(r[8]) < 2e-3 for r in mine), mine  # rel err: float16 rounding
    assert rows[1][3] == "fma 8x512 w4 s3*"  # the rule at one row: CUDA cores


def test_tiles_flag_replaces_the_configurations(capsys: pytest.CaptureFixture[str]) -> None:
    rows = table(capsys, "--tiles", "dot:32:64:3:2:2")
    assert [r[3] for r in rows if r[2] == "3"][1:] == [
        "dot 32x64 split 3 w2 s2",
        "dot 16x256 w4 s3*",
    ]


def test_parse_tiles() -> None:
    assert skinny_gemm.parse_tiles("fma:8:128,dot:16:256:2") == [
        SkinnyTiles(8, 128, dot=False),
        SkinnyTiles(16, 256, split_k=2),
    ]
    assert skinny_gemm.parse_tiles("tma:64:64:1:4:4:128") == [
        SkinnyTiles(64, 64, num_stages=4, tma=True, block_m=128)
    ]
    assert skinny_gemm.parse_tiles("wide,dot:16:256") == [*WIDE_TILES, SkinnyTiles(16, 256)]
    for bad in ("mma:16:256", "dot:16", "dot:8:256", "fma:8:256:1:4:3:128"):
        with pytest.raises(argparse.ArgumentTypeError):
            skinny_gemm.parse_tiles(bad)


def test_deferred_rows(capsys: pytest.CaptureFixture[str]) -> None:
    """--defer adds a row without the reduce launch for each split tile, its error that of
    the partials' sum."""
    rows = table(capsys, "--tiles", "dot:16:64:3,dot:16:64", "--defer")
    for m in ("1", "3", "16"):
        labels = [r[3].rstrip("<") for r in rows if r[2] == m]
        deferred = [label for label in labels if label.endswith("defer")]
        assert len(deferred) == 1 and "split 3" in deferred[0], labels
    assert all(float(r[8]) < 2e-3 for r in rows), rows
