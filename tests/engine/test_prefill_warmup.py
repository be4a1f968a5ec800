"""The prefill warm-up at start (engine/prefill_warmup.py): which prefills it runs, that they
run through the scratch row without taking a page or changing what the engine computes after,
and its switch. Whether it leaves no compilation to requests is checked on a GPU
(tests/gpu/test_prefill_warmup.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from decode_worker import MODES
from engine.cli import add_engine_args, engine_config_from_args
from engine.config import EngineConfig
from engine.engine import Engine
from engine.prefill_warmup import (
    PREFIX,
    WarmBatch,
    run_scratch_prefill,
    scratch_prefill,
    warm_up_prefill,
    warmup_batches,
)
from engine.sampling import SamplingParams
from tests.engine.reference import make_prompts
from worker.args import build_parser, worker_engine_config


@pytest.mark.parametrize(
    ("first", "budget", "pieces", "row"),
    [(257, 8192, 1024, 4096), (1, 8192, 0, 32768), (9, 100, 64, 40), (1, 40, 0, 20), (1, 5, 0, 3)],
)
def test_every_count_class_and_attention_kind(
    first: int, budget: int, pieces: int, row: int
) -> None:
    batches = warmup_batches(first, budget, pieces, row, short_extend=16)
    counts = {b.num_tokens for b in batches}
    eager_first = max(first, pieces + 1)
    # Every power of two and the count below it in range (divisible by 16 and not, and the
    # tile tables' octaves), the ends, and the first eager count.
    want = {first, budget, budget - 1, eager_first}
    want |= {c for k in range(20) for c in (2**k, 2**k - 1)}
    assert counts == {c for c in want if first <= c <= budget}
    assert len(batches) == len(set(batches))
    for b in batches:
        assert len(b.extend_lens) == len(b.prefix_lens) >= 1
        assert all(n >= 1 for n in b.extend_lens)
        assert all(n + p <= row for n, p in zip(b.extend_lens, b.prefix_lens, strict=True))
    # The attention's kinds, through the pieces and eagerly: short sequences (other tiles)
    # without and with a cached prefix, and long ones over a prefix.
    for tokens in {min(pieces, budget), eager_first} & set(range(first, budget + 1)):
        kinds = {
            (max(b.extend_lens) <= 16, b.prefix_lens[0]) for b in batches if b.num_tokens == tokens
        }
        assert (True, 0) in kinds
        if row > PREFIX:
            assert (True, PREFIX) in kinds
            assert (tokens <= 16, PREFIX) in kinds


def test_nothing_to_warm_up() -> None:
    assert warmup_batches(300, 256, 0, 4096, 512) == []


def run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    return [r.output_ids for r in engine.generate(prompts, params)]


def small_engine(path: Path, backend: str) -> Engine:
    return Engine(
        EngineConfig(
            model_path=str(path),
            num_pages=64,
            page_size=4,
            context_length=48,
            chunked_prefill_size=40,
            max_running_requests=4,  # the sampling warm-up: batches of 1 to 4
            attention_backend=backend,
            moe_backend=backend,
        )
    )


@pytest.mark.parametrize("family", ["llama", "deepseek-v3"])
def test_the_warm_up_takes_no_page_and_changes_nothing(
    tiny_models: dict[str, Path], family: str
) -> None:
    """Run on the CPU (where the engine skips it) with the torch backend: every prefill on the
    scratch row, the pool whole after, and the engine's greedy tokens those of one that never
    warmed up."""
    fresh, warmed = (small_engine(tiny_models[family], "torch") for _ in range(2))
    runner = warmed.runner
    assert runner.warmup_prefills == 0  # not on the CPU
    scratch = int(runner.page_table.table[runner.page_table.scratch_row, 0])
    for batch in warmup_batches(1, 40, 0, 48, 16):
        ids = torch.zeros(batch.num_tokens, dtype=torch.int64)
        fb = scratch_prefill(runner, ids, batch)
        assert torch.equal(fb.out_slots // 4, torch.full((batch.num_tokens,), scratch))
        assert fb.host_prefix_lens == batch.prefix_lens
    prefills, seconds = warm_up_prefill(runner)
    assert prefills == len(warmup_batches(1, 40, 0, 48, 512)) and seconds >= 0
    assert warmed.num_free_pages == warmed.pool.num_pages
    prompts = make_prompts(warmed.model_config.vocab_size)[:3]
    assert run(warmed, prompts) == run(fresh, prompts)
    assert warmed.num_free_pages == warmed.pool.num_pages


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
def test_the_triton_kernels_take_its_batches(tiny_models: dict[str, Path], family: str) -> None:
    """The Triton backends (under the interpreter) on the warm-up's kinds of batch through the
    scratch row: several sequences, short ones over a cached prefix (MLA reads its context's
    latents from the scratch page), a long one over a prefix."""
    engine = small_engine(tiny_models[family], "triton")
    kinds = [
        WarmBatch((20, 19), (0, 0)),
        WarmBatch((3, 3, 1), (PREFIX,) * 3),
        WarmBatch((25,), (PREFIX,)),
    ]
    for batch in kinds:
        run_scratch_prefill(engine.runner, torch.zeros(batch.num_tokens, dtype=torch.int64), batch)
    assert engine.num_free_pages == engine.pool.num_pages


@pytest.mark.parametrize(
    ("mode", "flags", "off"),
    [
        ("null", [], False),
        ("null", ["--disable-prefill-warmup"], True),
        ("decode", [], True),  # prefills only to recompute a preempted request
    ],
)
def test_the_switch(mode: str, flags: list[str], off: bool) -> None:
    args = build_parser(MODES).parse_args(["--disaggregation-mode", mode, *flags])
    assert worker_engine_config(args).disable_prefill_warmup == off
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args(flags)).disable_prefill_warmup == bool(flags)


def test_a_failing_prefill_stops_the_start_in_one_line(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that fails in the warm-up (one that does not compile on the device) is a start
    error naming the switch; running out of memory names the flags to lower."""
    runner = small_engine(tiny_models["llama"], "torch").runner

    class Failing:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def __call__(self, batch: object) -> None:
            raise self.error

    def fails(error: Exception) -> None:
        monkeypatch.setattr(runner, "model", Failing(error))

    fails(RuntimeError("PTX compile failed\nmore detail"))
    with pytest.raises(
        ValueError, match=r"RuntimeError: PTX compile failed\);.*--disable-prefill-warmup"
    ):
        warm_up_prefill(runner)
    fails(torch.OutOfMemoryError("no memory"))
    with pytest.raises(
        ValueError, match=r"lower --chunked-prefill-size \(now 40\) or --mem-fraction"
    ):
        warm_up_prefill(runner)
