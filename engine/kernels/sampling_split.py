"""The sampling kernel's split path: each sampled row over several programs, for small batches.

One program a row (`engine.kernels.sampling`) reads the row from L2 at one SM's rate, about 33
µs a pass for a 128,256-token row on the H200: 148-335 µs at batch 1 (3-10 passes) while 131
SMs idle. Here a row's tiles (`block` tokens each, the draw's tiles too; 32 for a 128k row at
the default 4,096) are spread over `split` programs, at most one a tile, and every pass is its
own launch over a [rows, programs] grid:

1. Stats: each tile's largest and smallest finite logit and its finite tokens.
2. Probing passes, `passes_for(probes)` launches (7 at the default 32 probes). Each program
   first combines the partials the previous launch wrote for the whole row (every program of
   the row the same sums, in the same order), moving the bracket (lo, hi] of `sampling` to
   the largest failing and the smallest passing probe; then, unless the bracket holds at most
   `candidates` tokens or one float, it counts the tokens above each of `probes` new probes
   in its tiles, and their mass, and writes them per tile. Many probes a pass, not one: a
   small batch is bound by launches, not by reading, so a pass narrows the bracket 33-fold
   rather than halving it. The first pass puts half its probes evenly in value (a spread of
   logits narrows fast) and half evenly in the float32 bit pattern; later passes all in the
   bit pattern, which bounds the search: 7 passes take the widest bracket (every float) down
   to one float, so the number of launches is fixed, known without a host sync, and the
   passes a row does not need exit at once.
3. Compaction: the last combine, then each program copies its tiles' tokens in (lo, hi] to
   the row's candidates, at an offset from the per-tile counts (index order, no atomics).
4. Draw (one program a row): the search in registers of `sampling` over the candidates, then
   a tile by the first uniform over the tiles' kept mass (per-tile mass above hi from the
   partials, plus the kept candidates'), and a token within it by the second, as `sampling`
   draws. Every sum runs over tiles in a fixed order, so the token does not depend on `split`.

Ten launches at the defaults; the kept set is `sampling`'s (the same predicate, exact for
float32: at most rounding of the masses' sums differs). Expected, not yet measured: at batch 1
a few µs a launch in a CUDA graph (a probing pass compares 4,096 tokens a program with 32
probes; the passes a row does not need only read its record), 25-40 µs in all against
148-335; at batch 16 (8 programs a row, 4 tiles each) about 50 µs. Eagerly, each launch also
costs the host Triton's launch overhead (the sampler runs outside the decode step's graph,
while the device is still busy with the step).

Why this design. A cooperative kernel (the row's programs meeting at a global-memory barrier
between passes) saves the launches but is only safe if every program is resident at once,
which Triton does not promise, and cannot run under Triton's interpreter (it runs programs one
after another: the first to wait would wait forever), so the tests could not check it. A first
pass that cuts the row down to its candidates cannot be exact in general: top-p 0.9 on flat
logits keeps half the vocabulary. Launches are cheap in a CUDA graph, and the split path is
used only where the batch is small (`split_for`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.sampling_common import (
    _keeps,
    _key,
    _load,
    _pick,
    _row_settings,
    _search,
    _value,
)

PROBES = 32  # probes a probing pass
# The split path is taken for at most this many sampled rows (with two or more tiles a row):
# beyond, one program a row already covers much of the GPU, and a probing pass over many
# tiles costs more compute (every token against every probe) than one-probe bisection.
SPLIT_ROWS = 16
REC = 16  # floats in a tile's record (fields below)
# Key distance from just below -max float to max float: the widest bracket.
_WIDEST = 2 * 0x7F7FFFFF + 1
_SLOTS = 4096  # elements a program holds in a [SUB, PROBES] or [SUBC, TP] product


def split_for(rows: int, vocab: int, sms: int, *, block: int) -> int:
    """Programs a row for `rows` sampled rows of `vocab` logits on a device of `sms` SMs (0: not
    a GPU): 1 (one program a row) for large batches, single-tile rows and off the GPU; else
    two programs an SM, at most one a tile. On the H200 (132 SMs, 128k logits, top-p 0.9, flat
    logits, `bench.sampling --split`) 16 rows took 201 µs of device time at 8 programs a row
    and 172 at 16; 1 and 4 rows 73-80 µs at 32 (one program a row: 336-340)."""
    tiles = triton.cdiv(vocab, block)
    if sms <= 0 or rows > SPLIT_ROWS or tiles < 2:
        return 1
    return min(tiles, max(2, 2 * sms // rows))


def sub_block(block: int, probes: int) -> int:
    """Tokens a probing pass compares with every probe at once ([SUB, PROBES] in registers)."""
    return min(block, _SLOTS // probes)


def sub_candidates(candidates: int, tiles: int) -> int:
    """Candidates the draw sorts into the tiles at once ([SUBC, TP] in registers)."""
    return max(1, min(candidates, _SLOTS // triton.next_power_of_2(tiles)))


def passes_for(probes: int) -> int:
    """Probing passes that take any bracket of float32 logits down to one float: the first
    pass's bit-pattern probes (half of them) cut it into probes // 2 + 1 parts, each later
    pass into probes + 1."""
    width = -(-_WIDEST // (probes - probes // 2 + 1))
    passes = 1
    while width > 1:
        width = -(-width // (probes + 1))
        passes += 1
    return passes


# A tile's record, per row and tile, written by the program that owns the tile; the row's
# fields (up to _FILTERING) are the same in every tile's record.
_REC = tl.constexpr(REC)
_M, _LO, _HI, _COUNT_LO, _COUNT_HI, _MASS_HI, _TOTAL, _PENDING, _PASSES, _FILTERING = (
    tl.constexpr(i) for i in range(10)
)
# The tile's count and mass above lo and above hi.
_CL, _CH, _ML, _MH = (tl.constexpr(i) for i in range(10, 14))


@triton.jit
def _probes(lo, hi, first, PROBES: tl.constexpr):
    """PROBES logits inside (lo, hi) (strictly, if their keys are 2 or more apart): in the first
    pass (`first`) half evenly in value and half evenly in key, later all evenly in key. The
    key probes are lo's key plus ceil(w * r / parts) for r = 1.., so the parts between them
    hold at most ceil(w / parts) keys each."""
    HALF: tl.constexpr = PROBES // 2
    j = tl.arange(0, PROBES)
    k_lo = _key(lo)
    k_hi = _key(hi)
    by_value = j < tl.where(first, HALF, 0)
    f = (j + 1).to(tl.float32) / (HALF + 1)
    at_value = _key(lo * (1.0 - f) + hi * f)  # no overflow: never hi - lo
    parts = tl.where(first, PROBES - HALF + 1, PROBES + 1)
    rank = tl.where(first, j - HALF, j) + 1
    at_key = k_lo + ((k_hi - k_lo) * rank + parts - 1) // parts
    k = tl.where(by_value, at_value, at_key)
    return _value(tl.minimum(tl.maximum(k, k_lo + 1), k_hi - 1))


@triton.jit
def _sample_stats_kernel(
    logits_ptr,
    stride,
    rows_ptr,
    part_ptr,
    n,
    tiles,
    per_program,
    PW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # logits: [B, n]; rows: [R]; part: [2, R, tiles, PW], slot 0 written: (max, finite min,
    # finite count) per tile.
    j = tl.program_id(0)
    g = tl.program_id(1)
    row_ptr = logits_ptr + tl.load(rows_ptr + j) * stride
    lanes = tl.arange(0, BLOCK)
    for i in range(0, per_program):
        tile = g * per_program + i
        x = _load(row_ptr, tile * BLOCK + lanes, n)
        finite = x > float("-inf")
        out = part_ptr + (j * tiles + tile) * PW
        ok = tile < tiles
        tl.store(out, tl.max(x, 0), mask=ok)
        tl.store(out + 1, tl.min(tl.where(finite, x, float("inf")), 0), mask=ok)
        tl.store(out + 2, tl.sum(finite.to(tl.float32), 0), mask=ok)


@triton.jit(do_not_specialize=["k"])
def _sample_pass_kernel(
    logits_ptr,
    stride,
    rows_ptr,
    settings_ptr,
    rec_ptr,
    part_ptr,
    cand_x_ptr,
    cand_i_ptr,
    n,
    num_rows,
    tiles,
    per_program,
    k,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
    PROBES: tl.constexpr,
    PW: tl.constexpr,
    TP: tl.constexpr,
    CAND: tl.constexpr,
    FIRST: tl.constexpr,
    COMPACT: tl.constexpr,
):
    # Launch k (1...) of a row's passes. part: [2, R, tiles, PW] (per tile: the count above each
    # probe, their mass, the tile's total mass); rec: [2, R, tiles, _REC]. Launch k reads slot
    # (k - 1) % 2 and writes slot k % 2 (the stats launch wrote part's slot 0). cand_x, cand_i:
    # [R, CAND], written by the compacting launch (COMPACT).
    j = tl.program_id(0)
    g = tl.program_id(1)
    row_ptr = logits_ptr + tl.load(rows_ptr + j) * stride
    scale, top_k, top_p, min_p = _row_settings(settings_ptr, j, num_rows, n)
    kk = tl.zeros([], tl.int32) + k
    tv = tl.arange(0, TP)
    valid = tv < tiles
    first_tile = g * per_program
    own = valid & (tv >= first_tile) & (tv < first_tile + per_program)
    pj = tl.arange(0, PROBES)
    prev_part = part_ptr + ((kk + 1) % 2 * num_rows + j) * tiles * PW
    prev_rec = rec_ptr + ((kk + 1) % 2 * num_rows + j) * tiles * _REC
    zero = tl.zeros([], tl.float32)

    if FIRST:  # the stats: the bracket from just below the smallest finite logit to the largest
        mx = tl.load(prev_part + tv * PW, mask=valid, other=float("-inf"))
        mn = tl.load(prev_part + tv * PW + 1, mask=valid, other=float("inf"))
        cl = tl.load(prev_part + tv * PW + 2, mask=valid, other=0.0)
        m = tl.max(mx, 0)
        live = m > float("-inf")
        m = tl.where(live, m, 0.0)
        lo = _value(_key(tl.where(live, tl.min(mn, 0), 0.0)) - 1)
        hi = m  # the top token is always kept
        filtering = live & ((top_k < n) | (top_p < 1.0) | (min_p > 0.0))
        ch = tl.zeros([TP], tl.float32)
        ml = tl.zeros([TP], tl.float32)  # unknown until pass 1's totals
        mh = tl.zeros([TP], tl.float32)
        count_lo = tl.sum(cl, 0)
        count_hi = zero
        mass_hi = zero
        total = zero
        passes = zero + 1.0
    else:  # the state the previous launch left, and its probes' partials if it probed
        r = prev_rec + first_tile * _REC
        m = tl.load(r + _M)
        lo = tl.load(r + _LO)
        hi = tl.load(r + _HI)
        count_lo = tl.load(r + _COUNT_LO)
        count_hi = tl.load(r + _COUNT_HI)
        mass_hi = tl.load(r + _MASS_HI)
        total = tl.load(r + _TOTAL)
        passes = tl.load(r + _PASSES)
        filtering = tl.load(r + _FILTERING) > 0.0
        recs = prev_rec + tv * _REC
        cl = tl.load(recs + _CL, mask=valid, other=0.0)
        ch = tl.load(recs + _CH, mask=valid, other=0.0)
        ml = tl.load(recs + _ML, mask=valid, other=0.0)
        mh = tl.load(recs + _MH, mask=valid, other=0.0)
        if tl.load(r + _PENDING) > 0.0:
            t = _probes(lo, hi, kk == 2, PROBES)
            grid = prev_part + tv[:, None] * PW + pj[None, :]
            cnt = tl.load(grid, mask=valid[:, None], other=0.0)  # [TP, PROBES]
            mass = tl.load(grid + PROBES, mask=valid[:, None], other=0.0)
            tot = tl.load(prev_part + tv * PW + 2 * PROBES, mask=valid, other=0.0)
            total = tl.sum(tot, 0)
            count = tl.sum(cnt, 0)
            mass_at = tl.sum(mass, 0)
            keep = _keeps(t, count, mass_at, total, m, scale, top_k, top_p, min_p)
            new_lo = tl.max(tl.where(keep, float("-inf"), t), 0)
            a = tl.min(tl.where((keep == 0) & (t == new_lo), pj, PROBES), 0)
            new_hi = tl.min(tl.where(keep, t, float("inf")), 0)
            b = tl.min(tl.where(keep & (t == new_hi), pj, PROBES), 0)
            at_a = (pj == a)[None, :]
            at_b = (pj == b)[None, :]
            moved_lo = a < PROBES
            moved_hi = b < PROBES
            # Mass above the first lo (below every logit) is the tiles' total: known from pass 1.
            ml = tl.where(kk == 2, tot, ml)
            ml = tl.where(moved_lo, tl.sum(tl.where(at_a, mass, 0.0), 1), ml)
            cl = tl.where(moved_lo, tl.sum(tl.where(at_a, cnt, 0.0), 1), cl)
            mh = tl.where(moved_hi, tl.sum(tl.where(at_b, mass, 0.0), 1), mh)
            ch = tl.where(moved_hi, tl.sum(tl.where(at_b, cnt, 0.0), 1), ch)
            count_lo = tl.where(moved_lo, tl.sum(tl.where(pj == a, count, 0.0), 0), count_lo)
            count_hi = tl.where(moved_hi, tl.sum(tl.where(pj == b, count, 0.0), 0), count_hi)
            mass_hi = tl.where(moved_hi, tl.sum(tl.where(pj == b, mass_at, 0.0), 0), mass_hi)
            lo = tl.where(moved_lo, new_lo, lo)
            hi = tl.where(moved_hi, new_hi, hi)

    cur_part = part_ptr + (kk % 2 * num_rows + j) * tiles * PW
    out = rec_ptr + ((kk % 2 * num_rows + j) * tiles + tv[:, None]) * _REC
    pending = zero
    width = _key(hi) - _key(lo)  # floats in (lo, hi]
    if COMPACT:
        # Unfiltered rows, and brackets of one float (every token in them equals hi, which
        # passes): everything above lo is kept, no candidates.
        collapse = (filtering == 0) | (width <= 1)
        hi = tl.where(collapse, lo, hi)
        ch = tl.where(collapse, cl, ch)
        mh = tl.where(collapse, ml, mh)
        count_hi = tl.where(collapse, count_lo, count_hi)
        mass_hi = tl.where(collapse, tl.sum(ml, 0), mass_hi)
        size = (cl - ch).to(tl.int32)  # candidates a tile, copied in index order
        start = tl.cumsum(size, 0) - size
        lanes = tl.arange(0, BLOCK)
        for i in range(0, per_program):
            tile = first_tile + i
            mine = tv == tile
            if tl.sum(tl.where(mine, size, 0), 0) > 0:
                x = _load(row_ptr, tile * BLOCK + lanes, n)
                sel = (x > lo) & (x <= hi)
                pos = tl.sum(tl.where(mine, start, 0), 0) + tl.cumsum(sel.to(tl.int32), 0) - 1
                sel &= pos < CAND  # always (passes_for bounds the bracket); guards memory
                tl.store(cand_x_ptr + j * CAND + pos, x, mask=sel)
                tl.store(cand_i_ptr + j * CAND + pos, tile * BLOCK + lanes, mask=sel)
        passes += tl.where(count_lo > count_hi, 1.0, 0.0)
    else:
        go = (filtering != 0) & (width > 1) & (count_lo - count_hi > CAND)
        if FIRST:  # pass 1 always runs: its totals are every row's
            go = zero == zero
        if go:
            t = _probes(lo, hi, kk == 1, PROBES)
            lanes = tl.arange(0, SUB)
            for i in range(0, per_program):
                tile = first_tile + i
                cnt_acc = tl.zeros([SUB, PROBES], tl.float32)
                mass_acc = tl.zeros([SUB, PROBES], tl.float32)
                tot_acc = tl.zeros([SUB], tl.float32)
                for s in range(0, BLOCK, SUB):
                    x = _load(row_ptr, tile * BLOCK + s + lanes, n)
                    e = tl.exp2((x - m) * scale)
                    above = x[:, None] > t[None, :]
                    cnt_acc += above.to(tl.float32)
                    mass_acc += tl.where(above, e[:, None], 0.0)
                    tot_acc += e
                ok = pj < tl.where(tile < tiles, PROBES, 0)  # (no vector & scalar: the interpreter)
                at = cur_part + tile * PW + pj
                tl.store(at, tl.sum(cnt_acc, 0), mask=ok)
                tl.store(at + PROBES, tl.sum(mass_acc, 0), mask=ok)
                tl.store(cur_part + tile * PW + 2 * PROBES, tl.sum(tot_acc, 0), mask=tile < tiles)
            pending = zero + 1.0
            passes += 1.0

    # The own tiles' records in one store, [TP, _REC]: the row's fields in each tile's record.
    f = tl.arange(0, _REC)[None, :]
    record = tl.where(f == _M, m, tl.where(f == _LO, lo, tl.where(f == _HI, hi, 0.0)))
    record = tl.where(f == _COUNT_LO, count_lo, tl.where(f == _COUNT_HI, count_hi, record))
    record = tl.where(f == _MASS_HI, mass_hi, tl.where(f == _TOTAL, total, record))
    record = tl.where(f == _PENDING, pending, tl.where(f == _PASSES, passes, record))
    record = tl.where(f == _FILTERING, filtering.to(tl.float32), record)
    record = tl.where(f == _CL, cl[:, None], tl.where(f == _CH, ch[:, None], record))
    record = tl.where(f == _ML, ml[:, None], tl.where(f == _MH, mh[:, None], record))
    tl.store(out + f, record, mask=own[:, None])


@triton.jit
def _sample_draw_kernel(
    logits_ptr,
    stride,
    rows_ptr,
    settings_ptr,
    uniforms_ptr,
    out_ptr,
    rec_ptr,
    cand_x_ptr,
    cand_i_ptr,
    stats_ptr,
    n,
    num_rows,
    tiles,
    slot,
    BLOCK: tl.constexpr,
    TP: tl.constexpr,
    CAND: tl.constexpr,
    SUBC: tl.constexpr,
    WRITE_STATS: tl.constexpr,
):
    # One program a row: the records of `slot` (the compacting launch's), the candidates; out:
    # [B] int64, row rows[j] written; stats: [R, 3] (sampling.Stats) if WRITE_STATS.
    j = tl.program_id(0)
    row = tl.load(rows_ptr + j)
    row_ptr = logits_ptr + row * stride
    scale, top_k, top_p, min_p = _row_settings(settings_ptr, j, num_rows, n)
    rec = rec_ptr + (slot * num_rows + j) * tiles * _REC
    m = tl.load(rec + _M)
    lo = tl.load(rec + _LO)
    hi = tl.load(rec + _HI)
    count_hi = tl.load(rec + _COUNT_HI)
    tv = tl.arange(0, TP)
    mh = tl.load(rec + tv * _REC + _MH, mask=tv < tiles, other=0.0)
    found = tl.minimum(tl.load(rec + _COUNT_LO) - count_hi, CAND).to(tl.int32)
    cand_x = cand_x_ptr + j * CAND
    cand_i = cand_i_ptr + j * CAND
    cands = tl.arange(0, CAND)
    cx = tl.load(cand_x + cands, mask=cands < found, other=float("-inf"))
    ce = tl.exp2((cx - m) * scale)
    total = tl.load(rec + _TOTAL)
    mass_hi = tl.load(rec + _MASS_HI)
    lo, probes = _search(cx, ce, lo, hi, count_hi, mass_hi, total, m, scale, top_k, top_p, min_p)

    # Each tile's kept mass: above hi (the partials'), and its kept candidates'.
    kept = tl.zeros([TP], tl.float32)
    sub = tl.arange(0, SUBC)
    for c in range(0, found, SUBC):
        x = tl.load(cand_x + c + sub, mask=c + sub < found, other=float("-inf"))
        i = tl.load(cand_i + c + sub, mask=c + sub < found, other=0)
        w = tl.where(x > lo, tl.exp2((x - m) * scale), 0.0)
        kept += tl.sum(tl.where((i // BLOCK)[:, None] == tv[None, :], w[:, None], 0.0), 0)
    tile = _pick(tl.where(tv < tiles, mh + kept, 0.0), tl.load(uniforms_ptr + 2 * j), TP)
    x = _load(row_ptr, tile * BLOCK + tl.arange(0, BLOCK), n)
    weight = tl.where(x > lo, tl.exp2((x - m) * scale), 0.0)
    token = tile * BLOCK + _pick(weight, tl.load(uniforms_ptr + 2 * j + 1), BLOCK)
    tl.store(out_ptr + row, token.to(tl.int64))
    if WRITE_STATS:
        tl.store(stats_ptr + 3 * j, lo)
        tl.store(stats_ptr + 3 * j + 1, tl.load(rec + _PASSES))
        tl.store(stats_ptr + 3 * j + 2, probes.to(tl.float32))


def launch(
    x: torch.Tensor,
    rows: torch.Tensor,
    settings: torch.Tensor,
    uniforms: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor | None,
    *,
    block: int,
    candidates: int,
    num_warps: int,
    split: int,
    probes: int,
) -> None:
    """`sampling.sample` over `split` programs a row (at most one a tile), its arguments checked
    there; `x` `[B, V]` contiguous in its last dimension, `settings` and `uniforms` contiguous.
    Launches a fixed sequence (no host sync: a CUDA graph can hold it)."""
    if not 2 <= probes <= _SLOTS or probes & (probes - 1):
        raise ValueError(f"sample's probes must be a power of two from 2 to {_SLOTS}, got {probes}")
    num_rows, vocab = rows.numel(), x.shape[1]
    tiles = triton.cdiv(vocab, block)
    per_program = triton.cdiv(tiles, min(split, tiles))
    grid = (num_rows, triton.cdiv(tiles, per_program))
    tp = triton.next_power_of_2(tiles)
    pw = 2 * probes + 1
    rec = torch.empty(2, num_rows, tiles, REC, dtype=torch.float32, device=x.device)
    part = torch.empty(2, num_rows, tiles, pw, dtype=torch.float32, device=x.device)
    cand_x = torch.empty(num_rows, candidates, dtype=torch.float32, device=x.device)
    cand_i = torch.empty(num_rows, candidates, dtype=torch.int32, device=x.device)
    _sample_stats_kernel[grid](
        x, x.stride(0), rows, part, vocab, tiles, per_program, PW=pw, BLOCK=block,
        num_warps=num_warps,
    )  # fmt: skip
    passes = passes_for(probes)
    for k in range(1, passes + 2):  # the probing passes, then the compaction
        _sample_pass_kernel[grid](
            x, x.stride(0), rows, settings, rec, part, cand_x, cand_i, vocab, num_rows, tiles,
            per_program, k, BLOCK=block, SUB=sub_block(block, probes), PROBES=probes,
            PW=pw, TP=tp, CAND=candidates, FIRST=k == 1, COMPACT=k == passes + 1,
            num_warps=num_warps,
        )  # fmt: skip
    _sample_draw_kernel[(num_rows,)](
        x, x.stride(0), rows, settings, uniforms, out, rec, cand_x, cand_i,
        stats if stats is not None else cand_x, vocab, num_rows, tiles, (passes + 1) % 2,
        BLOCK=block, TP=tp, CAND=candidates, SUBC=sub_candidates(candidates, tiles),
        WRITE_STATS=stats is not None, num_warps=num_warps,
    )  # fmt: skip
