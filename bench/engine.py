"""Offline throughput of pdserve's engine beside transformers, on the same weights.

    python -m bench.engine --model-path models/qwen3-moe --batch-sizes 1,16,64
    python -m bench.engine --preset llama3-8b --device cuda    # dummy weights, nothing on disk

Prefill: B distinct prompts of `--prompt-len` tokens, one output token each, timed from the
first step until all finish. Decode: B prompts are prefilled, then `--decode-steps` steps of
one token per request are timed one by one (device synchronised before each clock read).
Prints a Markdown table; `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from engine.config import EngineConfig
from engine.device import Device
from engine.engine import Engine, StepOutput
from engine.models import CausalLM
from engine.sampling import SamplingParams

LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
PRESETS = {"llama3-8b": LLAMA3_8B}
FOOTNOTE = """
pdserve: the Engine.step() loop (schedule, forward, greedy sample, postprocess); a prefill of
B prompts is one step. HF: prefill is one forward over [B, prompt_len] (logits_to_keep=1); a
decode step is a manual greedy loop over its DynamicCache (forward [B, 1], argmax, host read of
the tokens), i.e. generate()'s step without its logits processors and stopping checks.
Decode step ms is the mean over the timed steps; decode tok/s = batch / step time. Each figure
is the median of --repeats runs on fresh prompts, after a warm-up at the largest batch. With
dummy weights transformers runs the engine's own seeded weights, handed over by name."""


@dataclass(frozen=True)
class Figures:
    """One system's numbers at one batch size."""

    batch: int
    prefill_tok_s: float
    decode_step_ms: float

    @property
    def decode_tok_s(self) -> float:
        """Output tokens per second in decode: the batch's B tokens per step."""
        return 1000.0 * self.batch / self.decode_step_ms


def write_preset(name: str, out_dir: Path, num_layers: int | None = None) -> Path:
    """Write preset `name`'s config.json into `out_dir` (optionally with fewer layers)."""
    config = dict(PRESETS[name])
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> torch.Tensor:
    """`[batch, prompt_len]` random token ids: rows differ, so the prefix cache has no hits (the
    pdserve runs check that it had none)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=gen)


def clock(device: Device) -> float:
    device.synchronize()
    return time.perf_counter()


# -- pdserve ----------------------------------------------------------------------------------


def _submit(engine: Engine, prompts: torch.Tensor, max_new_tokens: int) -> set[str]:
    engine.flush_cache()  # every measurement starts from an empty prefix cache
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
    return {engine.add_request(row, params) for row in prompts.tolist()}


def _check_no_hits(outputs: list[StepOutput]) -> None:
    hits = sum(o.num_cached_tokens for o in outputs)
    if hits:
        raise RuntimeError(f"the prefix cache served {hits} prompt tokens; prompts must differ")


def pdserve_prefill(engine: Engine, prompts: torch.Tensor) -> float:
    """Prompt tokens per second for one batch of prompts, each generating one token."""
    _submit(engine, prompts, max_new_tokens=1)
    start = clock(engine.device)
    while engine.has_unfinished():
        _check_no_hits(engine.step())
    return prompts.numel() / (clock(engine.device) - start)


def pdserve_decode(engine: Engine, prompts: torch.Tensor, steps: int) -> float:
    """Mean milliseconds of a decode step over the whole batch, after its prefill."""
    ids = _submit(engine, prompts, max_new_tokens=steps + 1)
    started: set[str] = set()
    while started != ids:
        outputs = engine.step()
        _check_no_hits(outputs)
        started.update(o.request_id for o in outputs)
    times = []
    for _ in range(steps):
        start = clock(engine.device)
        outputs = engine.step()
        times.append(clock(engine.device) - start)
        if len(outputs) != len(ids):
            raise RuntimeError(
                f"a decode step advanced {len(outputs)} of {len(ids)} requests "
                "(preempted? enlarge --kv-cache-memory-gib)"
            )
    if engine.has_unfinished():
        raise RuntimeError("requests are still live after the timed decode steps")
    return 1000 * statistics.mean(times)


def pdserve_state_as_hf(model: CausalLM) -> dict[str, torch.Tensor]:
    """pdserve's (fused) parameters as views under the Hugging Face checkpoint names."""
    params = dict(model.named_parameters())
    state = {}
    for name, target in model.weight_map().items():
        tensor = params[target.param].detach()
        if target.expert is not None:
            tensor = tensor[target.expert]
        if target.size is not None or target.offset:
            size = tensor.shape[0] - target.offset if target.size is None else target.size
            tensor = tensor.narrow(0, target.offset, size)
        state[name] = tensor
    return state


