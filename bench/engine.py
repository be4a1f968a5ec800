"""Offline speed of pdserve's engine beside transformers, on the same weights, against the floor.

    python -m bench.engine --preset llama3-8b --device cuda          # dummy weights, no disk
    python -m bench.engine --preset qwen3-30b-a3b --decode 1x128,64x128 --prefill 64x128
    python -m bench.engine --model-path models/qwen3-moe --decode 1x16,4x16 --prefill 4x16

Decode `BxL`: B prompts of L tokens are prefilled, then `--decode-steps` steps of one token per
request are timed two ways: one by one (the device synchronised before each clock read, so the
host's launch of each step is exposed: "step ms"), and back to back as a server runs them (the
host prepares the next step while the device runs this one, the clock stopping when the host
holds the last step's tokens: "back to back ms", pdserve only). Requests are greedy unless
`--temperature` is given (then sampled, with `--top-p`), and unconstrained unless `--regex`
is given: then every request is constrained by it (structured output: the host fills each
step's grammar mask; with overlapped scheduling while the device runs the step's forward
pass), pdserve only, and a `--preset` gets a synthetic tokenizer of its vocabulary's size
(`bench.grammar.synthetic_tokenizer`). The default pattern cannot end within the timed steps.
Prefill `BxL`: B distinct prompts of L tokens, one output token each, timed from the first step
until all finish.

The floor of a decode step is the bytes it must read (the weights it touches, plus the KV of
every running token) over the device-to-device copy bandwidth measured in the same run; the
floor of a prefill is its model FLOPs over the measured bf16 (or the run's dtype) matrix-product
rate. Prints Markdown tables; `--json PATH` also writes the numbers.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from torch import nn

from bench.ceiling import copy_bandwidth, matmul_rate
from bench.grammar import write_synthetic_tokenizer
from bench.moe_shapes import PRESETS as MOE_PRESETS
from engine.config import EngineConfig, ModelConfig
from engine.device import Device
from engine.engine import Engine, StepOutput
from engine.models import CausalLM
from engine.sampling import Constraint, SamplingParams

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
    "max_position_embeddings": 131072,  # Llama-3.1-8B (Llama-3-8B's shape, longer RoPE)
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
PRESETS = {"llama3-8b": LLAMA3_8B, **MOE_PRESETS}
DEFAULT_DECODE = "1x128,16x128,64x128,256x128,64x2048,256x512"
DEFAULT_PREFILL = "64x128,8x2048,1x8192"
FOOTNOTE = """
pdserve: the Engine.step() loop (schedule, forward, sample, postprocess). HF: prefill is one
forward over [B, L] (logits_to_keep=1); a decode step is a manual greedy loop over its
DynamicCache (forward [B, 1], argmax, host read of the tokens), i.e. generate()'s step without
its logits processors and stopping checks. Each figure is the median of --repeats runs on
fresh prompts, after a warm-up. floor: bytes read (decode) or FLOPs (prefill) over the ceiling
measured in this run; x floor = pdserve / floor. step ms: each decode step timed alone, the
device synchronised around it (its launch exposed); back to back: the steps run as a server
runs them (the next step prepared while the device runs this one); steady: the same run
without its first step (prepared with nothing to hide behind) and its last (every request
finishing at once), as a server's batch runs between arrivals and departures. host ms: a
pdserve step's mean wall time minus the mean device time of its decode forward (CUDA
events), i.e. what the device waits for Python per step (overlapped scheduling hides the
rest). MoE floors assume
uniform routing: a step of B tokens reads E(1 - (1 - k/E)^B) experts per layer (dummy weights
route about uniformly)."""


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int

    @staticmethod
    def parse(text: str) -> Shape:
        b, _, n = text.lower().partition("x")
        shape = Shape(int(b), int(n))
        if shape.batch < 1 or shape.length < 1:
            raise ValueError(f"batch and length must be >= 1, got {text!r}")
        return shape

    def __str__(self) -> str:
        return f"{self.batch}x{self.length}"


@dataclass(frozen=True)
class Ceiling:
    """What the device does at best, measured in this run."""

    copy_bytes_per_s: float  # device-to-device copy: bytes read + bytes written per second
    matmul_flop_per_s: float  # a large square matrix product in the run's dtype


def decode_floor_ms(cost: ModelCost, ceiling: Ceiling, shape: Shape, steps: int) -> float:
    """A decode step's floor: the bytes it reads over the measured copy bandwidth."""
    return 1000 * cost.decode_bytes(shape, steps) / ceiling.copy_bytes_per_s


