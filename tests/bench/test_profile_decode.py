"""bench.profile_decode's table on hand-made rows (the profiling itself needs CUDA)."""

from __future__ import annotations

from bench.engine import Shape
from bench.profile_decode import (
    KernelRow,
    host_during,
    kind_of,
    render,
    render_host_gaps,
    render_timeline,
    timeline_of,
)


def test_kernels_are_sorted_into_kinds() -> None:
    assert kind_of("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == "matmul"
    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kind_of("_decode_split_kernel") == "attention"
    assert kind_of("_fused_add_rmsnorm_kernel") == "norm/rope/act"
    assert kind_of("grouped_gemm_kernel") == "MoE"
    assert kind_of("small_gate_up_kernel") == kind_of("small_down_combine_kernel") == "MoE"
    assert kind_of("_decode_combine_kernel") == "attention"
    assert kind_of("_argmax_combine_kernel") == "sampling"
    assert kind_of("something_new") == "other"


def test_the_table_sums_to_the_device_time_and_sets_it_against_the_floor() -> None:
    rows = [KernelRow("nvjet_a", 2.0, 3000.0), KernelRow("_decode_split_kernel", 32.0, 1000.0)]
    text = render(Shape(1, 128), rows, floor_ms=3.2, top=1, steps=8)
    assert "4.000 ms of kernels per step" in text and "(1.25x)" in text
    assert "| `nvjet_a` | matmul | 2.0 | 3000.0 | 75.0% |" in text
    assert "_decode_split_kernel` |" not in text  # past --top
    assert "| attention | 32 | 1000.0 | 25.0% |" in text


def test_the_timeline_splits_idle_time_into_launch_gaps_and_longer_ones() -> None:
    # Two steps: kernels a and b overlap (counted once), a 2 µs launch gap, then 20 µs idle
    # after c (a graph boundary) before the second step's a.
    spans = [
        (0.0, 10.0, "a"),
        (5.0, 12.0, "b"),
        (14.0, 30.0, "c"),
        (50.0, 60.0, "a"),
        (61.0, 70.0, "c"),
    ]
    t = timeline_of(spans, steps=2)
    assert t.span_us == 35.0  # 70 µs over 2 steps
    assert t.busy_us == (12 + 16 + 10 + 9) / 2
    assert t.small_gaps_us == (2 + 1) / 2
    assert t.large_gaps_us == 10.0
    assert t.large_gaps == (("c", 10.0),)
    assert t.longest == ((30.0, 50.0),)
    text = render_timeline(t)
    assert "35.0 µs from first kernel to last, 23.5 µs busy" in text
    assert "10.0 µs after `c`" in text
    assert timeline_of([], 1).span_us == 0.0


def test_the_host_events_in_a_gap_are_ranked_by_overlap() -> None:
    # Device idle from 30 to 50 µs: a Python-side op covering most of it, a short one inside,
    # one before it.
    events = [
        (25.0, 48.0, "aten::tensor", "engine/model_runner.py(256): prepare"),
        (40.0, 42.0, "aten::empty", "engine/device.py(114): upload"),
        (0.0, 20.0, "aten::mm", "engine/layers/linear.py(30): forward"),
    ]
    assert host_during(events, (30.0, 50.0)) == [
        ("aten::tensor", "engine/model_runner.py(256): prepare", 18.0),
        ("aten::empty", "engine/device.py(114): upload", 2.0),
    ]
    t = timeline_of([(0.0, 30.0, "a"), (50.0, 60.0, "b")], steps=1)
    text = render_host_gaps(t, events)
    assert "host during the 20 µs gap at 30 µs:" in text
    assert "18.0 µs `aten::tensor` engine/model_runner.py(256): prepare" in text
