"""Engine flags (named as SGLang names them) and a command-line demo of the offline engine.

    python -m engine.cli --model-path DIR --prompt "Hello" --max-tokens 32
    python -m engine.cli --chat --prompt "What is a KV cache?"   # embedded tiny MoE model

With no `--model-path` the embedded default is used: a small Qwen3-MoE checkpoint generated
locally (random weights, so the text is gibberish; the machinery is real).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from engine.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    GEMM_BACKENDS,
    LOAD_FORMATS,
    MOE_BACKENDS,
    EngineConfig,
)
from engine.device import DEVICE_KINDS
from engine.sampling import SamplingParams

DEFAULT_MODEL_FAMILY = "qwen3-moe"
# --piecewise-cuda-graph-max-tokens' default where the engine prefills (EngineConfig's).
PIECEWISE_DEFAULT_TOKENS = EngineConfig.piecewise_cuda_graph_max_tokens


def default_model_dir() -> Path:
    """The embedded default checkpoint, generated on first use."""
    from engine.testing.tiny_models import write_tiny_models

    cache = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    return write_tiny_models(cache / "models", [DEFAULT_MODEL_FAMILY])[DEFAULT_MODEL_FAMILY]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model-path", help="Hugging Face model directory (default: embedded tiny MoE)")
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    g.add_argument("--device", default="auto", help=f"one of {DEVICE_KINDS}, optionally :index")
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument("--random-seed", type=int, default=0)
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--max-total-tokens", type=int, help="KV pool size in tokens")
    g.add_argument("--kv-cache-memory", type=float, help="KV pool size in GiB")
    g.add_argument("--mem-fraction-static", type=float, default=0.85)
    g.add_argument("--context-length", type=int)
    g.add_argument("--chunked-prefill-size", type=int, default=8192, help="-1 disables chunking")
    g.add_argument("--max-prefill-tokens", type=int, default=16384)
    g.add_argument("--max-running-requests", type=int, default=256)
    g.add_argument("--disable-radix-cache", action="store_true")
    g.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks (processes)")
    g.add_argument("--dp-size", type=int, help="data-parallel attention ranks (= --ep-size)")
    g.add_argument("--ep-num-redundant-experts", type=int, default=0)
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="auto: triton on CUDA, torch (the reference) elsewhere",
    )
    g.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="run every step eagerly: no decode graphs, no prefill graphs in pieces",
    )
    g.add_argument(
        "--grammar-compile-timeout",
        type=float,
        default=30.0,
        help="seconds a request's output constraint may take to compile before it fails "
        "with a 400 (the compile finishes in the background and is cached)",
    )
    g.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="apply each step's tokens before launching the next (no CPU/device overlap)",
    )
    g.add_argument(
        "--cuda-graph-max-bs", type=int, default=256, help="largest decode batch run as a graph"
    )
    g.add_argument(
        "--short-prefill-tokens",
        type=int,
        default=-1,
        help="prefills of up to this many tokens run as decode rows through the decode graphs "
        "(no per-kernel launches from Python: first-token latency of short prompts); -1 auto "
        "(the graphs' largest batch), 0 off",
    )
    g.add_argument(
        "--disable-piecewise-cuda-graph",
        action="store_true",
        help="launch longer prefills' kernels from Python instead of replaying graphs "
        "captured between attention calls",
    )
    g.add_argument(
        "--piecewise-cuda-graph-max-tokens",
        type=int,
        default=None,
        help="prefills of up to this many tokens replay graphs captured in pieces between "
        f"attention calls (0 off; default {PIECEWISE_DEFAULT_TOKENS}, and 0 on a decode "
        "worker of a disaggregated pair, which prefills only to recompute a preempted request)",
    )
    g.add_argument(
        "--disable-prefill-warmup",
        action="store_true",
        help="skip running one prefill of each kind at start (which compiles the kernels a "
        "first request of that kind would otherwise wait for; GPU only, off under --ep-size "
        "> 1 and on a decode worker of a disaggregated pair)",
    )
    g.add_argument("--moe-backend", "--moe-runner-backend", default="auto", choices=MOE_BACKENDS)
    g.add_argument(
        "--disable-shared-experts-fusion",
        action="store_true",
        help="keep DeepSeek's shared experts a separate MLP (by default the Triton MoE backend "
        "computes them as extra experts of the routed kernels when --ep-size is 1)",
    )
    g.add_argument(
        "--gemm-backend",
        default="auto",
        choices=GEMM_BACKENDS,
        help="decode-sized linear layers: triton = the skinny Triton GEMM up to 64 rows, "
        "torch = cuBLAS, auto = the skinny GEMM where it measured faster (Hopper)",
    )


def engine_config_from_args(
    args: argparse.Namespace, *, recompute_only_prefills: bool = False
) -> EngineConfig:
    """The engine's settings from its flags. ``recompute_only_prefills``: this engine prefills
    only to recompute a preempted request (a disaggregated decode worker), so the prefill
    graphs are off unless their flag asks (their capture's start-up seconds and memory, which
    the KV cache gets instead, for prefills that rare)."""
    if args.dp_size is not None and args.dp_size != args.ep_size:
        # Attention is data-parallel over exactly the expert-parallel ranks.
        raise ValueError(f"--dp-size ({args.dp_size}) must equal --ep-size ({args.ep_size})")
    kv_bytes = int(args.kv_cache_memory * 2**30) if args.kv_cache_memory else None
    return EngineConfig(
        model_path=str(args.model_path or default_model_dir()),
        load_format=args.load_format,
        device=args.device,
        dtype=args.dtype,
        seed=args.random_seed,
        page_size=args.page_size,
        max_total_tokens=args.max_total_tokens,
        kv_cache_memory_bytes=kv_bytes,
        mem_fraction_static=args.mem_fraction_static,
        context_length=args.context_length,
        chunked_prefill_size=args.chunked_prefill_size,
        max_prefill_tokens=args.max_prefill_tokens,
        max_running_requests=args.max_running_requests,
        disable_radix_cache=args.disable_radix_cache,
        ep_size=args.ep_size,
        ep_num_redundant_experts=args.ep_num_redundant_experts,
        attention_backend=args.attention_backend,
        disable_cuda_graph=args.disable_cuda_graph,
        disable_overlap_schedule=args.disable_overlap_schedule,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        short_prefill_tokens=args.short_prefill_tokens,
        disable_piecewise_cuda_graph=args.disable_piecewise_cuda_graph,
        piecewise_cuda_graph_max_tokens=(
            args.piecewise_cuda_graph_max_tokens
            if args.piecewise_cuda_graph_max_tokens is not None
            else 0
            if recompute_only_prefills
            else PIECEWISE_DEFAULT_TOKENS
        ),
        disable_prefill_warmup=args.disable_prefill_warmup or recompute_only_prefills,
        moe_backend=args.moe_backend,
        disable_shared_experts_fusion=args.disable_shared_experts_fusion,
        gemm_backend=args.gemm_backend,
        grammar_compile_timeout_s=args.grammar_compile_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)

    from engine.engine import START_ERRORS, Engine

    try:
        config = engine_config_from_args(args)
        sampling = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            max_new_tokens=args.max_tokens,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        engine = Engine(config)
    except START_ERRORS as exc:  # no such device, no model at the path
        parser.error(str(exc))
    tokenizer = engine.tokenizer
    prompts = args.prompt or ["The page pool"]
    if args.chat:
        if tokenizer is None:
            parser.error("--chat needs a tokenizer.json in the model directory")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    start = time.perf_counter()
    try:
        results = engine.generate(prompts, sampling)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(f"model: {config.model_path} on {engine.device.kind}")
    for prompt, result in zip(prompts, results, strict=True):
        print(f"\n--- prompt ({len(result.prompt_ids)} tokens): {prompt!r}")
        reason = result.finish_reason.value if result.finish_reason else None
        print(f"--- output ({len(result.output_ids)} tokens, {reason}): {result.text!r}")
    tokens = sum(len(r.output_ids) for r in results)
    print(f"\n{tokens} tokens in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
