"""Colocated against disaggregated serving on GPUs, through the router, at several request rates.

Starts `pdserve local` twice on one model, first colocated (one worker doing both phases),
then disaggregated (prefill and decode workers, KV handed over by `cuda_ipc`; on one shared
GPU with a memory fraction each, or `--gpus 2` for one each), and runs `bench.serving` against
each at every `--request-rates` value with the same seeded dataset and SLOs. Prints both
tables and a comparison (TTFT, ITL, goodput per rate); writes each mode's JSON and PNG and a
summary JSON into `--out-dir`.

With `--preset llama3-8b` the model is Llama-3-8B's shape with dummy weights: its config.json
(bench.engine's preset) beside a generated word tokenizer of the same vocabulary (`w0 w1 ...`:
every id the dummy model samples decodes to a word; the text is noise).

With `--mps` the disaggregated mode runs under NVIDIA MPS (bench/mps.py: a control daemon of
its own for the mode's span, its directories in the workers' environment), so that the two
workers on one GPU run side by side instead of time-slicing it; the summary records it.

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
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers

from bench import serving
from bench.engine import PRESETS, write_preset
from bench.mps import MPSUnavailable, control_binary, mps_daemon
from cluster.local import LocalCluster, LocalClusterSpec


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
    with LocalCluster(spec):
        if serving.main(argv) not in (0, 2):
            raise RuntimeError(f"bench.serving failed against the {mode} cluster")
    runs: list[dict[str, Any]] = json.loads((out / f"serving-{mode}.json").read_text())["runs"]
    return runs


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
    return "\n".join(
        "| " + " | ".join(r) + " |" for r in [rows[0], ["---"] * len(header), *rows[1:]]
    )


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
    table = compare(results)
    print("\n" + table)
    summary = {"config": {k: str(v) for k, v in vars(args).items()}, "mps": mps,
               "runs": results}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(serving._jsonable(summary), indent=1))
    (out / "summary.md").write_text(table + "\n")
    print(f"\nresults in {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
