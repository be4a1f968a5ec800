"""Decode steps captured as CUDA graphs, one per batch-size bucket.

A decode step launches a few hundred small kernels; replaying a captured graph launches them
all at once, so the device never waits on Python. Each bucket's graph reads three static
device rows (token ids, positions, page-table rows); a batch is padded up to its bucket with
entries that point at the scratch row of the page table (and so at the scratch page of the KV
pool), whose results are dropped. The whole step is inside the graph: slot computation,
attention metadata, the forward pass and the LM head. Graphs share one memory pool, captured
from the largest bucket down.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class CaptureCost:
    """What a capture took: wall time and device memory (the free memory it used up)."""

    seconds: float = 0.0
    memory_bytes: int = 0


@contextmanager
def capturing() -> Iterator[tuple[torch.cuda.Stream, CaptureCost]]:
    """The setting every capture here runs in: no garbage collection (a collection during
    capture could destroy another engine's graphs, a CUDA call that invalidates the capture),
    a side stream made current (capture cannot run on the default stream), and the cost
    measured after the device is drained; the cost is filled in when the block ends."""
    gc.collect()
    gc.disable()
    try:
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        cost = CaptureCost()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield stream, cost
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        cost.seconds = time.perf_counter() - start
        cost.memory_bytes = free_before - torch.cuda.mem_get_info()[0]
    finally:
        gc.enable()


def graph_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 and every 16 beyond, capped at `max_bs` (kept)."""
    sizes = [1, 2, 4, 8, *range(16, 257, 8), *range(272, max_bs + 1, 16)]
    buckets = [b for b in sizes if b < max_bs]
    return [*buckets, max_bs]


class GraphInputs:
    """The graphs' input rows (token ids, positions, page-table rows) in one flat device
    buffer, laid out per bucket: bucket `bs` reads ids at `[0, bs)`, positions at `[bs, 2bs)`
    and rows at `[2bs, 3bs)`. A step's inputs are then one contiguous range of a pinned staging
    buffer copied in one transfer. (Three rows of a `[3, max_bs]` buffer, sliced to a smaller
    bucket, are not contiguous: torch stages such a copy through pageable memory, and a copy
    from pageable memory waits for the stream to drain, so the host could not run ahead of
    the device.) Two staging buffers are used in turn: with overlapped scheduling the next
    step's inputs are written while the last step's copy may still be queued."""

    def __init__(self, max_bs: int, scratch_row: int, device: torch.device) -> None:
        self.max_bs = max_bs
        self.scratch_row = scratch_row
        self.device_buffer = torch.zeros(3 * max_bs, dtype=torch.int64, device=device)
        pin = device.type == "cuda"
        self._stagings = [torch.zeros(3 * max_bs, dtype=torch.int64, pin_memory=pin)
                          for _ in range(2)]  # fmt: skip
        self._stagings_np = [t.numpy() for t in self._stagings]
        self._turn = 0

    def views(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bucket `bs`'s ids, positions and rows: what its graph is captured reading."""
        buf = self.device_buffer
        return buf[:bs], buf[bs : 2 * bs], buf[2 * bs : 3 * bs]

    def fill(
        self, bs: int, ids: Sequence[int], positions: Sequence[int], rows: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage a batch of `len(ids)` entries into bucket `bs`'s layout, the rest padded to
        read token 0 at position 0 through the scratch row (results dropped). Returns the
        pinned host range and the device range it is to be copied into, both contiguous."""
        n = len(ids)
        if not n <= bs <= self.max_bs:
            raise ValueError(f"{n} entries do not fit bucket {bs} (at most {self.max_bs})")
        self._turn ^= 1
        staging = self._stagings_np[self._turn]
        staging[:n] = ids
        staging[n:bs] = 0
        staging[bs : bs + n] = positions
        staging[bs + n : 2 * bs] = 0
        staging[2 * bs : 2 * bs + n] = rows
        staging[2 * bs + n : 3 * bs] = self.scratch_row
        return self._stagings[self._turn][: 3 * bs], self.device_buffer[: 3 * bs]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        self.runner = runner
        self.buckets = graph_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        self.inputs = GraphInputs(
            self.max_bs, runner.page_table.scratch_row, runner.device.torch_device
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.memory_bytes = 0
        self.capture_seconds = 0.0

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.max_bs

    @torch.inference_mode()
    def capture(self) -> None:
        runner = self.runner
        with capturing() as (stream, cost):
            pool = None
            for bs in reversed(self.buckets):
                # The warm-up and the capture read padding only: the scratch row.
                host, dev = self.inputs.fill(bs, [], [], [])
                dev.copy_(host)
                fb = runner.decode_batch(*self.inputs.views(bs), runner.max_context)
                runner.run_decode(fb)  # warm-up: kernel compilation, library handles
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[bs] = runner.run_decode(fb)
                pool = graph.pool()
                self.graphs[bs] = graph
        self.capture_seconds, self.memory_bytes = cost.seconds, cost.memory_bytes
        log.info(
            "captured %d decode graphs (batch 1..%d) in %.1f s, %.0f MiB",
            len(self.graphs),
            self.max_bs,
            self.capture_seconds,
            self.memory_bytes / 2**20,
        )

    def replay(
        self,
        ids: list[int],
        positions: list[int],
        rows: list[int],
        device_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, vocab]` of one decode step (a view into the graph's output buffer,
        valid until the next replay). `device_ids` `[B]`, when given, replaces `ids`."""
        n = len(ids)
        bs = self.buckets[bisect.bisect_left(self.buckets, n)]
        host, dev = self.inputs.fill(bs, ids, positions, rows)
        dev.copy_(host, non_blocking=True)
        if device_ids is not None:
            self.inputs.views(bs)[0][:n].copy_(device_ids)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
