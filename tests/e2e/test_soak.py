"""`make soak` in its short form (bench/soak.py): a real cluster under mixed load while
workers are stopped and killed, Redis is killed and KV writes are delayed and dropped."""

from __future__ import annotations

from pathlib import Path

from bench.soak import run


def test_short_chaos_soak(tiny_models: dict[str, Path]) -> None:
    report = run(
        duration_s=20,
        concurrency=4,
        fault_interval_s=4,
        stop_s=2,
        kinds=("stop_prefill", "kill_redis", "kill_decode", "stop_decode"),
        seed=5,
    )
    assert report.requests > 100
    assert len(report.faults) >= 3
    assert report.hung == 0, report
    assert report.mismatched == 0, report
    assert report.leaked_workers == [], report
    assert report.lost_outside_windows == 0, report
    assert report.ok >= 0.9 * (report.requests - report.disconnected), report
