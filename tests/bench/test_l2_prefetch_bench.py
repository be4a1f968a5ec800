"""`bench.l2_prefetch`'s command line on a host without a GPU: a bad shape is named, and the
run itself says it needs a CUDA device (its prefetch is sm_90 PTX)."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

import bench.l2_prefetch as l2_prefetch


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--shapes", "qwen3_o,foo"], "--shapes takes qwen3_o, qwen3_qkv, llama_o; got foo"),
        (["--shapes", "llama_o"], "needs a CUDA device"),
    ],
)
def test_command_line_errors(
    argv: list[str],
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(l2_prefetch.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["l2_prefetch", *argv])
    with pytest.raises(SystemExit) as exit_info:
        l2_prefetch.main()
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
