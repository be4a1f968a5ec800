"""Synchronizing CUDA calls in the back-to-back decode loop, on the GPU machine.

    python3 -m bench.gpu.sync_probe --preset moonlight-16b-a3b --decode 256x128

Moonlight 256 x 128 runs about 0.43 ms a step above its kernels' busy time (bench/NOTES.md):
device idle between or inside steps. This runs the engine's decode steps as a server does
(`Engine.step()` back to back, overlapped scheduling on) and reports each `step()` call's
host wall time (min / median / max: a call that waits on the device for longer than a step
shows as a long one), then the same steps under torch's sync debug mode (`warn`): every call
that synchronises the host with the device (a blocking copy, an `.item()`, a pageable upload),
counted by where in the engine it was made. The one intended wait, for the previous step's
tokens, is a CUDA event's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import torch

from bench import engine as bench_engine


def wrap_parts(engine: bench_engine.Engine, parts: dict[str, float]) -> None:
    """Add each part's host milliseconds within a `step()` call to `parts` (the scheduler's
    look-ahead, the launch, the wait for the earlier step's tokens, the postprocess); the
    wrappers live on the instances."""

    def timed(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def run(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                parts[label] = parts.get(label, 0.0) + 1e3 * (time.perf_counter() - start)

        setattr(owner, name, run)

    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.scheduler, "schedule_lookahead", "lookahead")
    timed(engine.scheduler, "postprocess", "postprocess")
    timed(engine, "_launch", "launch")
    timed(engine, "_apply", "apply")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="moonlight-16b-a3b", choices=sorted(bench_engine.PRESETS))
    p.add_argument("--decode", default="256x128", help="one BxL shape")
    p.add_argument("--steps", type=int, default=24)
    args = p.parse_args()
    engine_args = bench_engine.parse_args(
        ["--preset", args.preset, "--skip-hf", "--prefill", "", "--decode", args.decode,
         "--decode-steps", str(args.steps)]
    )  # fmt: skip
    shape = engine_args.decode[0]
    with tempfile.TemporaryDirectory(prefix="pdserve-probe-") as tmp:
        path = str(bench_engine.write_preset(args.preset, Path(tmp)))
        engine = bench_engine.Engine(bench_engine.engine_config(engine_args, path, "dummy"))
        vocab = engine.model_config.vocab_size
        gen = torch.Generator().manual_seed(0)

        def prompts() -> torch.Tensor:
            return torch.randint(10, vocab - 10, (shape.batch, shape.length), generator=gen)

        for round_ in ("warm-up", "timed"):
            bench_engine.start_decode(engine, prompts(), max_new_tokens=args.steps + 1)
            torch.cuda.synchronize()
            calls = []
            split: list[dict[str, float]] = []
            with bench_engine.decode_device_time(engine) as events:
                while engine.has_unfinished():
                    parts: dict[str, float] = {}
                    if round_ == "timed":
                        wrap_parts(engine, parts)
                    start = time.perf_counter()
                    engine.step()
                    calls.append(1e3 * (time.perf_counter() - start))
                    split.append(parts)
                    for obj in (engine.scheduler, engine):
                        for name in ("schedule", "schedule_lookahead", "postprocess",
                                     "_launch", "_apply"):  # fmt: skip
                            vars(obj).pop(name, None)
            torch.cuda.synchronize()
            device = [s.elapsed_time(e) for s, e in events]
            print(
                f"{round_}: {len(calls)} step() calls, ms min / median / max "
                f"{min(calls):.2f} / {statistics.median(calls):.2f} / {max(calls):.2f}; "
                f"forward device ms min / median / max {min(device):.2f} / "
                f"{statistics.median(device):.2f} / {max(device):.2f}",
                flush=True,
            )
            print("  step() ms: " + " ".join(f"{c:.2f}" for c in calls))
            print("  forward device ms: " + " ".join(f"{d:.2f}" for d in device))
            # Between one forward's end and the next one's start: device idle plus the
            # sampling, copies and uploads between graphs.
            gaps = [
                events[i + 1][0].elapsed_time(events[i][1]) * -1 for i in range(len(events) - 1)
            ]
            print("  between forwards ms: " + " ".join(f"{g:.3f}" for g in gaps))
            for i in (0, 1, 2, len(split) - 2, len(split) - 1):
                if split[i]:
                    line = ", ".join(f"{k} {v:.2f}" for k, v in split[i].items())
                    print(f"  call {i + 1} ({calls[i]:.2f} ms): {line}")
        graphs = engine.runner.graphs
        if graphs is not None and shape.batch in graphs.graphs:
            # The captured graph alone, replayed back to back: its own period.
            graph = graphs.graphs[shape.batch]
            for _ in range(3):
                graph.replay()
            start_ev = torch.cuda.Event(enable_timing=True)
            end_ev = torch.cuda.Event(enable_timing=True)
            start_ev.record()
            for _ in range(20):
                graph.replay()
            end_ev.record()
            torch.cuda.synchronize()
            period = start_ev.elapsed_time(end_ev) / 20
            print(f"bare replay of the {shape.batch} graph: {period:.3f} ms")
        bench_engine.start_decode(engine, prompts(), max_new_tokens=args.steps + 1)
        sites: Counter[str] = Counter()

        def record(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            # Raised from C++ inside the Python call that synchronised: this stack is its.
            frames = [f for f in traceback.extract_stack()[:-1] if "/engine/" in f.filename]
            where = " <- ".join(
                f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1][:6]
            )
            sites[f"{str(message)[:60]} at {where or filename}"] += 1

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                while engine.has_unfinished():
                    engine.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        print(
            f"sync debug mode, {args.steps} decode steps: {sum(sites.values())} synchronizing calls"
        )
        for site, count in sites.most_common():
            print(f"  {count} x {site}")


if __name__ == "__main__":
    main()
