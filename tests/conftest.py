"""Shared pytest fixtures."""

from __future__ import annotations

import os

# The Triton kernel tests run on the CPU under Triton's interpreter, which triton picks when it
# is imported; transformers' model code imports triton while the test modules are collected,
# so a test module setting this itself would be too late. (TRITON_INTERPRET=0 overrides.)
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

from engine.testing.tiny_models import write_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny checkpoint family, written once per test session: ``{family: model_dir}``."""
    return write_tiny_models(tmp_path_factory.mktemp("models"))
