"""bench/kv_transfer_gpu.py's timing without a GPU: a case whose first call is slow is timed
once more only (the 1-token scattered cases in memcpy and batch modes took 0.5-1 s a call on
the H200, 13 calls each by default), the others `--warmup` plus `--reps` calls."""

from __future__ import annotations

import time

import pytest

from bench import kv_transfer_gpu


@pytest.mark.parametrize(
    ("call_s", "warmup", "reps", "calls"),
    [
        (0.0, 3, 10, 13),  # fast: warm-up, then the median of 10
        (0.0, 0, 2, 2),  # no warm-up: the first call is one of the reps
        (0.03, 3, 10, 2),  # slow: the first call as warm-up, one timed
        (0.03, 0, 5, 1),  # slow, no warm-up: the first call is the result
    ],
)
def test_slow_cases_are_timed_once(
    monkeypatch: pytest.MonkeyPatch, call_s: float, warmup: int, reps: int, calls: int
) -> None:
    monkeypatch.setattr(kv_transfer_gpu, "SLOW_CALL_S", 0.02)
    made = []

    def call() -> None:
        made.append(1)
        time.sleep(call_s)

    seconds = kv_transfer_gpu.timed(call, warmup, reps)
    assert len(made) == calls
    assert seconds >= call_s
