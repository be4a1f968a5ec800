"""Colocated against disaggregated serving on GPUs, through the router, at several request rates.

Starts `pdserve local` twice on one model, first colocated (one worker doing both phases),
then disaggregated (prefill and decode workers, KV handed over by `cuda_ipc`; on one shared
GPU with a memory fraction each, or `--gpus 2` for one each), and runs `bench.serving` against
each at every `--request-rates` value with the same seeded dataset and SLOs. Prints both
tables and a comparison (TTFT, ITL, goodput per rate); writes each mode's JSON and PNG and a
summary JSON into `--out-dir`.

Around each rate's run it scrapes every process's /metrics and prints, beside TTFT p50, the
run's mean of each phase of the time to first token that the workers measure
(`worker.metrics.PHASES`, the KV write) and of the router's TTFT: (sum after - sum before) /
(count after - count before) of each histogram, over all workers of the mode.

With `--preset llama3-8b` the model is Llama-3-8B's shape with dummy weights: its config.json
(bench.engine's preset) beside a generated word tokenizer of the same vocabulary (`w0 w1 ...`:
every id the dummy model samples decodes to a word; the text is noise).

With `--mps` the disaggregated mode runs under NVIDIA MPS (bench/mps.py: a control daemon of
its own for the mode's span, its directories in the workers' environment), so that the two
workers on one GPU run side by side instead of time-slicing it; the summary records it.
With both modes run, a last table sets each rate's disaggregated TTFT p50 against the
colocated one plus the hand-off (the means of the prefill side's destination wait, KV write
and TransferDone in that run), plus 10%.
`--decode-env` / `--prefill-env NAME=VALUE` give one role's worker a variable of its own, such
as MPS's client priority (`CUDA_MPS_CLIENT_PRIORITY=1`: below normal) or its share of the SMs
(`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`).

    python -m bench.serving_pd --preset llama3-8b --request-rates 1 2 4 8 16 inf \\
        --num-prompts 200 --random-input-len 1024 --random-output-len 128 \\
        --slo-ttft-ms 500 --slo-itl-ms 30 --out-dir /tmp/pd
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import urllib.request
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer, models, pre_tokenizers

from bench import serving
from bench.engine import PRESETS, write_preset
from bench.mps import MPSUnavailable, control_binary, mps_daemon
from cluster.local import LocalCluster, LocalClusterSpec
from worker.metrics import PHASES

# The phases of the time to first token in the order a disaggregated request meets them, each
# a histogram of some process of the cluster (a colocated worker has the first two only).
PHASE_HISTOGRAMS = {
    **{key: PHASES[key][0] for key in ("prefill_queue", "prefill_compute", "handoff_wait")},
    "kv_write": "pdserve:kv_transfer_latency_seconds",
    **{key: PHASES[key][0] for key in
       ("transfer_done", "decode_bootstrap", "decode_kv_wait", "decode_pickup")},
    "router_ttft": "pdserve:time_to_first_token_seconds",
}  # fmt: skip


def model_dir(args: argparse.Namespace, out: Path) -> Path:
    """The model to serve: `--model-path`, or the preset's config beside a word tokenizer."""
    if args.model_path:
        return Path(args.model_path)
    path = out / f"model-{args.preset}"
    path.mkdir(parents=True, exist_ok=True)
    write_preset(args.preset, path)
    write_word_tokenizer(path, int(PRESETS[args.preset]["vocab_size"]))
    return path


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A tokenizer whose every id is a word (`w0`, `w1`, ...), whitespace-separated: a dummy
    model samples ids anywhere in its vocabulary, and each must decode to text for the
    benchmark to see tokens stream (a real tokenizer of another vocabulary would map most of
    them to nothing)."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def histogram_totals(text: str) -> dict[str, tuple[float, float]]:
    """Every histogram's (sum, count) in a Prometheus text page, added over its label sets."""
    totals: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        total, count = totals.get(family.name, (0.0, 0.0))
        for sample in family.samples:
            if sample.name == family.name + "_sum":
                total += sample.value
            elif sample.name == family.name + "_count":
                count += sample.value
        totals[family.name] = (total, count)
    return totals


def scrape_histograms(urls: Iterable[str]) -> dict[str, tuple[float, float]] | None:
    """`histogram_totals` of every /metrics page at `urls`, added; None (with a warning) when
    one does not answer: the benchmark goes on without its phases."""
    totals: dict[str, tuple[float, float]] = {}
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                text = resp.read().decode()
        except OSError as exc:
            print(f"warning: could not scrape {url}: {exc}", file=sys.stderr)
            return None
        for name, (total, count) in histogram_totals(text).items():
            before = totals.get(name, (0.0, 0.0))
            totals[name] = (before[0] + total, before[1] + count)
    return totals


