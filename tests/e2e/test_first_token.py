"""A streamed disaggregated request's first token comes from the prefill worker's reply, with
real workers, Mooncake and the router as processes: it reaches the client while the KV write
is still held back (PDSERVE_TRANSFER_FAULTS delays it), and a write that fails after it went
out migrates the request with the greedy output intact and every page freed."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from kv_transfer.faults import ENV
from tests.e2e.procs import worker
from tests.router.procs import call, metric, router_process, sse_events, wait_idle

MODEL = "qwen3-moe"
PROMPT = list(range(3, 40))
MAX_NEW = 12
# The faulty engine draws, per batch write, its delay (uniform 0..delay_ms) then its drop
# (random() < drop) from random.Random(seed). Seed 2's first delay is 0.956 * DELAY_MS.
DELAY_MS, DELAY_SEED = 2000.0, 2
# Seed 32 with drop 0.5: the first write is dropped, the next three are not.
DROP, DROP_SEED = 0.5, 32
# Long enough for the delayed write; the decode worker waits this long for the pages.
SLOW_HANDOFF = ("--transfer-timeout", "10")


def first_write_delay_s() -> float:
    return random.Random(DELAY_SEED).uniform(0, DELAY_MS) / 1000


def drops(seed: int, writes: int) -> list[bool]:
    """Which of the first writes the lossy worker drops (its delay draw comes first)."""
    rng = random.Random(seed)
    dropped = []
    for _ in range(writes):
        rng.uniform(0, 0)
        dropped.append(rng.random() < DROP)
    return dropped


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models[MODEL]


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[int]:
    engine = Engine(EngineConfig(model_path=str(model_dir), num_pages=64))
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)
    [result] = engine.generate([PROMPT], params)
    return list(result.output_ids)


@pytest.fixture(scope="module")
def workers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A decode worker; a prefill worker whose first KV write takes about 2 s; one whose first
    write is dropped."""
    logs = tmp_path_factory.mktemp("logs")
    slow = {ENV: f"delay_ms={DELAY_MS},seed={DELAY_SEED}"}
    lossy = {ENV: f"drop={DROP},seed={DROP_SEED}"}
    with (
        worker("decode", model_dir, *SLOW_HANDOFF, log_dir=logs) as (_, decode),
        worker("prefill", model_dir, *SLOW_HANDOFF, log_dir=logs, env=slow) as (_, slow_p),
        worker("prefill", model_dir, *SLOW_HANDOFF, log_dir=logs, env=lossy) as (_, lossy_p),
    ):
        yield {"decode": decode, "slow": slow_p, "lossy": lossy_p}


def body(stream: bool, **extra: Any) -> dict[str, Any]:
    sampling = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    return {"input_ids": PROMPT, "sampling_params": sampling, "stream": stream, **extra}


def timed_stream(url: str, request: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """The stream's events (cumulative output ids) with their arrival times since the POST."""
    start = time.monotonic()
    return [
        (time.monotonic() - start, event)
        for event in sse_events(url + "/generate", request)
        if event != "[DONE]"
    ]


def test_first_token_arrives_while_the_kv_write_is_held_back(
    model_dir: Path, workers: dict[str, str], expected: list[int]
) -> None:
    delay = first_write_delay_s()
    assert delay > 1.8  # what the seed gives; the test rests on it
    flags = ("--prefill", workers["slow"], "--decode", workers["decode"])
    with router_process(model_dir, *flags) as (_, url):
        events = timed_stream(url, body(stream=True))
        # The first event carries the first token alone; the next waits for the pages.
        (t_first, first), (t_second, second) = events[0], events[1]
        assert first["output_ids"] == expected[:1]
        assert len(second["output_ids"]) > 1
        assert t_second - t_first > 0.8 * delay, (t_first, t_second)
        assert events[-1][1]["output_ids"] == expected

        # Not streamed: nothing asked of the prefill worker, same tokens, same logprobs as a
        # stream whose first token came from the prefill worker.
        status, whole = call(url + "/generate", "POST", body(stream=False, return_logprob=True))
        assert status == 200 and whole["output_ids"] == expected
        streamed = timed_stream(url, body(stream=True, return_logprob=True))[-1][1]
        assert streamed["output_ids"] == expected
        assert (
            streamed["meta_info"]["output_token_logprobs"]
            == whole["meta_info"]["output_token_logprobs"]
        )
    wait_idle(workers["slow"], "prefill")
    wait_idle(workers["decode"], "decode")


def test_write_dropped_after_the_first_token_migrates_exactly(
    model_dir: Path, workers: dict[str, str], expected: list[int]
) -> None:
    assert drops(DROP_SEED, 4) == [True, False, False, False]
    flags = ("--prefill", workers["lossy"], "--decode", workers["decode"])
    with router_process(model_dir, *flags) as (_, url):
        events = timed_stream(url, body(stream=True))
        # The first token came from the attempt whose write failed; the request then moved
        # (prompt plus that token) to a fresh attempt, with nothing repeated or missing.
        assert events[0][1]["output_ids"] == expected[:1]
        assert events[-1][1]["output_ids"] == expected
        assert events[-1][1]["meta_info"]["completion_tokens"] == MAX_NEW
        assert metric(url, "pdserve:router_migrations_total") == 1
        assert metric(url, "pdserve:router_retries_total") == 0
    wait_idle(workers["lossy"], "prefill")
    wait_idle(workers["decode"], "decode")
