"""A worker started with --grammar-warmup builds constrained decoding's vocabulary view in
the background and says so; without it (the tests' default) it does not."""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.procs import worker

READY = "constrained decoding ready"


def test_warmup_builds_the_vocabulary_view_at_start(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = tiny_models["qwen3"]
    with worker("null", model, "--grammar-warmup", log_dir=tmp_path) as (child, _):
        assert child.log_path is not None
        deadline = time.monotonic() + 60
        while READY not in child.log_path.read_text():
            assert time.monotonic() < deadline, child.log_path.read_text()[-2000:]
            time.sleep(0.1)
    (tmp_path / "off").mkdir()
    with worker("null", model, "--no-grammar-warmup", log_dir=tmp_path / "off") as (child, _):
        time.sleep(1.0)
        assert child.log_path is not None and READY not in child.log_path.read_text()
