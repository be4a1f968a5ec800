"""Triton helpers shared by the sampling kernel's one-program path (`engine.kernels.sampling`)
and its split path (`engine.kernels.sampling_split`): the order-preserving float32 keys, the
probes, the keep predicate (top-k, top-p, min-p at a cut-off), the loads, the in-register
search over candidates and the draw. Their own module, so that neither path imports the other
for them."""

from __future__ import annotations

import math

import triton
import triton.language as tl

VALUE_STEPS = tl.constexpr(24)  # probes halfway in value, then halfway in bit pattern
# Full-row probes end within VALUE_STEPS + 32 steps (the bit-pattern halvings of 2**32 floats);
# the bound also stops the loop outright, as a guard against a device hang.
MAX_STEPS = tl.constexpr(VALUE_STEPS.value + 33)
_LOG2E = tl.constexpr(math.log2(math.e))


@triton.jit
def _row_settings(settings_ptr, j, num_rows, n):
    """Sampled row j's settings from `[4, R]` float32 (temperature, top-k, top-p, min-p): the
    softmax's scale in base 2 (log2(e) / temperature), top-k (off, <= 0: more than the row's
    `n` tokens), top-p and min-p."""
    scale = _LOG2E / tl.load(settings_ptr + j)
    top_k = tl.load(settings_ptr + num_rows + j)
    top_p = tl.load(settings_ptr + 2 * num_rows + j)
    min_p = tl.load(settings_ptr + 3 * num_rows + j)
    return scale, tl.where(top_k > 0, top_k, n + 1.0), top_p, min_p


@triton.jit
def _key(x):
    """The float32 `x` as an int64 that orders as the floats do, consecutive floats consecutive
    integers; -0.0 and +0.0 are both 0 (they compare equal)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, (bits ^ 0x7FFFFFFF) + 1, bits).to(tl.int64)


@triton.jit
def _value(key):
    """The float32 whose `_key` is `key` (+0.0 for 0)."""
    k = key.to(tl.int32)
    return tl.where(k < 0, (k - 1) ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _probe(lo, hi, step):
    """A float strictly between `lo` and `hi` (there is one): halfway in value for the first
    VALUE_STEPS steps (fast on a spread of logits) where that is strictly inside, else halfway
    in bit pattern (halves the floats left: 32 steps end any search)."""
    mid = lo + (hi - lo) * 0.5
    k_lo = _key(lo)
    by_bits = _value(k_lo + (_key(hi) - k_lo) // 2)
    return tl.where((step < VALUE_STEPS) & (mid > lo) & (mid < hi), mid, by_bits)


@triton.jit
def _keeps(t, count, mass, total, m, scale, top_k, top_p, min_p):
    """Whether a token of logit `t` is kept, given the `count` and `mass` of the tokens with a
    larger logit: monotone in `t`, so the kept set is an upper set of the logits."""
    # top-p 1 (off) keeps every mass; so written, the clauses are all scalars or all vectors
    # (vectors of probes in the split path: the interpreter cannot mix them).
    top_p_ok = mass < tl.where(top_p >= 1.0, float("inf"), top_p * total)
    return (count < top_k) & top_p_ok & (tl.exp2((t - m) * scale) >= min_p)


@triton.jit
def _load(row_ptr, pos, n):
    x = tl.load(row_ptr + pos, mask=pos < n, other=float("-inf")).to(tl.float32)
    return tl.where(x == x, x, float("-inf"))


@triton.jit
def _above(row_ptr, n, t, m, scale, BLOCK: tl.constexpr):
    """(count, mass) of the row's tokens with a logit > `t`, and the row's total mass; masses
    unnormalised (p_i * total). Counts are float32 (exact below 2**24)."""
    lanes = tl.arange(0, BLOCK)
    count = tl.zeros([BLOCK], tl.float32)
    mass = tl.zeros([BLOCK], tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for off in range(0, n, BLOCK):
        x = _load(row_ptr, off + lanes, n)
        e = tl.exp2((x - m) * scale)
        above = x > t
        count += above.to(tl.float32)
        mass += tl.where(above, e, 0.0)
        total += e
    return tl.sum(count, 0), tl.sum(mass, 0), tl.sum(total, 0)


@triton.jit
def _pick(w, u, SIZE: tl.constexpr):
    """An index drawn with probability w[i] / sum(w), `u` uniform in [0, 1): the first positive
    weight whose running sum exceeds u * sum (the last positive one if rounding leaves none;
    0 if all are 0). Never an index of weight 0."""
    idx = tl.arange(0, SIZE)
    run = tl.cumsum(w, 0)
    target = u * tl.max(run, 0)
    first = tl.min(tl.where((run > target) & (w > 0), idx, SIZE), 0)
    last = tl.max(tl.where(w > 0, idx, 0), 0)
    return tl.where(first < SIZE, first, last)


@triton.jit
def _search(cx, ce, lo, hi, base_count, base_mass, total, m, scale, top_k, top_p, min_p):
    """The cut-off finished over candidates in registers: `cx` their logits (-inf padding), `ce`
    their p_i; `base_count` and `base_mass` the tokens above `hi` that are not candidates. Each
    probe is at a candidate's logit (the one nearest below the midpoint, else the nearest above):
    it decides at least that candidate, and halves the range the undecided ones span. Returns
    the new `lo` (every candidate above it kept) and the number of probes."""
    step = tl.full([], 0, tl.int32)
    undecided = tl.sum(((cx > lo) & (cx < hi)).to(tl.int32), 0)
    while undecided > 0:
        inside = (cx > lo) & (cx < hi)
        mid = lo * 0.5 + hi * 0.5  # hi is finite: never NaN; -inf only below every candidate
        below = tl.max(tl.where(inside & (cx <= mid), cx, float("-inf")), 0)
        t = tl.where(below > float("-inf"), below, tl.min(tl.where(inside, cx, float("inf")), 0))
        above = cx > t
        count = base_count + tl.sum(above.to(tl.float32), 0)
        mass = base_mass + tl.sum(tl.where(above, ce, 0.0), 0)
        keep = _keeps(t, count, mass, total, m, scale, top_k, top_p, min_p)
        lo = tl.where(keep, lo, t)
        hi = tl.where(keep, t, hi)
        undecided = tl.sum(((cx > lo) & (cx < hi)).to(tl.int32), 0)
        step += 1
    return lo, step
