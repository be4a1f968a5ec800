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

from engine.testing.interpreter import skip_dead_interpreter_work, skip_helper_repatching
from engine.testing.tiny_models import write_tiny_models

# The interpreter re-patches the language at every `@triton.jit` helper's call (a third of a
# tiny model's interpreted forward pass): once a launch is enough. Its integer-overflow checks
# are computed for an assert it never emits (without `debug`): a fifth more.
if os.environ.get("TRITON_INTERPRET") == "1":
    skip_helper_repatching()
    skip_dead_interpreter_work()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny checkpoint family, written once per test session: ``{family: model_dir}``."""
    return write_tiny_models(tmp_path_factory.mktemp("models"))