# -- transformers -----------------------------------------------------------------------------


def load_hf(
    path: str, dtype: torch.dtype, device: Device, state: dict[str, torch.Tensor] | None
) -> Any:
    """The transformers model of `path`: its checkpoint, or `state` (checkpoint-named tensors).

    Loaded, then moved (device_map would need accelerate). Passing `state` through
    `from_pretrained` lets transformers apply its own checkpoint conversions (fused experts);
    where none applies it keeps the given tensors, so dense weights are shared, not copied.
    """
    model: Any
    if state is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        config = transformers.AutoConfig.from_pretrained(path)
        cls = getattr(transformers, config.architectures[0])
        model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return model.to(device.torch_device).eval()


@torch.inference_mode()
def hf_prefill(model: Any, prompts: torch.Tensor, device: Device) -> float:
    ids = prompts.to(device.torch_device)
    start = clock(device)
    model(ids, use_cache=True, logits_to_keep=1)
    return prompts.numel() / (clock(device) - start)


@torch.inference_mode()
def hf_decode(model: Any, prompts: torch.Tensor, steps: int, device: Device) -> float:
    """Mean ms of a greedy step: forward one token per row over the DynamicCache, argmax, read."""
    out = model(prompts.to(device.torch_device), use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(steps):
        start = clock(device)
        next_ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        out = model(next_ids, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(dim=-1).tolist()  # the host reads the tokens, as the engine does
        times.append(clock(device) - start)
    return 1000 * statistics.mean(times)


# -- driver -----------------------------------------------------------------------------------


def measure(
    prefill: Callable[[torch.Tensor], float],
    decode: Callable[[torch.Tensor, int], float],
    args: argparse.Namespace,
    vocab: int,
) -> dict[int, Figures]:
    """Warm up once at the largest batch, then measure every batch size (median of repeats,
    each repeat on fresh prompts)."""
    decode(random_prompts(max(args.batch_sizes), args.prompt_len, vocab, seed=1), 2)
    figures = {}
    for b in args.batch_sizes:
        seeds = range(1000 * b, 1000 * b + 2 * args.repeats, 2)
        prompts = [random_prompts(b, args.prompt_len, vocab, seed) for seed in seeds]
        others = [random_prompts(b, args.prompt_len, vocab, seed + 1) for seed in seeds]
        figures[b] = Figures(
            batch=b,
            prefill_tok_s=statistics.median(prefill(p) for p in prompts),
            decode_step_ms=statistics.median(decode(p, args.decode_steps) for p in others),
        )
    return figures


def engine_config(args: argparse.Namespace, model_path: str, load_format: str) -> EngineConfig:
    biggest = max(args.batch_sizes)
    prefill_tokens = max(8192, biggest * args.prompt_len)  # one prefill step per batch
    sizing: dict[str, Any] = {}
    if args.kv_cache_memory_gib is not None:
        sizing["kv_cache_memory_bytes"] = int(args.kv_cache_memory_gib * 2**30)
    else:
        # Every request's prompt + output, plus the page of headroom admission keeps per request.
        per_request = -(-(args.prompt_len + args.decode_steps + 1) // args.page_size) + 1
        sizing["num_pages"] = biggest * per_request
    return EngineConfig(
        model_path=model_path,
        load_format=load_format,
        device=args.device,
        dtype=args.dtype,
        page_size=args.page_size,
        chunked_prefill_size=prefill_tokens,
        max_prefill_tokens=prefill_tokens,
        max_running_requests=max(256, biggest),
        **sizing,
    )


def device_name(device: Device) -> str:
    if device.kind == "cuda":
        return torch.cuda.get_device_name(device.index)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def render(rows: dict[int, tuple[Figures, Figures | None]]) -> str:
    def cells(f: Figures | None) -> tuple[str, str, str]:
        if f is None:
            return "-", "-", "-"
        return f"{f.prefill_tok_s:,.0f}", f"{f.decode_step_ms:,.2f}", f"{f.decode_tok_s:,.0f}"

    lines = [
        "| batch | pdserve prefill tok/s | HF prefill tok/s | pdserve decode step ms "
        "| HF decode step ms | pdserve decode tok/s | HF decode tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, (ours, hf) in rows.items():
        (p1, d1, t1), (p2, d2, t2) = cells(ours), cells(hf)
        lines.append(f"| {b} | {p1} | {p2} | {d1} | {d2} | {t1} | {t2} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="a Hugging Face model directory")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model shape, dummy weights")
    p.add_argument("--preset-layers", type=int, help=argparse.SUPPRESS)  # smoke tests only
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--batch-sizes", default="1,16,64", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="report the median of this many runs")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-gib", type=float, help="default: just what the runs need")
    p.add_argument("--skip-hf", action="store_true", help="measure pdserve only")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    if args.batch_sizes[0] < 1 or args.prompt_len < 1 or min(args.decode_steps, args.repeats) < 1:
        p.error("batch sizes, --prompt-len, --decode-steps and --repeats must be >= 1")
    return args


def bench_pdserve(
    args: argparse.Namespace, path: str, load_format: str, hand_over_weights: bool
) -> tuple[dict[int, Figures], Device, torch.dtype, int, dict[str, torch.Tensor] | None]:
    """pdserve's figures, where it ran, and (if asked) its weights under checkpoint names; the
    engine and its KV pool are freed on return."""
    engine = Engine(engine_config(args, path, load_format))
    vocab = engine.model_config.vocab_size
    figures = measure(
        lambda p: pdserve_prefill(engine, p), lambda p, n: pdserve_decode(engine, p, n), args, vocab
    )
    state = pdserve_state_as_hf(engine.runner.model) if hand_over_weights else None
    return figures, engine.device, engine.runner.dtype, vocab, state


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        if args.preset:
            path = str(write_preset(args.preset, Path(tmp), args.preset_layers))
            load_format, model_name = "dummy", args.preset
            if args.preset_layers is not None:
                model_name += f" cut to {args.preset_layers} layers"
        else:
            path, load_format, model_name = args.model_path, args.load_format, args.model_path
        # Dummy weights exist only in the engine, so they are handed over to transformers.
        hand_over = load_format == "dummy" and not args.skip_hf
        ours, device, dtype, vocab, state = bench_pdserve(args, path, load_format, hand_over)
        hf: dict[int, Figures] = {}
        if not args.skip_hf:
            gc.collect()
            if device.kind == "cuda":
                torch.cuda.empty_cache()  # the engine's KV pool, before the HF model arrives
            model = load_hf(path, dtype, device, state)
            del state
            hf = measure(
                lambda p: hf_prefill(model, p, device),
                lambda p, n: hf_decode(model, p, n, device),
                args,
                vocab,
            )

    header = {
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": model_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
    }
    print(" | ".join(f"{k}: {v}" for k, v in header.items()) + "\n")
    print(render({b: (ours[b], hf.get(b)) for b in args.batch_sizes}))
    print(FOOTNOTE)
    if args.json:
        numbers = {
            name: {b: asdict(f) | {"decode_tok_s": f.decode_tok_s} for b, f in figures.items()}
            for name, figures in (("pdserve", ours), ("hf", hf))
        }
        args.json.write_text(json.dumps(header | numbers, indent=2))


if __name__ == "__main__":
    main()