def phase_means_ms(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float | None]:
    """Each phase's mean over what was observed between two scrapes, in ms; None for a phase
    that observed nothing (not measured in this mode)."""
    means: dict[str, float | None] = {}
    for phase, name in PHASE_HISTOGRAMS.items():
        total_0, count_0 = before.get(name, (0.0, 0.0))
        total_1, count_1 = after.get(name, (0.0, 0.0))
        count = count_1 - count_0
        means[phase] = (total_1 - total_0) / count * 1000 if count > 0 else None
    return means


def phase_probe(urls: list[str]) -> serving.RunProbe:
    """A `bench.serving.RunProbe`: scrape `urls` before and after each run; the run's summary
    gets `phases_ms` (`phase_means_ms`, or None when a scrape failed)."""

    def start() -> Callable[[], dict[str, Any]]:
        before = scrape_histograms(urls)

        def finish() -> dict[str, Any]:
            after = scrape_histograms(urls)
            if before is None or after is None:
                return {"phases_ms": None}
            return {"phases_ms": phase_means_ms(before, after)}

        return finish

    return start


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def run_mode(
    args: argparse.Namespace, model: Path, out: Path, mode: str, env: dict[str, str]
) -> list[dict[str, Any]]:
    """`mode`'s runs at every rate; `env`: variables for the cluster's processes."""
    colocated = mode == "colocated"
    worker_args = tuple(shlex.split(args.worker_args))
    if not colocated and args.transfer_backend:
        worker_args += ("--transfer-backend", args.transfer_backend)
    spec = LocalClusterSpec(
        model_path=str(model),
        colocated=colocated,
        port=args.port,
        load_format="dummy" if args.preset else "auto",
        engine_args=worker_args,
        log_dir=str(out / f"logs-{mode}"),
        device=args.device,
        gpu_count=args.gpus if args.device == "cuda" else None,
        env=env,
        prefill_env=dict(args.prefill_env),
        decode_env=dict(args.decode_env),
    )
    argv = [
        "--base-url", f"http://127.0.0.1:{args.port}", "--tokenizer", str(model),
        "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.random_input_len),
        "--random-output-len", str(args.random_output_len), "--random-range-ratio",
        str(args.random_range_ratio), "--warmup-requests", "4", "--disable-tqdm",
        "--output-file", str(out / f"serving-{mode}.json"), "--request-rates",
        *(str(r) for r in args.request_rates),
    ]  # fmt: skip
    if args.max_concurrency:
        argv += ["--max-concurrency", str(args.max_concurrency)]
    for flag in ("slo_ttft_ms", "slo_itl_ms", "slo_e2e_ms"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    print(f"\n== {mode}" + (" (MPS)" if env else ""), flush=True)
    with LocalCluster(spec) as cluster:
        # Every process's /metrics: the workers' phases and the router's TTFT.
        if serving.main(argv, probe=phase_probe(list(cluster.metrics.values()))) not in (0, 2):
            raise RuntimeError(f"bench.serving failed against the {mode} cluster")
    runs: list[dict[str, Any]] = json.loads((out / f"serving-{mode}.json").read_text())["runs"]
    return runs


def markdown_table(rows: list[list[str]]) -> str:
    """`rows` (the header first) as a Markdown table."""
    lines = [rows[0], ["---"] * len(rows[0]), *rows[1:]]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def compare(results: dict[str, list[dict[str, Any]]]) -> str:
    """One row per rate: each mode's TTFT and ITL p50/p99 (ms) and goodput."""
    header = ["rate"]
    for mode in results:
        header += [f"{mode} {m}" for m in ("TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "goodput")]
    rows = [header]
    for i, first in enumerate(next(iter(results.values()))):
        rate = first["request_rate"]
        row = [str(rate) if isinstance(rate, str) else f"{rate:g}"]
        for runs in results.values():
            r = runs[i]
            row += [f"{r['ttft_ms']['p50']:.1f}", f"{r['ttft_ms']['p99']:.1f}",
                    f"{r['itl_ms']['p50']:.2f}", f"{r['itl_ms']['p99']:.2f}",
                    f"{r['goodput']:.2f}"]  # fmt: skip
        rows.append(row)
    return markdown_table(rows)


def phase_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """One row per mode and rate: the client's TTFT p50 and each phase's mean (ms; "-" where
    the mode has no such phase)."""
    header = ["mode", "rate", "TTFT p50", *(f"{p} mean" for p in PHASE_HISTOGRAMS)]
    rows = [header]
    for mode, runs in results.items():
        for r in runs:
            rate = r["request_rate"]
            phases = r.get("phases_ms") or {}
            row = [mode, str(rate) if isinstance(rate, str) else f"{rate:g}",
                   f"{r['ttft_ms']['p50']:.1f}"]  # fmt: skip
            for phase in PHASE_HISTOGRAMS:
                value = phases.get(phase)
                row.append("-" if value is None else f"{value:.2f}")
            rows.append(row)
    return markdown_table(rows)


HANDOFF_PHASES = ("handoff_wait", "kv_write", "transfer_done")  # the hand-off's own time


def ttft_target_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Per rate with both modes run: disaggregated TTFT p50 against colocated TTFT p50 plus the
    hand-off (the prefill side's wait for the destination, the KV write and TransferDone's
    round trip: their means this run), plus 10% (ms; "" where phases were not scraped)."""
    if not {"colocated", "disaggregated"} <= results.keys():
        return ""
    header = ["rate", "colocated TTFT p50", "hand-off", "target", "disaggregated TTFT p50", "met"]
    rows = [header]
    for colo, disagg in zip(results["colocated"], results["disaggregated"], strict=True):
        rate = colo["request_rate"]
        phases = disagg.get("phases_ms") or {}
        if any(phases.get(p) is None for p in HANDOFF_PHASES):
            continue
        handoff = sum(phases[p] for p in HANDOFF_PHASES)
        target = (colo["ttft_ms"]["p50"] + handoff) * 1.1
        got = disagg["ttft_ms"]["p50"]
        rows.append([str(rate) if isinstance(rate, str) else f"{rate:g}",
                     f"{colo['ttft_ms']['p50']:.1f}", f"{handoff:.2f}", f"{target:.1f}",
                     f"{got:.1f}", "yes" if got <= target else "no"])  # fmt: skip
    if len(rows) == 1:
        return ""
    return markdown_table(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model shape, dummy weights")
    src.add_argument("--model-path", help="a Hugging Face model directory")
    p.add_argument("--gpus", type=int, default=1, help="1: both workers share cuda:0")
    p.add_argument("--device", default="cuda", help="cuda (placed by --gpus), or cpu to try it")
    p.add_argument("--transfer-backend", help="default: cuda_ipc on GPUs, mooncake on the CPU")
    p.add_argument("--worker-args", default="", help="flags for every worker, one string")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--request-rates", type=float, nargs="+", default=[1, 2, 4, 8, math.inf])
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=1.0)
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-itl-ms", type=float)
    p.add_argument("--slo-e2e-ms", type=float)
    p.add_argument("--modes", nargs="+", default=["colocated", "disaggregated"],
                   choices=["colocated", "disaggregated"])  # fmt: skip
    p.add_argument("--mps", action="store_true",
                   help="run the disaggregated mode under NVIDIA MPS (the two workers' kernels "
                   "side by side on a shared GPU, not time-sliced)")  # fmt: skip
    for role in ("prefill", "decode"):
        p.add_argument(f"--{role}-env", type=env_pair, action="append", default=[],
                       metavar="NAME=VALUE",
                       help=f"a variable for the disaggregated {role} worker only (repeatable), "
                       "e.g. CUDA_MPS_CLIENT_PRIORITY=1 or CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 "
                       "under --mps")  # fmt: skip
    p.add_argument("--out-dir", default="serving-pd")
    args = p.parse_args(argv)
    if args.gpus < 1:
        p.error(f"--gpus must be >= 1, got {args.gpus}")
    if args.mps and not args.device.startswith("cuda"):
        p.error(f"--mps is for CUDA devices, not --device {args.device}")
    if args.mps:
        try:
            control_binary()  # before the colocated mode's minutes, not after them
        except MPSUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.transfer_backend is None:
        args.transfer_backend = "cuda_ipc" if args.device.startswith("cuda") else "mooncake"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model_dir(args, out)
    results = {}
    mps = {mode: args.mps and mode == "disaggregated" for mode in args.modes}
    for mode in args.modes:
        env: AbstractContextManager[dict[str, str]]
        env = mps_daemon(out / "mps-logs") if mps[mode] else nullcontext({})
        try:
            with env as mps_env:
                results[mode] = run_mode(args, model, out, mode, mps_env)
        except MPSUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    table = compare(results) + "\n\n" + phase_table(results)
    targets = ttft_target_table(results)
    if targets:  # the low-load criterion: within colocated plus the hand-off, plus 10%
        table += "\n\n" + targets
    print("\n" + table)
    summary = {"config": {k: str(v) for k, v in vars(args).items()}, "mps": mps,
               "runs": results}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(serving._jsonable(summary), indent=1))
    (out / "summary.md").write_text(table + "\n")
    print(f"\nresults in {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
