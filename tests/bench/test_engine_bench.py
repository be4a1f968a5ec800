"""bench/engine.py end to end on a tiny checkpoint: the tables, the floors and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import engine as bench


@pytest.mark.parametrize("overlap", [True, False])
def test_engine_bench_prints_floors_and_writes_json(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], overlap: bool
) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--model-path",
        str(tiny_models["qwen3-moe"]),
        "--decode",
        "1x8,3x8",
        "--prefill",
        "2x8",
        "--decode-steps",
        "3",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    if not overlap:
        argv.append("--disable-overlap-schedule")
    bench.main(argv)  # fmt: skip
    text = capsys.readouterr().out
    assert "| decode BxL | pdserve step ms | floor ms | x floor | back to back ms " in text
    assert "| steady ms | steady x floor |" in text
    assert "| 3x8 |" in text and "| 2x8 |" in text
    assert "sampling: greedy" in text
    numbers = json.loads(out.read_text())
    for shape in ("1x8", "3x8"):
        assert numbers["pdserve"]["decode"][shape]["step_ms"] > 0
        assert numbers["pdserve"]["decode"][shape]["back_to_back_ms"] > 0
        assert numbers["pdserve"]["decode"][shape]["steady_ms"] > 0  # 3 steps: the middle one
        assert numbers["hf"]["decode"][shape]["step_ms"] > 0
        assert numbers["decode_floor_ms"][shape] > 0
    assert numbers["prefill_flops"]["2x8"] > 0


def test_engine_bench_decodes_sampled_requests(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bench.main(["--model-path", str(tiny_models["llama"]), "--decode", "2x8", "--prefill", "",
                "--decode-steps", "3", "--repeats", "1", "--skip-hf", "--temperature", "0.7",
                "--top-p", "0.9"])  # fmt: skip
    text = capsys.readouterr().out
    assert "sampling: temperature 0.7, top-p 0.9" in text
    assert "| 2x8 |" in text
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "llama3-8b", "--decode", "1x8", "--top-p", "0"])


def test_engine_bench_decodes_constrained_requests(
    tiny_models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--regex`: every request constrained (the tiny model's own tokenizer here; a preset
    gets a synthetic one), each decode step masked, every timed step's tokens matching it."""
    from engine.engine import Engine

    tokens: list[int] = []
    step = Engine.step

    def recorded(self: Engine, *args: object, **kwargs: object) -> object:
        outs = step(self, *args, **kwargs)  # type: ignore[arg-type]
        tokens.extend(o.token_id for o in outs)
        return outs

    monkeypatch.setattr(Engine, "step", recorded)
    bench.main(["--model-path", str(tiny_models["llama"]), "--decode", "2x8", "--prefill", "",
                "--decode-steps", "3", "--repeats", "1", "--skip-hf",
                "--regex", "[ab]{50}"])  # fmt: skip
    text = capsys.readouterr().out
    assert "sampling: greedy, constrained by regex '[ab]{50}'" in text
    assert "| 2x8 |" in text
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(tiny_models["llama"])
    assert tokens and all(set(tokenizer.decode([t])) <= {"a", "b"} for t in tokens)
    with pytest.raises(SystemExit):  # transformers' loop is not constrained
        bench.parse_args(["--preset", "llama3-8b", "--decode", "1x8", "--regex"])


def test_synthetic_tokenizer_files_load_as_a_checkpoints(tmp_path: Path) -> None:
    from bench.grammar import write_synthetic_tokenizer
    from engine.tokenizer import Tokenizer

    write_synthetic_tokenizer(tmp_path, 1000)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert len(tokenizer.vocab()) == 1000 and tokenizer.eos_token_ids


def test_shapes_and_costs() -> None:
    assert bench.Shape.parse("64x2048") == bench.Shape(64, 2048)
    with pytest.raises(ValueError):
        bench.Shape.parse("0x5")
    cost = bench.ModelCost(
        dense_bytes=100.0, expert_bytes=10.0, moe_layers=2, num_experts=4, top_k=2,
        kv_token_bytes=1.0, dense_params=50.0, lm_head_params=5.0, attn_flop_per_pair=3.0,
    )  # fmt: skip
    # Batch 1 touches its top-k experts per layer: 2 layers x 2 experts x 10 bytes, plus the
    # dense weights and the KV of 4 + 2 / 2 tokens.
    assert cost.decode_bytes(bench.Shape(1, 4), steps=2) == 100 + 2 * 2 * 10 + 5
    # Many tokens touch every expert.
    many = cost.decode_bytes(bench.Shape(1000, 4), steps=2)
    assert many == pytest.approx(100 + 2 * 4 * 10 + 5000)


def test_engine_bench_names_a_model_path_without_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--model-path", str(tmp_path), "--decode", "1x8"])
    err = capsys.readouterr().err
    assert f"no config.json in {tmp_path}: give a Hugging Face model directory" in err


def test_engine_bench_transformers_draws_its_own_dummy_weights(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--hf-weights own`: transformers builds the dummy model from its config with its own
    random weights (for models whose two copies would not fit the device), and is timed."""
    argv = ["--model-path", str(tiny_models["qwen3-moe"]), "--load-format", "dummy"]
    argv += ["--decode", "1x8", "--prefill", "2x8", "--decode-steps", "2", "--repeats", "1"]
    bench.main([*argv, "--hf-weights", "own"])
    text = capsys.readouterr().out
    assert "transformers weights: its own draws (--hf-weights)" in text
    row = next(line for line in text.splitlines() if line.startswith("| 2x8 |"))
    assert float(row.split("|")[3].replace(",", "")) > 0  # transformers' tok/s
    bench.main(argv)  # auto on the CPU: the engine's weights, handed over
    assert "transformers weights: the engine's" in capsys.readouterr().out
