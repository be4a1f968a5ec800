"""bench/moe_kernel.py's fused-shared shapes: the shared experts are stacked after the routed
ones and every token gets them with weight 1.0, as the engine's shared-expert fusion routes."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch

from bench.moe_kernel import SHAPES, make_layers, make_step, with_shared


def test_shared_experts_are_appended_to_every_token() -> None:
    shape = SHAPES["moonlight-16b-a3b-fused"]
    assert (shape.stacked, shape.pairs) == (66, 8)
    weights = torch.rand(3, 6)
    ids = torch.randint(0, 64, (3, 6))
    w, i = with_shared(shape, weights, ids)
    assert torch.equal(i[:, :6], ids) and torch.equal(i[:, 6:], torch.tensor([[64, 65]] * 3))
    assert torch.equal(w[:, :6], weights) and torch.equal(w[:, 6:], torch.ones(3, 2))
    plain = SHAPES["moonlight-16b-a3b"]
    assert with_shared(plain, weights, ids) == (weights, ids)


def test_a_fused_step_routes_over_the_stacked_weights() -> None:
    shape = SHAPES["tiny-fused"]
    layers = make_layers(shape, 1, torch.device("cpu"), torch.float32)
    assert layers[0].w13.shape[0] == layers[0].w2.shape[0] == shape.stacked
    step = make_step(shape, 5, layers, torch.zeros(shape.experts), seed=0)
    weights, ids = step.routed[0]
    assert ids.shape == weights.shape == (5, shape.pairs)
    assert (ids[:, : shape.top_k] < shape.experts).all()
    assert (ids[:, shape.top_k :] >= shape.experts).all()


def test_split_times_and_one_gemm_tuning_run_on_the_interpreter(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--split-times` and `--tune-gemm` smoke runs on the tiny shape (CPU, interpreter: no
    meaningful times), with the candidates cut to two so that the run stays short."""
    import bench.moe_kernel as moe_kernel

    every = moe_kernel.gemm_candidates
    monkeypatch.setattr(moe_kernel, "gemm_candidates", lambda base, which: every(base, which)[:2])
    args = ["--device", "cpu", "--dtype", "float32", "--shape", "tiny-fused", "--tokens", "9"]
    moe_kernel.main([*args, "--reps", "1", "--layers", "1", "--split-times"])
    moe_kernel.main([*args, "--reps", "1", "--layers", "1", "--tune-gemm", "down"])
    out = capsys.readouterr().out
    assert "| 9 | MoEKernelConfig(" in out  # the split row, with its config
    assert "T=9 down: table's" in out and "(9, MoEKernelConfig(" in out


def test_config_argument() -> None:
    from bench.moe_kernel import kernel_tiles
    from engine.kernels.fused_moe_configs import MoEKernelConfig

    assert kernel_tiles("64,128,32,8,8,3") == MoEKernelConfig(64, 128, 32, 8, 8, 3)
    assert kernel_tiles("128,128,64,8,8,4,tma").tma
    for bad in ("64,128,32,8,8", "64,128,32,8,8,3,x", "48,128,32,8,8,3"):
        with pytest.raises(argparse.ArgumentTypeError, match="BLOCK_M,BLOCK_N"):
            kernel_tiles(bad)


def test_gemm_candidates_vary_one_gemm() -> None:
    from bench.moe_kernel import gemm_candidates
    from engine.kernels.fused_moe_configs import MoEKernelConfig

    base = MoEKernelConfig(64, 64, 64, group_m=8)
    downs = gemm_candidates(base, "down")
    assert all(c.block_n == 64 and c.down is not None for c in downs)
    assert {(c.down_config.block_n, c.down_config.num_stages) for c in downs} >= {(256, 5)}
    gate_ups = gemm_candidates(base, "gate_up")
    assert all(c.down_config == replace(base, down=None) for c in gate_ups)
    assert len({c.block_n for c in gate_ups}) == 3


def test_small_path_tiles_take_the_gate_up_on_the_tensor_cores(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--small-tiles` with a sixth value > 0 puts the gate-up products on the tensor cores,
    pipelined that deep; repeated, each is timed on the same layers (a smoke run on the
    interpreter); a bad value is a usage error."""
    import bench.moe_kernel as moe_kernel

    args = ["--device", "cpu", "--dtype", "float32", "--shape", "tiny-fused", "--tokens", "1"]
    tiles = ["--small-tiles", "16,16,8,16,4", "--small-tiles", "16,16,8,16,4,3"]
    moe_kernel.main([*args, "--reps", "1", "--layers", "1", "--path", "small", *tiles])
    out = capsys.readouterr().out
    assert out.count("\n| 1 | ") == 2 and out.count("### SmallBatchTiles(") == 2
    assert "gate_up_dot=False" in out and "gate_up_dot=True, gate_up_stages=3" in out
    with pytest.raises(SystemExit):
        moe_kernel.main([*args, "--small-tiles", "16,256,8,256"])
    assert "DOT_STAGES" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny", "tiny-fused", "qwen-tiny"])
def test_the_small_path_routed_in_its_kernels_matches_the_ids_given(name: str) -> None:
    """`--path small-routed` (routing in the kernels, as a decode step runs it; grouped routing
    with fused shared experts too) gives what the small path gives on the reference's choices."""
    shape = SHAPES.get(name) or replace(SHAPES["qwen3-30b-a3b"], name=name, hidden=64,
                                         intermediate=32, experts=16, top_k=4)  # fmt: skip
    layers = make_layers(shape, 2, torch.device("cpu"), torch.float32)
    step = make_step(shape, 2, layers, torch.randn(shape.experts) * 0.1, seed=3)
    given: list[torch.Tensor] = []
    routed: list[torch.Tensor] = []
    step.fused(given, None, "small")
    step.fused(routed, None, "small-routed")
    assert len(routed) == len(given) == 2
    for a, b in zip(routed, given, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tune_searches_a_prefills_gemms_apart(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--tune` at a prefill's rows an expert (the threshold lowered to the tiny shape's) follows
    its whole-layer pick with the down's and then the gate-up's own searches, and prints the
    row it ends with, after the engine's own config's time (CPU, interpreter, candidates cut to
    two)."""
    import bench.moe_kernel as moe_kernel

    every, every_gemm = moe_kernel.candidates, moe_kernel.gemm_candidates
    monkeypatch.setattr(moe_kernel, "candidates", lambda rows=0.0: every(rows)[:2])
    monkeypatch.setattr(moe_kernel, "gemm_candidates", lambda b, w: every_gemm(b, w)[:2])
    monkeypatch.setattr(moe_kernel, "PREFILL_ROWS_PER_EXPERT", 0)
    args = ["--device", "cpu", "--dtype", "float32", "--shape", "tiny-fused", "--tokens", "9"]
    given = "16,16,16,1,4,2,tma"
    moe_kernel.main([*args, "--reps", "1", "--layers", "1", "--tune", "--config", given])
    captured = capsys.readouterr()
    assert "T=9: the table's" in captured.err  # the engine's config now, for the gain
    assert "T=9: given" in captured.err and "tma=True" in captured.err
    assert "T=9 down alone:" in captured.err and "T=9 gate_up alone:" in captured.err
    assert "(9, MoEKernelConfig(" in captured.out
    # --config alone: the engine's and the given configs, no search, no table rows.
    moe_kernel.main([*args, "--reps", "1", "--layers", "1", "--config", given])
    captured = capsys.readouterr()
    assert "T=9: the table's" in captured.err and "T=9: given" in captured.err
    assert "alone:" not in captured.err and "MoEKernelConfig(" not in captured.out
