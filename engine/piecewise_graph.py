"""Prefills captured as CUDA graphs in pieces, attention between them run eagerly.

A prefill too long to run as decode rows (`ModelRunner.runs_as_decode`) launches each of the
model's kernels from Python: on an H100 Moonlight's 27 layers took 18-30 ms of the host for
300-1,024 tokens (with the machine's CPU) whatever the device's share (`bench.prefill_phases`,
`session.sh b67`, `b68`); in pieces about 6 ms, and the device bounds the step.
Everything but the attention depends only on the number of tokens, so for a set of token
counts (buckets) the model is captured as one CUDA graph per stretch between two attention
calls: the embedding to the first layer's QKV projection, each layer's O projection, MLP or
MoE and the next layer's norm and projections, and the last layer's to the final norm. The
attention (its RoPE, KV write, metadata and kernels, which follow the batch's sequences) runs
between them as it does eagerly, on the real tokens only. A batch is padded to its bucket:
the padding rows read stale token ids and stale attention outputs (finite, never the real
rows'), and their results are dropped.

Where the model calls attention (`ForwardBatch.attend`), the capture ends the current graph,
records the call, and begins the next. The recorded call's inputs are views into the pieces'
memory pool: they are kept as views that do not own that memory (`_unowned`), so that later
pieces may reuse it; a replay runs the pieces and the calls in the captured order, so every
input is written by the piece before its call and read before anything after overwrites it.
Each call's output is copied into a buffer outside the pool, the one the next piece was
captured reading. Buckets share one pool (not the decode graphs'), captured from the largest
down; a bucket's replay never interleaves with another's.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.cuda_graph import capturing
from engine.forward_batch import ForwardBatch
from engine.prefill_warmup import scratch_prefill, split_tokens

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

AttendFn = Callable[..., torch.Tensor]


def piecewise_buckets(max_tokens: int) -> list[int]:
    """8, 16, 32, 64, then every 32 up to 256 and every 128 beyond, capped at `max_tokens`
    (kept): a batch pads at most 31 tokens up to 256 and 127 beyond."""
    if max_tokens < 1:
        return []
    sizes = [8, 16, 32, 64, *range(96, 257, 32), *range(384, max_tokens + 1, 128)]
    return [*(b for b in sizes if b < max_tokens), max_tokens]


_INT_TYPES = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}  # by element size


class _CudaMemory:
    """`__cuda_array_interface__` over a tensor's elements, as integers of their width: what
    `torch.as_tensor` wraps without owning (its dtypes lack bfloat16; the view restores it)."""

    def __init__(self, t: torch.Tensor) -> None:
        size = t.element_size()
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "strides": tuple(s * size for s in t.stride()),
            "typestr": _INT_TYPES[size],
            "data": (t.data_ptr(), False),
            "version": 3,
        }


def _unowned(t: torch.Tensor) -> torch.Tensor:
    """A view of `t`'s elements that does not keep its memory allocated."""
    return torch.as_tensor(_CudaMemory(t), device=t.device).view(t.dtype)


@dataclass
class _Call:
    """One recorded attention call: `fn(batch, *inputs)` written into `out`."""

    fn: AttendFn
    inputs: tuple[torch.Tensor, ...]  # [N, ...] unowned views into the pool
    out: torch.Tensor  # [N, ...] a view of a buffer outside the pool


class _Recorder:
    """Set on the capture's batch (`ForwardBatch.pieces`): splits the capture at each
    attention call."""

    def __init__(self, owner: PiecewiseGraphs, pool: Any) -> None:
        self.owner = owner
        self.pool = pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.calls: list[_Call] = []
        self._begin()

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.graphs.append(graph)

    def attend(self, fn: AttendFn, batch: ForwardBatch, inputs: tuple[torch.Tensor, ...]) -> Any:
        self.graphs[-1].capture_end()
        # Run once outside the capture for the output's shape (on the capture's padding
        # batch: its KV writes go to the scratch page; the inputs hold no values yet).
        batch.pieces = None
        try:
            result = fn(batch, *inputs)
        finally:
            batch.pieces = self
        out = self.owner.output_buffer(result)
        self.calls.append(_Call(fn, tuple(_unowned(t) for t in inputs), out))
        self._begin()
        return out

    def end(self) -> None:
        self.graphs[-1].capture_end()


