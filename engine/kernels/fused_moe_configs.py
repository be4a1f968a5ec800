"""Block sizes of the fused MoE kernels, per layer shape, chosen by the number of tokens.

`TUNED` maps a layer shape to rows `(max_tokens, config)` in ascending order, each tuned at
its `max_tokens`: a step of T tokens takes the first row with `T <= max_tokens` if T is within
4x of it (`max_tokens <= 4 T`), so that a row tuned for a prefill's thousands of tokens is not
used for a few hundred. Other token counts, and shapes not in the table, take
`default_config`. `python -m bench.moe_kernel --tune` times the candidates of
`candidates()` on the GPU and prints rows to paste here; entries say which device they were
tuned on. A row's config may give the down GEMM its own launch (`down=`), which `python -m
bench.moe_kernel --tune-gemm down` searches from the table's config (`--split-times` times
the align and the two GEMMs apart, against their weights' floors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.kernels.sms import H200_SHARED_MEMORY


@dataclass(frozen=True)
class MoEKernelConfig:
    """Tile sizes of `grouped_gemm_kernel`. BLOCK_M rows of one expert per program (the
    alignment of the sorted pairs), BLOCK_N output columns (gate and up each, in the gate-up
    GEMM), BLOCK_K of the reduction per step; GROUP_M row blocks share a column sweep."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3
    # `grouped_gemm_tma_kernel`: weight tiles (and the down GEMM's activation) loaded by the
    # tensor-memory accelerator (Hopper and later; Triton's interpreter runs it on the CPU).
    tma: bool = False
    # The down GEMM's own launch (its N is the hidden size and its K the expert's intermediate
    # size, the gate-up's the other way round), or None for this one. It shares `block_m` (the
    # pairs' alignment) and `tma` (the activation's layout between the two).
    down: MoEKernelConfig | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            # tl.dot needs power-of-two tiles of at least 16 on the GPU.
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.group_m < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"group_m, num_warps and num_stages must be >= 1 in {self}")
        down = self.down
        if down is not None and (
            down.block_m != self.block_m or down.tma != self.tma or down.down is not None
        ):
            raise ValueError(
                f"the down GEMM's config must share block_m and tma and have no down: {self}"
            )

    @property
    def down_config(self) -> MoEKernelConfig:
        """The down GEMM's launch: `down`, or this one."""
        return self.down or self


# Prefills of thousands of tokens (Qwen3-30B-A3B's and fused Moonlight's 8,192 and 16,384
# rows), from `--tune-gemm down` then `--tune-gemm gate_up` (`--tokens 1024,8192,16384 --reps 5
# --layers 2`) on an H100 80GB (the H200's SM count and matrix rate): the down on 128 x 256
# tiles with 4 stages, µs at 8,192 / 16,384 tokens, Moonlight 743 / 1,421 -> 573 / 1,054 and
# Qwen3-30B-A3B 450 / 805 -> 391 / 689; the gate-up with 4 stages Moonlight 1,253 / 2,444 ->
# 1,253 / 2,351 and Qwen3-30B-A3B 777 / 1,366 -> 735 / 1,337.
_PREFILL_TILES = MoEKernelConfig(
    128, 128, 64, group_m=8, num_warps=8, num_stages=4, tma=True,
    down=MoEKernelConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=4, tma=True),
)  # fmt: skip

# Qwen3-30B-A3B at 1,024 tokens: the gate-up's own search (`--tune-gemm gate_up`, H100) took
# 64-wide tiles at 3 stages, 311.1 -> 301.3 µs a layer; the down keeps the row's earlier tiles
# (its search found 166.6 -> 165.6 µs elsewhere: left).
_QWEN3_1024 = MoEKernelConfig(
    64, 64, 64, group_m=8, num_warps=4, num_stages=3,
    down=MoEKernelConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4),
)  # fmt: skip

