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
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import numpy as np

    from engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


def graph_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 and every 16 beyond, capped at `max_bs` (kept)."""
    sizes = [1, 2, 4, 8, *range(16, 257, 8), *range(272, max_bs + 1, 16)]
    buckets = [b for b in sizes if b < max_bs]
    return [*buckets, max_bs]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        self.runner = runner
        self.buckets = graph_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        dev = runner.device.torch_device
        # ids, positions, rows: the graphs' inputs, filled before each replay in one copy.
        self.inputs = torch.zeros(3, self.max_bs, dtype=torch.int64, device=dev)
        # Two pinned staging buffers, used in turn: with overlapped scheduling the next
        # step's inputs are written while the last step's copy may still be queued.
        self._stagings = [torch.zeros(3, self.max_bs, dtype=torch.int64).pin_memory()
                          for _ in range(2)]  # fmt: skip
        self._stagings_np = [t.numpy() for t in self._stagings]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.memory_bytes = 0
        self.capture_seconds = 0.0

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.max_bs

    def _pad(self, staging: np.ndarray, start: int, stop: int) -> None:
        """Entries `[start, stop)` read token 0 at position 0 through the scratch row."""
        staging[0, start:stop] = 0
        staging[1, start:stop] = 0
        staging[2, start:stop] = self.runner.page_table.scratch_row

    @torch.inference_mode()
    def capture(self) -> None:
        runner = self.runner
        # A collection during capture could destroy another engine's graphs (a CUDA call that
        # invalidates the capture): collect now, and not at all until the capture ends.
        gc.collect()
        gc.disable()
        try:
            self._capture_all(runner)
        finally:
            gc.enable()

    def _capture_all(self, runner: ModelRunner) -> None:
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        self._pad(self._stagings_np[0], 0, self.max_bs)
        self.inputs.copy_(self._stagings[0])
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):
                fb = runner.decode_batch(
                    self.inputs[0, :bs],
                    self.inputs[1, :bs],
                    self.inputs[2, :bs],
                    runner.max_context,
                )
                runner.run_decode(fb)  # warm-up: kernel compilation, library handles
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[bs] = runner.run_decode(fb)
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.memory_bytes = free_before - torch.cuda.mem_get_info()[0]
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
        self._turn ^= 1
        staging = self._stagings_np[self._turn]
        staging[0, :n] = ids
        staging[1, :n] = positions
        staging[2, :n] = rows
        self._pad(staging, n, bs)
        self.inputs[:, :bs].copy_(self._stagings[self._turn][:, :bs], non_blocking=True)
        if device_ids is not None:
            self.inputs[0, :n].copy_(device_ids)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
