"""What a worker's first prefills of each kind cost beyond later ones of the same kind.

    python -m bench.first_use --preset moonlight-16b-a3b --batches "1500;8x128;2048+1024"
    python -m bench.first_use --preset llama3-8b --mix 24 --disable-prefill-warmup

Triton compiles a kernel for each new specialization it meets (constexpr tiles chosen by the
step's shape, integer arguments equal to 1 or divisible by 16); a compilation met on the
request path stalls that step for a fraction of a second or more. After the engine has started
(decode graphs, prefill pieces and, unless `--disable-prefill-warmup`, the prefill warm-up),
each batch of `--batches` is prefilled (one output token each) twice with fresh prompts: the
first time and again. Printed per batch: both wall times and the compilations the first met
(Triton's `jit_cache_hook`: a kernel specialization new to this process, compiled or loaded
from Triton's cache, with the seconds until its `jit_post_compile_hook`). `--mix N` then
prefills N batches of random composition (1 to 8 prompts of 1 to `--mix-max-len` tokens, a
third over a cached prefix) and counts what compiled among them: what a warm-up left to
requests. Triton's cache is a fresh directory unless `--keep-triton-cache`, so the figures
are a new machine's (a pod without a cache volume).

A batch is `;`-separated: prompts `L` or `NxL`, comma-separated within it (`700,900`, `8x128`),
and `L+P` for a prompt of L new tokens after a cached prefix of P (the prefix is prefilled
first, outside the timing, so that the batch's prompts hit it in the prefix cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BATCHES = "1500;1100,900;8x128;40x33;2048+1024;3000;4096;2x4096;1,1"


@dataclass(frozen=True)
class Prompt:
    new: int
    prefix: int = 0


def parse_batch(text: str) -> list[Prompt]:
    """`700,900`, `8x128`, `2048+1024` (new tokens after a cached prefix)."""
    prompts: list[Prompt] = []
    for part in text.split(","):
        part = part.strip().lower()
        count, times, rest = part.rpartition("x")
        new, _, prefix = rest.partition("+")
        n, p, c = int(new), int(prefix or 0), int(count or 1)
        if n < 1 or p < 0 or c < 1 or (times and not count):
            raise ValueError(f"a prompt is [Nx]L[+P] with N, L >= 1 and P >= 0, got {part!r}")
        prompts += [Prompt(n, p)] * c
    return prompts


@dataclass
class Compiles:
    """Specializations met while active: (kernel name, seconds to compile or load) each."""

    kernels: list[tuple[str, float]] = field(default_factory=list)
    _started: dict[tuple[str, Any], float] = field(default_factory=dict)  # (name, key) -> start

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.kernels)

    def names(self) -> str:
        counts: dict[str, int] = {}
        for name, _ in self.kernels:
            counts[name] = counts.get(name, 0) + 1
        return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(counts.items()))


@contextmanager
def counting_compiles() -> Iterator[list[Compiles]]:
    """Triton's compile hooks set while active; append a `Compiles` to the yielded list to
    start a new count (the last one counts)."""
    from triton import knobs

    counts: list[Compiles] = [Compiles()]

    def name(kw: dict[str, Any]) -> str:
        return str(getattr(kw.get("fn"), "name", kw.get("fn")))  # a JitFunctionInfo

    def before(**kw: Any) -> bool:
        counts[-1]._started[name(kw), kw["key"]] = time.perf_counter()
        return False  # compile as usual

    def after(**kw: Any) -> bool:
        started = counts[-1]._started.pop((name(kw), kw["key"]), None)
        if started is not None:
            counts[-1].kernels.append((name(kw), time.perf_counter() - started))
        return False

    old = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
    try:
        yield counts
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = old


def run_batch(engine: Any, prompts: list[Prompt], rng: random.Random) -> float:
    """Prefill `prompts` (their prefixes first, untimed), one output token each: wall ms."""
    from engine.sampling import SamplingParams

    vocab = engine.model_config.vocab_size
    engine.flush_cache()
    params = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    def drain() -> int:
        hits = 0
        while engine.has_unfinished():
            hits += sum(o.num_cached_tokens for o in engine.step())
        return hits

    prefixes = {p.prefix: tokens(p.prefix) for p in prompts if p.prefix}
    for prefix in prefixes.values():
        engine.add_request(prefix, params)
    drain()
    engine.device.synchronize()
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(prefixes.get(p.prefix, []) + tokens(p.new), params)
    hits = drain()
    engine.device.synchronize()
    wall = 1000 * (time.perf_counter() - start)
    want = sum(p.prefix for p in prompts)
    # The cache holds a prefix to a page boundary only; more than was cached is a bug.
    if hits > want:
        raise RuntimeError(f"prefix cache served {hits} tokens where {want} were cached")
    return wall


def random_batch(rng: random.Random, max_len: int) -> list[Prompt]:
    prompts = []
    for _ in range(rng.randint(1, 8)):
        prefix = (
            rng.randint(max(1, max_len // 4), max(1, max_len // 2)) if rng.random() < 1 / 3 else 0
        )
        prompts.append(Prompt(rng.randint(1, max_len), prefix))
    return prompts


def render(rows: list[tuple[str, int, float, float, Compiles]]) -> str:
    lines = [
        "| batch | tokens | first ms | again ms | compilations | compile s | kernels |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, tokens, first, again, c in rows:
        lines.append(
            f"| {name} | {tokens} | {first:.1f} | {again:.1f} | {len(c.kernels)} "
            f"| {c.seconds:.2f} | {c.names() or '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--batches", default=DEFAULT_BATCHES)
    extra.add_argument("--mix", type=int, default=0, metavar="N")
    extra.add_argument("--mix-max-len", type=int, default=3000)
    extra.add_argument("--seed", type=int, default=0)
    extra.add_argument("--keep-triton-cache", action="store_true")
    ours, rest = extra.parse_known_args(argv if argv is not None else sys.argv[1:])
    try:
        batches = [(t.strip(), parse_batch(t)) for t in ours.batches.split(";") if t.strip()]
    except ValueError as exc:
        sys.exit(f"bench.first_use: --batches: {exc}")
    mix_longest = ours.mix_max_len + ours.mix_max_len // 2
    longest = max([p.new + p.prefix for _, b in batches for p in b] + [mix_longest])
    # Pages for the largest batch with its prefixes cached beside it (a mix batch: at most 8
    # prompts of the longest), and a page of headroom a request.
    most = max([sum(p.new + 2 * p.prefix + 32 for p in b) for _, b in batches]
               + [8 * (2 * mix_longest + 32)])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pdserve-first-use-") as tmp:
        if not ours.keep_triton_cache:
            os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton")
        from bench.engine import device_name, engine_config, parse_args, write_preset
        from engine.engine import Engine

        args = parse_args([*rest, "--skip-hf", "--decode", "", "--prefill", f"1x{longest}",
                           "--decode-steps", "1"])  # fmt: skip
        if args.preset:
            path = str(write_preset(args.preset, Path(tmp), args.preset_layers))
            load_format = "dummy"
        else:
            path, load_format = args.model_path, args.load_format
        config = engine_config(args, path, load_format)
        if args.kv_cache_memory_gib is None:
            pages = -(-most // args.page_size) + 2 * 64
            config = dataclasses.replace(config, num_pages=pages)
        start = time.perf_counter()
        engine = Engine(config)
        startup = time.perf_counter() - start
        rng = random.Random(ours.seed)
        rows = []
        with counting_compiles() as counts:
            for name, prompts in batches:
                counts.append(Compiles())
                first = run_batch(engine, prompts, rng)
                compiled = counts[-1]
                counts.append(Compiles())
                again = run_batch(engine, prompts, rng)
                rows.append((name, sum(p.new for p in prompts), first, again, compiled))
            counts.append(Compiles())
            mix_ms = [run_batch(engine, random_batch(rng, ours.mix_max_len), rng)
                      for _ in range(ours.mix)]  # fmt: skip
            mixed = counts[-1]
    print(f"{device_name(engine.device)}; engine start {startup:.1f} s (prefill warm-up "
          f"{engine.runner.warmup_seconds:.1f} s); Triton cache "
          f"{'kept' if ours.keep_triton_cache else 'fresh'}")  # fmt: skip
    print()
    print(render(rows))
    if ours.mix:
        print()
        print(f"mix of {ours.mix} random batches (1-8 prompts of 1-{ours.mix_max_len} tokens, a "
              f"third over a cached prefix): {len(mixed.kernels)} compilations, "
              f"{mixed.seconds:.2f} s ({mixed.names() or 'none'}); batch ms max "
              f"{max(mix_ms):.1f}, median {sorted(mix_ms)[len(mix_ms) // 2]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
