"""MoE routing in one Triton kernel per layer: one program per token, no host sync.

The same results as `engine.layers.moe.select_experts` (softmax top-k) and
`select_experts_grouped` (DeepSeek-V3's grouped sigmoid with the correction bias), which take
5 and about 15 small kernels each. Ties between equal scores go to the lower expert id (torch's
`topk` leaves them unspecified); the chosen experts come out best first.

`router_logits` computes DeepSeek's float32 gate logits `x @ W.T` for a decode step's few
tokens in one kernel from the weights' own dtype (bfloat16 upcast as it is loaded, float32
products and sums): the reference's `F.linear(x.float(), W.float())` up to summation order,
without its two conversions per step; more tokens take that product itself.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.kernels import pdl

# The routing's top-k with one block-wide reduction a choice (a 64-bit key: the value's bits,
# ordered as an integer, over the complement of the id) instead of a max and then a min over
# the ids tied at it: the same choices and weights (tests with most logits tied check both
# against stable sorts), 45 -> 29 barriers in the small path's gate-up (Qwen3-30B-A3B), whose
# weight loads wait on its routing. Checked compiled at full shapes (`bench.check_moe_gpu`)
# and timed on an H100 in the twenty-first session (`bash bench/gpu/session.sh b22`):
# Qwen3-30B-A3B 1 x 128 2.91 / 2.91 ms against 2.94 / 2.95 without, Moonlight level. On by
# default; `PDSERVE_PACKED_TOPK=0` gives the two-reduction form. Read when a kernel compiles.
PACKED_TOPK = tl.constexpr(os.environ.get("PDSERVE_PACKED_TOPK", "1") != "0")


@triton.jit
def softmax_topk_rows(
    logits,  # [T, E] router logits, rows `stride_t` apart
    rows,  # [BLOCK_T] the tokens to route (in range: callers clamp)
    stride_t,
    num_experts,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    """Softmax top-k of each of `rows`' tokens: (weights `[BLOCK_T, K_POW2]` float32, ids
    `[BLOCK_T, K_POW2]` int64), best first, slots from TOP_K on zero. Shared by
    `softmax_topk_kernel`, the grouped MoE path's routing-and-count kernel and the small-batch
    MoE's gate-up kernel (`engine.kernels.fused_moe`, `fused_moe_small`), which must choose
    alike."""
    cols = tl.arange(0, E_POW2)
    ok = cols < num_experts
    ptr = logits + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    x = tl.load(ptr, mask=ok[None, :], other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = tl.where(ok[None, :], p, 0.0)
    p = p / tl.sum(p, axis=1)[:, None]
    slots = tl.arange(0, K_POW2)[None, :]
    chosen_w = tl.zeros([rows.shape[0], K_POW2], dtype=tl.float32)
    chosen_id = tl.zeros([rows.shape[0], K_POW2], dtype=tl.int64)
    if PACKED_TOPK:
        # One reduction a choice (a block-wide reduction is a chain of shuffles and a barrier, and
        # the gate-up's loads wait on the routing): each expert's key holds its probability in the
        # high word (>= 0, so the bits order as the values do) and the complement of its id in the
        # low word (of equal probabilities the lower id has the larger key). The choices and
        # weights are those of taking the largest probability and then the lowest id among its
        # ties.
        low = (E_POW2 - 1 - cols).to(tl.int64)[None, :]
        key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | low
        # Taken or past E: a high word of -1, below every probability's, the id kept (those tie
        # among themselves, as the -1.0 probabilities of a plain comparison would).
        gone = ((tl.zeros_like(low) - 1) << 32) | low
        key = tl.where(ok[None, :], key, gone)
        for j in tl.static_range(TOP_K):
            best = tl.max(key, axis=1)[:, None]
            key = tl.where(key == best, gone, key)
            high = best >> 32
            w = high.to(tl.int32).to(tl.float32, bitcast=True)
            chosen_w = tl.where(slots == j, w, chosen_w)
            chosen_id = tl.where(slots == j, E_POW2 - 1 - (best - (high << 32)), chosen_id)
    else:
        # Probabilities are >= 0: -1 marks an expert already taken (or past E).
        left = tl.where(ok[None, :], p, -1.0)
        for j in tl.static_range(TOP_K):
            best = tl.max(left, axis=1)[:, None]
            idx = tl.min(tl.where(left == best, cols[None, :], E_POW2), axis=1)[:, None]
            left = tl.where(cols[None, :] == idx, -1.0, left)
            chosen_w = tl.where(slots == j, best, chosen_w)
            chosen_id = tl.where(slots == j, idx.to(tl.int64), chosen_id)
    if RENORMALIZE:
        chosen_w = chosen_w / tl.sum(chosen_w, axis=1)[:, None]
    return chosen_w, chosen_id


@triton.jit
def softmax_topk_kernel(
    logits,  # [T, E]
    weights,  # [T, TOP_K] out, logits' dtype
    ids,  # [T, TOP_K] int64 out
    num_experts,
    stride_t,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    t = tl.program_id(0).to(tl.int64)
    rows = t + tl.zeros([1], dtype=tl.int64)
    chosen_w, chosen_id = softmax_topk_rows(
        logits, rows, stride_t, num_experts, TOP_K, K_POW2, E_POW2, RENORMALIZE
    )
    slots = tl.arange(0, K_POW2)[None, :]
    out = rows[:, None] * TOP_K + slots
    tl.store(weights + out, chosen_w.to(weights.dtype.element_ty), mask=slots < TOP_K)
    tl.store(ids + out, chosen_id, mask=slots < TOP_K)


@triton.jit
def grouped_topk_rows(
    logits,  # [T, E] router logits, rows `stride_t` apart
    rows,  # [BLOCK_T] the tokens to route (in range: callers clamp)
    stride_t,
    bias,  # [E] the correction bias
    num_experts,  # E: the routed experts; shared ones are numbered from E
    scaling,
    NUM_GROUPS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
    K_POW2: tl.constexpr,  # a power of two >= TOP_K + NUM_SHARED
    RENORMALIZE: tl.constexpr,
):
    """Grouped sigmoid top-k of each of `rows`' tokens: (weights `[BLOCK_T, K_POW2]` float32,
    ids `[BLOCK_T, K_POW2]` int64), the routed choices best first in slots `[0, TOP_K)`, then
    the `NUM_SHARED` shared experts (ids E, E + 1, ..., weight 1.0: neither renormalised nor
    scaled), zeros past them. Shared as `softmax_topk_rows` is, by `grouped_topk_kernel` and
    the MoE kernels that route."""
    g = tl.arange(0, G_POW2)
    c = tl.arange(0, P_POW2)
    ok = (g[:, None] < NUM_GROUPS) & (c[None, :] < PER_GROUP)
    expert = g[:, None] * PER_GROUP + c[None, :]  # [G_POW2, P_POW2]
    ptr = logits + rows.to(tl.int64)[:, None, None] * stride_t + expert[None, :, :]
    x = tl.load(ptr, mask=ok[None, :, :], other=0.0).to(tl.float32)  # [BLOCK_T, G, P]
    scores = tl.sigmoid(x)
    b = tl.load(bias + expert, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok[None, :, :], scores + b[None, :, :], -float("inf"))
    # A group's score: its two best `choice` values.
    first = tl.max(choice, axis=2)
    first_at = tl.min(tl.where(choice == first[:, :, None], c[None, None, :], P_POW2), axis=2)
    second = tl.max(
        tl.where(c[None, None, :] == first_at[:, :, None], -float("inf"), choice), axis=2
    )
    group_score = tl.where(g[None, :] < NUM_GROUPS, first + second, -float("inf"))  # [T, G]
    eligible = (g[None, :] < 0) & (rows[:, None] >= 0)  # [BLOCK_T, G_POW2], all False
    for _ in tl.static_range(TOPK_GROUPS):
        best = tl.max(group_score, axis=1)[:, None]
        pick = tl.min(tl.where(group_score == best, g[None, :], G_POW2), axis=1)[:, None]
        eligible = eligible | (g[None, :] == pick)
        group_score = tl.where(g[None, :] == pick, -float("inf"), group_score)
    choice = tl.where(eligible[:, :, None], choice, -float("inf"))
    slots = tl.arange(0, K_POW2)[None, :]
    chosen_w = tl.zeros([rows.shape[0], K_POW2], dtype=tl.float32)
    chosen_id = tl.zeros([rows.shape[0], K_POW2], dtype=tl.int64)
    if PACKED_TOPK:
        # The choice and the id in one key, as `softmax_topk_rows` packs them (one reduction to find
        # a choice instead of two): the choice's bits made to order as the values do (-0.0 counted
        # as +0.0, as the comparison of values does) in the high word, the complement of the id in
        # the low word, so that ties go to the lower id. A choice taken becomes -inf's key, as the
        # comparison of values had it.
        span = G_POW2 * P_POW2
        low = (span - 1 - expert).to(tl.int64)[None, :, :]
        bits = (choice + 0.0).to(tl.int32, bitcast=True)
        key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32) | low
        gone = ((tl.zeros_like(low) - 2139095041) << 32) | low  # -inf's high word
        for j in tl.static_range(TOP_K):
            best = tl.max(tl.max(key, axis=2), axis=1)[:, None, None]
            here = key == best
            w = tl.sum(tl.sum(tl.where(here, scores, 0.0), axis=2), axis=1)
            key = tl.where(here, gone, key)
            idx = span - 1 - (best - ((best >> 32) << 32))  # [BLOCK_T, 1, 1]
            chosen_w = tl.where(slots == j, w[:, None], chosen_w)
            chosen_id = tl.where(slots == j, tl.reshape(idx, [rows.shape[0], 1]), chosen_id)
    else:
        big = NUM_GROUPS * PER_GROUP
        for j in tl.static_range(TOP_K):
            best = tl.max(tl.max(choice, axis=2), axis=1)
            at = tl.where(choice == best[:, None, None], expert[None, :, :], big)
            idx = tl.min(tl.min(at, axis=2), axis=1)  # [BLOCK_T]
            here = expert[None, :, :] == idx[:, None, None]
            w = tl.sum(tl.sum(tl.where(here, scores, 0.0), axis=2), axis=1)
            choice = tl.where(here, -float("inf"), choice)
            chosen_w = tl.where(slots == j, w[:, None], chosen_w)
            chosen_id = tl.where(slots == j, idx[:, None].to(tl.int64), chosen_id)
    if RENORMALIZE:
        chosen_w = chosen_w / (tl.sum(chosen_w, axis=1)[:, None] + 1e-20)
    chosen_w = chosen_w * scaling
    shared = (slots >= TOP_K) & (slots < TOP_K + NUM_SHARED)
    chosen_w = tl.where(shared, 1.0, chosen_w)
    chosen_id = tl.where(shared, (num_experts + slots - TOP_K).to(tl.int64), chosen_id)
    return chosen_w, chosen_id


# What a kernel that routes routes by (its ROUTE argument): nothing (the choices are given),
# softmax top-k, or DeepSeek-V3's grouped top-k.
ROUTE_NONE, ROUTE_SOFTMAX, ROUTE_GROUPED = 0, 1, 2


@triton.jit
def route_rows(
    logits,  # [T, E] router logits, rows `stride_t` apart
    rows,  # [BLOCK_T] the tokens to route (in range)
    stride_t,
    bias,  # [E] ROUTE_GROUPED's correction bias, else unused
    num_routed,  # E
    scaling,  # ROUTE_GROUPED's scaling factor
    ROUTE: tl.constexpr,  # ROUTE_SOFTMAX or ROUTE_GROUPED
    WIDTH: tl.constexpr,  # slots a token: the routed choices, then NUM_SHARED shared experts
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,  # ROUTE_SOFTMAX: a power of two >= E
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,  # ROUTE_GROUPED: `grouped_topk_rows`' settings
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
):
    """`softmax_topk_rows` (WIDTH choices) or `grouped_topk_rows` (WIDTH - NUM_SHARED choices,
    then the shared experts) by ROUTE: for the MoE kernels that route as they go."""
    if ROUTE == 1:
        chosen_w, chosen_id = softmax_topk_rows(
            logits, rows, stride_t, num_routed, WIDTH, K_POW2, E_POW2, RENORMALIZE
        )
    else:
        chosen_w, chosen_id = grouped_topk_rows(
            logits,
            rows,
            stride_t,
            bias,
            num_routed,
            scaling,
            NUM_GROUPS,
            PER_GROUP,
            TOPK_GROUPS,
            WIDTH - NUM_SHARED,
            NUM_SHARED,
            G_POW2,
            P_POW2,
            K_POW2,
            RENORMALIZE,
        )
    return chosen_w, chosen_id


# One token's routing inside one warp (`route_token`): up to this many routed experts, as
# 32-lane chunks (Kimi-K2's 384 experts: 12). Each warp of the program holds every chunk (a
# 32-element tensor is replicated across the warps), so every reduction is a warp's own:
# shuffles or one `redux.sync`, no shared memory and no barrier (0 `bar.sync` against 19 for
# `softmax_topk_rows` at one row).
WARP_ROUTE_EXPERTS = tl.constexpr(512)
# Whether `route_token` routes inside a warp (else `route_rows` always). On: `bash
# bench/gpu/session.sh b25` (H100) checked it compiled (the same experts as the routing kernels
# at Qwen3-30B-A3B's, Moonlight's, DeepSeek-V3's and Kimi-K2's geometry; greedy tokens equal to
# transformers') and timed decode 1 x 128 at Qwen3-30B-A3B 2.99 -> 2.98 ms, Moonlight 2.46 ->
# 2.41-2.42 (two alternations). `PDSERVE_WARP_ROUTE=0` turns it off. Read when a kernel compiles.
WARP_ROUTE = tl.constexpr(os.environ.get("PDSERVE_WARP_ROUTE", "1") != "0")


@triton.jit
def _chunk(ptr, chunk: tl.constexpr, num_routed, SPAN: tl.constexpr, OTHER: tl.constexpr):
    """Experts `[32 * chunk, 32 * chunk + 32)` of a per-expert vector (a token's logits, the
    correction bias) as float32, OTHER past `num_routed`, and which of them are experts; a
    chunk past SPAN (the experts the chunks cover, >= num_routed) loads nothing."""
    expert = chunk * 32 + tl.arange(0, 32)
    ok = expert < num_routed
    if chunk * 32 < SPAN:
        x = tl.load(ptr + expert, mask=ok, other=OTHER).to(tl.float32)
    else:
        x = tl.full([32], OTHER, dtype=tl.float32)
    return x, ok


@triton.jit
def _ordered(bits):
    """A float's int32 bits made to order as the values do (its own inverse)."""
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _warp_key(value, chunk: tl.constexpr, ok, ORDERED: tl.constexpr):
    """Each expert's top-k key: the value's bits, made to order as an integer (ORDERED: any
    sign; else the value is >= 0 and its bits order already), in the high word, the complement
    of the expert's id (within WARP_ROUTE_EXPERTS) in the low word; `ok` False: a high word
    below every value's (-inf's, as a plain comparison of values would have it)."""
    low = ((chunk * 32 + tl.arange(0, 32)) ^ (WARP_ROUTE_EXPERTS - 1)).to(tl.int64)
    bits = value.to(tl.int32, bitcast=True)
    if ORDERED:
        bits = _ordered(bits)
        gone = -2139095041  # -inf's ordered bits
    else:
        gone = -1
    bits = tl.where(ok, bits, gone)
    return (bits.to(tl.int64) << 32) | low