class PiecewiseGraphs:
    """One bucket's pieces are `graphs[N]` (one more than its attention calls) and
    `calls[N]`; every bucket reads its token ids from `ids[:N]`."""

    def __init__(self, runner: ModelRunner, max_tokens: int) -> None:
        self.runner = runner
        self.buckets = piecewise_buckets(max_tokens)
        self.max_tokens = self.buckets[-1] if self.buckets else 0
        device = runner.device.torch_device
        self.ids = torch.zeros(self.max_tokens, dtype=torch.int64, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.calls: dict[int, list[_Call]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self._outputs: dict[tuple[Any, ...], torch.Tensor] = {}
        self.memory_bytes = 0
        self.capture_seconds = 0.0
        self.runs = 0  # prefills run through the pieces

    def fits(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    def output_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """`[N, ...]` rows of a zeroed buffer of `max_tokens` rows shaped like `like`'s, one
        per shape and dtype, shared by every call and bucket (they run one after another).
        Zeroed so that padding rows are finite from the first replay."""
        key = (tuple(like.shape[1:]), like.dtype)
        buf = self._outputs.get(key)
        if buf is None:
            buf = torch.zeros(self.max_tokens, *like.shape[1:], dtype=like.dtype,
                              device=like.device)  # fmt: skip
            self._outputs[key] = buf
        return buf[: like.shape[0]]

    def _padding_batch(self, tokens: int) -> ForwardBatch:
        """A prefill of `tokens` tokens through the page table's scratch row (every slot on the
        scratch page), reading `ids[:tokens]`: sequences of at most the tokens a row maps (a
        bucket may be longer than the context length; only the attention, run eagerly between
        the pieces, sees the sequences)."""
        runner = self.runner
        row_tokens = runner.page_table.width * runner.config.page_size
        return scratch_prefill(runner, self.ids[:tokens], split_tokens(tokens, row_tokens))

    @torch.inference_mode()
    def capture(self) -> None:
        try:
            with capturing() as (_, cost):
                self._capture_all()
        except torch.OutOfMemoryError as e:
            # ValueError: the engine's start errors, which the CLIs print as one line.
            raise ValueError(
                "no memory left to capture prefill graphs in pieces: lower "
                "--mem-fraction-static or --piecewise-cuda-graph-max-tokens, or start with "
                "--disable-piecewise-cuda-graph"
            ) from e
        except RuntimeError as e:
            raise ValueError(
                f"capturing prefill graphs in pieces failed ({e}); start with "
                "--disable-piecewise-cuda-graph to run prefills eagerly"
            ) from e
        self.capture_seconds, self.memory_bytes = cost.seconds, cost.memory_bytes
        log.info("captured prefill graphs in pieces: %s", self.describe())

    def _capture_all(self) -> None:
        """Every bucket's pieces, largest first, on `capturing`'s stream."""
        model = self.runner.model
        pool = torch.cuda.graph_pool_handle()
        for tokens in reversed(self.buckets):
            fb = self._padding_batch(tokens)
            model(fb)  # warm-up: kernel compilation, library handles
            recorder = _Recorder(self, pool)
            fb.pieces = recorder
            try:
                hidden = model(fb)
            finally:
                recorder.end()
                fb.pieces = None
            self.graphs[tokens] = recorder.graphs
            self.calls[tokens] = recorder.calls
            self.hidden[tokens] = hidden

    def describe(self) -> str:
        """The buckets and what capturing them took, for logs and benchmark headers."""
        return (
            f"{len(self.buckets)} buckets (tokens <= {self.max_tokens}, "
            f"{self.capture_seconds:.1f} s, {self.memory_bytes / 2**20:.0f} MiB)"
        )

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """Final hidden states `[T, hidden]` of prefill `fb` (prepared; `T` within
        `max_tokens`): a view into the bucket's output, valid until the next run."""
        n = int(fb.input_ids.shape[0])
        tokens = self.buckets[bisect.bisect_left(self.buckets, n)]
        self.ids[:n].copy_(fb.input_ids)
        graphs = self.graphs[tokens]
        for graph, call in zip(graphs, self.calls[tokens], strict=False):
            graph.replay()
            call.out[:n].copy_(call.fn(fb, *(t[:n] for t in call.inputs)))
        graphs[-1].replay()
        self.runs += 1
        return self.hidden[tokens][:n]
