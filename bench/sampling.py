"""Sampled decoding's token pick on the GPU: the Triton kernel (`engine.kernels.sampling`) against
the torch path (`_filter`'s sort, then torch.multinomial), over float32 logits of a 128,256-token
vocabulary (Llama-3's) at batch 1 to 256.

    python -m bench.sampling [--vocab 128256] [--batches 1,8,64,256] [--logits flat,peaked]

Two settings, temperature 0.8 with top-p 0.9 and with top-k 50, on two kinds of logits: "flat",
N(0, 1), where top-p keeps about half the vocabulary (the kernel's worst case: about 10 passes
over the row), and "peaked", N(0, 4) with 20 tokens lifted by 8 to 16 (LLM-like: top-p keeps a
handful, 3 passes). Times, medians of `--reps`: "torch" and "kernel", the sampler's whole
sampled-rows call (settings and uniforms uploaded, then the sort or the kernel) between two
synchronizations, launches included; "kernel device", a CUDA-graph replay of the kernel alone.
The floor is the logits read once (B x vocab x 4 bytes) over the copy bandwidth measured in the
same run; the kernel reads each row `passes` times (from L2 after the first). "kept differ":
tokens whose kept/dropped status differs from `_filter`'s over the whole batch (ties and
float32 rounding at the top-p boundary; see the kernel's docstring).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

import torch

from bench.ceiling import copy_bandwidth
from bench.moe_kernel import time_eager, time_graph
from engine.kernels import sampling
from engine.sampler import _filter, _sample_torch, _sample_triton
from engine.sampling import SamplingParams

SETTINGS = {
    "top-p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "top-k 50": SamplingParams(temperature=0.8, top_k=50),
}
HEADER = (
    "| logits | setting | batch | floor µs | torch µs | kernel µs | kernel device µs "
    "| device / floor | torch / kernel | passes | kept differ |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


@dataclass(frozen=True)
class Row:
    logits: str
    setting: str
    batch: int
    floor_s: float
    torch_s: float
    kernel_s: float
    device_s: float
    passes: float  # mean full-row passes a row
    kept_differ: int

    def line(self) -> str:
        us = [f"{t * 1e6:.1f}" for t in (self.floor_s, self.torch_s, self.kernel_s, self.device_s)]
        return (
            f"| {self.logits} | {self.setting} | {self.batch} | {' | '.join(us)} "
            f"| {self.device_s / self.floor_s:.1f}x | {self.torch_s / self.kernel_s:.1f}x "
            f"| {self.passes:.1f} | {self.kept_differ} |"
        )


def make_logits(kind: str, batch: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """`[batch, vocab]` float32 logits on the GPU: "flat" or "peaked" (see the module doc)."""
    if kind == "flat":
        return torch.randn(batch, vocab, device="cuda", generator=gen)
    logits = torch.randn(batch, vocab, device="cuda", generator=gen) * 2
    top = torch.rand(batch, vocab, device="cuda", generator=gen).topk(20, dim=-1).indices
    lift = torch.linspace(8, 16, 20, device="cuda").expand(batch, 20)
    return logits.scatter_add_(1, top, lift)


def measure(kind: str, name: str, batch: int, vocab: int, bandwidth: float, reps: int) -> Row:
    gen = torch.Generator(device="cuda").manual_seed(batch)
    logits = make_logits(kind, batch, vocab, gen)
    params = [SETTINGS[name]] * batch
    rows = list(range(batch))
    generators = [None] * batch
    tokens = logits.argmax(dim=-1)
    kernel = sampling.sample

    def ours() -> None:
        _sample_triton(kernel, logits, tokens, rows, params, generators, gen)

    def theirs() -> None:
        _sample_torch(logits, tokens, rows, params, generators, gen)

    # The kernel alone, on inputs made once: what a CUDA graph of the decode step would hold.
    p = params[0]
    settings = torch.tensor(
        [[p.temperature], [float(max(p.top_k, 0))], [p.top_p], [p.min_p]], device="cuda"
    ).repeat(1, batch)
    uniforms = torch.rand(batch, 2, device="cuda", generator=gen)
    row_ids = torch.arange(batch, device="cuda")
    stats = sampling.sample_with_stats(logits, row_ids, settings, uniforms, tokens)
    kept = logits > stats.threshold[:, None]
    differ = int((kept != (_filter(logits, params) > 0)).sum())
    alone = functools.partial(kernel, logits, row_ids, settings, uniforms, tokens)
    return Row(
        kind,
        name,
        batch,
        floor_s=batch * vocab * 4 / bandwidth,
        torch_s=time_eager(theirs, reps),
        kernel_s=time_eager(ours, reps),
        device_s=time_graph(alone, reps),
        passes=float(stats.passes.mean()),
        kept_differ=differ,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--logits", default="flat,peaked")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.sampling needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e9:.0f} GB/s, vocab {args.vocab}")
    print(HEADER)
    for kind in args.logits.split(","):
        for name in SETTINGS:
            for b in (int(v) for v in args.batches.split(",")):
                print(measure(kind, name, b, args.vocab, bandwidth, args.reps).line(), flush=True)


if __name__ == "__main__":
    main()
