"""The L2 prefetch switch (`PDSERVE_L2_PREFETCH`, engine/kernels/l2_prefetch.py): parsed and
checked at start, and a no-op off CUDA. The prefetch itself is inline PTX for sm_90, which
Triton's interpreter cannot run: `bench.compile_kernels` assembles it
(tests/engine/test_kernels_compile.py), and `bench.l2_prefetch` and the engine A/Bs time it on
the GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e .[dev])")

from engine.config import EngineConfig, l2_prefetch_targets_from_env
from engine.kernels import l2_prefetch
from engine.layers.linear import Linear
from engine.layers.moe import TritonMoEBackend


@pytest.mark.parametrize(
    ("value", "targets"),
    [
        ("", set()),
        ("off", set()),
        ("o", {"o"}),
        ("o, down", {"o", "down"}),
        ("down,", {"down"}),
        ("o,down,qkv", {"o", "down", "qkv"}),
    ],
)
def test_targets_parse(monkeypatch: pytest.MonkeyPatch, value: str, targets: set[str]) -> None:
    monkeypatch.setenv("PDSERVE_L2_PREFETCH", value)
    assert l2_prefetch_targets_from_env() == targets


def test_an_unknown_target_fails_at_start_naming_the_choices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PDSERVE_L2_PREFETCH", "o,gate")
    with pytest.raises(ValueError, match=r"of o, down, qkv \(or off\), got gate$"):
        EngineConfig(model_path="unused")


def test_prefetchable_ranges() -> None:
    w = torch.zeros(64, 64, dtype=torch.bfloat16)
    assert l2_prefetch.prefetchable(w)
    assert not l2_prefetch.prefetchable(w.t())  # not contiguous
    assert not l2_prefetch.prefetchable(w.flatten()[:4])  # fewer than 16 bytes
    assert not l2_prefetch.prefetchable(w, max_bytes=w.numel())  # larger than the cache takes
    assert not l2_prefetch.prefetchable(w.flatten()[1:])  # not 16-byte aligned


def test_nothing_is_launched_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every target named, a CPU product and a CPU MoE layer ask nothing of L2 (and the
    product computes the same)."""
    monkeypatch.setenv("PDSERVE_L2_PREFETCH", "o,down,qkv")
    l2_prefetch.targets.cache_clear()
    launched: list[torch.Tensor] = []
    monkeypatch.setattr(l2_prefetch, "prefetch", launched.append)
    try:
        layer = Linear(32, 16, bias=False)
        x = torch.randn(2, 32)
        assert not l2_prefetch.enabled("o", x)
        layer.prefetch_weight(x, "o")
        TritonMoEBackend().prefetch_ahead(layer, x, pairs_per_token=1)  # the `qkv` target
        assert launched == []
        torch.testing.assert_close(layer(x), x @ layer.weight.t())
    finally:
        l2_prefetch.targets.cache_clear()
