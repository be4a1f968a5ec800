"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.testing.tiny_models import write_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny checkpoint family, written once per test session: ``{family: model_dir}``."""
    return write_tiny_models(tmp_path_factory.mktemp("models"))
