"""The Triton sampling kernel against `_filter` (the torch path): the kept set, the draw's
distribution, seeded rows, and the edges.

On this CPU host the kernel runs under Triton's interpreter (tests/conftest.py), with small
tiles and candidate rows so that a few hundred tokens take every path a 128k vocabulary takes
on the GPU: bisection over the whole row, the candidates copied and searched in registers, and
the draw from the candidates or from the row's tiles; and the split path (a row over several
programs, `engine.kernels.sampling_split`), against the same references and the one-program
path's tokens. The interpreter runs a program at a time, so the split path's tests keep to a
few dozen rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.sampling import Stats, sample, sample_with_stats
from engine.kernels.sampling_split import passes_for, split_for
from engine.sampler import _filter, _sample_triton
from engine.sampling import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (block, candidates): "tiles" bisects the whole row until (lo, hi] holds 16 tokens and draws
# from the row's tiles unless every kept token is a candidate; "registers" copies every token
# into the candidates at once (the vocabularies here are below 512) and draws from them.
PATHS = {"tiles": (64, 16), "registers": (128, 512)}
# The split path at the "tiles" sizes (5 tiles a 300-token row): (programs a row, probes a
# pass). "split 2" spreads the tiles unevenly (3 and 2); "split 64" asks for more programs
# than tiles (one a tile); with 4 probes a pass, the bracket takes more passes (15 launched).
SPLITS = {"split 2": (2, 32), "split 64": (64, 32), "split 3, 4 probes": (3, 4)}
GRID = [
    SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp)
    for t in (0.3, 1.0, 2.0)
    for k in (1, 5, 0)
    for p in (0.1, 0.5, 0.9, 1.0)
    for mp in (0.0, 0.05)
]


def settings_of(params: Sequence[SamplingParams]) -> torch.Tensor:
    return torch.tensor(
        [
            [p.temperature for p in params],
            [float(max(p.top_k, 0)) for p in params],
            [p.top_p for p in params],
            [p.min_p for p in params],
        ],
        device=DEVICE,
    )


def draw(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    uniforms: torch.Tensor,
    path: str = "tiles",
) -> tuple[torch.Tensor, Stats]:
    """Every row's token, and the kernel's stats, by a path of PATHS (one program a row) or
    SPLITS (at the "tiles" sizes)."""
    split, probes = SPLITS.get(path, (1, None))
    block, candidates = PATHS.get(path, PATHS["tiles"])
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=DEVICE)
    rows = torch.arange(logits.shape[0], device=DEVICE)
    stats = sample_with_stats(
        logits, rows, settings_of(params), uniforms, out, block=block, candidates=candidates,
        split=split, probes=probes,
    )  # fmt: skip
    return out, stats


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Distinct logits (no ties) whose spread / 0.3 stays far from float32 underflow."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=gen) * 2.5).to(DEVICE)


def assert_kept_is_the_filters(
    logits: torch.Tensor, params: Sequence[SamplingParams], tokens: torch.Tensor, stats: Stats
) -> None:
    """The kept set {logits > threshold} is `_filter`'s, and every token drawn from it."""
    probs = _filter(logits, params)
    kept = logits > stats.threshold[:, None]
    # They differ only where float32 rounding decides: a token whose mass before it is within
    # 1e-6 of top-p (here, _filter dropping a 1.5e-8 last token at top-p 1, "off", when its
    # cumsum reaches 1.0).
    for j, i in (kept != (probs > 0)).nonzero().tolist():
        exact = torch.softmax(logits[j].double() / params[j].temperature, 0)
        before = exact[exact > exact[i]].sum()
        assert abs(before - params[j].top_p) < 1e-6, (params[j], i, before)
    assert int((kept != (probs > 0)).sum()) <= 1
    assert probs.gather(1, tokens[:, None]).min() > 0  # every draw from the kept set


