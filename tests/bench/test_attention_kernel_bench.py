"""bench/attention_kernel.py on the CPU under Triton's interpreter: the table has a row per
tile configuration with the default marked, and every configuration computes what the default
does (float32: the same softmax, only the split boundaries move)."""

from __future__ import annotations

import pytest
import torch

from bench import attention_kernel
from engine.kernels.attention import DecodeTiles, decode_attention, decode_splits


def test_table_rows(capsys: pytest.CaptureFixture[str]) -> None:
    attention_kernel.main(["--device", "cpu", "--shapes", "2x40", "--heads", "4/2/16",
                           "--block-n", "16,32", "--num-warps", "4", "--num-stages", "2",
                           "--layers", "1", "--reps", "1"])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x40")]
    assert len(rows) == 3  # the default (64 keys a tile) and the two asked for
    assert sum("*" in r for r in rows) == 1 and sum("<" in r for r in rows) == 1
    assert [r.split("|")[2].strip() for r in rows] == ["64", "16", "32"]


@pytest.mark.parametrize(
    "tiles", [DecodeTiles(16, 2, 1), DecodeTiles(32, 8, 3), DecodeTiles(32, 4, 3, 16, 32)]
)
def test_other_tiles_give_the_same_attention(tiles: DecodeTiles) -> None:
    """Every tile configuration computes the same attention, at the engine's split count and
    at one split; with short tiles (the last case) at one split the 20-token sequence takes
    the short loop and the 33- and 45-token ones the 32-key loop, in one launch."""
    case = attention_kernel.make_case(3, 45, (4, 2, 16), 16, 1, "cpu")
    case.seq_lens.copy_(torch.tensor([45, 20, 33]))
    q = case.q.float()
    k, v = (t.float() for t in case.caches[0])
    for one_split in (False, True):
        outs = []
        for t in (DecodeTiles(), tiles):
            splits = 1 if one_split else decode_splits(3, 2, 45, t.block_n)
            outs.append(decode_attention(q, k, v, case.table, case.rows, case.seq_lens, 16,
                                         0.25, splits, tiles=t))  # fmt: skip
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_forced_splits(capsys: pytest.CaptureFixture[str]) -> None:
    """`--splits`: a row per tile configuration and split count, the engine's count (0) marked
    `*` on the default tiles only; every split count computes the same attention."""
    attention_kernel.main(["--device", "cpu", "--shapes", "2x40", "--heads", "4/2/16",
                           "--block-n", "16", "--num-warps", "4", "--num-stages", "2",
                           "--layers", "1", "--reps", "1", "--splits", "0,3"])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x40")]
    assert len(rows) == 4  # default and 16-key tiles, each at the engine's count and at 3
    assert sum("*" in r for r in rows) == 1
    assert [r.split("|")[6].strip() for r in rows][1::2] == ["3", "3"]
    assert all(float(r.split("|")[-2]) < 0.05 for r in rows)  # bfloat16 against the default


def test_one_split_tiles_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`PDSERVE_DECODE_TILES` gives the one-split launch's tiles; a bad value names the form."""
    from engine.config import decode_tiles_from_env
    from engine.kernels import attention

    monkeypatch.delenv("PDSERVE_DECODE_TILES", raising=False)
    assert decode_tiles_from_env() is None
    monkeypatch.setenv("PDSERVE_DECODE_TILES", "32,4,3")
    assert decode_tiles_from_env() == (32, 4, 3)
    attention.one_split_tiles.cache_clear()
    try:
        assert attention.default_tiles(1) == DecodeTiles(32, 4, 3)
        assert attention.default_tiles(4) == DecodeTiles(num_stages=2)
    finally:
        monkeypatch.delenv("PDSERVE_DECODE_TILES")
        attention.one_split_tiles.cache_clear()
    assert attention.default_tiles(1) == attention.ONE_SPLIT_TILES == DecodeTiles(64, 4, 3, 32, 256)
    monkeypatch.setenv("PDSERVE_DECODE_TILES", "64,4,3,32,256")
    assert decode_tiles_from_env() == (64, 4, 3, 32, 256)
    for bad in ("32,4", "48,4,3", "a,b,c", "64,4,3,32", "64,4,3,64,256", "64,4,3,24,256"):
        monkeypatch.setenv("PDSERVE_DECODE_TILES", bad)
        with pytest.raises(ValueError, match="PDSERVE_DECODE_TILES"):
            decode_tiles_from_env()