# (num_experts, hidden, moe_intermediate, top_k, dtype) -> ((max_tokens, config), ...)
ShapeKey = tuple[int, int, int, int, str]
TUNED: dict[ShapeKey, tuple[tuple[int, MoEKernelConfig], ...]] = {
    # Qwen3-30B-A3B, tuned on an NVIDIA H200 by `python -m bench.moe_kernel --tune --shape
    # qwen3-30b-a3b --tokens 1,4,16,64 --reps 10` (µs per layer call, CUDA graph, 4 layers'
    # weights cycled; the floor is 17.8 / 67 / 182 / 282 µs).
    (128, 2048, 768, 8, "bfloat16"): (
        (1, MoEKernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)),  # 38.0 µs
        (4, MoEKernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=3)),  # 87.0 µs
        (16, MoEKernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=3)),  # 201.1 µs
        (64, MoEKernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)),  # 331.5 µs
        # Batch 128-512 decode, from `--tune --tokens 128,256,512 --reps 10 --layers 4`
        # (before, 256 tokens took the 1,024 row: 128-row blocks of a few real rows each).
        (128, MoEKernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=3)),  # 299.2 µs
        (256, MoEKernelConfig(32, 64, 128, group_m=8, num_warps=4, num_stages=3)),  # 307.3 µs
        (512, MoEKernelConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4)),  # 321.4 µs
        # Prefill, from `--tune --tokens 1024,8192,16384 --reps 5 --layers 2` (the candidates
        # for experts of over 64 rows, with and without TMA loads): 379.6 / 1,296.5 / 2,338.2
        # µs; the best with pointer loads at 8,192 and 16,384: 1,329.2 / 2,416.0. Those two
        # rows have since had each GEMM searched apart (`_PREFILL_TILES`), and so has 1,024's
        # (`_QWEN3_1024`).
        (1024, _QWEN3_1024),
        (8192, _PREFILL_TILES),
        (16384, _PREFILL_TILES),
    ),
    # Moonlight-16B-A3B, tuned on an NVIDIA H200 by `python -m bench.moe_kernel --tune --shape
    # moonlight-16b-a3b --tokens 1,4,16,64 --reps 10`.
    (64, 2048, 1408, 6, "bfloat16"): (
        (1, MoEKernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)),  # 38.9 µs
        (4, MoEKernelConfig(16, 64, 64, group_m=1, num_warps=4, num_stages=3)),  # 87.2 µs
        (16, MoEKernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=3)),  # 180.0 µs
        (64, MoEKernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=3)),  # 237.4 µs
        # Prefill (as Qwen3's): 413.5 / 1,623.1 / 3,282.9 µs.
        (1024, MoEKernelConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4)),
        (8192, MoEKernelConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3)),
        (16384, MoEKernelConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3)),
    ),
}
# Moonlight with its 2 shared experts fused (66 stacked experts, 8 pairs a token, what the
# engine runs): the routed shape's decode rows; prefill tuned on an NVIDIA H200 (`--tune --shape
# moonlight-16b-a3b-fused --tokens 1024,8192,16384 --reps 5 --layers 2`): 458.4 / 1,980.8 /
# 3,769.3 µs, against 461.9 / 2,025.3 / 3,954.5 with pointer loads; the 8,192 and 16,384 rows
# since searched GEMM by GEMM (`_PREFILL_TILES`), and the 1,024 row, which came out the same.
_DOWN_256 = MoEKernelConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=3)
TUNED[(66, 2048, 1408, 8, "bfloat16")] = (
    *TUNED[(64, 2048, 1408, 6, "bfloat16")][:4],
    # Batch 128-512 decode (`--tune --shape moonlight-16b-a3b-fused --tokens 128,256,512 --reps
    # 10 --layers 4`): 276.1 / 285.6 / 354.7 µs. Batch 256 decode went from 12.67 to 10.92 ms.
    (128, MoEKernelConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=3)),
    # At 256 each GEMM's launch then searched alone from that row (`--tune-gemm gate_up`,
    # `--tune-gemm down`, `--tokens 256`, H200, `session.sh O`): gate-up 210.0 -> 202.8 µs
    # (128-wide tiles, 5 stages), down 105.2 -> 96.7 (128-wide tiles; 80.2 µs of bytes).
    (256, MoEKernelConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=5, down=_DOWN_256)),
    (512, MoEKernelConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4)),
    # At 1,024 the two GEMMs' own searches picked these tiles too (gate-up 348 -> 336 µs, down
    # 194 -> 189, the same H100).
    (1024, _PREFILL_TILES),
    (8192, _PREFILL_TILES),
    (16384, _PREFILL_TILES),
)