@triton.jit
def _max_key(keys, FIRST: tl.constexpr, COUNT: tl.constexpr):
    """The largest key of chunks `[FIRST, FIRST + COUNT)` (a scalar: one warp reduction)."""
    m = keys[FIRST]
    for c in tl.static_range(FIRST + 1, FIRST + COUNT):
        m = tl.maximum(m, keys[c])
    return tl.max(m, axis=0)


@triton.jit
def _removed(key, removed):
    """A chunk's keys taken out of the choice: `removed`'s high word over their own ids."""
    return removed | (key & 0xFFFFFFFF)


@triton.jit
def _remove(keys, taken, removed):
    """`keys` with those equal to `taken` (a chunk's keys or a scalar) `_removed`."""
    out = ()
    for c in tl.static_range(len(keys)):
        out = out + (tl.where(keys[c] == taken, _removed(keys[c], removed), keys[c]),)
    return out


@triton.jit
def _eligible_groups(keys, removed, NUM_GROUPS: tl.constexpr, GROUP_CHUNKS: tl.constexpr,
                     TOPK_GROUPS: tl.constexpr):  # fmt: skip
    """The grouped routing's group choice for groups of whole chunks (`GROUP_CHUNKS` each):
    `keys` with every expert of a group outside the TOPK_GROUPS best removed. A group's score
    is its two best choices' sum (`grouped_topk_rows`'s), the best groups taken first, ties to
    the lower group: a group is eligible when fewer than TOPK_GROUPS groups come before it."""
    scores = ()
    for g in tl.static_range(NUM_GROUPS):
        first = _max_key(keys, g * GROUP_CHUNKS, GROUP_CHUNKS)
        second = _max_key(_remove(keys, first, removed), g * GROUP_CHUNKS, GROUP_CHUNKS)
        a = _ordered((first >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
        b = _ordered((second >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
        scores = scores + (a + b,)
    out = ()
    for g in tl.static_range(NUM_GROUPS):
        ahead = 0
        for h in tl.static_range(NUM_GROUPS):
            if h < g:
                ahead += (scores[h] >= scores[g]).to(tl.int32)
            elif h > g:
                ahead += (scores[h] > scores[g]).to(tl.int32)
        for c in tl.static_range(g * GROUP_CHUNKS, (g + 1) * GROUP_CHUNKS):
            k = keys[c]
            out = out + (tl.where(ahead < TOPK_GROUPS, k, _removed(k, removed)),)
    return out


@triton.jit
def route_token(
    logits,  # [T, E] router logits, rows `stride_t` apart
    row,  # the token (scalar, in range)
    stride_t,
    bias,  # [E] ROUTE_GROUPED's correction bias, else unused
    num_routed,  # E
    scaling,  # ROUTE_GROUPED's scaling factor
    ROUTE: tl.constexpr,
    WIDTH: tl.constexpr,  # slots: the routed choices, then NUM_SHARED shared experts
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
):
    """`route_rows` for one token, as 1-D `[K_POW2]` weights (float32) and ids (int64): the
    same choices (the largest value first, ties to the lower id) and weights up to float32
    summation order. Up to `WARP_ROUTE_EXPERTS` routed experts inside each warp with no
    barrier: softmax, and the grouped routing where every group is eligible (`TOPK_GROUPS ==
    NUM_GROUPS`: Moonlight's and Kimi-K2's one group) or its groups are whole 32-expert chunks
    (DeepSeek-V3's 8 of 32); otherwise `route_rows` on the one row. For the small MoE path,
    whose every program routes its token before its first weight load."""
    ALL_GROUPS: tl.constexpr = ROUTE == 1 or TOPK_GROUPS == NUM_GROUPS
    # The experts the chunks cover: a power of two for softmax (E_POW2 >= E), else E itself.
    SPAN: tl.constexpr = E_POW2 if ROUTE == 1 else NUM_GROUPS * PER_GROUP
    WARP: tl.constexpr = (
        WARP_ROUTE and SPAN <= WARP_ROUTE_EXPERTS and (ALL_GROUPS or PER_GROUP % 32 == 0)
    )
    CHUNKS: tl.constexpr = (SPAN + 31) // 32
    CHOICES: tl.constexpr = WIDTH if ROUTE == 1 else WIDTH - NUM_SHARED
    slots = tl.arange(0, K_POW2)
    if WARP:
        row_ptr = logits + row.to(tl.int64) * stride_t
        xs = ()
        oks = ()
        for c in tl.static_range(CHUNKS):
            x, ok = _chunk(row_ptr, c, num_routed, SPAN, -float("inf"))
            xs = xs + (x,)
            oks = oks + (ok,)
        keys = ()
        if ROUTE == 1:
            # Softmax: probabilities >= 0, so their bits order as they do.
            m = xs[0]
            for c in tl.static_range(1, CHUNKS):
                m = tl.maximum(m, xs[c])
            m = tl.max(m, axis=0)
            ps = ()
            for c in tl.static_range(CHUNKS):
                ps = ps + (tl.where(oks[c], tl.exp(xs[c] - m), 0.0),)
            total = _tree_sum(ps)
            for c in tl.static_range(CHUNKS):
                keys = keys + (_warp_key(ps[c] / total, c, oks[c], False),)
            gone = -1
        else:
            # Grouped sigmoid: choose by score + bias, weigh by score.
            scores = ()
            for c in tl.static_range(CHUNKS):
                s = tl.sigmoid(xs[c])
                b, _ = _chunk(bias, c, num_routed, SPAN, 0.0)
                scores = scores + (s,)
                # + 0.0: -0.0 counts as +0.0, as the comparison of values does.
                keys = keys + (_warp_key(s + b + 0.0, c, oks[c], True),)
            gone = -2139095041
        # A key taken: its high word below every value's, its id kept.
        removed = (tl.zeros([32], dtype=tl.int64) + gone) << 32
        if not ALL_GROUPS:
            keys = _eligible_groups(keys, removed, NUM_GROUPS, PER_GROUP // 32, TOPK_GROUPS)
        chosen_w = tl.zeros([K_POW2], dtype=tl.float32)
        chosen_id = tl.zeros([K_POW2], dtype=tl.int64)
        for j in tl.static_range(CHOICES):
            best = _max_key(keys, 0, CHUNKS)
            high = best >> 32
            expert = (best - (high << 32)) ^ (WARP_ROUTE_EXPERTS - 1)
            if ROUTE == 1:
                w = high.to(tl.int32).to(tl.float32, bitcast=True)
            else:
                # The chosen expert's score (> 0, so its bits order: one integer max).
                sb = tl.where(keys[0] == best, scores[0].to(tl.int32, bitcast=True), 0)
                for c in tl.static_range(1, CHUNKS):
                    sb = tl.maximum(
                        sb, tl.where(keys[c] == best, scores[c].to(tl.int32, bitcast=True), 0)
                    )
                w = tl.max(sb, axis=0).to(tl.float32, bitcast=True)
            keys = _remove(keys, best, removed)
            chosen_w = tl.where(slots == j, w, chosen_w)
            chosen_id = tl.where(slots == j, expert, chosen_id)
        if ROUTE == 1:
            if RENORMALIZE:
                chosen_w = chosen_w / tl.sum(chosen_w, axis=0)
        else:
            if RENORMALIZE:
                chosen_w = chosen_w / (tl.sum(chosen_w, axis=0) + 1e-20)
            chosen_w = chosen_w * scaling
            shared = (slots >= CHOICES) & (slots < WIDTH)
            chosen_w = tl.where(shared, 1.0, chosen_w)
            chosen_id = tl.where(shared, (num_routed + slots - CHOICES).to(tl.int64), chosen_id)
    else:
        chosen_w, chosen_id = route_rows(
            logits, row.to(tl.int64) + tl.zeros([1], dtype=tl.int64), stride_t, bias, num_routed,
            scaling, ROUTE, WIDTH, K_POW2, E_POW2, RENORMALIZE, NUM_GROUPS, PER_GROUP,
            TOPK_GROUPS, NUM_SHARED, G_POW2, P_POW2,
        )  # fmt: skip
        # The one row (the sum of one value: exact).
        chosen_w = tl.sum(chosen_w, axis=0)
        chosen_id = tl.sum(chosen_id, axis=0)
    return chosen_w, chosen_id


@triton.jit
def _pairs(values):
    """Neighbouring chunks summed: `(v0 + v1, v2 + v3, ...)`, an odd last one kept."""
    out = ()
    for i in tl.static_range(len(values) // 2):
        out = out + (values[2 * i] + values[2 * i + 1],)
    if len(values) % 2 == 1:
        out = out + (values[len(values) - 1],)
    return out


@triton.jit
def _tree_sum(values):
    """The sum over every lane of up to 16 chunks: pairwise over the chunks (four:
    `(p0 + p1) + (p2 + p3)`), then one warp reduction."""
    for _ in tl.static_range(4):
        if len(values) > 1:
            values = _pairs(values)
    return tl.sum(values[0], axis=0)


@triton.jit
def grouped_topk_kernel(
    logits,  # [T, E]
    bias,  # [E] the correction bias
    weights,  # [T, TOP_K + NUM_SHARED] float32 out
    ids,  # [T, TOP_K + NUM_SHARED] int64 out
    num_experts,
    stride_t,
    scaling,
    NUM_GROUPS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    G_POW2: tl.constexpr,
    P_POW2: tl.constexpr,
    K_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    t = tl.program_id(0).to(tl.int64)
    rows = t + tl.zeros([1], dtype=tl.int64)
    chosen_w, chosen_id = grouped_topk_rows(
        logits,
        rows,
        stride_t,
        bias,
        num_experts,
        scaling,
        NUM_GROUPS,
        PER_GROUP,
        TOPK_GROUPS,
        TOP_K,
        NUM_SHARED,
        G_POW2,
        P_POW2,
        K_POW2,
        RENORMALIZE,
    )
    slots = tl.arange(0, K_POW2)[None, :]
    width = TOP_K + NUM_SHARED
    out = rows[:, None] * width + slots
    tl.store(weights + out, chosen_w, mask=slots < width)
    tl.store(ids + out, chosen_id, mask=slots < width)


@triton.jit
def router_logits_kernel(
    x,  # [T, H]
    w,  # [E, H]
    out,  # [T, E] float32, or the sums rounded to its dtype
    num_tokens,
    num_experts,
    hidden,
    stride_xt,
    stride_we,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.start(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    t_ok = tokens < num_tokens
    e_ok = experts < num_experts
    ks = tl.arange(0, BLOCK_K)
    x_ptr = x + tokens.to(tl.int64)[:, None] * stride_xt + ks[None, :]  # [BLOCK_T, BLOCK_K]
    # A decode step's few tokens: products on the CUDA cores, summed over K at the end.
    w_ptr = w + experts[:, None] * stride_we + ks[None, :]  # [BLOCK_E, BLOCK_K]
    partial = tl.zeros([BLOCK_T, BLOCK_E, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        a = tl.load(x_ptr, mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(w_ptr, mask=e_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        partial += a[:, None, :] * b[None, :, :]
        x_ptr += BLOCK_K
        w_ptr += BLOCK_K
    acc = tl.sum(partial, axis=2)
    o_ptr = out + tokens.to(tl.int64)[:, None] * num_experts + experts[None, :]
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=t_ok[:, None] & e_ok[None, :])


# Up to this many tokens `router_logits` runs its kernel (products on the CUDA cores); above,
# the reference's cuBLAS float32 product. Its float32 dot tiles ("ieee") took 48 µs a layer at
# 64 tokens on the H200 (16 programs, each a serial loop over the hidden size: Moonlight's
# batch-64 step 1.25 ms of 10.5), where cuBLAS and the two conversions take a few.
ROUTER_SMALL_TOKENS = 8
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def router_logits(
    x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Float32 logits `[T, E]` of x `[T, H]` against the gate weight `[E, H]` (any float
    dtypes): `F.linear(x.float(), weight.float())` up to summation order. Up to
    `ROUTER_SMALL_TOKENS` tokens one kernel reads both as they are (no conversion of the weight
    each step); more take that product itself. `out_dtype`: the float32 sums rounded once to
    it (a bfloat16 gate's `F.linear(x, weight)`, as Qwen3-MoE's reference computes its
    logits, up to summation order; more tokens then take exactly that product). More tokens'
    float32 logits stay with cuBLAS: a tensor-core kernel for them measured 1.0-1.2x cuBLAS's
    time on Moonlight's gate and 2.0-5.2x on DeepSeek-V3's (H200, 16 to 1,024 tokens)."""
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    if weight.shape[1] != hidden:
        raise ValueError(
            f"gate weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}: expected "
            f"[E, {hidden}]"
        )
    if num_tokens > ROUTER_SMALL_TOKENS:
        if out_dtype == x.dtype == weight.dtype:
            return torch.nn.functional.linear(x, weight)
        if x.is_cuda and x.dtype == weight.dtype and x.dtype in _HALF_DTYPES:
            # cuBLAS on the half-precision inputs, float32 out: their products are exact in
            # float32 and summed in it, as the reference's float32 product sums them, without
            # converting x (8,192 tokens: a 33 MB write and a SIMT float32 GEMM, 90 µs a
            # layer of a Moonlight prefill).
            return torch.mm(x, weight.t(), out_dtype=torch.float32).to(out_dtype)
        return torch.nn.functional.linear(x.float(), weight.float()).to(out_dtype)
    out = torch.empty(num_tokens, num_experts, dtype=out_dtype, device=x.device)
    if num_tokens == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    # Many narrow programs: the weight streams from memory, spread over the SMs.
    block_t = triton.next_power_of_2(num_tokens)
    block_e, block_k = 2, max(128, 1024 // block_t)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_experts, block_e))
    router_logits_kernel[grid](
        x,
        weight,
        out,
        num_tokens,
        num_experts,
        hidden,
        x.stride(0),
        weight.stride(0),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=block_k,
        num_warps=4,
        **pdl.launch_args(x),
    )
    return out


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_experts` in one kernel: (weights `[T, k]` in the logits' dtype, ids `[T, k]`)."""
    num_tokens, num_experts = router_logits.shape
    weights = router_logits.new_empty(num_tokens, top_k)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens:
        logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
        softmax_topk_kernel[(num_tokens,)](
            logits,
            weights,
            ids,
            num_experts,
            logits.stride(0),
            TOP_K=top_k,
            K_POW2=triton.next_power_of_2(top_k),
            E_POW2=triton.next_power_of_2(num_experts),
            RENORMALIZE=renormalize,
            **pdl.launch_args(logits),
        )
    return weights, ids


def grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling_factor: float = 1.0,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_experts_grouped` in one kernel: (weights `[T, k + num_shared]` float32, ids
    `[T, k + num_shared]`), the shared experts appended as that function does."""
    num_tokens, num_experts = router_logits.shape
    per_group = num_experts // num_groups
    device = router_logits.device
    width = top_k + num_shared
    weights = torch.empty(num_tokens, width, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, width, dtype=torch.int64, device=device)
    if num_tokens:
        logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
        grouped_topk_kernel[(num_tokens,)](
            logits,
            correction_bias.contiguous(),
            weights,
            ids,
            num_experts,
            logits.stride(0),
            float(scaling_factor),
            NUM_GROUPS=num_groups,
            PER_GROUP=per_group,
            TOPK_GROUPS=topk_groups,
            TOP_K=top_k,
            NUM_SHARED=num_shared,
            G_POW2=triton.next_power_of_2(num_groups),
            P_POW2=triton.next_power_of_2(per_group),
            K_POW2=triton.next_power_of_2(width),
            RENORMALIZE=renormalize,
            **pdl.launch_args(logits),
        )
    return weights, ids
