"""The cost of constrained decoding per decode step, at several batch sizes.

    python -m bench.grammar                          # batch 1 and 64, a 151,936-token vocabulary
    python -m bench.grammar --model-path models/qwen3 --batch-sizes 1,8,64

Every row of the batch is constrained by one JSON schema (a nested object with an array, enums,
bounded numbers and strings: a tool call's arguments), its matcher moved to its own point of
the output by a seeded random walk of allowed tokens, so the rows sit in different grammar
states (at least 32 of them, batch 1 cycling through them). Per step the engine does, and
this times (the mean of `--steps` calls after `--warmup`):

- fill: `GrammarBackend.token_mask`, the bitmask rows on the host (xgrammar's matcher; several
  rows through its batch matcher's threads), plus the copy to the device on CUDA;
- accept: each row's `accept_token` of its sampled token (the host work after sampling);
- apply: `TokenMask.apply` on float32 logits `[B, V]`: xgrammar's CPU kernel, and its Triton
  kernel on CUDA when there is a GPU (timed with CUDA events);
- compile: the schema's first compile (which builds xgrammar's view of the vocabulary too),
  another schema's, and a cache hit.

Without `--model-path` the vocabulary is synthetic: the 256 byte-level symbols and seeded
random pieces of words, numbers, spaces and JSON punctuation, as many as a Qwen vocabulary
(151,936); a real checkpoint's tokenizer gives its own (the mask's cost grows with the
vocabulary and with how many tokens a state allows).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import tokenizers
import torch

from engine.grammar import GrammarBackend, GrammarState, TokenMask
from engine.sampling import Constraint
from engine.tokenizer import Tokenizer

QWEN_VOCAB = 151936
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "units": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23},
                  "maxItems": 6},
        "detail": {"type": "object", "properties": {"wind": {"type": "boolean"},
                   "note": {"type": "string", "maxLength": 40}}, "required": ["wind"]},
    },
    "required": ["city", "units", "days"],
}  # fmt: skip
_PIECES = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + "Ġ" * 12 + '{}[]",:.-_'


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE vocabulary of `vocab_size` entries: the 256 byte symbols, an EOS,
    and seeded random pieces (no merges: the bench only needs the vocabulary)."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(sorted(alphabet))}
    vocab["<|eos|>"] = len(vocab)
    rng = random.Random(seed)
    while len(vocab) < vocab_size:
        piece = "".join(rng.choice(_PIECES) for _ in range(rng.randint(2, 9)))
        vocab.setdefault(piece, len(vocab))
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return Tokenizer(backend, special_tokens={"eos_token": "<|eos|>"})


def write_synthetic_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """`synthetic_tokenizer(vocab_size)` as a checkpoint's `tokenizer.json` and
    `tokenizer_config.json` (EOS `<|eos|>`), for a model directory with dummy weights."""
    tokenizer = synthetic_tokenizer(vocab_size)
    (out_dir / "tokenizer.json").write_text(tokenizer.backend_json(), encoding="utf-8")
    config = {"eos_token": "<|eos|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def timed(fn: Callable[[int], object], steps: int, warmup: int, cuda: bool = False) -> float:
    """Mean milliseconds of `fn(call_number)` over `steps` calls after `warmup`."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t) * 1000)
    return statistics.fmean(times)


def applying(mask: TokenMask, logits: torch.Tensor) -> Callable[[int], None]:
    return lambda _: mask.apply(logits)