def default_config(
    num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype = torch.bfloat16
) -> MoEKernelConfig:
    """The rule for shapes and token counts without a tuned row (DeepSeek-V3 and Kimi-K2 at
    decode sizes, any shape under expert parallelism, whose ranks hold a share of the
    experts), by the rows a step's average expert gets. In 16 bits, what the tuned tables
    below picked at those rows (Qwen3-30B-A3B's 128 x 2,048 x 768 experts, Moonlight's 64 and
    66 x 2,048 x 1,408):
    - up to 4 rows: 16-row blocks of 64 columns by 128 of K, 4 warps (Qwen3-30B-A3B at 1-64
      tokens, Moonlight at 1-16);
    - up to 16: 32-row blocks (Qwen3-30B-A3B at 256 tokens; its tables kept 16-row blocks at
      8 rows, Moonlight's at 6, but Kimi-K2's wider experts at 6 rows ran 32-row blocks 8%
      faster);
    - up to 64: 64 x 128 x 64, 4 warps, 4 stages (both at 256-1,024 tokens);
    - more (a prefill): `_PREFILL_TILES`, whose gate-up and down were each searched at 1,024 to
      16,384 tokens on both shapes and came out the same.
    Against the earlier rule (8 warps on 16-row blocks, which no tuned row chose, and 64 x 128
    x 32 pointer tiles for prefills), one layer of DeepSeek-V3 (the shared expert fused) on an
    H100, µs at 16 / 64 / 256 / 1,024 / 8,192 tokens: 1,987 / 4,298 / 6,759 / 8,101 / 23,682
    -> 1,992 / 3,978 / 5,282 / 6,771 / 14,378 (`python -m bench.moe_kernel --shape
    deepseek-v3-fused --tokens 16,64,256,1024,8192 --layers 1 --reps 10 --config ...` with the
    earlier rule's four tiles); Kimi-K2's 2,163 / 4,405 / 7,383 / 8,797 / 26,077 -> 2,147 /
    4,104 / 6,556 / 7,934 / 16,554, where 6,556 is the 16-row blocks that the rule then took at
    256 tokens: 32-row blocks ran 6,056 (8 warps, group 4; DeepSeek-V3's 5,343 against 5,282
    for the rule's 4 warps, group 8). DeepSeek-V3's own search at 8,192 / 16,384 tokens
    (`--tune`) found 3 stages 4% / 2% faster than these prefill tiles' 4: left to the rule, as
    a table row keyed by all 257 experts would serve only an unsharded DeepSeek-V3. float32
    (the exact checks) keeps narrower tiles: twice the bytes a tile would spill the
    registers."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    rule = _RULE_FP32 if dtype == torch.float32 else _RULE_16BIT
    return next(config for most, config in rule if rows_per_expert <= most)


# `default_config`'s tiles by the most rows an expert each serves.
_RULE_16BIT = (
    (4, MoEKernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=3)),
    (16, MoEKernelConfig(32, 64, 128, group_m=8, num_warps=4, num_stages=3)),
    (64, MoEKernelConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4)),
    (float("inf"), _PREFILL_TILES),
)
_RULE_FP32 = (
    (1, MoEKernelConfig(16, 32, 128, group_m=1, num_warps=8, num_stages=4)),
    (16, MoEKernelConfig(16, 64, 64, group_m=1, num_warps=8, num_stages=4)),
    (64, MoEKernelConfig(32, 64, 128, group_m=4, num_warps=8, num_stages=3)),
    (float("inf"), MoEKernelConfig(64, 64, 32, group_m=8, num_warps=8, num_stages=3)),
)


def candidates(rows_per_expert: float = 0.0) -> list[MoEKernelConfig]:
    """The configurations the tuner tries for a step whose experts average `rows_per_expert`
    rows (72 for decode, 40 for prefill: a few minutes per shape on an H200). Narrow column
    tiles give a decode step's few blocks enough programs to fill the device; a prefill's
    hundreds of rows an expert make the matmul the work, which wants large tiles (not 128 x
    256: the gate-up GEMM's two accumulators would not fit the registers), each with and
    without the tensor-memory accelerator's loads (`tma`)."""
    if rows_per_expert > 64:
        return [
            MoEKernelConfig(block_m, block_n, block_k, 8, warps, stages, tma)
            for tma in (False, True)
            for block_m, block_n in ((64, 64), (64, 128), (64, 256), (128, 64), (128, 128))
            for block_k in (64, 128)
            for warps in (4, 8)
            for stages in (3, 4)
        ]
    return [
        MoEKernelConfig(block_m, block_n, block_k, 1 if block_m == 16 else 8, warps, stages)
        for block_m in (16, 32, 64)
        for block_n in (32, 64, 128)
        for block_k in (64, 128)
        for warps in (4, 8)
        for stages in (3, 4)
    ]


def _stage_bytes(config: MoEKernelConfig, element_size: int, weights: int = 2) -> int:
    """One pipeline stage of a program: a tile of x and one of each of its `weights` (the
    gate-up's two, the down's one)."""
    return config.block_k * (config.block_m + weights * config.block_n) * element_size


def shared_bytes(config: MoEKernelConfig, element_size: int, weights: int = 2) -> int:
    """The shared memory a program takes, at most: the tiles of x and of its weights (the
    gate-up's two, `weights=1` for a down launch) that its `num_stages - 1` loads in flight
    hold. Float32 tiles compiled for sm_89 and sm_90 take exactly this; 16-bit ones take less."""
    return (config.num_stages - 1) * _stage_bytes(config, element_size, weights)


def fit_shared(
    config: MoEKernelConfig, element_size: int, shared: int, weights: int = 2
) -> MoEKernelConfig:
    """`config` with fewer stages (two at least) where a program would take more than `shared`
    bytes (`shared_bytes`; the device's limit): the tables' H200 tiles on an A10 or L40S (99
    KB), float32's defaults there. Its own down launch likewise, as one weight's tiles."""
    stages, stage = config.num_stages, _stage_bytes(config, element_size, weights)
    while stages > 2 and (stages - 1) * stage > shared:
        stages -= 1
    down = config.down and fit_shared(config.down, element_size, shared, weights=1)
    if stages == config.num_stages and down == config.down:
        return config
    return dataclasses.replace(config, num_stages=stages, down=down)


def kernel_config(
    num_tokens: int,
    num_experts: int,
    hidden: int,
    intermediate: int,
    top_k: int,
    dtype: torch.dtype,
    shared: int = H200_SHARED_MEMORY,
) -> MoEKernelConfig:
    """The table's row for `num_tokens` (see the module's note), else `default_config`, with
    no more stages than the device's `shared` memory a program holds (`fit_shared`)."""
    key = (num_experts, hidden, intermediate, top_k, str(dtype).removeprefix("torch."))
    rows = TUNED.get(key, ())
    config = None
    for max_tokens, row in rows:
        if num_tokens <= max_tokens:
            if max_tokens <= 4 * num_tokens or max_tokens == rows[0][0]:
                config = row
            break
    config = config or default_config(num_tokens, num_experts, top_k, dtype)
    return fit_shared(config, dtype.itemsize, shared)
