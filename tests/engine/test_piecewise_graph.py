"""Prefills through CUDA graphs captured in pieces (engine/piecewise_graph.py): the buckets and
the settings here; the captured pieces themselves on a GPU (tests/gpu/test_piecewise_graph.py)."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pytest
import torch

from decode_worker import MODES
from engine.cli import add_engine_args, engine_config_from_args
from engine.config import EngineConfig
from engine.engine import Engine
from engine.piecewise_graph import PiecewiseGraphs, piecewise_buckets
from worker.args import build_parser, worker_engine_config


def test_buckets_pad_little() -> None:
    buckets = piecewise_buckets(2048)
    assert buckets[:6] == [8, 16, 32, 64, 96, 128]
    assert buckets[-3:] == [1792, 1920, 2048]
    assert buckets == sorted(set(buckets))
    # The most a batch pads: 31 tokens up to 256, 127 beyond.
    steps = list(itertools.pairwise(buckets))
    assert max(b - a for a, b in steps if a < 256) <= 32
    assert max(b - a for a, b in steps) == 128


@pytest.mark.parametrize(
    ("limit", "last"), [(1, [1]), (8, [8]), (100, [64, 96, 100]), (300, [256, 300])]
)
def test_buckets_end_at_the_limit(limit: int, last: list[int]) -> None:
    assert piecewise_buckets(limit)[-len(last) :] == last


def test_no_buckets_when_off() -> None:
    assert piecewise_buckets(0) == []


def test_the_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="piecewise_cuda_graph_max_tokens must be >= 0"):
        EngineConfig(model_path="m", piecewise_cuda_graph_max_tokens=-1)


def test_flags_reach_the_engine_config() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(
        ["--disable-piecewise-cuda-graph", "--piecewise-cuda-graph-max-tokens", "512"]
    )
    config = engine_config_from_args(args)
    assert config.disable_piecewise_cuda_graph
    assert config.piecewise_cuda_graph_max_tokens == 512
    default = engine_config_from_args(parser.parse_args([]))
    assert not default.disable_piecewise_cuda_graph
    assert default.piecewise_cuda_graph_max_tokens == 1024


@pytest.mark.parametrize(
    ("mode", "flags", "tokens"),
    [
        ("decode", [], 0),  # prefills only to recompute: no capture unless asked
        ("decode", ["--piecewise-cuda-graph-max-tokens", "256"], 256),
        ("null", [], 1024),
    ],
)
def test_a_decode_worker_captures_no_prefill_graphs_by_default(
    mode: str, flags: list[str], tokens: int
) -> None:
    args = build_parser(MODES).parse_args(["--disaggregation-mode", mode, *flags])
    assert worker_engine_config(args).piecewise_cuda_graph_max_tokens == tokens


def test_cpu_prefills_run_eagerly(tiny_models: dict[str, Path]) -> None:
    engine = Engine(EngineConfig(model_path=str(tiny_models["llama"]), num_pages=64))
    assert engine.runner.pieces is None


@pytest.mark.parametrize("family", ["llama", "deepseek-v3"])
def test_a_bucket_longer_than_the_context_captures_as_several_sequences(
    tiny_models: dict[str, Path], family: str
) -> None:
    """The capture's padding batch of a bucket longer than a page-table row maps (a small
    `--context-length`, or a batch of several prompts) is several sequences on the scratch
    row, every slot on the scratch page; the model runs on it (before, one sequence of the
    bucket's length indexed past the row: a device-side assert at start on a GPU)."""
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models[family]), num_pages=64, page_size=4, context_length=40
        )
    )
    runner = engine.runner
    row_tokens = runner.page_table.width * 4
    assert row_tokens < 100
    fb = PiecewiseGraphs(runner, 128)._padding_batch(100)
    lens = list(fb.host_extend_lens)
    assert sum(lens) == 100 and max(lens) == row_tokens and len(lens) == -(-100 // row_tokens)
    scratch = int(runner.page_table.table[runner.page_table.scratch_row, 0])
    assert torch.equal(fb.out_slots // 4, torch.full((100,), scratch))
    with torch.inference_mode():
        hidden = runner.model(fb)
    assert hidden.shape[0] == 100 and bool(hidden.isfinite().all())
    assert engine.num_free_pages == engine.pool.num_pages