@dataclass(frozen=True)
class ModelCost:
    """What a model's steps must read and compute, from its parameters."""

    dense_bytes: float  # weights every decode step reads (all but the embedding and experts)
    expert_bytes: float  # one routed expert's weights
    moe_layers: int
    num_experts: int
    top_k: int
    kv_token_bytes: float  # one token's KV over all layers
    dense_params: float  # matmul parameters per token (no embedding, LM head, routed experts)
    lm_head_params: float
    attn_flop_per_pair: float  # FLOPs of one (query, key) pair over all layers and heads

    def decode_bytes(self, shape: Shape, steps: int) -> float:
        """Bytes one decode step at batch B reads, mid-way through the timed steps."""
        e, k = self.num_experts, self.top_k
        touched = e * (1 - (1 - k / e) ** shape.batch) if e else 0.0
        context = shape.length + steps / 2
        return (
            self.dense_bytes
            + self.moe_layers * touched * self.expert_bytes
            + shape.batch * context * self.kv_token_bytes
        )

    def prefill_flops(self, shape: Shape, dtype_bytes: int) -> float:
        per_token = 2 * (self.dense_params + self.moe_layers * self.top_k * self.expert_bytes
                         / dtype_bytes)  # fmt: skip
        pairs = shape.length * (shape.length + 1) / 2  # causal
        return shape.batch * (
            shape.length * per_token + pairs * self.attn_flop_per_pair + 2 * self.lm_head_params
        )


@dataclass(frozen=True)
class Decode:
    step_ms: float
    host_ms: float | None = None  # pdserve only, on CUDA
    back_to_back_ms: float | None = None  # pdserve only
    steady_ms: float | None = None  # pdserve only: back to back, the first and last steps out


def random_prompts(shape: Shape, vocab: int, seed: int) -> torch.Tensor:
    """`[B, L]` random token ids: rows differ, so the prefix cache has no hits (the pdserve
    runs check that it had none)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (shape.batch, shape.length), generator=gen)


def clock(device: Device) -> float:
    device.synchronize()
    return time.perf_counter()


def write_preset(name: str, out_dir: Path, num_layers: int | None = None) -> Path:
    """Write preset `name`'s config.json into `out_dir` (optionally with fewer layers)."""
    config = dict(PRESETS[name])
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
        if "first_k_dense_replace" in config:
            config["first_k_dense_replace"] = min(config["first_k_dense_replace"], num_layers)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# -- the device's ceiling and the model's cost -------------------------------------------------


def measure_ceiling(device: Device, dtype: torch.dtype) -> Ceiling:
    """The copy bandwidth and matmul rate of `device` (`bench.ceiling`)."""
    return Ceiling(copy_bandwidth(device.torch_device), matmul_rate(device.torch_device, dtype))


