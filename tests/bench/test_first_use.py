"""bench/first_use.py: its batch syntax, its compile count's bookkeeping (Triton's hooks fire
only where kernels compile: a GPU), and a run on a tiny checkpoint on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from triton import knobs

from bench import first_use as bench


def test_batches_parse() -> None:
    P = bench.Prompt
    assert bench.parse_batch("1500") == [P(1500)]
    assert bench.parse_batch("700, 900") == [P(700), P(900)]
    assert bench.parse_batch("3x128") == [P(128)] * 3
    assert bench.parse_batch("2x40+64,5") == [P(40, 64), P(40, 64), P(5)]
    for bad in ("0", "x5", "3x0", "5+-1", "abc"):
        with pytest.raises(ValueError):
            bench.parse_batch(bad)


def test_compiles_are_counted_from_triton_hooks() -> None:
    """The hooks as Triton calls them (keyword arguments; `fn` a JitFunctionInfo with a
    `name`): each compile counted once, into the newest count, the hooks restored after."""

    class Info:
        def __init__(self, name: str) -> None:
            self.name = name

    before = knobs.runtime.jit_cache_hook
    with bench.counting_compiles() as counts:
        hook, post = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
        assert hook is not None and post is not None
        for name in ("_extend_kernel", "_rms_kernel", "_extend_kernel"):
            assert not hook(key=(name, 1), fn=Info(name), repr="", compile={})
            assert not post(key=(name, 1), fn=Info(name), repr="", compile={})
        counts.append(bench.Compiles())
        hook(key=("k", 2), fn=Info("_argmax_kernel"))
        post(key=("k", 2), fn=Info("_argmax_kernel"))
    first, last = counts[0], counts[1]
    assert len(first.kernels) == 3 and first.names() == "_extend_kernel x2, _rms_kernel"
    assert last.names() == "_argmax_kernel" and last.seconds >= 0
    assert knobs.runtime.jit_cache_hook is before


def test_a_run_prints_a_row_per_batch_and_the_mix(
    tiny_models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", os.environ.get("TRITON_CACHE_DIR", "/tmp"))
    bench.main(["--model-path", str(tiny_models["deepseek-v3"]), "--device", "cpu",
                "--attention-backend", "torch", "--batches", "50;3x9;20+40", "--mix", "3",
                "--mix-max-len", "80"])  # fmt: skip
    text = capsys.readouterr().out
    assert "| batch | tokens | first ms | again ms | compilations |" in text
    for row in ("| 50 | 50 |", "| 3x9 | 27 |", "| 20+40 | 20 |"):
        assert row in text
    assert "mix of 3 random batches" in text and "0 compilations" in text