@pytest.mark.parametrize("path", PATHS)
def test_kept_set_is_the_filters(path: str) -> None:
    logits = random_logits(len(GRID), 300, seed=0)
    uniforms = torch.rand(len(GRID), 2, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    tokens, stats = draw(logits, GRID, uniforms, path)
    assert_kept_is_the_filters(logits, GRID, tokens, stats)
    if path == "tiles":  # whole-row bisection, then candidates, on the filtered rows
        assert stats.passes.max() >= 5 and stats.probes.max() > 0
    else:  # pass 1, the copy, no pass to draw; unfiltered rows: pass 1 and the draw's pass
        assert stats.passes.tolist() == [2.0] * len(GRID)


@pytest.mark.parametrize("path", SPLITS)
def test_split_kept_set_is_the_filters_and_the_one_programs(path: str) -> None:
    # A quarter of the grid (an eighth with more programs or passes; every temperature, top-k,
    # top-p and min-p still met), the rows and uniforms of the one-program test above: the same
    # kept sets and tokens as the one-program path.
    chosen = list(range(0, len(GRID), 4)) if path == "split 2" else list(range(1, len(GRID), 9))
    grid = [GRID[i] for i in chosen]
    logits = random_logits(len(GRID), 300, seed=0)[chosen]
    uniforms = torch.rand(len(GRID), 2, generator=torch.Generator().manual_seed(1))[chosen]
    tokens, stats = draw(logits, grid, uniforms.to(DEVICE), path)
    assert_kept_is_the_filters(logits, grid, tokens, stats)
    one_tokens, one_stats = draw(logits, grid, uniforms.to(DEVICE), "tiles")
    assert torch.equal(logits > stats.threshold[:, None], logits > one_stats.threshold[:, None])
    assert torch.equal(tokens, one_tokens)
    # The stats, the probing passes and the compaction (when there are candidates); never more
    # than the launches (the bound on the passes is what fixes their number).
    bound = 1 + passes_for(SPLITS[path][1]) + 1
    assert stats.passes.min() >= 2 and stats.passes.max() <= bound
    if path == "split 3, 4 probes":  # two or more probing passes: their partials combined
        assert stats.passes.max() >= 4 and stats.probes.max() > 0


def test_draws_by_candidates_follow_the_kept_distribution() -> None:
    # u_token evenly spread over [0, 1) (40 tokens: one tile, which u_tile picks whatever it
    # is): the draw's inverse CDF gives each kept token its probability's share of the points,
    # within one point.
    n = 120
    logits = random_logits(1, 40, seed=2).expand(n, 40)
    params = [SamplingParams(temperature=0.8, top_p=0.8)] * n
    u = torch.stack([torch.full((n,), 0.7), (torch.arange(n) + 0.5) / n], 1).to(DEVICE)
    tokens, _ = draw(logits, params, u, "registers")
    want = _filter(logits[:1], params[:1])[0] * n
    got = torch.bincount(tokens, minlength=40).to(want.dtype)
    assert (got[want == 0] == 0).all()
    assert (got - want).abs().max() <= 1.01, (got, want)


def test_draws_by_tiles_follow_the_kept_distribution() -> None:
    # A grid of (u_tile, u_token): the tile's share of u_tile times the token's share of
    # u_token within it, each within one point. 40 tokens in tiles of 16: 16, 16 and 8.
    n_tile, n_token, block = 16, 8, 16
    logits = random_logits(1, 40, seed=3)
    params = [SamplingParams(temperature=1.5)]
    probs = _filter(logits, params)[0].double()
    tiles = probs.split(block)
    u_tile = (torch.arange(n_tile) + 0.5) / n_tile
    u_token = (torch.arange(n_token) + 0.5) / n_token
    u = torch.cartesian_prod(u_tile, u_token).to(DEVICE)
    n = len(u)
    out = torch.full((n,), -1, dtype=torch.int64, device=DEVICE)
    stats = sample_with_stats(
        logits.expand(n, 40), torch.arange(n, device=DEVICE), settings_of(params * n), u, out,
        block=block, candidates=16,
    )  # fmt: skip
    assert stats.passes.tolist() == [2.0] * n  # pass 1 and the draw's
    got = torch.bincount(out, minlength=40).double()
    for t, tile in enumerate(tiles):
        share = tile.sum()
        for i, p in enumerate(tile / share):
            low = max(0.0, n_tile * share - 1) * max(0.0, n_token * p - 1)
            high = (n_tile * share + 1) * (n_token * p + 1)
            assert low - 1e-9 <= got[t * block + i] <= high + 1e-9, (t, i, got, probs)


def test_every_path_draws_the_same_token() -> None:
    # A grid of (u_tile, u_token) on three rows of five 64-token tiles: a top-p row whose kept
    # set spans the tiles, a top-k row, an unfiltered one. One program a row drawing from the
    # tiles (candidates 16) or from the candidates (all 300 of them), and the split path, draw
    # by the same tile-then-token inverse CDF: the same token for the same uniforms (up to
    # float32 rounding, which no point here is near).
    base = random_logits(3, 300, seed=8)
    settings = [
        SamplingParams(temperature=1.5, top_p=0.9),
        SamplingParams(temperature=0.7, top_k=20),
        SamplingParams(temperature=1.0),
    ]
    u = torch.cartesian_prod(torch.tensor([0.15, 0.8]), torch.tensor([0.3, 0.9]))
    logits = base.repeat_interleave(len(u), 0)
    params = [p for p in settings for _ in u]
    uniforms = u.repeat(3, 1).to(DEVICE)
    rows = torch.arange(len(params), device=DEVICE)
    tokens = {}
    for name, (candidates, split) in {
        "tiles": (16, 1), "registers": (512, 1), "split 2": (16, 2)
    }.items():  # fmt: skip
        out = torch.full((len(params),), -1, dtype=torch.int64, device=DEVICE)
        sample(logits, rows, settings_of(params), uniforms, out, block=64, candidates=candidates,
               split=split)  # fmt: skip
        tokens[name] = out
    assert all(torch.equal(t, tokens["tiles"]) for t in tokens.values()), tokens
    # The tokens spread over the row's tiles, not one tile's.
    assert len(set((tokens["tiles"] // 64).tolist())) >= 3


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # x - max, to -inf
def test_split_takes_the_widest_bracket_to_one_float() -> None:
    # Logits from -3e38 to 3e38 and from 1e-38 up, and 40 tokens tied at the top-k cut-off (more
    # than the 16 candidates): the bracket narrows to the one float below the tie, in at most
    # passes_for(probes) probing passes, and the tie is kept whole.
    vocab = 300
    row = torch.linspace(-1.0, 1.0, vocab) * 3e38
    row[::7] = torch.logspace(-38, 38, len(row[::7]))
    row[100:140] = 2.5
    above = int((row > 2.5).sum())
    params = [SamplingParams(temperature=1.0, top_k=above + 10)] * 2
    logits = torch.stack([row, row.flip(0)]).to(DEVICE)
    u = torch.tensor([[0.2, 0.7], [0.9, 0.1]], device=DEVICE)
    tokens, stats = draw(logits, params, u, "split 3, 4 probes")
    kept = logits > stats.threshold[:, None]
    assert kept.sum(1).tolist() == [above + 40] * 2
    assert torch.equal(kept, logits >= 2.5)
    assert (logits.gather(1, tokens[:, None]) >= 2.5).all()
    assert stats.passes.max() <= 1 + passes_for(4) + 1


def test_split_for_fills_the_gpu_on_small_batches_only() -> None:
    tiles = 32  # a 128,256-token row in 4,096-token tiles
    assert split_for(1, 128256, 132, block=4096) == tiles  # at most one program a tile
    assert split_for(8, 128256, 132, block=4096) == tiles  # 33 for two an SM: one a tile
    assert split_for(16, 128256, 132, block=4096) == 16  # two programs an SM
    assert split_for(17, 128256, 132, block=4096) == 1  # one program a row: enough of them
    assert split_for(1, 4096, 132, block=4096) == 1  # one tile: nothing to split
    assert split_for(1, 128256, 0, block=4096) == 1  # not a GPU
    assert passes_for(32) == 7


def test_random_draws_pass_a_chi_square() -> None:
    # Through the sampler's kernel path with uniforms from a seeded generator: 200 draws of
    # top-k 4 (3 degrees of freedom: 16.3 is the 0.1% tail).
    n = 200
    logits = random_logits(1, 60, seed=4).expand(n, 60).contiguous()
    params = [SamplingParams(temperature=1.0, top_k=4)] * n
    tokens = torch.full((n,), -1, dtype=torch.int64, device=DEVICE)
    kernel = functools.partial(sample, block=64, candidates=64)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    _sample_triton(kernel, logits, tokens, list(range(n)), params, [None] * n, gen)
    want = _filter(logits[:1], params[:1])[0] * n
    got = torch.bincount(tokens, minlength=60).to(want.dtype)
    kept = want > 0
    assert int(kept.sum()) == 4 and (got[~kept] == 0).all()
    chi2 = ((got[kept] - want[kept]) ** 2 / want[kept]).sum()
    assert chi2 < 16.3, (got[kept], want[kept])


def test_seeded_rows_repeat_and_ignore_the_batch() -> None:
    # One program a row; the split path draws the same tokens from the same uniforms
    # (test_every_path_draws_the_same_token, and the split kept-set test's tokens).
    logits = random_logits(4, 200, seed=6)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in (None, 3, 9, None)]
    kernel = functools.partial(sample, block=64, candidates=16)

    def steps(rows: list[int], seeds: list[int | None]) -> list[list[int]]:
        """Three steps' tokens for `rows`, each with a generator of its seed (or the shared)."""
        gens = [None if s is None else torch.Generator(device=DEVICE).manual_seed(s) for s in seeds]
        shared = torch.Generator(device=DEVICE).manual_seed(len(rows))
        out = []
        for _ in range(3):
            tokens = torch.full((len(rows),), -1, dtype=torch.int64, device=DEVICE)
            chosen = [params[r] for r in rows]
            _sample_triton(
                kernel, logits[rows], tokens, list(range(len(rows))), chosen, gens, shared
            )
            out.append(tokens.tolist())
        return out

    batch = steps([0, 1, 2, 3], [None, 3, 9, None])
    alone = steps([2], [9])
    assert [s[2] for s in batch] == [s[0] for s in alone]
    assert [s[1] for s in batch] == [s[1] for s in steps([3, 1], [None, 3])]
    assert steps([0, 1, 2, 3], [None, 3, 9, None]) == batch  # the shared one is seeded too


@pytest.mark.parametrize("path", [*PATHS, "split 2"])
def test_edges(path: str) -> None:
    vocab = 300  # not a multiple of the block: the last tile is partial
    logits = random_logits(6, vocab, seed=7)
    logits[1, -1] = 20.0  # the maximum in the partial tile
    logits[2, ::2] = float("-inf")  # masked by a grammar
    logits[3, ::3] = float("nan")  # counted as -inf
    logits[4] = float("-inf")  # nothing allowed: token 0, as argmax gives
    logits[5, :5] = torch.tensor([7.0, 5.0, 5.0, 5.0, 3.0])  # a tie at the top-k boundary
    logits[5, 5:] = -10.0 - torch.arange(vocab - 5.0)
    top1 = SamplingParams(temperature=0.7, top_k=1)
    params = [
        SamplingParams(temperature=1.3, top_p=1e-6),
        top1,
        SamplingParams(temperature=2.0, top_k=500),
        SamplingParams(temperature=2.0),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.0, top_k=2),
    ]
    for u in (0.0, 0.5, 1 - 2**-24):  # the ends of [0, 1)
        uniforms = torch.full((6, 2), u, device=DEVICE)
        tokens, stats = draw(logits, params, uniforms, path)
        assert tokens[0] == logits[0].argmax() and tokens[1] == vocab - 1
        assert torch.isfinite(logits[2, tokens[2]]) and torch.isfinite(logits[3, tokens[3]])
        assert tokens[4] == 0
        assert 0 <= tokens[5] <= 3
    kept = logits > stats.threshold[:, None]
    assert kept.sum(1).tolist()[:2] == [1, 1]
    # The tied 5.0s are kept together: one token above them, fewer than top-k 2.
    assert kept[5].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert torch.equal(kept[2], torch.isfinite(logits[2]))  # top-k 500 > the 150 allowed
    assert torch.equal(kept[3], ~logits[3].isnan())


def test_bad_arguments_are_named() -> None:
    logits = torch.zeros(2, 10, device=DEVICE)
    rows = torch.arange(2, device=DEVICE)
    out = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    u = torch.zeros(2, 2, device=DEVICE)
    settings = settings_of([SamplingParams()] * 2)
    with pytest.raises(ValueError, match="settings"):
        sample(logits, rows, settings[:, :1], u, out)
    with pytest.raises(ValueError, match="candidates"):
        sample(logits, rows, settings, u, out, candidates=48)
    with pytest.raises(ValueError, match="logits"):
        sample(logits[0], rows, settings, u, out)
    with pytest.raises(ValueError, match="split"):
        sample(logits, rows, settings, u, out, split=0)
    with pytest.raises(ValueError, match="probes"):
        sample(logits, rows, settings, u, out, block=4, split=2, probes=3)