def model_cost(engine: Engine) -> ModelCost:
    model = cast(nn.Module, engine.runner.model)
    cfg = engine.model_config
    elsize = engine.runner.dtype.itemsize
    params = {id(p): p for p in model.parameters()}
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    experts = [m for m in model.modules() if hasattr(m, "w13") and hasattr(m, "w2")]
    head = getattr(model, "lm_head", None)
    head_ids = {id(head.weight)} if isinstance(head, nn.Module) else set()
    total = sum(p.numel() for p in params.values())
    embed = sum(params[i].numel() for i in embeds if i in params)
    # Routed experts only: shared experts stacked after them (shared-expert fusion) are read
    # every step, like the dense weights, whichever way they are stored.
    expert = 0
    for m in experts:
        w13, w2 = cast(torch.Tensor, m.w13), cast(torch.Tensor, m.w2)
        expert += (w13.numel() + w2.numel()) // w13.shape[0] * cast(int, m.num_experts)
    lm_head = sum(params[i].numel() for i in head_ids) or (embed if cfg.tie_word_embeddings else 0)
    num_experts = cfg.num_experts
    # A tied LM head is the embedding: it is read once per step, as the head.
    dense = total - embed - expert + (embed if cfg.tie_word_embeddings else 0)
    cache = engine.runner.kv_cache
    kv_token = cache.total_bytes / ((cache.num_pages + 1) * cache.page_size)
    if cfg.mla is not None:
        dk = cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim
        dv = cfg.mla.v_head_dim
    else:
        dk = dv = cfg.head_dim
    return ModelCost(
        dense_bytes=dense * elsize,
        expert_bytes=(expert / max(1, len(experts)) / max(1, num_experts)) * elsize,
        moe_layers=len(experts),
        num_experts=num_experts,
        top_k=cfg.num_experts_per_tok,
        kv_token_bytes=kv_token,
        dense_params=dense - lm_head,
        lm_head_params=lm_head,
        attn_flop_per_pair=2 * cfg.num_layers * cfg.num_heads * (dk + dv),
    )


# -- pdserve ----------------------------------------------------------------------------------


# The decode runs' sampling (--temperature, --top-p): greedy unless set; --regex: the constraint.
SAMPLING: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "regex": None}
# A constraint no request can finish within the timed steps (tokens of at most a few dozen
# characters, so 2,000 of them are far past any --decode-steps run's reach).
LONG_REGEX = "[a-z]{2000}"


def submit(engine: Engine, prompts: torch.Tensor, max_new_tokens: int) -> set[str]:
    """Requests for `prompts` (greedy, or as `SAMPLING` says) on an empty prefix cache; their
    ids."""
    engine.flush_cache()  # every measurement starts from an empty prefix cache
    regex = SAMPLING["regex"]
    params = SamplingParams(
        temperature=SAMPLING["temperature"],
        top_p=SAMPLING["top_p"],
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
        constraint=Constraint("regex", regex) if regex else None,
    )
    return {engine.add_request(row, params) for row in prompts.tolist()}


def start_decode(engine: Engine, prompts: torch.Tensor, max_new_tokens: int) -> set[str]:
    """`submit`, then step until every request has its first token (prefilled): from here
    each step is a decode step of the whole batch. The requests' ids."""
    ids = submit(engine, prompts, max_new_tokens)
    started: set[str] = set()
    while started != ids:
        outputs = engine.step()
        _check_no_hits(outputs)
        started.update(o.request_id for o in outputs)
    return ids


def _check_no_hits(outputs: list[StepOutput]) -> None:
    hits = sum(o.num_cached_tokens for o in outputs)
    if hits:
        raise RuntimeError(f"the prefix cache served {hits} prompt tokens; prompts must differ")


def pdserve_prefill(engine: Engine, prompts: torch.Tensor) -> float:
    """Seconds to prefill one batch of prompts, each generating one token."""
    submit(engine, prompts, max_new_tokens=1)
    start = clock(engine.device)
    while engine.has_unfinished():
        _check_no_hits(engine.step())
    return clock(engine.device) - start


@contextmanager
def decode_device_time(engine: Engine) -> Iterator[list[tuple[Any, Any]]]:
    """While active, a (start, end) CUDA event pair around each decode forward (CUDA only:
    else the list stays empty), read after the steps so that nothing here waits for the device
    (overlapped scheduling launches a step before the previous one ends). The runner's
    `forward_decode` is wrapped on the instance, and restored after."""
    runner = engine.runner
    events: list[tuple[Any, Any]] = []
    if engine.device.kind != "cuda":
        yield events
        return
    inner = runner.forward_decode

    def timed(*args: Any, **kwargs: Any) -> Any:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = inner(*args, **kwargs)
        end.record()
        events.append((start, end))
        return out

    runner.forward_decode = timed  # type: ignore[method-assign]
    try:
        yield events
    finally:
        del runner.forward_decode


