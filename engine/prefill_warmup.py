"""Prefill shapes run once at start, so that their Triton kernels compile before a request
waits on them.

A Triton kernel compiles once per specialization: its constexpr tiles (chosen on the host
from the step's shape: the extend attention's short- or long-sequence tiles, the MoE's tiles
by tokens), and its integer arguments equal to 1 or divisible by 16 (a step's token count).
Decode graphs and prefill pieces compile what they capture; the rest was left to the first
request of each new kind, whose step then stalled for the compilations (on an H100, a
colocated Moonlight worker's first prefills past the pieces' 1,024 tokens: mean compute 288 ms
against 25-26 later, TTFT p99 1.8 s). `warm_up_prefill` runs, at start, one prefill of each
kind a request can bring (`warmup_batches`) through the scratch row of the page table (every
KV write lands on the scratch page; no page is reserved) and drops the logits; then
`warm_up_sampling` picks tokens from every batch size a step may have, greedy and sampled
(the argmax's and the sampling kernel's launches are cut by the number of rows).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.forward_batch import ForwardBatch
from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

# A cached prefix of the warm-up's prefix batches: not a page multiple, so that a sequence's
# first new token starts inside a page.
PREFIX = 17


@dataclass(frozen=True)
class WarmBatch:
    """One prefill: per sequence its new tokens and its cached prefix."""

    extend_lens: tuple[int, ...]
    prefix_lens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)


def split_tokens(tokens: int, most: int, prefix: int = 0) -> WarmBatch:
    """`tokens` new tokens as sequences of at most `most`, each over `prefix` cached ones."""
    full, rest = divmod(tokens, most)
    lens = (most,) * full + ((rest,) if rest else ())
    return WarmBatch(lens, (prefix,) * len(lens))


def warmup_batches(
    first: int, budget: int, pieces_max: int, row_tokens: int, short_extend: int
) -> list[WarmBatch]:
    """The prefills to run at start: for token counts from `first` (the least a prefill that
    is not run as decode rows has) to `budget` (the most one step computes), each power of two
    and the count one below it (divisible by 16 and not), and `first` and `budget` themselves;
    each as the fewest sequences that a page-table row holds (`row_tokens`). The attention's
    kinds (sequences of at most `short_extend` tokens, which take other tiles; a cached
    prefix) once in each of the two ways a prefill runs: through the pieces (up to
    `pieces_max` tokens; 0: none) and eagerly past them."""
    if budget < first or first < 1:
        return []
    eager_first = max(first, pieces_max + 1)
    counts = {first, eager_first, budget - 1, budget}
    power = 1
    while power <= budget:
        counts.update((power - 1, power))
        power *= 2
    counts = {c for c in counts if first <= c <= budget}
    batches = [split_tokens(n, row_tokens, 0) for n in sorted(counts)]
    ways = [c for c in (min(pieces_max, budget), eager_first) if first <= c <= budget]
    for tokens in dict.fromkeys(ways):
        batches.append(split_tokens(tokens, min(short_extend, tokens), 0))
        if row_tokens > PREFIX:  # a prefix and at least one new token fit a row
            longest = row_tokens - PREFIX
            batches.append(split_tokens(tokens, min(short_extend, tokens, longest), PREFIX))
            batches.append(split_tokens(tokens, longest, PREFIX))
    return list(dict.fromkeys(batches))


def scratch_prefill(runner: ModelRunner, input_ids: torch.Tensor, batch: WarmBatch) -> ForwardBatch:
    """Prefill `batch` reading `input_ids` `[num_tokens]`, every sequence through the page
    table's scratch row: each KV write lands on the scratch page, and a cached prefix is read
    from it (its values: whatever the scratch page holds; the results are dropped)."""
    device = input_ids.device
    lens, prefixes = list(batch.extend_lens), list(batch.prefix_lens)
    extend_lens = torch.tensor(lens, device=device)
    positions = torch.cat(
        [torch.arange(p, p + n, device=device) for n, p in zip(lens, prefixes, strict=True)]
    )
    rows = torch.full((len(lens),), runner.page_table.scratch_row, device=device)
    seq_lens = [n + p for n, p in zip(lens, prefixes, strict=True)]
    fb = ForwardBatch(
        input_ids=input_ids,
        positions=positions,
        out_slots=runner._slots(rows.repeat_interleave(extend_lens), positions),
        page_table=runner.page_table.table,
        req_rows=rows,
        prefix_lens=torch.tensor(prefixes, dtype=torch.int64, device=device),
        extend_lens=extend_lens,
        logits_indices=extend_lens.cumsum(0) - 1,
        max_extend_len=max(lens),
        max_seq_len=max(seq_lens),
        kv_cache=runner.kv_cache,
        is_decode=False,
        host_extend_lens=tuple(lens),
        host_prefix_lens=tuple(prefixes),
    )
    runner.attention.prepare(fb)
    return fb


@torch.inference_mode()
def run_scratch_prefill(runner: ModelRunner, input_ids: torch.Tensor, batch: WarmBatch) -> None:
    """`scratch_prefill`'s batch run as a request's prefill runs: through the pieces where
    they fit, else eagerly, then the LM head; the logits are dropped."""
    fb = scratch_prefill(runner, input_ids, batch)
    pieces = runner.pieces
    n = batch.num_tokens
    hidden = pieces.run(fb) if pieces is not None and pieces.fits(n) else runner.model(fb)
    runner.model.compute_logits(hidden[fb.logits_indices])


@torch.inference_mode()
def warm_up_prefill(runner: ModelRunner) -> tuple[int, float]:
    """Run `warmup_batches` for `runner`'s limits, as a request's prefill runs (through the
    pieces where they fit, else eagerly, then the LM head). Returns the prefills run and the
    seconds they took."""
    from engine.kernels.attention import SHORT_EXTEND  # Triton: CUDA only

    config = runner.config
    pieces = runner.pieces
    row_tokens = runner.page_table.width * config.page_size
    # A step's new tokens take pages of the pool: no step holds more than it has.
    budget = min(config.prefill_token_budget, runner.kv_cache.num_pages * config.page_size)
    batches = warmup_batches(
        runner.short_prefill_tokens + 1,
        budget,
        pieces.max_tokens if pieces is not None else 0,
        min(row_tokens, runner.max_context),
        SHORT_EXTEND,
    )
    sizes = [b.num_tokens for b in batches] or [0]
    start = time.perf_counter()
    ids = torch.zeros(max(sizes), dtype=torch.int64, device=runner.device.torch_device)
    for batch in batches:
        n = batch.num_tokens
        try:
            run_scratch_prefill(runner, ids[:n], batch)
        except torch.OutOfMemoryError as e:
            # ValueError: the engine's start errors, which the CLIs print as one line.
            raise ValueError(
                f"a prefill of {n} tokens does not fit in device memory beside the KV pool: "
                f"lower --chunked-prefill-size (now {config.chunked_prefill_size}) or "
                "--mem-fraction-static"
            ) from e
        except Exception as e:  # a kernel that does not compile or launch on this device
            raise ValueError(
                f"the prefill warm-up failed on {len(batch.extend_lens)} sequences of "
                f"{n} tokens ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "requests of that kind would fail the same way; --disable-prefill-warmup "
                "starts without it"
            ) from e
    warm_up_sampling(runner)
    runner.device.synchronize()
    seconds = time.perf_counter() - start
    log.info("prefill warm-up: %d prefills of %d to %d tokens, sampling, in %.1f s", len(batches),
             min(sizes), max(sizes), seconds)  # fmt: skip
    return len(batches), seconds


@torch.inference_mode()
def warm_up_sampling(runner: ModelRunner) -> None:
    """For every number of sequences B a prefill step may end with (1 to the running requests'
    limit): the LM head on B rows (a prefill's logits, not in the decode graphs; the skinny
    GEMM's tiles go by rows) and a token picked from them greedy (on the model's dtype) and
    sampled (in float32, with its argmax), as `sample_on_device` does for a step's requests;
    the argmax and the sampling kernel cut their launches by the number of rows."""
    from engine.sampler import sample_on_device

    most = runner.config.max_running_requests
    hidden = torch.zeros(most, runner.model_config.hidden_size, dtype=runner.dtype,
                         device=runner.device.torch_device)  # fmt: skip
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(top_p=0.9)
    for b in range(1, most + 1):
        logits = runner.model.compute_logits(hidden[:b])
        for params in (greedy, sampled):
            sample_on_device(logits, [params] * b, [None] * b)
