"""bench/stack_cost.py: the steady window on made-up timings, the worker flags that rebuild the
offline engine's config, and one small run on the CPU (offline engine, then `pdserve local`
colocated with the router in front)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bench import stack_cost
from engine.cli import add_engine_args, engine_config_from_args
from engine.config import EngineConfig


def request(sent: float, ttft: float, gaps: list[float], tokens: list[int]) -> dict[str, Any]:
    return {"sent": sent, "ttft": ttft, "itls": gaps, "chunk_tokens": tokens,
            "output_len": sum(tokens)}  # fmt: skip


def test_the_window_runs_from_the_last_first_token_to_the_first_last_token() -> None:
    # Chunks every 1/8 s from 1 s to 2.25 s, and from 1.5 s to 2.75 s: all decode in [1.5, 2.25].
    early = request(0.0, 1.0, [0.125] * 10, [1] * 11)
    late = request(0.5, 1.0, [0.125] * 10, [1] * 11)
    window = stack_cost.steady_window([early, late])
    assert (window.start_s, window.end_s) == (1.5, 2.25)
    # In (1.5, 2.25]: 1.625 .. 2.25 of each (the chunk at 1.5 opens the window).
    assert window.tokens == 12
    assert window.tokens_per_s == 16


def test_the_window_counts_chunks_of_several_tokens_scaled_to_the_server_count() -> None:
    # Two tokens a chunk by the tokenizer's count, but the server says 33 in all: 3 a chunk.
    r = request(0.0, 0.0, [0.125] * 10, [2] * 11)
    r["output_len"] = 33
    other = request(0.0, 0.25, [0.125] * 5, [1] * 6)  # decoding from 0.25 s to 0.875 s
    window = stack_cost.steady_window([r, other])
    assert (window.start_s, window.end_s) == (0.25, 0.875)
    # r's chunks at 0.375 .. 0.875 (5 of 3 tokens), other's at 0.375 .. 0.875 (5 of 1).
    assert window.tokens == pytest.approx(5 * 3 + 5)


def test_no_window_when_the_requests_never_decode_together() -> None:
    first = request(0.0, 0.1, [0.1] * 3, [1] * 4)  # ends at 0.4 s
    second = request(0.5, 0.1, [0.1] * 3, [1] * 4)  # starts at 0.6 s
    with pytest.raises(ValueError, match="no span with all 2 requests decoding"):
        stack_cost.steady_window([first, second])


def test_no_window_under_a_step() -> None:
    # Chunks at 0.1 .. 0.4 s; the other's three first in a burst at 0.31 s, its last at 0.39 s:
    # in (0.31, 0.39] only that last one, a token for two requests.
    steady = request(0.0, 0.1, [0.1] * 3, [1] * 4)
    burst = request(0.0, 0.31, [0.0, 0.0, 0.08], [1] * 4)
    with pytest.raises(ValueError, match="less than a step"):
        stack_cost.steady_window([steady, burst])


def test_waves_without_a_window_are_skipped_with_the_reason() -> None:
    steady = request(0.0, 1.0, [0.125] * 10, [1] * 11)
    burst = request(0.0, 2.25, [0.0] * 10, [1] * 11)  # every chunk at once, at the end
    waves = [{"requests": [steady, burst], "output_throughput": 5.0},
             {"requests": [steady, steady], "output_throughput": 9.0}]  # fmt: skip
    windows, rates, skipped = stack_cost.count_waves(waves)
    assert [(w.start_s, w.end_s) for w in windows] == [(1.0, 2.25)] and rates == [9.0]
    (why,) = skipped
    assert "no span with all 2 requests decoding" in why


def test_worker_flags_rebuild_the_offline_engine_config() -> None:
    config = EngineConfig(
        model_path="m", dtype="bfloat16", seed=3, page_size=32, num_pages=100,
        context_length=400, chunked_prefill_size=4096, max_prefill_tokens=8192,
        max_running_requests=64, attention_backend="torch", disable_cuda_graph=True,
        disable_overlap_schedule=True, cuda_graph_max_bs=32, gemm_backend="torch",
    )  # fmt: skip
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    served = engine_config_from_args(
        parser.parse_args(["--model-path", "m", *stack_cost.worker_flags(config)])
    )
    # All but the KV pool's size, which the worker sizes from memory.
    assert dataclasses.replace(served, num_pages=100) == config


def test_stack_cost_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stack.json"
    # 32 tokens: on the CPU about 0.2 s of decode, so a short stall of a loaded host does not
    # swallow the whole span; a wave that still has none is rerun (--retries, 2 by default).
    argv = ["--device", "cpu", "--batches", "2", "--input-len", "8", "--output-len", "32",
            "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert stack_cost.main(argv) == 0
    text = capsys.readouterr().out
    assert "| batch | context | offline step ms | offline tok/s | served tok/s |" in text
    assert "| 2 | 8+32 |" in text
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["batch"] == 2 and row["offline_tok_s"] > 0 and row["served_tok_s"] > 0
    assert row["stack_cost"] == pytest.approx(1 - row["served_tok_s"] / row["offline_tok_s"])
    assert 1 <= row["window_steps"] < 32
    (window,) = report["served_waves"]["2"]["windows"]
    assert window["end_s"] > window["start_s"] > 0
    assert report["target"] == 0.1 and "--max-running-requests" in report["worker_flags"]
    assert (tmp_path / "stack-runs" / "serving-b2.json").exists()
