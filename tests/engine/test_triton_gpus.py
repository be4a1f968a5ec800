"""Which GPUs take the Triton kernels (`engine.device.triton_gpu_problem`): NVIDIA's from sm_80,
where `bench.compile_kernels` compiles every launch; older ones and AMD's take the torch
backends under `auto`, and `--X-backend triton` there is refused with the fix in one line."""

from __future__ import annotations

import pytest
import torch

from engine.device import (
    TRITON_MIN_CAPABILITY,
    check_interpreted_dtype,
    check_triton_backend,
    triton_gpu_problem,
)
from engine.layers.attention import TorchAttentionBackend, make_attention_backend
from engine.layers.linear import GemmBackend, gemm_backend_for


@pytest.mark.parametrize(
    "name, capability",
    [("A100", (8, 0)), ("A10", (8, 6)), ("L40S", (8, 9)), ("H200", (9, 0)), ("B200", (10, 0)),
     ("RTX PRO 6000", (12, 0))],
)  # fmt: skip
def test_ampere_and_later_run_the_kernels(name: str, capability: tuple[int, int]) -> None:
    assert triton_gpu_problem(name, capability, hip=False) is None


def test_older_and_amd_gpus_say_why_not() -> None:
    assert TRITON_MIN_CAPABILITY == (8, 0)
    t4 = triton_gpu_problem("Tesla T4", (7, 5), hip=False)
    assert t4 == "Tesla T4 is sm_75, and the kernels need sm_80 (Ampere) or later"
    v100 = triton_gpu_problem("Tesla V100", (7, 0), hip=False)
    assert v100 is not None and "sm_70" in v100
    mi300 = triton_gpu_problem("AMD Instinct MI300X", (9, 4), hip=True)
    assert mi300 is not None and "AMD GPU (ROCm)" in mi300


def test_auto_is_torch_off_cuda_and_triton_there_is_refused_without_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(make_attention_backend("auto", "cpu", False), TorchAttentionBackend)
    assert type(gemm_backend_for("auto", "cpu")) is GemmBackend
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="use --attention-backend torch"):
        make_attention_backend("triton", "npu", False)
    with pytest.raises(ValueError, match="use --gemm-backend torch"):
        check_triton_backend("gemm-backend", "cpu")


def test_bfloat16_triton_runs_under_the_interpreter_are_refused() -> None:
    """Triton's interpreter computes `tl.dot` on bfloat16 wrongly (silently): an engine asked
    for a triton backend off CUDA in bfloat16 stops with the fix instead of wrong tokens."""
    backends = {"attention-backend": "triton", "moe-backend": "auto", "gemm-backend": "torch"}
    with pytest.raises(ValueError, match=r"float32 \(or float16\) there, or --attention-backend"):
        check_interpreted_dtype(torch.bfloat16, "cpu", backends)
    check_interpreted_dtype(torch.float32, "cpu", backends)
    check_interpreted_dtype(torch.float16, "cpu", backends)
    check_interpreted_dtype(torch.bfloat16, "cuda", backends)
    check_interpreted_dtype(torch.bfloat16, "cpu", {"attention-backend": "auto"})
