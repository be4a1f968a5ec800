"""Where a prefill's wall time goes: the host's phases of each step beside the device's.

    python -m bench.prefill_phases --preset moonlight-16b-a3b --prefill 64x128,8x2048

Same engine, model and shapes as `bench.engine` (its flags), pdserve only. Each shape is
prefilled once to warm up, then `--repeats` times with the engine's own methods timed on the
host (`time.perf_counter`) and, on CUDA, CUDA events recorded between them:

- host: the scheduler's `schedule`, the runner's `prepare` (the step's inputs), the model's
  launches (the forward pass less `prepare`), the sampler's launches, the wait for the sampled
  ids (`_apply` less the scheduler's `postprocess`) and `postprocess` itself;
- device: the forward pass from its first upload to the end of `prepare` (the inputs' copies),
  from there to its last kernel (the model), and the sampling after it.

Where the model's launches take the host as long as the model takes the device, the host
bounds the step; the device is idle for the host's time before the forward pass starts
(`schedule`, `prepare`) and after it ends (`postprocess`). Printed per shape: medians over the
repeats, in ms per prefill (a prefill of several steps sums them; `--step-tokens N` splits it
into steps of N prompt tokens, as a server's default chunked prefill size does, and then
overlapped scheduling launches each step before the one before it is applied). `--host-profile N`
also prints the N functions with the most host time of one more prefill of each shape, under
`cProfile` (which slows the host: its times are for ranking, not the table's).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.engine import (
    _check_no_hits,
    engine_config,
    parse_args,
    pdserve_prefill,
    random_prompts,
    submit,
    write_preset,
)
from engine.engine import Engine

HOST = ("schedule", "prepare", "model", "sample", "wait", "postprocess")
DEVICE = ("inputs", "model", "sample")


class Phases:
    """Host seconds and CUDA events of one prefill, summed over its steps."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.host: dict[str, float] = defaultdict(float)
        self.marks: list[dict[str, Any]] = []  # per forward pass: event name -> CUDA event
        self.forwards = 0

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[-1][name] = event

    def device_ms(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for m in self.marks:
            if {"start", "inputs", "model", "sample"} <= m.keys():
                out["inputs"] += m["start"].elapsed_time(m["inputs"])
                out["model"] += m["inputs"].elapsed_time(m["model"])
                out["sample"] += m["model"].elapsed_time(m["sample"])
        return out


def _timed(phases: Phases, name: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            phases.host[name] += time.perf_counter() - start

    return wrapper


@contextmanager
def instrumented(engine: Engine, phases: Phases) -> Iterator[None]:
    """The engine's step phases timed into `phases` while active (instance attributes that
    shadow the methods, deleted after)."""
    runner, scheduler = engine.runner, engine.scheduler
    forward, prepare, sample = runner.forward, runner.prepare, engine._sample

    def timed_forward(batch: Any) -> Any:
        phases.marks.append({})
        phases.forwards += 1
        phases.mark("start")
        start = time.perf_counter()
        out = forward(batch)
        phases.host["forward"] += time.perf_counter() - start
        phases.mark("model")
        return out

    def timed_prepare(batch: Any) -> Any:
        out = _timed(phases, "prepare", prepare)(batch)
        phases.mark("inputs")
        return out

    def timed_sample(*args: Any, **kwargs: Any) -> Any:
        out = _timed(phases, "sample", sample)(*args, **kwargs)
        phases.mark("sample")
        return out

    patches: list[tuple[Any, str, Any]] = [
        (runner, "forward", timed_forward),
        (runner, "prepare", timed_prepare),
        (engine, "_sample", timed_sample),
        (engine, "_apply", _timed(phases, "apply", engine._apply)),
        (scheduler, "schedule", _timed(phases, "schedule", scheduler.schedule)),
        (scheduler, "postprocess", _timed(phases, "postprocess", scheduler.postprocess)),
    ]
    for obj, name, fn in patches:
        setattr(obj, name, fn)
    try:
        yield
    finally:
        for obj, name, _ in patches:
            delattr(obj, name)


def measure_prefill(
    engine: Engine, prompts: torch.Tensor
) -> tuple[float, dict[str, float], dict[str, float]]:
    """One prefill of `prompts` (one token each): its wall ms, the host's ms by phase (`HOST`)
    and the device's (`DEVICE`, empty off CUDA)."""
    phases = Phases(engine.device.kind == "cuda")
    with instrumented(engine, phases):
        wall = pdserve_prefill(engine, prompts)  # bench.engine's own prefill measurement
    h = phases.host
    host = {
        "schedule": h["schedule"],
        "prepare": h["prepare"],
        "model": h["forward"] - h["prepare"],
        "sample": h["sample"],
        "wait": h["apply"] - h["postprocess"],
        "postprocess": h["postprocess"],
    }
    host_ms = {k: 1000 * v for k, v in host.items()}
    host_ms["steps"] = phases.forwards
    return 1000 * wall, host_ms, phases.device_ms()


def render(rows: list[tuple[str, float, dict[str, float], dict[str, float]]]) -> str:
    head = ["prefill BxL", "steps", "wall ms"]
    head += [f"host {k}" for k in HOST] + ["host other"] + [f"device {k}" for k in DEVICE]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for shape, wall, host, device in rows:
        other = wall - sum(host[k] for k in HOST)
        cells = [shape, f"{host.get('steps', 1):.0f}", f"{wall:.2f}"]
        cells += [f"{host[k]:.2f}" for k in HOST] + [f"{other:.2f}"]
        cells += [f"{device[k]:.2f}" if k in device else "-" for k in DEVICE]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def median_run(
    runs: list[tuple[float, dict[str, float], dict[str, float]]],
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Each figure's median over the runs."""
    wall = statistics.median(r[0] for r in runs)
    host = {k: statistics.median(r[1][k] for r in runs) for k in (*HOST, "steps")}
    device = {k: statistics.median(r[2][k] for r in runs) for k in DEVICE if k in runs[0][2]}
    return wall, host, device


def host_profile(engine: Engine, prompts: torch.Tensor, top: int) -> str:
    """The `top` functions by their own host time over one prefill of `prompts`, then the
    `top` by their cumulative time (what each of the model's calls costs with its callees)."""
    submit(engine, prompts, max_new_tokens=1)
    engine.device.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    while engine.has_unfinished():
        _check_no_hits(engine.step())
    engine.device.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--host-profile", type=int, default=0, metavar="N")
    extra.add_argument(
        "--step-tokens",
        type=int,
        help="prompt tokens a prefill step takes (the engine's chunked prefill size; the "
        "server's default is 8192): a prefill of more runs as several steps back to back "
        "(default: the whole prefill in one step, as bench.engine)",
    )
    ours, rest = extra.parse_known_args(argv if argv is not None else sys.argv[1:])
    args = parse_args([*rest, "--skip-hf", "--decode", ""])
    if not args.prefill:
        sys.exit("bench.prefill_phases: give --prefill shapes")
    with tempfile.TemporaryDirectory(prefix="pdserve-phases-") as tmp:
        if args.preset:
            path, load_format = (
                str(write_preset(args.preset, Path(tmp), args.preset_layers)),
                "dummy",
            )
        else:
            path, load_format = args.model_path, args.load_format
        config = engine_config(args, path, load_format)
        if ours.step_tokens:
            step = ours.step_tokens
            config = replace(config, chunked_prefill_size=step, max_prefill_tokens=step)
        engine = Engine(config)
    vocab = engine.model_config.vocab_size
    rows = []
    for i, shape in enumerate(args.prefill):
        measure_prefill(engine, random_prompts(shape, vocab, seed=100 + i))  # warm-up
        runs = [
            measure_prefill(engine, random_prompts(shape, vocab, seed=200 + 10 * i + r))
            for r in range(args.repeats)
        ]
        wall, host, device = median_run(runs)
        rows.append((str(shape), wall, host, device))
        if ours.host_profile:
            prompts = random_prompts(shape, vocab, seed=300 + i)
            text = host_profile(engine, prompts, ours.host_profile)
            print(f"### host profile, prefill {shape}\n{text}")
    name = torch.cuda.get_device_name() if engine.device.kind == "cuda" else engine.device.kind
    print(f"{name}, overlap {engine.overlap}; medians of {args.repeats} runs, ms a prefill")
    pieces = engine.runner.pieces
    if pieces is not None:
        print(f"prefills of up to {pieces.max_tokens} tokens through piecewise graphs: "
              f"{pieces.describe()}, {pieces.runs} prefills ran in pieces")  # fmt: skip
    print()
    print(render(rows))


if __name__ == "__main__":
    main()