def test_short_tiles_rows(capsys: pytest.CaptureFixture[str]) -> None:
    """`--short`: a row per second-loop setting, named in its column; none at or above the
    tile's own keys."""
    attention_kernel.main(["--device", "cpu", "--shapes", "2x40", "--heads", "4/2/16",
                           "--block-n", "16,32", "--num-warps", "4", "--num-stages", "2",
                           "--layers", "1", "--reps", "1", "--short", "0,16:32"])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x40")]
    cells = [(r.split("|")[2].strip(), r.split("|")[5].strip()) for r in rows]
    assert cells == [
        ("64", "32:256"),
        ("16", "-"),
        ("32", "-"),
        ("32", "16:32"),
    ]  # the engine's first
    assert all(float(r.split("|")[-2]) < 0.05 for r in rows)  # bfloat16 against the default


def test_graph_context_sets_the_split_count(capsys: pytest.CaptureFixture[str]) -> None:
    """`--graph-context`: the split count a graph captured for that context launches (more
    splits than the shape's own 40 tokens take), the same attention."""
    attention_kernel.main(["--device", "cpu", "--shapes", "2x40", "--heads", "4/2/16",
                           "--block-n", "16", "--num-warps", "4", "--num-stages", "2",
                           "--layers", "1", "--reps", "1", "--graph-context", "512"])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x40")]
    want = decode_splits(2, 2, 512, 64), decode_splits(2, 2, 512, 16)
    assert tuple(int(r.split("|")[6]) for r in rows) == want and want[0] > decode_splits(
        2, 2, 40, 64
    )
    assert all(float(r.split("|")[-2]) < 0.05 for r in rows)


def test_engine_one_split_tiles_take_both_loops() -> None:
    """The engine's one-split launch (`ONE_SPLIT_TILES`) over sequences of 100 (the 32-key
    loop), 256 (its last) and 300 tokens (the 64-key loop) in one launch: the attention of
    64-key tiles alone, float32."""
    from engine.kernels.attention import ONE_SPLIT_TILES

    case = attention_kernel.make_case(3, 300, (4, 2, 16), 16, 1, "cpu")
    case.seq_lens.copy_(torch.tensor([100, 256, 300]))
    q = case.q.float()
    k, v = (t.float() for t in case.caches[0])
    outs = [
        decode_attention(q, k, v, case.table, case.rows, case.seq_lens, 16, 0.25, 1, tiles=t)
        for t in (DecodeTiles(num_stages=3), ONE_SPLIT_TILES)
    ]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_min_split_tiles(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--min-split-tiles`: splits of at least that many tiles (fewer of them hold keys), named
    in the splits cell, the same attention; `PDSERVE_DECODE_SPLITS` sets the engine's rule and
    a bad value names the form."""
    from engine.config import decode_splits_from_env
    from engine.kernels import attention

    attention_kernel.main(["--device", "cpu", "--shapes", "2x100", "--heads", "4/2/16",
                           "--block-n", "16", "--num-warps", "4", "--num-stages", "2",
                           "--layers", "1", "--reps", "1", "--splits", "4",
                           "--min-split-tiles", "1,3"])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x100")]
    assert [r.split("|")[6].strip() for r in rows[1:]] == ["4", "4 (>= 3 tiles)"]
    assert all(float(r.split("|")[-2]) < 0.05 for r in rows)
    monkeypatch.setenv("PDSERVE_DECODE_SPLITS", "16,2")
    attention.split_rule.cache_clear()
    try:
        assert attention.split_rule() == (16, 2)
        assert attention.default_tiles(4).min_split_tiles == 2
        assert attention.decode_splits(1, 8, 8192, 64, max_splits=16) == 16
    finally:
        monkeypatch.delenv("PDSERVE_DECODE_SPLITS")
        attention.split_rule.cache_clear()
    assert attention.split_rule() == (64, 1)
    with pytest.raises(ValueError, match="min_split_tiles"):
        DecodeTiles(min_split_tiles=0)
    for bad in ("0", "16,0", "a", "1,2,3"):
        monkeypatch.setenv("PDSERVE_DECODE_SPLITS", bad)
        with pytest.raises(ValueError, match="PDSERVE_DECODE_SPLITS"):
            decode_splits_from_env()
