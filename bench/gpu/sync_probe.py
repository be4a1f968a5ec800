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
from typing import TextIO

import torch

from bench import engine as bench_engine


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
            while engine.has_unfinished():
                start = time.perf_counter()
                engine.step()
                calls.append(1e3 * (time.perf_counter() - start))
            print(
                f"{round_}: {len(calls)} step() calls, ms min / median / max "
                f"{min(calls):.2f} / {statistics.median(calls):.2f} / {max(calls):.2f}",
                flush=True,
            )
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
