"""Where a decode step's device time goes: the kernels of pdserve's decode steps, from the
profiler, per step and against the step's bytes floor.

    python -m bench.profile_decode --preset llama3-8b --decode 1x128,64x128,256x512
    python -m bench.profile_decode --preset qwen3-30b-a3b --decode 1x128 --top 30
    python -m bench.profile_decode --preset moonlight-16b-a3b --decode '' --profile-prefill 64x128

Same engine, model and shapes as `bench.engine` (its flags), pdserve only. For each decode
shape, B prompts are prefilled, a few steps warm up, then `--profile-steps` steps run under
`torch.profiler` (CUDA graph replays included: the profiler sees the kernels inside them).
Prints, per shape: each kernel's calls and microseconds per step, its share of the device
time, and the device time beside the floor (the bytes the step must read over the measured
copy bandwidth), then the same summed by kind (matmul, attention, MoE, norm/rope/act,
sampling, other). `--profile-prefill BxL,...` profiles prefills of B distinct L-token prompts
the same way (one warm-up prefill first), against the floor of their FLOPs over the measured
matrix-product rate. CUDA only.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engine import (
    ModelCost,
    Shape,
    decode_floor_ms,
    engine_config,
    measure_ceiling,
    model_cost,
    parse_args,
    pdserve_prefill,
    random_prompts,
    start_decode,
    write_preset,
)
from engine.engine import Engine

# Kinds by kernel name, first match wins (cuBLAS/cuBLASLt names vary by version: nvjet, sm90_xmma,
# cutlass, gemv; the Triton kernels are ours, named after their functions).
KINDS = (
    # The small MoE path's kernels first: "small_down_combine" is not attention's combine.
    ("MoE", r"moe|expert|grouped_gemm|align|_sort|topk|route|small_gate_up|small_down"),
    ("sampling", r"argmax"),  # its combine kernel is not attention's either
    ("attention", r"decode|extend|attention|flash|mla|_combine"),
    ("matmul", r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitk|sm90_"),
    ("norm/rope/act", r"rms|norm|rope|rotary|silu|gelu|act_and_mul|residual"),
    ("sampling", r"argmax|softmax|sample|multinomial|sort|cumsum|gumbel|penal|logit"),
    ("copy/fill", r"copy|fill|memset|memcpy|index|gather|scatter|cat"),
)

ACTIVITIES = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
DEVICE = torch.autograd.DeviceType.CUDA  # the events counted


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


@dataclass(frozen=True)
class KernelRow:
    name: str
    calls_per_step: float
    us_per_step: float


@dataclass(frozen=True)
class Timeline:
    """The profiled steps' device timeline, per step: from the first kernel's start to the
    last one's end (`span_us`), the time some kernel ran (`busy_us`, overlaps counted once),
    the idle gaps of at most `SMALL_GAP_US` (launch to launch inside a graph) and the longer
    ones, with the kernels they follow (graph boundaries, host waits)."""

    span_us: float
    busy_us: float
    small_gaps_us: float
    large_gaps_us: float
    large_gaps: tuple[tuple[str, float], ...]  # (the kernel before, µs per step), longest first
    # The longest gaps themselves, (start µs, end µs), longest first (at most LONGEST_GAPS).
    longest: tuple[tuple[float, float], ...] = ()


SMALL_GAP_US = 4.0
LONGEST_GAPS = 3


def timeline(prof: Any, steps: int) -> Timeline:
    """The device timeline of the profiled events (``Timeline``), per step."""
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == DEVICE
    )
    return timeline_of(spans, steps)


def timeline_of(spans: list[tuple[float, float, str]], steps: int) -> Timeline:
    """``Timeline`` of kernels given as (start µs, end µs, name), sorted by start."""
    if not spans:
        return Timeline(0.0, 0.0, 0.0, 0.0, ())
    busy = small = large = 0.0
    after: dict[str, float] = defaultdict(float)
    windows: list[tuple[float, float]] = []
    run_start, run_end, last = spans[0]
    for start, end, name in spans[1:]:
        if start > run_end:
            gap = start - run_end
            if gap <= SMALL_GAP_US:
                small += gap
            else:
                large += gap
                after[last] += gap
                windows.append((run_end, start))
            busy += run_end - run_start
            run_start = start
        if end >= run_end:
            run_end, last = end, name
    busy += run_end - run_start
    span = run_end - spans[0][0]
    gaps = sorted(((n, us / steps) for n, us in after.items()), key=lambda g: -g[1])
    longest = sorted(windows, key=lambda w: w[0] - w[1])[:LONGEST_GAPS]
    return Timeline(
        span / steps, busy / steps, small / steps, large / steps, tuple(gaps), tuple(longest)
    )


def host_during(
    events: list[tuple[float, float, str, str]], window: tuple[float, float], top: int = 5
) -> list[tuple[str, str, float]]:
    """What the host ran while the device idled over `window` (start, end µs): the host events
    (start µs, end µs, name, call site) overlapping it, as (name, call site, µs of overlap),
    the longest first. Nested events each count (an op and the ops it calls)."""
    lo, hi = window
    overlaps: dict[tuple[str, str], float] = defaultdict(float)
    for start, end, name, site in events:
        overlap = min(end, hi) - max(start, lo)
        if overlap > 0:
            overlaps[(name, site)] += overlap
    ranked = sorted(overlaps.items(), key=lambda kv: -kv[1])[:top]
    return [(name, site, us) for (name, site), us in ranked]


def host_events(prof: Any) -> list[tuple[float, float, str, str]]:
    """The profiled host events as (start µs, end µs, name, innermost pdserve call site)."""
    out = []
    for e in prof.events():
        if e.device_type == DEVICE:
            continue
        frames = [f for f in (e.stack or []) if "/site-packages/" not in f and "python3" not in f]
        out.append((e.time_range.start, e.time_range.end, e.name, frames[0] if frames else ""))
    return out


def render_host_gaps(t: Timeline, events: list[tuple[float, float, str, str]]) -> str:
    """The host's events during each of the timeline's longest gaps."""
    out = []
    for lo, hi in t.longest:
        out.append(f"  host during the {hi - lo:.0f} µs gap at {lo:.0f} µs:")
        # Enclosing frames cover the whole gap too: enough rows to reach the innermost ones.
        for name, site, us in host_during(events, (lo, hi), top=14):
            short = name if len(name) <= 50 else name[:47] + "..."
            out.append(f"    {us:8.1f} µs `{short}` {site}")
    return "\n".join(out)


def render_timeline(t: Timeline, top: int = 6) -> str:
    out = [
        f"timeline per step: {t.span_us:.1f} µs from first kernel to last, {t.busy_us:.1f} µs "
        f"busy, idle {t.small_gaps_us:.1f} µs in gaps of <= {SMALL_GAP_US:.0f} µs and "
        f"{t.large_gaps_us:.1f} µs in longer ones"
    ]
    for name, us in t.large_gaps[:top]:
        short = name if len(name) <= 70 else name[:67] + "..."
        out.append(f"  {us:8.1f} µs after `{short}`")
    return "\n".join(out)


def profile_shape(
    engine: Engine, shape: Shape, vocab: int, steps: int
) -> tuple[list[KernelRow], Timeline]:
    """The kernels of `steps` decode steps of `shape`, per step, most time first, and the
    steps' timeline."""
    warm = 3
    start_decode(engine, random_prompts(shape, vocab, seed=11), steps + warm + 4)
    for _ in range(warm):
        engine.step()
    engine.device.synchronize()
    with profile(activities=ACTIVITIES) as prof:
        for _ in range(steps):
            engine.step()
        engine.device.synchronize()
    while engine.has_unfinished():
        engine.step()
    return kernel_rows(prof, steps), timeline(prof, steps)