def pdserve_decode(engine: Engine, prompts: torch.Tensor, steps: int) -> Decode:
    """Mean milliseconds of a decode step over the whole batch, after its prefill, and of what
    the device waits for the host in it. Overlapped, a step's outputs come one call later, and
    the prefill's call already launched the first decode step: each call is then one step's
    period (were none in flight, a first call would launch one, untimed)."""
    ids = start_decode(engine, prompts, max_new_tokens=steps + 1)
    priming = engine.overlap and not engine.step_in_flight
    walls = []
    with decode_device_time(engine) as events:
        for call in range(steps + (1 if priming else 0)):
            start = clock(engine.device)
            outputs = engine.step()
            wall = 1000 * (clock(engine.device) - start)
            if priming and call == 0:
                if outputs:
                    raise RuntimeError("an overlapped decode step reported at once")
                continue
            walls.append(wall)
            if len(outputs) != len(ids):
                raise RuntimeError(
                    f"a decode step advanced {len(outputs)} of {len(ids)} requests "
                    "(preempted? enlarge --kv-cache-memory-gib)"
                )
    if engine.has_unfinished():
        raise RuntimeError("requests are still live after the timed decode steps")
    device_ms = [s.elapsed_time(e) for s, e in events]
    host = None
    if device_ms:
        # Per step: wall time beyond the device's own (the host's share it could not hide).
        busy = statistics.mean(device_ms)
        host = max(0.0, statistics.mean(walls) - busy)
    return Decode(statistics.mean(walls), host)


def pdserve_decode_free_running(engine: Engine, prompts: torch.Tensor, steps: int) -> Decode:
    """Mean milliseconds of a decode step over the whole batch, after its prefill, with the
    steps run back to back as a server runs them: the device is synchronised before the first
    step only, and the clock stops when the host holds the last step's tokens. Overlapped,
    the host's share of a step hides behind the device's work, which the synchronisation
    around every step in `pdserve_decode` does not let it do. `steady_ms`: the same run from
    the host's receipt of the first step's tokens to that of the last step but one, i.e.
    without the first step's exposed preparation and the last step's finishing of every
    request (a server's batch in its steady state; None under three steps)."""
    ids = start_decode(engine, prompts, max_new_tokens=steps + 1)
    preemptions = engine.scheduler.num_preemptions
    tokens = 0
    arrivals: list[float] = []  # when each step's tokens reached the host
    start = clock(engine.device)
    while engine.has_unfinished():
        made = len(engine.step())
        if made:
            arrivals.append(time.perf_counter())
        tokens += made
    elapsed = time.perf_counter() - start
    engine.device.synchronize()  # a step launched ahead, past the end, is dropped
    if tokens != steps * len(ids) or engine.scheduler.num_preemptions != preemptions:
        raise RuntimeError(
            f"{len(ids)} requests made {tokens} decode tokens, not {steps * len(ids)}, or were "
            "preempted (enlarge --kv-cache-memory-gib)"
        )
    steady = None
    if len(arrivals) >= 3:
        steady = 1000 * (arrivals[-2] - arrivals[0]) / (len(arrivals) - 2)
    return Decode(1000 * elapsed / steps, steady_ms=steady)


def pdserve_state_as_hf(model: CausalLM) -> dict[str, torch.Tensor]:
    """pdserve's (fused) parameters as views under the Hugging Face checkpoint names."""
    params = dict(model.named_parameters())
    state = {}
    for name, targets in model.weight_map().items():
        parts = []
        for target in targets if isinstance(targets, tuple) else (targets,):
            tensor = params[target.param].detach()
            if target.expert is not None:
                tensor = tensor[target.expert]
            if target.size is not None or target.offset:
                size = tensor.shape[0] - target.offset if target.size is None else target.size
                tensor = tensor.narrow(0, target.offset, size)
            parts.append((target.source_offset, target.source_dim, tensor))
            if target.source_size is None:
                break  # the whole tensor (replicas would repeat it)
        if len(parts) == 1:
            state[name] = parts[0][2]
        else:  # slices of one checkpoint tensor (shared experts split into stacked experts)
            parts.sort(key=lambda part: part[0])
            state[name] = torch.cat([part[2] for part in parts], dim=parts[0][1])
    return state


