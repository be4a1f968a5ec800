"""Sampled decoding's token pick on the GPU: the Triton kernel (`engine.kernels.sampling`) against
the torch path (`_filter`'s sort, then torch.multinomial), over float32 logits of a 128,256-token
vocabulary (Llama-3's) at batch 1 to 256.

    python -m bench.sampling [--vocab 128256] [--batches 1,8,64,256] [--logits flat,peaked]
                             [--split 1,auto]

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

`--split` compares the kernel's paths: 1 is one program a row, N > 1 the split path with N
programs a row (`engine.kernels.sampling_split`; at most one a 4,096-token tile, 32 for a
128k row), "auto" `split_for`'s choice (the split path up to 16 rows; the sampler takes it
once `sampling.SPLIT_BY_DEFAULT` is set, after this comparison). The
"split" column shows what ran ("auto" resolved); "passes" counts launches that read the whole
row on the split path (stats, probing passes, compaction); "tokens differ": rows whose token
differs from one program a row's for the same uniforms (the paths draw alike: only float32
rounding, at a top-p boundary or a tile's edge, may part them).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.ceiling import copy_bandwidth
from bench.moe_kernel import time_eager, time_graph
from engine.kernels import sampling
from engine.kernels.sampling_split import split_for
from engine.sampler import _filter, _sample_torch, _sample_triton
from engine.sampling import SamplingParams

SETTINGS = {
    "top-p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "top-k 50": SamplingParams(temperature=0.8, top_k=50),
}
HEADER = (
    "| logits | setting | batch | split | floor µs | torch µs | kernel µs | kernel device µs "
    "| device / floor | torch / kernel | passes | kept differ | tokens differ |\n"
    "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


@dataclass(frozen=True)
class Row:
    logits: str
    setting: str
    batch: int
    split: str  # programs a row that ran ("auto" with what it chose)
    floor_s: float
    torch_s: float
    kernel_s: float
    device_s: float
    passes: float  # mean full-row passes a row
    kept_differ: int
    tokens_differ: int  # rows whose token (same uniforms) differs from one program a row's

    def line(self) -> str:
        us = [f"{t * 1e6:.1f}" for t in (self.floor_s, self.torch_s, self.kernel_s, self.device_s)]
        return (
            f"| {self.logits} | {self.setting} | {self.batch} | {self.split} | {' | '.join(us)} "
            f"| {self.device_s / self.floor_s:.1f}x | {self.torch_s / self.kernel_s:.1f}x "
            f"| {self.passes:.1f} | {self.kept_differ} | {self.tokens_differ} |"
        )


def make_logits(kind: str, batch: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """`[batch, vocab]` float32 logits on the GPU: "flat" or "peaked" (see the module doc)."""
    if kind == "flat":
        return torch.randn(batch, vocab, device="cuda", generator=gen)
    logits = torch.randn(batch, vocab, device="cuda", generator=gen) * 2
    top = torch.rand(batch, vocab, device="cuda", generator=gen).topk(20, dim=-1).indices
    lift = torch.linspace(8, 16, 20, device="cuda").expand(batch, 20)
    return logits.scatter_add_(1, top, lift)


def measure(
    kind: str, name: str, batch: int, vocab: int, bandwidth: float, reps: int, splits: list[str]
) -> list[Row]:
    """One row a split setting ("auto" or programs a row), the torch path timed once."""
    gen = torch.Generator(device="cuda").manual_seed(batch)
    logits = make_logits(kind, batch, vocab, gen)
    params = [SETTINGS[name]] * batch
    rows = list(range(batch))
    generators = [None] * batch
    tokens = logits.argmax(dim=-1)

    def theirs() -> None:
        _sample_torch(logits, tokens, rows, params, generators, gen)

    torch_s = time_eager(theirs, reps)
    # The kernel alone, on inputs made once: what a CUDA graph of the decode step would hold.
    p = params[0]
    settings = torch.tensor(
        [[p.temperature], [float(max(p.top_k, 0))], [p.top_p], [p.min_p]], device="cuda"
    ).repeat(1, batch)
    uniforms = torch.rand(batch, 2, device="cuda", generator=gen)
    row_ids = torch.arange(batch, device="cuda")
    one_program = torch.empty_like(tokens)  # the tokens that every path should draw
    sampling.sample(logits, row_ids, settings, uniforms, one_program, split=1)
    sms = torch.cuda.get_device_properties(logits.device).multi_processor_count
    auto = split_for(batch, vocab, sms, block=sampling.BLOCK)
    out = []
    for setting in splits:
        split = auto if setting == "auto" else int(setting)
        kernel = functools.partial(sampling.sample, split=split)

        def ours(kernel: Callable[..., object] = kernel) -> None:
            _sample_triton(kernel, logits, tokens, rows, params, generators, gen)

        drawn = torch.empty_like(tokens)
        stats = sampling.sample_with_stats(logits, row_ids, settings, uniforms, drawn, split=split)
        kept = logits > stats.threshold[:, None]
        differ = int((kept != (_filter(logits, params) > 0)).sum())
        alone = functools.partial(kernel, logits, row_ids, settings, uniforms, tokens)
        out.append(
            Row(
                kind,
                name,
                batch,
                split=f"auto ({auto})" if split is None else setting,
                floor_s=batch * vocab * 4 / bandwidth,
                torch_s=torch_s,
                kernel_s=time_eager(ours, reps),
                device_s=time_graph(alone, reps),
                passes=float(stats.passes.mean()),
                kept_differ=differ,
                tokens_differ=int((drawn != one_program).sum()),
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--logits", default="flat,peaked")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument(
        "--split", default="1,auto", help="programs a row to compare: numbers, or auto"
    )
    args = parser.parse_args(argv)
    splits = args.split.split(",")
    if any(v != "auto" and not (v.isdigit() and int(v) >= 1) for v in splits):
        parser.error(f"--split takes numbers from 1 and auto, got {args.split}")
    if not torch.cuda.is_available():
        raise SystemExit("bench.sampling needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy {bandwidth / 1e9:.0f} GB/s, vocab {args.vocab}")
    print(HEADER)
    for kind in args.logits.split(","):
        for name in SETTINGS:
            for b in (int(v) for v in args.batches.split(",")):
                for row in measure(kind, name, b, args.vocab, bandwidth, args.reps, splits):
                    print(row.line(), flush=True)


if __name__ == "__main__":
    main()