def kernel_rows(prof: Any, steps: int) -> list[KernelRow]:
    """The profiled device kernels per step, most time first."""
    total_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type != DEVICE:
            continue
        total_us[event.name] += event.time_range.elapsed_us()
        calls[event.name] += 1
    rows = [KernelRow(n, calls[n] / steps, us / steps) for n, us in total_us.items()]
    return sorted(rows, key=lambda r: -r.us_per_step)


def profile_prefill(
    engine: Engine, shape: Shape, vocab: int
) -> tuple[list[KernelRow], Timeline, str]:
    """The kernels of one prefill of `shape` (after one warm-up prefill of other prompts), its
    timeline, and what the host ran during the timeline's longest gaps (Python call sites
    recorded: `with_stack`)."""
    pdserve_prefill(engine, random_prompts(shape, vocab, seed=12))
    engine.device.synchronize()
    with profile(activities=ACTIVITIES, with_stack=True) as prof:
        pdserve_prefill(engine, random_prompts(shape, vocab, seed=13))
        engine.device.synchronize()
    line = timeline(prof, 1)
    return kernel_rows(prof, 1), line, render_host_gaps(line, host_events(prof))


def render(
    shape: Shape,
    rows: list[KernelRow],
    floor_ms: float,
    top: int,
    steps: int,
    phase: str = "decode",
) -> str:
    device_us = sum(r.us_per_step for r in rows)
    out = [
        f"### {phase} {shape}: {device_us / 1000:.3f} ms of kernels per step, floor "
        f"{floor_ms:.3f} ms ({device_us / 1000 / floor_ms:.2f}x), "
        f"{sum(r.calls_per_step for r in rows):.0f} kernels per step, {steps} steps profiled",
        "",
        "| kernel | kind | calls/step | µs/step | share |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows[:top]:
        name = r.name if len(r.name) <= 70 else r.name[:67] + "..."
        out.append(
            f"| `{name}` | {kind_of(r.name)} | {r.calls_per_step:.1f} | {r.us_per_step:.1f} "
            f"| {100 * r.us_per_step / device_us:.1f}% |"
        )
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        by_kind[kind_of(r.name)][0] += r.us_per_step
        by_kind[kind_of(r.name)][1] += r.calls_per_step
    out += ["", "| kind | kernels/step | µs/step | share |", "|---|---:|---:|---:|"]
    for kind, (us, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        out.append(f"| {kind} | {n:.0f} | {us:.1f} | {100 * us / device_us:.1f}% |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--profile-steps", type=int, default=8)
    extra.add_argument("--top", type=int, default=20, help="kernels listed per shape")
    extra.add_argument(
        "--profile-prefill",
        type=lambda text: [Shape.parse(t) for t in text.split(",") if t.strip()],
        default=[],
        help="BxL,...: prefills to profile (each the floor of its FLOPs at the matmul rate)",
    )
    ours, rest = extra.parse_known_args(argv)
    # The prefills to profile size the KV pool (each is one step) but are not run by bench.engine.
    shapes = ",".join(str(s) for s in ours.profile_prefill)
    args = parse_args([*rest, "--skip-hf", "--prefill", shapes])
    if not torch.cuda.is_available():
        sys.exit("bench.profile_decode needs a CUDA GPU (it reads the profiler's kernel times)")
    with tempfile.TemporaryDirectory(prefix="pdserve-profile-") as tmp:
        if args.preset:
            path, load_format = str(write_preset(args.preset, Path(tmp))), "dummy"
        else:
            path, load_format = args.model_path, args.load_format
        engine = Engine(engine_config(args, path, load_format))
    cost: ModelCost = model_cost(engine)
    ceiling = measure_ceiling(engine.device, engine.runner.dtype)
    vocab = engine.model_config.vocab_size
    print(
        f"{torch.cuda.get_device_name()}, copy {ceiling.copy_bytes_per_s / 1e9:.0f} GB/s, "
        f"attention {type(engine.runner.attention).__name__}, graphs "
        f"{'off' if engine.runner.graphs is None else 'on'}, overlap {engine.overlap}\n"
    )
    for shape in args.decode:
        rows, line = profile_shape(engine, shape, vocab, ours.profile_steps)
        floor = decode_floor_ms(cost, ceiling, shape, ours.profile_steps)
        print(render(shape, rows, floor, ours.top, ours.profile_steps), flush=True)
        print(render_timeline(line) + "\n", flush=True)
    dtype_bytes = torch.empty((), dtype=engine.runner.dtype).element_size()
    for shape in ours.profile_prefill:
        rows, line, host = profile_prefill(engine, shape, vocab)
        floor = 1000 * cost.prefill_flops(shape, dtype_bytes) / ceiling.matmul_flop_per_s
        print(render(shape, rows, floor, ours.top, 1, phase="prefill"), flush=True)
        print(render_timeline(line) + "\n" + host + "\n", flush=True)


if __name__ == "__main__":
    main()
