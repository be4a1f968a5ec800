"""bench/prefill_phases.py on a tiny checkpoint (CPU: the host's phases; CUDA events need a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import prefill_phases as bench
from bench.engine import Shape, engine_config, parse_args, random_prompts
from engine.engine import Engine


def test_phases_of_a_prefill_sum_to_within_its_wall_time(tiny_models: dict[str, Path]) -> None:
    args = parse_args(["--model-path", str(tiny_models["llama"]), "--prefill", "3x20",
                       "--decode", "", "--skip-hf", "--device", "cpu"])  # fmt: skip
    engine = Engine(engine_config(args, str(tiny_models["llama"]), "auto"))
    prompts = random_prompts(Shape(3, 20), engine.model_config.vocab_size, seed=1)
    wall, host, device = bench.measure_prefill(engine, prompts)
    assert device == {}  # no CUDA events off CUDA
    assert set(host) == {*bench.HOST, "steps"} and host["steps"] == 1
    assert all(v >= 0 for v in host.values())
    assert host["model"] > 0 and host["schedule"] > 0 and host["postprocess"] > 0
    assert sum(host[k] for k in bench.HOST) <= wall
    assert not engine.has_unfinished() and engine.num_free_pages == engine.pool.num_pages
    # The instance patches are gone: the engine's own methods again.
    assert "forward" not in vars(engine.runner) and "_apply" not in vars(engine)


def test_the_table_has_a_row_per_shape_and_the_host_remainder(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bench.main(["--model-path", str(tiny_models["qwen3-moe"]), "--prefill", "2x8,1x30",
                "--repeats", "2", "--device", "cpu", "--host-profile", "5"])  # fmt: skip
    text = capsys.readouterr().out
    assert "| prefill BxL | steps | wall ms | host schedule |" in text and "| host other |" in text
    assert "| 2x8 |" in text and "| 1x30 |" in text
    assert "### host profile, prefill 1x30" in text and "tottime" in text
    row = next(line for line in text.splitlines() if line.startswith("| 2x8 |"))
    assert row.rstrip().endswith("| - | - | - |")  # the device's columns: CUDA only
    no_device: dict[str, float] = {}
    rows = [("4x4", 10.0, dict.fromkeys(bench.HOST, 1.0), no_device)]
    assert "| 4x4 | 1 | 10.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 4.00 | - | - | - |" in (
        bench.render(rows)
    )


def test_step_tokens_split_a_prefill_into_steps(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bench.main(["--model-path", str(tiny_models["llama"]), "--prefill", "6x8", "--repeats", "1",
                "--device", "cpu", "--step-tokens", "16"])  # fmt: skip
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 6x8"))
    assert row.startswith("| 6x8 | 3 |")  # 48 tokens, 16 a step