def allowed_ids(mask: TokenMask, row: int, vocab: int) -> list[int]:
    bits = mask.bitmask[row].cpu()
    ids = torch.arange(vocab)
    words = bits[ids // 32].to(torch.int64) & 0xFFFFFFFF
    return ids[((words >> (ids % 32)) & 1).bool()].tolist()


def walked_states(
    backend: GrammarBackend, constraint: Constraint, batch: int, rng: random.Random
) -> list[GrammarState]:
    """`batch` matchers, each moved by a random walk of allowed tokens to its own state (one
    that has not ended)."""
    states = []
    eos = set(backend.stop_token_ids)
    for _ in range(batch):
        state = backend.state(constraint)
        for _ in range(rng.randint(0, 30)):
            mask = backend.token_mask([state])
            assert mask is not None
            choices = [t for t in allowed_ids(mask, 0, backend.vocab_size) if t not in eos]
            if not choices:
                break
            state.accept(rng.choice(choices))
        states.append(state)
    return states


def run(args: argparse.Namespace) -> list[dict[str, float | int | str]]:
    if args.model_path:
        tokenizer = Tokenizer.from_pretrained(args.model_path)
        config = json.loads((Path(args.model_path) / "config.json").read_text())
        vocab = int(config["vocab_size"])
        source = f"{args.model_path} ({vocab} logits)"
    else:
        vocab = args.vocab_size
        tokenizer = synthetic_tokenizer(vocab)
        source = f"synthetic byte-level vocabulary of {vocab}"
    eos = tokenizer.eos_token_ids
    cpu = GrammarBackend(tokenizer, vocab, eos, torch.device("cpu"))
    cuda = torch.cuda.is_available()
    gpu = GrammarBackend(tokenizer, vocab, eos, torch.device("cuda")) if cuda else None
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    start = time.perf_counter()
    cpu.compile(constraint).result()
    compile_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    cpu.compile(constraint).result()
    hit_ms = (time.perf_counter() - start) * 1000
    other = Constraint("json_schema", json.dumps({**SCHEMA, "required": ["city"]}))
    start = time.perf_counter()
    cpu.compile(other).result()
    miss_ms = (time.perf_counter() - start) * 1000
    if gpu is not None:
        gpu.compile(constraint).result()
    print(f"vocabulary: {source}; torch threads {torch.get_num_threads()}")
    print(f"compile: first {compile_ms:.0f} ms (reads the vocabulary too), another schema "
          f"{miss_ms:.0f} ms, a cache hit {hit_ms:.3f} ms")  # fmt: skip
    rows = []
    rng = random.Random(args.seed)
    pool = walked_states(cpu, constraint, max(32, *args.batch_sizes), rng)
    for batch in args.batch_sizes:

        def group(i: int, b: int = batch) -> list[GrammarState]:
            start = i * b % len(pool)
            return (pool[start:] + pool[:start])[:b]

        fill = timed(lambda i: cpu.token_mask(group(i)), args.steps, args.warmup)
        states = group(0)
        mask = cpu.token_mask(states)
        assert mask is not None
        # Accept one allowed token per row, then roll it back: the same states every call.
        picks = [allowed_ids(mask, i, vocab)[0] for i in range(batch)]

        def accept(_: int, s: list[GrammarState] = states, p: list[int] = picks) -> None:
            for state, token in zip(s, p, strict=True):
                state.accept(token)
            for state in s:
                state.matcher.rollback(1)

        accept_ms = timed(accept, args.steps, args.warmup)
        logits = torch.randn(batch, vocab)
        apply_cpu = timed(applying(mask, logits), args.steps, args.warmup)
        row: dict[str, float | int | str] = {
            "batch": batch, "fill_ms": fill, "accept_ms": accept_ms, "apply_cpu_ms": apply_cpu,
        }  # fmt: skip
        if gpu is not None:
            fill_gpu = timed(lambda i: gpu.token_mask(group(i)), args.steps, args.warmup)
            gmask = gpu.token_mask(states)
            assert gmask is not None
            glogits = torch.randn(batch, vocab, device="cuda")
            apply_gpu = timed(applying(gmask, glogits), args.steps, args.warmup, cuda=True)
            row |= {"fill_copy_cuda_ms": fill_gpu, "apply_cuda_ms": apply_gpu}
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, float | int | str]]) -> None:
    cols = list(rows[0])
    print(" | ".join(f"{c:>17}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>17.3f}" if isinstance(r[c], float) else f"{r[c]:>17}"
                         for c in cols))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", help="a checkpoint whose tokenizer.json to use")
    p.add_argument("--vocab-size", type=int, default=QWEN_VOCAB, help="synthetic vocabulary")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 64])  # fmt: skip
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.vocab_size < 512:
        p.error("batch sizes and --steps must be >= 1, --vocab-size >= 512")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
