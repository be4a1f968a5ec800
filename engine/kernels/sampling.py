"""Sampling a token from each row's logits after temperature, top-k, top-p and min-p, without
sorting the vocabulary.

The torch path (`engine.sampler._filter`) sorts every sampled row (128,256 float32 for Llama-3),
takes a cumsum and scatters back: about 1.4 ms of a batch-64 decode step on the H200. Here one
program takes a row, and the row (512 KB) stays in L2 between its passes:

1. The row's largest and smallest finite logit.
2. The filters keep an upper set of the logits: token i is kept iff fewer than `top_k` tokens
   have a strictly larger logit, their probability mass is below `top_p`, and p_i is at least
   `min_p` times the top probability (`_keeps` below; every clause holds for all logits above one
   where it holds). So the kept set is {x > lo} for a `lo` found by bisection: `lo` fails the
   predicate (or lies below every logit), `hi` passes it. Each full-row pass counts the tokens
   above a probe halfway between them, and their mass, with p_i = exp((x_i - max) / T) computed
   on the fly (never stored), and moves `lo` or `hi` to the probe.
3. Once at most `candidates` tokens lie in (lo, hi] (or above lo), one more pass copies them
   into a scratch row, and the search finishes in registers over those alone, each probe at a
   candidate's logit (which decides that candidate at least), until no candidate lies strictly
   between `lo` and `hi`.
4. The token: by inverse CDF over the kept tokens' p_i, with two uniforms a row drawn by torch
   from the row's generator on the device: a tile of `block` tokens by the first, over the
   tiles' kept mass, and a token within it by the second. If every kept token is among the
   candidates, both picks run over the registers (the running mass over the candidates, in
   index order, crosses u of the total in the same tile as the tiles' running mass does);
   otherwise one more pass sums the kept mass per tile. (Gumbel-max would need a Philox draw
   for every token of the row, about as dear as two passes; this needs two numbers.)

Passes over a 128,256-token row (measured under the interpreter, at the defaults): 3 on a
peaked (LLM-like) row with top-p 0.9 or top-k 50, 4 for top-k 50 on N(0, 1) logits, 10 for
top-p 0.9 on N(0, 1) at temperature 0.8 (half the vocabulary kept), plus 5 to 13 probes in
registers; the sort costs far more than any of them.

Exactness. Full-row probes are halfway in value for the first `VALUE_STEPS` steps, then
halfway in the float32 bit pattern, which halves the floats left each step (at most
VALUE_STEPS + 32 steps; `MAX_STEPS` only guards the device against a hang); the search in
registers ends, at most one probe a candidate, when no token lies strictly between `lo` and
`hi`. So the threshold is exact for the kernel's own float32 arithmetic: no step bound
truncates it. What differs from `_filter` is rounding and ties: masses are float32 sums in
another order than torch's cumsum (a token whose mass before it is within ~1e-6 of `top_p`
may go either way; `_filter` even drops a last token at top-p 1, "off", when its cumsum
rounds to 1), p_i is exp2((x - max) * log2(e) / T) rather than softmax(x / T) (on the GPU
ex2.approx, which flushes p_i below 2**-126 of the top to 0: never drawn), and tokens with
equal logits are all kept or all dropped (`_filter` keeps a prefix of a tie in sort order).
The draw is exact up to float32: u * (running sum) over the kept tokens, never a token outside
the kept set or of zero probability.

A row's token depends on its logits, settings and uniforms alone: one program, with reduction
orders fixed by `block` and `candidates` (not by the batch). NaN logits count as -inf; a row
of -inf gives token 0.

Small batches may take the split path instead (`engine.kernels.sampling_split`; `split_for`
decides where `SPLIT_BY_DEFAULT` is set, `sample`'s `split` overrides): each row over several
programs, for one program a row leaves most SMs idle at batch 1. It keeps the same set and
draws the same way (a tile by the first uniform, a token in it by the second), so a seeded
row's token changes between the two paths only where float32 rounding decides (sums in
another order), as between any two orders.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from engine.kernels.sampling_common import (
    MAX_STEPS,
    _above,
    _keeps,
    _key,
    _load,
    _pick,
    _probe,
    _row_settings,
    _search,
    _value,
)
from engine.kernels.sms import sm_count

# Whether `sample(split=None)` takes `split_for`'s choice (the split path up to 16 rows) or
# one program a row. On: timed on the H200 (`bench.sampling --split 1,4,16,32,auto`, `bash
# bench/gpu/session.sh i`), device time at 1 / 4 / 16 rows of 128k logits, top-p 0.9: 336 /
# 339 / 340 µs on one program a row, 73 / 80 / 172 split; the kernels' tests pass compiled.
SPLIT_BY_DEFAULT = True

BLOCK = 4096  # logits a program loads at once: 16 float32 a thread with 8 warps
CANDIDATES = 4096  # tokens the bisection finishes on in registers
NUM_WARPS = 8


@dataclasses.dataclass(frozen=True)
class Stats:
    """Per sampled row: the kept set is {logits > threshold}; the passes over the whole row, and
    the probes over the candidates in registers."""

    threshold: torch.Tensor  # [R] float32
    passes: torch.Tensor  # [R] float32
    probes: torch.Tensor  # [R] float32


@triton.jit
def _sample_kernel(
    logits_ptr,
    stride,
    rows_ptr,
    settings_ptr,
    uniforms_ptr,
    out_ptr,
    cand_x_ptr,
    cand_i_ptr,
    stats_ptr,
    n,
    num_rows,
    BLOCK: tl.constexpr,
    CAND: tl.constexpr,
    TILES: tl.constexpr,
    WRITE_STATS: tl.constexpr,
):
    # logits: [B, n], rows `stride` apart; rows: [R] int64; settings: [4, R] (temperature,
    # top-k (<= 0: off), top-p, min-p); uniforms: [R, 2]; out: [B] int64, row rows[j] written;
    # cand_x, cand_i: [R, CAND] scratch; stats: [R, 3] (Stats) if WRITE_STATS.
    j = tl.program_id(0)
    row = tl.load(rows_ptr + j)
    row_ptr = logits_ptr + row * stride
    scale, top_k, top_p, min_p = _row_settings(settings_ptr, j, num_rows, n)
    lanes = tl.arange(0, BLOCK)

    # Pass 1: the largest and the smallest finite logit.
    big = tl.full([BLOCK], float("-inf"), tl.float32)
    small = tl.full([BLOCK], float("inf"), tl.float32)
    for off in range(0, n, BLOCK):
        x = _load(row_ptr, off + lanes, n)
        big = tl.maximum(big, x)
        small = tl.minimum(small, tl.where(x > float("-inf"), x, float("inf")))
    m = tl.max(big, 0)
    live = m > float("-inf")
    m = tl.where(live, m, 0.0)
    lo = _value(_key(tl.where(live, tl.min(small, 0), 0.0)) - 1)  # just below every logit
    hi = m  # the top token is always kept
    zero = tl.zeros([], tl.float32)
    count_lo = zero + n  # tokens above lo (an upper bound until a probe sets lo)
    count_hi = zero  # tokens above hi, and their mass
    mass_hi = zero
    total = zero
    filtering = live & ((top_k < n) | (top_p < 1.0) | (min_p > 0.0))
    passes = tl.full([], 1, tl.int32)

    # Pass 2...: bisection over the whole row, until (lo, hi] holds few enough tokens.
    step = tl.full([], 0, tl.int32)
    go = filtering & (count_lo - count_hi > CAND) & (_key(hi) - _key(lo) > 1)
    while go:
        t = _probe(lo, hi, step)
        count, mass, total = _above(row_ptr, n, t, m, scale, BLOCK)
        keep = _keeps(t, count, mass, total, m, scale, top_k, top_p, min_p)
        lo = tl.where(keep, lo, t)
        count_lo = tl.where(keep, count_lo, count)
        hi = tl.where(keep, t, hi)
        count_hi = tl.where(keep, count, count_hi)
        mass_hi = tl.where(keep, mass, mass_hi)
        step += 1
        go = (count_lo - count_hi > CAND) & (_key(hi) - _key(lo) > 1) & (step < MAX_STEPS)
    passes += step

    # One pass copies the undecided tokens, (lo, hi], to the scratch row; all above lo when
    # they fit (then the draw needs no further pass).
    compact = filtering & (_key(hi) - _key(lo) > 1)
    whole = count_lo <= CAND
    top = tl.where(whole, float("inf"), hi)
    base_count = tl.where(whole, 0.0, count_hi)
    base_mass = tl.where(whole, 0.0, mass_hi)
    found = tl.full([], 0, tl.int32)
    if compact:
        for off in range(0, n, BLOCK):
            x = _load(row_ptr, off + lanes, n)
            sel = (x > lo) & (x <= top)
            pos = found + tl.cumsum(sel.to(tl.int32), 0) - 1
            sel &= pos < CAND
            tl.store(cand_x_ptr + j * CAND + pos, x, mask=sel)
            tl.store(cand_i_ptr + j * CAND + pos, off + lanes, mask=sel)
            found += tl.sum(sel.to(tl.int32), 0)
        passes += 1
    tl.debug_barrier()  # the scratch row's stores, visible to every thread of the program
    cands = tl.arange(0, CAND)
    cx = tl.load(cand_x_ptr + j * CAND + cands, mask=cands < found, other=float("-inf"))
    ci = tl.load(cand_i_ptr + j * CAND + cands, mask=cands < found, other=0)
    ce = tl.exp2((cx - m) * scale)
    if step == 0:  # no full-row probe: every token is a candidate
        total = tl.sum(ce, 0)

    lo, step = _search(cx, ce, lo, hi, base_count, base_mass, total, m, scale, top_k, top_p, min_p)

    # The draw, over the kept tokens {x > lo}.
    u_tile = tl.load(uniforms_ptr + 2 * j)
    u_token = tl.load(uniforms_ptr + 2 * j + 1)
    if compact & whole:
        # The tile draw below, from the candidates (in index order): the tile of the first kept
        # token whose running mass passes u_tile of the total is the tile the tiles' running
        # mass picks; then the token in it by u_token.
        weight = tl.where(cx > lo, ce, 0.0)
        first = _pick(weight, u_tile, CAND)
        in_tile = ci // BLOCK == tl.sum(tl.where(cands == first, ci, 0), 0) // BLOCK
        picked = _pick(tl.where(in_tile, weight, 0.0), u_token, CAND)
        token = tl.sum(tl.where(cands == picked, ci, 0), 0)
    else:
        tiles = tl.arange(0, TILES)
        tile_mass = tl.zeros([TILES], tl.float32)
        for off in range(0, n, BLOCK):
            x = _load(row_ptr, off + lanes, n)
            kept = tl.where(x > lo, tl.exp2((x - m) * scale), 0.0)
            tile_mass = tl.where(tiles == off // BLOCK, tl.sum(kept, 0), tile_mass)
        passes += 1
        tile = _pick(tile_mass, u_tile, TILES)
        x = _load(row_ptr, tile * BLOCK + lanes, n)
        kept = tl.where(x > lo, tl.exp2((x - m) * scale), 0.0)
        token = tile * BLOCK + _pick(kept, u_token, BLOCK)
    tl.store(out_ptr + row, token.to(tl.int64))
    if WRITE_STATS:
        tl.store(stats_ptr + 3 * j, lo)
        tl.store(stats_ptr + 3 * j + 1, passes.to(tl.float32))
        tl.store(stats_ptr + 3 * j + 2, step.to(tl.float32))


def sample(
    logits: torch.Tensor,
    rows: torch.Tensor,
    settings: torch.Tensor,
    uniforms: torch.Tensor,
    out: torch.Tensor,
    *,
    block: int = BLOCK,
    candidates: int = CANDIDATES,
    num_warps: int = NUM_WARPS,
    split: int | None = None,
    probes: int | None = None,
) -> None:
    """Write a token drawn from row `rows[j]` of `logits` `[B, V]` to `out[rows[j]]` (int64 `[B]`),
    for each j, without a host sync (on a CUDA device or, under Triton's interpreter, the CPU).

    `settings` `[4, R]` float32: each row's temperature (> 0), top-k (<= 0: off), top-p (1:
    off) and min-p (0: off). `uniforms` `[R, 2]` float32 in [0, 1): the row's randomness (drawn
    from its generator, so a seeded row is reproducible whatever the batch). `block` and
    `candidates` (powers of two) and `num_warps` tune the kernel; tests pass small ones to take
    every path at small vocabularies. `split`: programs a row (1: one program a row; more: the
    split path, at most one a tile of `block` tokens; None: `split_for`'s choice); `probes`:
    the split path's probes a pass (a power of two; None: its default)."""
    _launch(
        logits, rows, settings, uniforms, out, None, block, candidates, num_warps, split, probes
    )


def sample_with_stats(
    logits: torch.Tensor,
    rows: torch.Tensor,
    settings: torch.Tensor,
    uniforms: torch.Tensor,
    out: torch.Tensor,
    *,
    block: int = BLOCK,
    candidates: int = CANDIDATES,
    num_warps: int = NUM_WARPS,
    split: int | None = None,
    probes: int | None = None,
) -> Stats:
    """`sample`, and each row's threshold and passes (the tests' and the benchmark's view)."""
    stats = torch.empty(rows.numel(), 3, dtype=torch.float32, device=logits.device)
    _launch(
        logits, rows, settings, uniforms, out, stats, block, candidates, num_warps, split, probes
    )
    return Stats(*stats.unbind(1))


def _launch(
    logits: torch.Tensor,
    rows: torch.Tensor,
    settings: torch.Tensor,
    uniforms: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor | None,
    block: int,
    candidates: int,
    num_warps: int,
    split: int | None,
    probes: int | None,
) -> None:
    # The split path's module imports this one's helpers: imported here, once both are loaded.
    from engine.kernels import sampling_split

    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"sample takes floating [B, V] logits, got {logits.dtype} {logits.shape}")
    num_rows, vocab = rows.numel(), logits.shape[1]
    if settings.shape != (4, num_rows) or uniforms.shape != (num_rows, 2):
        raise ValueError(
            f"{num_rows} rows need settings [4, {num_rows}] and uniforms [{num_rows}, 2], "
            f"got {tuple(settings.shape)} and {tuple(uniforms.shape)}"
        )
    for name, size in (("block", block), ("candidates", candidates)):
        if size <= 0 or size & (size - 1):
            raise ValueError(f"sample's {name} must be a power of two, got {size}")
    if not 0 < vocab < 2**24:  # counts are exact float32 below 2**24
        raise ValueError(f"sample takes 1 to 2**24 - 1 logits a row, got {vocab}")
    if split is not None and split < 1:
        raise ValueError(f"sample's split must be at least 1, got {split}")
    if num_rows == 0:
        return
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    if split is None:
        sms = sm_count(x.device) if x.is_cuda and SPLIT_BY_DEFAULT else 0
        split = sampling_split.split_for(num_rows, vocab, sms, block=block)
    if split > 1:
        sampling_split.launch(
            x, rows, settings.contiguous(), uniforms.contiguous(), out, stats,
            block=block, candidates=candidates, num_warps=num_warps, split=split,
            probes=probes if probes is not None else sampling_split.PROBES,
        )  # fmt: skip
        return
    cand_x = torch.empty(num_rows, candidates, dtype=torch.float32, device=x.device)
    cand_i = torch.empty(num_rows, candidates, dtype=torch.int32, device=x.device)
    _sample_kernel[(num_rows,)](
        x, x.stride(0), rows, settings.contiguous(), uniforms.contiguous(), out, cand_x, cand_i,
        stats if stats is not None else cand_x, vocab, num_rows,
        BLOCK=block, CAND=candidates, TILES=triton.next_power_of_2(triton.cdiv(vocab, block)),
        WRITE_STATS=stats is not None, num_warps=num_warps,
    )  # fmt: skip
