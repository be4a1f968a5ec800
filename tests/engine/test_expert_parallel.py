"""Expert-parallel decode over N CPU processes (gloo): same tokens as transformers, and EPLB."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.sampling import SamplingParams
from tests.engine.ep_driver import run_expert_parallel
from tests.engine.reference import MAX_NEW_TOKENS, reference

GREEDY = SamplingParams(temperature=0, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def assert_pages_balance(report: dict) -> None:
    for load in report["loads"]:
        assert load["num_running"] == load["num_waiting"] == 0, load
        assert load["num_free_pages"] == load["num_total_pages"], load


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_transformers(
    tiny_models: dict[str, Path], family: str, world: int
) -> None:
    ref = reference(tiny_models[family])
    # Seven prompts over `world` data-parallel ranks: ranks finish at different times, so idle
    # ranks run empty batches to keep the all-to-alls paired.
    report = run_expert_parallel(
        tiny_models[family], world, ref.prompts, GREEDY, num_pages=256, page_size=16
    )
    assert report["tokens"] == ref.tokens
    assert_pages_balance(report)


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
def test_eplb_rebalance_keeps_tokens_and_lowers_imbalance(
    tiny_models: dict[str, Path], family: str
) -> None:
    ref = reference(tiny_models[family], max_new_tokens=24)
    # A skewed workload: the same few tokens over and over route to few experts.
    skewed = [[7, 7, 7, 9] * 6] * 4
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    report = run_expert_parallel(
        tiny_models[family],
        2,
        [*ref.prompts, *skewed],
        params,
        num_redundant=2,
        rebalance_after=6,
        num_pages=256,
        page_size=16,
    )
    # Redundant copies and moved weights change where experts run, never what they compute.
    assert report["tokens"][: len(ref.prompts)] == ref.tokens
    assert len(set(map(tuple, report["tokens"][len(ref.prompts) :]))) == 1
    assert_pages_balance(report)
    imbalance = report["rebalance"]
    assert imbalance, "the rebalance did not run"
    for layer, (before, after) in imbalance.items():
        print(f"{family} {layer}: costliest rank / mean (step cost) {before:.3f} -> {after:.3f}")
        assert after <= before + 1e-9, (layer, before, after)
    assert any(after < before for before, after in imbalance.values())
