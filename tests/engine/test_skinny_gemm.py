"""The skinny GEMM (`engine.kernels.skinny_gemm`) against torch's `x.float() @ W.float().T`.

On this CPU host the kernel runs under Triton's interpreter (tests/conftest.py); on a GPU
compiled. Shapes are small and on purpose not multiples of any tile (N = 45, 70; K = 300,
520) so that every mask is exercised. Outputs are of order 1 (W scaled by K**-0.5, a bias of
order 1). Tolerances against the float32 reference on the same rounded inputs:

- float32: `rtol = atol = 1e-5` (only the summation order differs).
- float16: one float16 ulp of the output, `rtol = atol = 2**-10` (float32 sums, one
  rounding).
- bfloat16: one bfloat16 ulp, `rtol = atol = 2**-7` relative to the largest output (the
  interpreter truncates float32 -> bfloat16 instead of rounding; compiled, it rounds). The
  interpreter's `tl.dot` does not compute in bfloat16 (it returns garbage, silently), so on
  the CPU bfloat16 runs only the CUDA-core tiles; on a GPU every tile.
- The gate-up GEMM with silu(gate) * up in its epilogue rounds four times (gate, up, silu,
  the product) as the unfused path does; one ulp at each can differ (truncated under the
  interpreter), so bfloat16 there is checked to four ulps of the largest output.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels import fused
from engine.kernels.skinny_gemm import (
    DOT_TILES,
    GEMV_TILES,
    SM_COUNT,
    TILE_CONFIGS,
    TUNED,
    SkinnyTiles,
    pick_tiles,
    rows_per_program,
    skinny_gate_up,
    skinny_linear,
    tuned_tiles,
)
from engine.layers.linear import SkinnyGemmBackend
from engine.layers.pending import PendingSum

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}
LLAMA3_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


def make(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.float().cpu() @ w.float().cpu().T
    return y if b is None else y + b.float().cpu()


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, ulps: float = 1.0) -> None:
    tol = TOL[dtype] * ulps
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol * scale)


def interpreted_bf16_dot(dtype: torch.dtype, tiles: SkinnyTiles) -> bool:
    return DEVICE == "cpu" and dtype == torch.bfloat16 and tiles.dot


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 70, 300), (3, 45, 520), (16, 70, 300)])
def test_matches_torch(m: int, n: int, k: int, with_bias: bool, dtype: torch.dtype) -> None:
    x, w, b = make(m, n, k, dtype, seed=m)
    bias = b if with_bias else None
    tiles = pick_tiles(m, n, k, dtype)
    if interpreted_bf16_dot(dtype, tiles):
        tiles = GEMV_TILES
    got = skinny_linear(x, w, bias, tiles)
    assert got.dtype == dtype and got.shape == (m, n)
    close(got, reference(x, w, bias), dtype)


@pytest.mark.parametrize("m", [3, 16])
def test_every_tile_configuration_gives_the_same_result(m: int) -> None:
    """float32, so that only the summation order differs; splits into 3 and 4 runs of K
    (the last one short) too. Each configuration twice: bitwise the same (no atomics). The
    CUDA-core tiles run a program per row whatever M is: at 16 rows only the tensor-core
    tiles, whose programs hold all the rows, are new (the interpreter's time, halved)."""
    x, w, b = make(m, 45, 600, torch.float32, seed=10 + m)
    want = reference(x, w, b)
    extra = (SkinnyTiles(16, 64, split_k=3), SkinnyTiles(8, 32, split_k=4, dot=False),
             SkinnyTiles(8, 32, split_k=4, dot=False, prefetch=True),
             SkinnyTiles(4, 128, dot=False, prefetch=True),
             SkinnyTiles(16, 64, split_k=3, tma=True), SkinnyTiles(32, 64, tma=True))  # fmt: skip
    for tiles in (*TILE_CONFIGS, *extra):
        if m > 3 and not tiles.dot:
            continue
        got = skinny_linear(x, w, b, tiles)
        close(got, want, torch.float32)
        assert torch.equal(skinny_linear(x, w, b, tiles), got), tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preloading_tiles(dtype: torch.dtype) -> None:
    """The preloading kernel (each program's whole tile of W loaded before the PDL wait, then
    every row of x against it): 1 and 3 rows, K held by one program (block_k past K: masked)
    or split in two and three (the last split short), with and without the bias, the split
    partials left to the next norm; each twice, bitwise the same. A tile that does not cover
    its split, and preload with the tensor cores, are refused."""
    for m in (1, 3):
        x, w, b = make(m, 45, 300, dtype, seed=30 + m)
        for tiles in (SkinnyTiles(16, 512, dot=False, preload=True),
                      SkinnyTiles(8, 256, split_k=2, dot=False, num_warps=2, preload=True),
                      SkinnyTiles(4, 128, split_k=3, dot=False, preload=True)):  # fmt: skip
            for bias in (b, None):
                got = skinny_linear(x, w, bias, tiles)
                close(got, reference(x, w, bias), dtype)
                assert torch.equal(skinny_linear(x, w, bias, tiles), got), tiles
            pending = skinny_linear(x, w, None, tiles, defer=True)
            if tiles.split_k > 1:
                assert isinstance(pending, PendingSum)
                close(pending.parts.sum(1), reference(x, w, None), dtype)
    with pytest.raises(ValueError, match="preloading tiles hold a whole split"):
        skinny_linear(x, w, b, SkinnyTiles(16, 128, split_k=2, dot=False, preload=True))
    with pytest.raises(ValueError, match="preload is for the CUDA-core tiles"):
        SkinnyTiles(16, 64, preload=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_folded_into_preloading_tiles(dtype: torch.dtype) -> None:
    """`preload_norm_linear` (the RMSNorm with the residual add in the preloading product's
    launch): the new residual stream bit for bit the norm kernel's sum, a new tensor (the old
    one untouched); the output the norm-then-product's up to the float32 order of the norm's
    sum of squares (float32: 1e-5; bfloat16: an element of the normalised row may round one
    ulp the other way, so 2 ulps), with and without the bias, K ragged under the tile (45
    rows, K 300 in a 512 tile). Not for more rows, split K or tiles that do not preload."""
    from engine.kernels.skinny_gemm import preload_norm_linear

    x, w, b = make(1, 45, 300, dtype, seed=41)
    g = torch.Generator().manual_seed(42)
    residual = torch.randn(1, 300, generator=g).to(dtype).to(DEVICE)
    norm_w = (1 + 0.1 * torch.randn(300, generator=g)).to(dtype).to(DEVICE)
    tiles = SkinnyTiles(8, 512, dot=False, num_warps=4, preload=True)
    for bias in (b, None):
        kept = residual.clone()
        got = preload_norm_linear(x, residual, norm_w, 1e-6, w, bias, tiles)
        assert got is not None
        y, new_residual = got
        assert torch.equal(residual, kept) and new_residual.data_ptr() != residual.data_ptr()
        stream = residual.clone()
        normed = fused.rms_norm(x, norm_w, 1e-6, residual=stream)
        assert torch.equal(new_residual, stream)
        want = skinny_linear(normed, w, bias, tiles)
        close(y, want.float().cpu(), dtype, ulps=1 if dtype == torch.float32 else 2)
    x3, w3, _ = make(3, 45, 300, dtype, seed=43)
    split = SkinnyTiles(8, 256, split_k=2, dot=False, preload=True)
    assert preload_norm_linear(x3, residual.expand(3, -1), norm_w, 1e-6, w3, None, tiles) is None
    assert preload_norm_linear(x, residual, norm_w, 1e-6, w, None, split) is None
    assert preload_norm_linear(x, residual, norm_w, 1e-6, w, None, GEMV_TILES) is None


def test_float16_tensor_cores_and_cuda_cores_agree() -> None:
    x, w, b = make(3, 45, 520, torch.float16, seed=4)
    want = reference(x, w, b)
    for tiles in (GEMV_TILES, DOT_TILES[-1], SkinnyTiles(16, 64, split_k=3),
                  SkinnyTiles(16, 64, tma=True)):  # fmt: skip
        close(skinny_linear(x, w, b, tiles), want, torch.float16)


def test_wide_row_blocks() -> None:
    """`block_m` past the rule's 64 (a batch of 128-256 rows reading W once or twice): 130
    rows as blocks of 128 (the second ragged) and one of 256, pointer and TMA tiles, the
    gated form too; an invalid block_m is refused."""
    x, w, b = make(130, 45, 100, torch.float32, seed=6)
    want = reference(x, w, b)
    for tiles in (SkinnyTiles(16, 32, block_m=128), SkinnyTiles(16, 32, block_m=256, tma=True)):
        assert rows_per_program(130, tiles) == tiles.block_m
        close(skinny_linear(x, w, b, tiles), want, torch.float32)
    _, w2, _ = make(130, 40, 100, torch.float32, seed=7)
    gate, up = reference(x, w2, None).chunk(2, dim=-1)
    # The TMA form is what `TUNED` gives Llama-3-8B's gate-up in the 256-row graph.
    for tiles in (SkinnyTiles(16, 32, block_m=128), SkinnyTiles(16, 32, block_m=128, tma=True)):
        gate_up = skinny_gate_up(x, w2, None, tiles)
        close(gate_up, torch.nn.functional.silu(gate) * up, torch.float32)
    for bad in ({"block_m": 48}, {"block_m": 512}, {"block_m": 128, "dot": False}):
        with pytest.raises(ValueError, match="block_m"):
            SkinnyTiles(16, 32, **bad)  # type: ignore[arg-type]


def test_more_rows_than_one_program_holds() -> None:
    """70 rows: two row blocks of 64 on the tensor cores, 70 programs of one on the CUDA cores."""
    x, w, b = make(70, 45, 100, torch.float32, seed=5)
    for tiles in (DOT_TILES[-1], GEMV_TILES, SkinnyTiles(16, 32, tma=True)):
        close(skinny_linear(x, w, b, tiles), reference(x, w, b), torch.float32)


def test_tma_tiles_fall_back_on_unaligned_operands() -> None:
    """x sliced one column in: its base is not 16-byte aligned, which a TMA descriptor
    refuses; the pointer kernel runs the same tiles, with the same result."""
    x, w, b = make(3, 45, 101, torch.float32, seed=8)
    tiles = SkinnyTiles(16, 32, tma=True)
    got = skinny_linear(x[:, 1:], w[:, 1:], b, tiles)
    close(got, reference(x[:, 1:].contiguous(), w[:, 1:].contiguous(), b), torch.float32)
    with pytest.raises(ValueError, match="tma is for the tensor-core tiles"):
        SkinnyTiles(16, 64, dot=False, tma=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_split_sum_normalises_as_the_reduce(dtype: torch.dtype) -> None:
    """`defer=True` with K split: the float32 partials as a `PendingSum`, which the next
    RMSNorm's kernel sums; the same bits as the reduce launch then the norm. Without a split,
    with a bias or a gate it is the tensor as before."""
    x, w, b = make(5, 48, 600, dtype, seed=21)
    tiles = SkinnyTiles(16, 64, split_k=3, dot=dtype == torch.float32)
    pending = skinny_linear(x, w, None, tiles, defer=True)
    assert isinstance(pending, PendingSum) and tuple(pending.parts.shape) == (5, 3, 48)
    assert pending.shape == (5, 48)
    norm_w = (1 + 0.1 * torch.randn(48, generator=torch.Generator().manual_seed(2))).to(dtype)
    norm_w = norm_w.to(DEVICE)
    res = torch.randn(5, 48, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    res_got, res_want = res.clone(), res.clone()
    got = fused.rms_norm(pending, norm_w, 1e-6, residual=res_got)
    want = fused.rms_norm(skinny_linear(x, w, None, tiles), norm_w, 1e-6, residual=res_want)
    assert torch.equal(got, want) and torch.equal(res_got, res_want)
    for args, kw in (((x, w, None, SkinnyTiles(16, 64, dot=dtype == torch.float32)), {}),
                     ((x, w, b, tiles), {})):  # fmt: skip
        assert isinstance(skinny_linear(*args, **kw, defer=True), torch.Tensor)
    gated = skinny_gate_up(
        x, torch.cat([w, w]), None, SkinnyTiles(16, 64, split_k=3, dot=dtype == torch.float32)
    )
    assert isinstance(gated, torch.Tensor)


def test_empty_and_leading_dimensions() -> None:
    x, w, b = make(6, 45, 100, torch.float32, seed=6)
    assert skinny_linear(x[:0], w, b).shape == (0, 45)
    assert skinny_linear(x.view(2, 3, 100)[:, :0], w).shape == (2, 0, 45)
    got = skinny_linear(x.view(2, 3, 100), w, b)
    assert got.shape == (2, 3, 45)
    close(got.view(6, 45), reference(x, w, b), torch.float32)
    close(skinny_linear(x[:, :0], w[:, :0], b), b.float().cpu().expand(6, 45), torch.float32)


def gate_up_reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The unfused path: the GEMM rounded to `dtype`, silu(gate) rounded, times up."""
    gate, up = reference(x, w, b).to(dtype).float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate).to(dtype).float() * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 70, 300), (3, 90, 520), (16, 70, 200)])
def test_gate_up_matches_the_unfused_path(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    """silu(gate) * up in the GEMM's epilogue, with and without a bias, on every tile kind
    (bfloat16's tensor-core tiles only compiled) and split into 3 runs of K (a second launch
    applies the activation to the summed partials)."""
    x, w, b = make(m, n, k, dtype, seed=20 + m)
    tiles_list = [pick_tiles(m, n, k, dtype), GEMV_TILES, SkinnyTiles(16, 64, split_k=3),
                  SkinnyTiles(8, 32, split_k=3, dot=False), SkinnyTiles(16, 64, tma=True),
                  SkinnyTiles(16, 64, split_k=3, tma=True)]  # fmt: skip
    for bias in (b, None):
        want = gate_up_reference(x, w, bias, dtype)
        for tiles in tiles_list:
            if interpreted_bf16_dot(dtype, tiles):
                continue
            got = skinny_gate_up(x, w, bias, tiles)
            assert got.dtype == dtype and got.shape == (m, n // 2)
            close(got, want, dtype, ulps=4 if dtype == torch.bfloat16 else 1)


def test_gate_up_edges() -> None:
    x, w, b = make(3, 46, 100, torch.float32, seed=7)
    assert skinny_gate_up(x[:0], w, b).shape == (0, 23)
    close(skinny_gate_up(x[:, :0], w[:, :0], b), gate_up_reference(x[:, :0], w[:, :0], b,
          torch.float32), torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="even number of rows"):
        skinny_gate_up(x, w[:45])
    with pytest.raises(ValueError, match="preloading tiles are for skinny_linear"):
        skinny_gate_up(x, w, b, SkinnyTiles(8, 32, dot=False, prefetch=True))
    with pytest.raises(ValueError, match="preloading tiles are for skinny_linear"):
        skinny_gate_up(x, w, b, SkinnyTiles(8, 128, dot=False, preload=True))
    with pytest.raises(ValueError, match="prefetch is for the CUDA-core tiles"):
        SkinnyTiles(16, 64, prefetch=True)


def test_bad_input_is_refused() -> None:
    x, w, b = make(2, 45, 100, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        skinny_linear(x, w[:, :99])
    with pytest.raises(ValueError, match="but weight is"):
        skinny_linear(x, w.half())
    with pytest.raises(ValueError, match="bias must be"):
        skinny_linear(x, w, b[:44])
    with pytest.raises(ValueError, match="needs block_n"):  # 65,536 blocks of one row
        skinny_linear(
            x[:, :1], torch.ones(65536, 1, device=DEVICE), None, SkinnyTiles(1, 1, dot=False)
        )
    with pytest.raises(ValueError, match="block_n"):
        SkinnyTiles(8, 256)  # the tensor cores' smallest tile is 16
    with pytest.raises(ValueError, match="split_k"):
        SkinnyTiles(16, 256, split_k=0)


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize(("n", "k"), [*LLAMA3_8B, (1024, 4096)])
def test_rule_fills_the_device(m: int, n: int, k: int) -> None:
    tiles = pick_tiles(m, n, k)
    assert tiles.dot == (m > 1)
    assert -(-n // tiles.block_n) * tiles.split_k >= SM_COUNT
    assert tiles.split_k == 1 or k // tiles.split_k >= 2 * tiles.block_k
    if (n, k) in LLAMA3_8B:
        assert tiles.split_k == 1  # one launch: no second pass to sum splits
    assert pick_tiles(m, n, k, torch.float32).block_k == tiles.block_k // 2


def test_tuned_table_rows() -> None:
    """Rows ascend per shape; a None row is cuBLAS, and so is every row count past the last."""
    for rows in TUNED.values():
        limits = [max_rows for max_rows, _ in rows]
        assert limits == sorted(set(limits)), rows
    bf16 = torch.bfloat16
    assert tuned_tiles("linear", 1, 4096, 14336, bf16) == tuned_tiles(
        "linear", 16, 4096, 14336, bf16
    )
    down = tuned_tiles("linear", 64, 4096, 14336, bf16)
    assert down is not None and down.tma and down.split_k == 2
    assert tuned_tiles("linear", 65, 4096, 14336, bf16) is None
    # `auto`'s backend asks the table up to 256 rows; past a shape's last row it is cuBLAS.
    backend = SkinnyGemmBackend(tuned=True, max_rows=256)
    assert backend.tiles("linear", 64, 4096, 14336, bf16) == down
    assert backend.tiles("linear", 256, 4096, 14336, bf16) is None
    assert backend.tiles("linear", 257, 4096, 14336, bf16) is None
    assert tuned_tiles("gate_up", 16, 28672, 4096, bf16) == SkinnyTiles(64, 128)
    # Llama-3-8B's gate-up from 224 rows: 128 rows of x a program; cuBLAS from 65 to 223
    # (where it won at 160 and 192 rows, and the tiles gained 1-2% at most below).
    wide = backend.tiles("gate_up", 256, 28672, 4096, bf16)
    assert wide is not None and wide.tma and wide.block_m == 128
    assert backend.tiles("gate_up", 224, 28672, 4096, bf16) == wide
    assert backend.tiles("gate_up", 65, 28672, 4096, bf16) is None
    assert backend.tiles("gate_up", 223, 28672, 4096, bf16) is None
    assert backend.tiles("gate_up", 257, 28672, 4096, bf16) is None
    # Preloading tiles: one row only (over more rows the compiler hoists a float32 copy of the
    # tile out of the row loop: twice the registers), each holding its whole split of K (else
    # the launch refuses them).
    for (kind, n, k, _), rows in TUNED.items():
        for max_rows, tiles in rows:
            if tiles is not None and tiles.preload:
                assert kind == "linear" and max_rows == 1, (n, k, tiles)
                assert tiles.block_k * tiles.split_k >= k, (n, k, tiles)
