"""What the serving stack costs: one engine's decode rate served through the router, against
the same engine's offline rate at the same batch (issue 17: under 10% at saturation).

For every `--batches` value B, at prompts of `--input-len` L tokens:

- offline: bench.engine's engine in this process; B prompts of L tokens are prefilled, then
  `--output-len` decode steps run back to back (`pdserve_decode_free_running`: no sync between
  steps, as a server runs them); tok/s = B / step time, the median of `--repeats` runs.
- served: the same model directory and engine flags (written out from the offline engine's
  config: dtype, page size, context, batch limits, CUDA graphs, overlap, backends) served by
  `pdserve local` colocated (one worker, the router in front). bench.serving sends a wave of
  B prompts of L tokens at concurrency B, each asking for `--output-len` tokens with
  ignore_eos: one wave to warm up, then `--repeats` waves, each on fresh prompts.

A wave's served rate is counted over its steady middle: from the moment the last of its B
requests has its first token (from then on all B are decoding) to the moment the first one has
its last token (from then on the batch shrinks), the output tokens whose chunks arrived in that
span over its length, from the send time and per-chunk arrival times and token counts that
bench.serving records. The ramp (prefills, admission) and the tail (the last frames, the
requests ending) fall outside it. Both sides decode over contexts L to L + output-len, so
their steps read about the same KV. The served figure is the median over the waves.

The span is seen from the client: a stall of the client, the router or the host (a loaded
machine) holds the chunks back, and they arrive in a burst when it ends; a stall as long as the
wave's decode leaves no span (or one under a step) to count. Such a wave is skipped, and up to
`--retries` more waves run in its place (on fresh prompts); a batch errs when fewer than
`--repeats` waves could be counted (as it does every time when its requests are not admitted
together).

    python -m bench.stack_cost --preset llama3-8b --batches 16,64 --input-len 128 \\
        --output-len 256 --out stack_cost.json
    python -m bench.stack_cost --device cpu --batches 2,4 --input-len 16 --output-len 32

With neither `--preset` nor `--model-path` the model is pdserve's embedded tiny default (for a
smoke run on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import shlex
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import engine as offline_bench
from bench import serving
from bench.engine import PRESETS, Shape, add_engine_flags
from bench.serving_pd import model_dir
from cluster.local import LocalCluster, LocalClusterSpec
from engine.config import EngineConfig
from engine.engine import Engine

TARGET = 0.10  # the most the stack may cost, as a fraction of the offline rate (issue 17)
FOOTNOTE = """
offline: the engine in-process, the decode steps back to back (device synchronised before the
first and when the last step's tokens reach the host). served: `pdserve local` colocated, the
router in front, bench.serving at concurrency = batch, tokens counted from the last request's
first token to the first request's last (window steps = tokens in it / batch). stack cost =
1 - served / offline. The load generator runs on the same host as the stack."""


@dataclass(frozen=True)
class Window:
    """The span of one wave in which all its requests were decoding, in seconds from the
    wave's start."""

    start_s: float  # the last request's first token
    end_s: float  # the first request's last token
    tokens: float  # output tokens that arrived in (start_s, end_s]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.end_s - self.start_s)


def steady_window(requests: Sequence[Mapping[str, Any]]) -> Window:
    """The steady middle of one wave of concurrent requests, from bench.serving's per-request
    figures (`sent`, `ttft`, `itls`, `chunk_tokens`, `output_len`).

    A chunk's token count is its text re-encoded: exact for a word tokenizer, off by a little
    for others, so each request's counts are scaled to the server's `output_len`. Raises
    ValueError when no span had every request decoding (they were not admitted together, the
    outputs are too short for the ramp, or their chunks arrived in one burst), or when the span
    holds less than a step (a token a request)."""
    if not requests:
        raise ValueError("no requests: nothing to count")
    streams = []
    for r in requests:
        times = list(itertools.accumulate(r["itls"], initial=r["sent"] + r["ttft"]))
        counts = r["chunk_tokens"]
        if len(times) != len(counts) or not counts:
            raise ValueError(f"{len(times)} chunk times but {len(counts)} chunk token counts")
        scale = r["output_len"] / sum(counts)
        streams.append((times, [c * scale for c in counts]))
    start = max(times[0] for times, _ in streams)
    end = min(times[-1] for times, _ in streams)
    if not end > start:
        raise ValueError(
            f"no span with all {len(requests)} requests decoding: the last first token came "
            f"{start - end:.3f} s after the first request ended (not admitted together? a KV "
            "pool or --max-running-requests too small, or --output-len too short)"
        )
    tokens = sum(c for times, counts in streams for t, c in zip(times, counts, strict=True)
                 if start < t <= end)  # fmt: skip
    if tokens < len(requests):
        raise ValueError(
            f"the span with all {len(requests)} requests decoding ({1000 * (end - start):.1f} ms) "
            f"holds {tokens:.1f} tokens, less than a step (their chunks arrived in bursts?)"
        )
    return Window(start, end, tokens)


def count_waves(waves: Sequence[Mapping[str, Any]]) -> tuple[list[Window], list[float], list[str]]:
    """bench.serving's runs (`waves`): the windows and whole-wave rates of those with a steady
    window, and why each of the others has none."""
    windows, rates, skipped = [], [], []
    for w in waves:
        try:
            windows.append(steady_window(w["requests"]))
        except ValueError as exc:
            skipped.append(str(exc))
            continue
        rates.append(w["output_throughput"])
    return windows, rates, skipped


def worker_flags(config: EngineConfig) -> tuple[str, ...]:
    """Worker flags for the engine `config` describes, but for the model, the device and the
    KV pool's size (the worker sizes its pool from memory; the pool's size does not change a
    step's work)."""
    flags = [
        "--dtype", config.dtype, "--random-seed", str(config.seed),
        "--page-size", str(config.page_size),
        "--chunked-prefill-size", str(config.chunked_prefill_size),
        "--max-prefill-tokens", str(config.max_prefill_tokens),
        "--max-running-requests", str(config.max_running_requests),
        "--cuda-graph-max-bs", str(config.cuda_graph_max_bs),
        "--short-prefill-tokens", str(config.short_prefill_tokens),
        "--piecewise-cuda-graph-max-tokens", str(config.piecewise_cuda_graph_max_tokens),
        "--attention-backend", config.attention_backend,
        "--moe-backend", config.moe_backend,
        "--gemm-backend", config.gemm_backend,
    ]  # fmt: skip
    if config.context_length is not None:
        flags += ["--context-length", str(config.context_length)]
    for name in ("disable_cuda_graph", "disable_piecewise_cuda_graph",
                 "disable_overlap_schedule", "disable_radix_cache",
                 "disable_prefill_warmup"):  # fmt: skip
        if getattr(config, name):
            flags.append("--" + name.replace("_", "-"))
    return tuple(flags)


@dataclass(frozen=True)
class Offline:
    step_ms: dict[int, float]  # batch -> the median decode step
    config: EngineConfig
    header: dict[str, Any]


def measure_offline(args: argparse.Namespace, model: Path, load_format: str) -> Offline:
    """bench.engine's engine on `model` at every batch, its decode steps free-running."""
    shapes = ",".join(str(Shape(b, args.input_len)) for b in args.batches)
    argv = ["--model-path", str(model), "--load-format", load_format, "--device", args.device,
            "--dtype", args.dtype, "--decode", shapes, "--prefill", "", "--decode-steps",
            str(args.output_len), "--repeats", str(args.repeats), "--page-size",
            str(args.page_size), "--skip-hf", "--short-prefill-tokens",
            str(args.short_prefill_tokens)]  # fmt: skip
    for flag in ("attention_backend", "moe_backend", "gemm_backend"):
        if getattr(args, flag):
            argv += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    for flag in ("disable_cuda_graph", "disable_overlap_schedule"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    eargs = offline_bench.parse_args(argv)
    config = offline_bench.engine_config(eargs, str(model), load_format)
    step_ms, header = _decode_steps(eargs, config)
    gc.collect()  # the engine and its KV pool, before the served worker sizes its own
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return Offline(step_ms, config, header)


def _decode_steps(
    eargs: argparse.Namespace, config: EngineConfig
) -> tuple[dict[int, float], dict[str, Any]]:
    """The engine of `config`: its median free-running decode step at each of bench.engine's
    decode shapes (`eargs`), and what it ran with."""
    engine = Engine(config)
    results = offline_bench.measure(
        lambda p: offline_bench.pdserve_prefill(engine, p),
        lambda p, n: offline_bench.pdserve_decode_free_running(engine, p, n),
        eargs,
        engine.model_config.vocab_size,
    )
    graphs = engine.runner.graphs
    header = {
        "device": offline_bench.device_name(engine.device),
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "backends": type(engine.runner.attention).__name__,
        "cuda graphs": "off" if graphs is None else f"bs <= {graphs.max_bs}",
        "overlap": engine.overlap,
    }
    return {s.batch: d.step_ms for s, d in results.decode.items()}, header


@dataclass(frozen=True)
class Served:
    windows: list[Window]  # one per measured wave
    wave_tok_s: list[float]  # each wave's output tokens over its whole wall time (with ramp)
    skipped: list[str]  # why each wave left out had no steady window

    @property
    def tok_s(self) -> float:
        return statistics.median(w.tokens_per_s for w in self.windows)


def measure_served(
    args: argparse.Namespace, model: Path, load_format: str, flags: Sequence[str], work: Path
) -> dict[int, Served]:
    """`pdserve local` colocated on `model` with `flags`, a warm-up wave and `--repeats`
    waves of B requests at concurrency B for every batch B (and up to `--retries` more in
    place of waves without a steady window)."""
    spec = LocalClusterSpec(
        model_path=str(model),
        colocated=True,
        port=args.port,
        load_format=load_format,
        engine_args=(*flags, *shlex.split(args.worker_args)),
        log_dir=str(work / "logs"),
        device=args.device,
        gpu_count=1 if args.device == "cuda" else None,
    )
    served = {}
    with LocalCluster(spec) as cluster:
        for b in args.batches:
            print(f"\n== served, batch {b}", flush=True)
            windows: list[Window] = []
            rates: list[float] = []
            skipped: list[str] = []
            for attempt in range(1 + args.retries):
                need = args.repeats - len(windows)
                if need <= 0:
                    break
                warm = attempt == 0  # a warm-up request and wave first; retries find it warm
                out = work / (f"serving-b{b}.json" if warm else f"serving-b{b}-retry{attempt}.json")
                argv = ["--base-url", cluster.url, "--tokenizer", str(model),
                        "--seed", str(b + 1_000_000 * attempt), "--num-prompts", str(b),
                        "--random-input-len", str(args.input_len),
                        "--random-output-len", str(args.output_len), "--random-range-ratio", "1",
                        "--max-concurrency", str(b), "--warmup-requests", str(int(warm)),
                        "--request-rates", *["inf"] * (int(warm) + need), "--disable-tqdm",
                        "--output-file", str(out)]  # fmt: skip
                if serving.main(argv) != 0:
                    raise RuntimeError(f"bench.serving failed at batch {b}: see {out}, {work}/logs")
                w, r, s = count_waves(json.loads(out.read_text())["runs"][int(warm) :])
                windows += w
                rates += r
                skipped += s
                for why in s:
                    print(f"wave skipped: {why}", flush=True)
            if len(windows) < args.repeats:
                raise ValueError(
                    f"batch {b}: {len(skipped)} of {len(skipped) + len(windows)} waves had no "
                    f"steady span to count; the last: {skipped[-1]}"
                )
            served[b] = Served(windows, rates, skipped)
    return served


@dataclass(frozen=True)
class Row:
    batch: int
    input_len: int
    output_len: int
    offline_step_ms: float
    offline_tok_s: float
    served_tok_s: float
    window_steps: float  # tokens in the median wave's window over the batch
    stack_cost: float  # 1 - served / offline

    @property
    def met(self) -> bool:
        return self.stack_cost < TARGET


def rows(args: argparse.Namespace, offline: Offline, served: dict[int, Served]) -> list[Row]:
    out = []
    for b in args.batches:
        step = offline.step_ms[b]
        rate = served[b].tok_s
        tokens = statistics.median(w.tokens for w in served[b].windows)
        out.append(Row(b, args.input_len, args.output_len, step, 1000 * b / step, rate,
                       tokens / b, 1 - rate * step / (1000 * b)))  # fmt: skip
    return out


def render(table: Sequence[Row]) -> str:
    lines = [
        "| batch | context | offline step ms | offline tok/s | served tok/s | window steps "
        "| stack cost | target |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        verdict = "met" if r.met else "missed"
        lines.append(
            f"| {r.batch} | {r.input_len}+{r.output_len} | {r.offline_step_ms:.2f} "
            f"| {r.offline_tok_s:,.0f} | {r.served_tok_s:,.0f} | {r.window_steps:.0f} "
            f"| {100 * r.stack_cost:.1f}% | < {100 * TARGET:.0f}%: {verdict} |"
        )
    return "\n".join(lines)


def _batches(text: str) -> list[int]:
    try:
        batches = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batches takes integers like 16,64, got {text!r}"
        ) from None
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"--batches must be integers >= 1, got {text!r}")
    return batches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model shape, dummy weights")
    src.add_argument("--model-path", help="a Hugging Face model directory (default: embedded)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--batches", type=_batches, default=[16, 64], help="comma-separated")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (L)")
    p.add_argument("--output-len", type=int, default=256, help="tokens per request")
    p.add_argument("--repeats", type=int, default=2, help="offline runs and served waves")
    p.add_argument(
        "--retries", type=int, default=2, help="served waves run for those without a steady span"
    )
    add_engine_flags(p)
    p.add_argument("--worker-args", default="", help="more flags for the served worker only")
    p.add_argument("--port", type=int, default=0, help="the router's (0: a free one)")
    p.add_argument("--out", type=Path, default=Path("stack_cost.json"), help="the JSON")
    p.add_argument(
        "--work-dir", type=Path, help="bench.serving's JSON, the cluster's logs (default: OUT-runs)"
    )
    args = p.parse_args(argv)
    for name in ("input_len", "output_len", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.retries < 0:
        p.error(f"--retries must be >= 0, got {args.retries}")
    if args.output_len < 8:
        p.error(f"--output-len must be >= 8 for a steady span to count, got {args.output_len}")
    if args.work_dir is None:
        args.work_dir = args.out.with_name(args.out.stem + "-runs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.preset is None and args.model_path is None:
        from engine.cli import default_model_dir

        args.model_path = str(default_model_dir())
    load_format = "dummy" if args.preset else "auto"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pdserve-stack-") as tmp:
        model = model_dir(args, Path(tmp))  # a preset's config beside a word tokenizer
        print("== offline", flush=True)
        offline = measure_offline(args, model, load_format)
        flags = worker_flags(offline.config)
        try:
            served = measure_served(args, model, load_format, flags, args.work_dir)
        except (RuntimeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    table = rows(args, offline, served)
    name = args.preset or args.model_path
    print("\n" + " | ".join(f"{k}: {v}" for k, v in {"model": name, **offline.header}.items()))
    print("\n" + render(table))
    print(FOOTNOTE)
    report = {
        "model": name,
        **offline.header,
        "target": TARGET,
        "worker_flags": list(flags),
        "config": {k: str(v) for k, v in vars(args).items()},
        "rows": [asdict(r) | {"met": r.met} for r in table],
        "served_waves": {
            str(b): {
                "windows": [asdict(w) | {"tokens_per_s": w.tokens_per_s} for w in s.windows],
                "whole_wave_tok_s": s.wave_tok_s,
                "skipped": s.skipped,
            }
            for b, s in served.items()
        },
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"results: {args.out}, runs in {args.work_dir}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