# -- transformers -----------------------------------------------------------------------------


def load_hf(
    path: str,
    dtype: torch.dtype,
    device: Device,
    state: dict[str, torch.Tensor] | None,
    own: bool = False,
) -> Any:
    """The transformers model of `path`: its checkpoint, `state` (checkpoint-named tensors),
    or (`own`) its config with transformers' own random weights, made on the device.

    Loaded, then moved (device_map would need accelerate). Passing `state` through
    `from_pretrained` lets transformers apply its own checkpoint conversions (fused experts);
    where none applies it keeps the given tensors, so dense weights are shared, not copied.
    """
    model: Any
    if own:
        config = transformers.AutoConfig.from_pretrained(path)
        with torch.device(device.torch_device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()
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
    return clock(device) - start


@torch.inference_mode()
def hf_decode(model: Any, prompts: torch.Tensor, steps: int, device: Device) -> Decode:
    """Mean ms of a greedy step: forward one token per row over the DynamicCache, argmax, read."""
    out = model(prompts.to(device.torch_device), use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(steps):
        start = clock(device)
        next_ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        out = model(next_ids, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(dim=-1).tolist()  # the host reads the tokens, as the engine does
        times.append(clock(device) - start)
    return Decode(1000 * statistics.mean(times))


# -- driver -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Results:
    prefill_s: dict[Shape, float]
    decode: dict[Shape, Decode]


def measure(
    prefill: Callable[[torch.Tensor], float],
    decode: Callable[[torch.Tensor, int], Decode],
    args: argparse.Namespace,
    vocab: int,
) -> Results:
    """Warm up once per shape, then measure every shape (median of repeats, each on fresh
    prompts)."""
    pre: dict[Shape, float] = {}
    for s in args.prefill:
        prefill(random_prompts(s, vocab, seed=7))
        secs = [prefill(random_prompts(s, vocab, seed)) for seed in range(args.repeats)]
        pre[s] = statistics.median(secs)
    dec: dict[Shape, Decode] = {}
    for s in args.decode:
        decode(random_prompts(s, vocab, seed=7), 2)
        runs = [decode(random_prompts(s, vocab, 100 + seed), args.decode_steps)
                for seed in range(args.repeats)]  # fmt: skip
        step = statistics.median(r.step_ms for r in runs)
        hosts = [r.host_ms for r in runs if r.host_ms is not None]
        backs = [r.back_to_back_ms for r in runs if r.back_to_back_ms is not None]
        steadies = [r.steady_ms for r in runs if r.steady_ms is not None]
        dec[s] = Decode(
            step,
            statistics.median(hosts) if hosts else None,
            statistics.median(backs) if backs else None,
            statistics.median(steadies) if steadies else None,
        )
    return Results(pre, dec)


def engine_config(args: argparse.Namespace, model_path: str, load_format: str) -> EngineConfig:
    biggest = max(s.batch for s in [*args.decode, *args.prefill])
    prefill_tokens = max([8192, *(s.batch * s.length for s in args.prefill)])
    sizing: dict[str, Any] = {}
    if args.kv_cache_memory_gib is not None:
        sizing["kv_cache_memory_bytes"] = int(args.kv_cache_memory_gib * 2**30)
    else:
        # Every request's prompt + output, plus the page of headroom admission keeps per request.
        sizing["num_pages"] = max(
            s.batch * (-(-(s.length + args.decode_steps + 1) // args.page_size) + 1)
            for s in [*args.decode, *args.prefill]
        )
    context = max(s.length for s in [*args.decode, *args.prefill]) + args.decode_steps + 8
    extra: dict[str, Any] = {}
    if args.attention_backend:
        extra["attention_backend"] = args.attention_backend
    if args.moe_backend:
        extra["moe_backend"] = args.moe_backend
    if args.gemm_backend:
        extra["gemm_backend"] = args.gemm_backend
    return EngineConfig(
        model_path=model_path,
        load_format=load_format,
        device=args.device,
        dtype=args.dtype,
        page_size=args.page_size,
        chunked_prefill_size=prefill_tokens,
        max_prefill_tokens=prefill_tokens,
        max_running_requests=max(256, biggest),
        context_length=context,
        disable_cuda_graph=args.disable_cuda_graph,
        short_prefill_tokens=args.short_prefill_tokens,
        disable_piecewise_cuda_graph=args.disable_piecewise_cuda_graph,
        piecewise_cuda_graph_max_tokens=args.piecewise_cuda_graph_max_tokens,
        disable_overlap_schedule=args.disable_overlap_schedule,
        disable_prefill_warmup=args.disable_prefill_warmup,
        disable_shared_experts_fusion=args.disable_shared_experts_fusion,
        **sizing,
        **extra,
    )


def device_name(device: Device) -> str:
    if device.kind == "cuda":
        return torch.cuda.get_device_name(device.index)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_decode(
    ours: Results, hf: Results | None, cost: ModelCost, ceiling: Ceiling, steps: int
) -> str:
    lines = [
        "| decode BxL | pdserve step ms | floor ms | x floor | back to back ms "
        "| back to back x floor | steady ms | steady x floor | HF step ms | pdserve tok/s "
        "| HF tok/s | host ms/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, d in ours.decode.items():
        floor = decode_floor_ms(cost, ceiling, s, steps)
        h = hf.decode.get(s) if hf else None
        back, steady = d.back_to_back_ms, d.steady_ms
        lines.append(
            f"| {s} | {d.step_ms:.2f} | {floor:.2f} | {d.step_ms / floor:.2f} "
            f"| {_num(back, '.2f')} | {_num(back / floor if back else None, '.2f')} "
            f"| {_num(steady, '.2f')} | {_num(steady / floor if steady else None, '.2f')} "
            f"| {_num(h.step_ms if h else None, '.2f')} | {1000 * s.batch / d.step_ms:,.0f} "
            f"| {_num(1000 * s.batch / h.step_ms if h else None, ',.0f')} "
            f"| {_num(d.host_ms, '.2f')} |"
        )
    return "\n".join(lines)


def render_prefill(
    ours: Results, hf: Results | None, cost: ModelCost, ceiling: Ceiling, dtype_bytes: int
) -> str:
    lines = [
        "| prefill BxL | pdserve tok/s | HF tok/s | pdserve / HF | pdserve TFLOP/s "
        "| of matmul rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s, secs in ours.prefill_s.items():
        tokens = s.batch * s.length
        h = hf.prefill_s.get(s) if hf else None
        flops = cost.prefill_flops(s, dtype_bytes) / secs
        lines.append(
            f"| {s} | {tokens / secs:,.0f} | {_num(tokens / h if h else None, ',.0f')} "
            f"| {_num(h / secs if h else None, '.2f')} | {flops / 1e12:.1f} "
            f"| {100 * flops / ceiling.matmul_flop_per_s:.0f}% |"
        )
    return "\n".join(lines)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine's own switches, passed through as they are (bench.engine, bench.stack_cost)."""
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention-backend", help="the engine's --attention-backend (default auto)")
    p.add_argument("--moe-backend", help="the engine's --moe-backend (default auto)")
    p.add_argument("--gemm-backend", help="the engine's --gemm-backend (default auto)")
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument(
        "--short-prefill-tokens",
        type=int,
        default=-1,
        help="the engine's flag: prefills of up to this many tokens run as decode rows "
        "through the decode graphs (-1 auto, 0 off)",
    )
    p.add_argument("--disable-piecewise-cuda-graph", action="store_true")
    p.add_argument(
        "--piecewise-cuda-graph-max-tokens",
        type=int,
        default=1024,
        help="the engine's flag: prefills of up to this many tokens replay graphs captured in "
        "pieces between attention calls (0 off)",
    )
    p.add_argument("--disable-overlap-schedule", action="store_true")
    p.add_argument(
        "--disable-prefill-warmup",
        action="store_true",
        help="the engine's flag: no prefill of each kind at start (its compilations then wait "
        "for the first request of each kind; bench.first_use measures them)",
    )
    p.add_argument(
        "--disable-shared-experts-fusion",
        action="store_true",
        help="the engine's flag: DeepSeek-class shared experts as a separate MLP",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="a Hugging Face model directory")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model shape, dummy weights")
    p.add_argument("--preset-layers", type=int, help=argparse.SUPPRESS)  # smoke tests only
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--decode", default=DEFAULT_DECODE, help="decode shapes, BxL, comma-separated")
    p.add_argument("--prefill", default=DEFAULT_PREFILL, help="prefill shapes, BxL ('' none)")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="report the median of this many runs")
    add_engine_flags(p)
    p.add_argument("--kv-cache-memory-gib", type=float, help="default: just what the runs need")
    p.add_argument("--skip-hf", action="store_true", help="measure pdserve only")
    p.add_argument(
        "--hf-weights",
        choices=("auto", "engine", "own"),
        default="auto",
        help="with dummy weights, transformers' weights: the engine's, handed over (the same "
        "model, but both copies on the device while transformers converts them), or its own "
        "random draws of the same law (normal, std 0.02; for a model whose two copies do not "
        "fit); auto: the engine's where two copies fit the device",
    )
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="pdserve's decode requests sample at this temperature (default 0: greedy)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature")
    p.add_argument(
        "--regex",
        nargs="?",
        const=LONG_REGEX,
        help=f"constrain every request by this pattern (no value: {LONG_REGEX!r}); pdserve only",
    )
    args = p.parse_args(argv)
    if args.regex and not args.skip_hf:
        p.error("--regex needs --skip-hf: transformers' loop here is unconstrained")
    if args.model_path:
        try:
            ModelConfig.from_pretrained(args.model_path)  # the engine's own check, before it starts
        except FileNotFoundError as exc:
            p.error(f"{exc}: give a Hugging Face model directory or --preset NAME")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    SAMPLING.update(temperature=args.temperature, top_p=args.top_p, regex=args.regex)
    try:
        args.decode = [Shape.parse(t) for t in args.decode.split(",") if t.strip()]
        args.prefill = [Shape.parse(t) for t in args.prefill.split(",") if t.strip()]
    except ValueError as exc:
        p.error(f"--decode/--prefill take BxL shapes like 64x128: {exc}")
    if not args.decode and not args.prefill:
        p.error("nothing to measure: give --decode or --prefill shapes")
    if min(args.decode_steps, args.repeats) < 1:
        p.error("--decode-steps and --repeats must be >= 1")
    return args


def hands_over(engine: Engine, choice: str) -> bool:
    """Whether transformers takes the engine's dummy weights (`--hf-weights`): under `auto`,
    where the device holds two copies of them (transformers converts some, such as the MoE
    experts it stacks, while the engine's still live), with a tenth to spare."""
    if choice != "auto":
        return choice == "engine"
    if engine.device.kind != "cuda":
        return True
    model = cast(nn.Module, engine.runner.model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(engine.device.torch_device).total_memory
    return 2 * weights <= 0.9 * total


def bench_pdserve(
    args: argparse.Namespace, path: str, load_format: str, hf_weights: str | None
) -> tuple[Results, Engine, dict[str, torch.Tensor] | None, float]:
    """pdserve's figures, its engine, its weights under checkpoint names where transformers is
    to take them (`hf_weights`: `--hf-weights` for dummy weights, None for none), and its
    start-up seconds."""
    start = time.perf_counter()
    engine = Engine(engine_config(args, path, load_format))
    startup = time.perf_counter() - start
    vocab = engine.model_config.vocab_size

    def decode(prompts: torch.Tensor, steps: int) -> Decode:
        alone = pdserve_decode(engine, prompts, steps)
        back = pdserve_decode_free_running(engine, prompts, steps)
        return Decode(alone.step_ms, alone.host_ms, back.step_ms, back.steady_ms)

    results = measure(lambda p: pdserve_prefill(engine, p), decode, args, vocab)
    hand_over = hf_weights is not None and hands_over(engine, hf_weights)
    state = pdserve_state_as_hf(engine.runner.model) if hand_over else None
    return results, engine, state, startup


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        if args.preset:
            path = str(write_preset(args.preset, Path(tmp), args.preset_layers))
            load_format, model_name = "dummy", args.preset
            if args.regex:
                vocab_size = int(PRESETS[args.preset]["vocab_size"])
                write_synthetic_tokenizer(Path(tmp), vocab_size)
            if args.preset_layers is not None:
                model_name += f" cut to {args.preset_layers} layers"
        else:
            path, load_format, model_name = args.model_path, args.load_format, args.model_path
        # Dummy weights exist only in the engine: handed over to transformers, or drawn again.
        dummy = load_format == "dummy" and not args.skip_hf
        hf_weights = args.hf_weights if dummy else None
        ours, engine, state, startup = bench_pdserve(args, path, load_format, hf_weights)
        hf_source = (
            "-"
            if args.skip_hf
            else "checkpoint"
            if not dummy
            else "the engine's"
            if state is not None
            else "its own draws (--hf-weights)"
        )
        device, dtype, vocab = engine.device, engine.runner.dtype, engine.model_config.vocab_size
        cost = model_cost(engine)
        graphs, pieces = engine.runner.graphs, engine.runner.pieces
        warmup = (
            f"{engine.runner.warmup_prefills} prefills, {engine.runner.warmup_seconds:.1f} s"
            if engine.runner.warmup_prefills
            else "off"
        )
        backends = type(engine.runner.attention).__name__
        moe = getattr(engine.runner, "moe_backend", None)
        if moe is not None:
            backends += f", MoE {moe.name}"
        del engine
        gc.collect()
        if device.kind == "cuda":
            torch.cuda.empty_cache()  # the engine's KV pool, before the HF model arrives
        ceiling = measure_ceiling(device, dtype)
        hf: Results | None = None
        if not args.skip_hf:
            model = load_hf(path, dtype, device, state, own=dummy and state is None)
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
        "backends": backends,
        "cuda graphs": "off"
        if graphs is None
        else f"{len(graphs.graphs)} (bs <= {graphs.max_bs},"
        f" {graphs.capture_seconds:.1f} s, {graphs.memory_bytes / 2**20:.0f} MiB)",
        "prefill graphs in pieces": "off" if pieces is None else pieces.describe(),
        "prefill warm-up": warmup,
        "engine start s": round(startup, 1),
        "copy GB/s": round(ceiling.copy_bytes_per_s / 1e9),
        "matmul TFLOP/s": round(ceiling.matmul_flop_per_s / 1e12, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformers weights": hf_source,
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
        "sampling": (
            "greedy"
            if not SAMPLING["temperature"]
            else f"temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']}"
        )
        + (f", constrained by regex {SAMPLING['regex']!r}" if SAMPLING["regex"] else ""),
    }
    print(" | ".join(f"{k}: {v}" for k, v in header.items()) + "\n")
    if ours.decode:
        print(render_decode(ours, hf, cost, ceiling, args.decode_steps) + "\n")
    if ours.prefill_s:
        print(render_prefill(ours, hf, cost, ceiling, dtype.itemsize))
    print(FOOTNOTE)
    if args.json:
        numbers = {
            name: {
                "prefill_s": {str(s): v for s, v in r.prefill_s.items()},
                "decode": {str(s): asdict(d) for s, d in r.decode.items()},
            }
            for name, r in (("pdserve", ours), ("hf", hf))
            if r is not None
        }
        floors = {
            "decode_floor_ms": {
                str(s): decode_floor_ms(cost, ceiling, s, args.decode_steps) for s in args.decode
            },
            "prefill_flops": {str(s): cost.prefill_flops(s, dtype.itemsize) for s in args.prefill},
        }
        args.json.write_text(json.dumps(header | numbers | floors, indent=2))


if __name__ == "__main__":
    main()
