"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors under Triton's interpreter; it must be chosen before Triton
# is first imported. On a CUDA host the kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The many worker processes the tests start skip constrained decoding's background warm-up
# (importing xgrammar and reading the vocabulary: seconds of CPU each); test_grammar_warmup
# turns it on.
os.environ.setdefault("PDSERVE_GRAMMAR_WARMUP", "0")

from engine.testing.interpreter import skip_helper_repatching
from engine.testing.tiny_models import write_tiny_models

# The interpreter re-patches the language at every `@triton.jit` helper's call (a third of a
# tiny model's interpreted forward pass): once a launch is enough.
if os.environ.get("TRITON_INTERPRET") == "1":
    skip_helper_repatching()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny checkpoint family, written once per test session: ``{family: model_dir}``."""
    return write_tiny_models(tmp_path_factory.mktemp("models"))


# The files that take longest (tens of seconds to minutes on a 2-core machine: the Triton
# interpreter's model-level cases, the process-level fault tests), longest first. `make test`
# hands each file whole to one of a few processes in collection order (xdist's loadfile), so a
# long file collected last runs alone at the end while the other processes idle; started first,
# the short files fill in around them. A file missing here only runs in its usual place.
SLOW_FILES = (
    "engine/test_triton_attention.py",
    "engine/test_fused_moe.py",
    "router/test_failover.py",
    "e2e/test_workers.py",
    "engine/test_correctness.py",
    "router/test_cache_aware_e2e.py",
    "engine/test_skinny_gemm.py",
    "engine/test_expert_parallel.py",
    "engine/test_sampling_kernel.py",
    "router/test_registry.py",
    "e2e/test_soak.py",
    "e2e/test_expert_parallel_workers.py",
    "worker/test_startup_errors.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}

    def key(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((i for name, i in rank.items() if path.endswith("tests/" + name)), len(rank))

    items.sort(key=key)  # stable: each file's tests keep their order
