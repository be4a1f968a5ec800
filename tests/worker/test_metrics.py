"""The worker's TTFT phase histograms, without a worker."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import PHASES, WorkerMetrics, observe_phases, prefill_phases


def sums_and_counts(metrics: WorkerMetrics) -> dict[str, tuple[float, float]]:
    """{family name: (sum, count)} of every histogram of `metrics`."""
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            values = {s.name[len(family.name) :]: s.value for s in family.samples}
            out[family.name] = (values["_sum"], values["_count"])
    return out


def test_phases_observe_once_each_with_the_workers_labels() -> None:
    metrics = WorkerMetrics("prefill", "w:1", "m")
    phases = prefill_phases(received=1.0, started=1.25, sampled=2.0)
    assert phases == {"prefill_queue": 0.25, "prefill_compute": 0.75}
    observe_phases(metrics, {**phases, "handoff_wait": -0.001})  # raced stamps: counted as 0
    seen = sums_and_counts(metrics)
    assert seen[PHASES["prefill_queue"][0]] == (0.25, 1)
    assert seen[PHASES["prefill_compute"][0]] == (0.75, 1)
    assert seen[PHASES["handoff_wait"][0]] == (0.0, 1)
    assert seen[PHASES["decode_pickup"][0]] == (0.0, 0)
    text = generate_latest(metrics.registry).decode()
    assert 'pdserve:prefill_queue_seconds_bucket{le="0.0001",model_name="m",role="prefill"' in text


def test_an_unknown_start_observes_no_prefill_phase() -> None:
    assert prefill_phases(received=1.0, started=None, sampled=2.0) == {}


def test_observe_phases_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    metrics = WorkerMetrics("decode", "w:1", "m")
    with pytest.raises(ValueError, match="unknown TTFT phases"):
        metrics.observe_phases({"nonsense": 1.0})
    with caplog.at_level(logging.WARNING):
        observe_phases(metrics, {"nonsense": 1.0})
        observe_phases(None, {"decode_pickup": 1.0})
    assert "could not observe TTFT phases" in caplog.text
