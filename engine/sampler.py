"""Turns a step's logits into next tokens: greedy, temperature, top-k, top-p, min-p, seeds."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.device import triton_runs, upload
from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from engine.grammar import TokenMask


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the chosen token and the `top_logprobs` best alternatives."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def to_device(values: list[list[float]] | list[int], device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without waiting for the device: on CUDA through
    pinned memory, copied asynchronously. (A copy from pageable memory waits for everything
    queued on the stream, the step's forward pass included, so the host could not prepare
    the next step meanwhile.) Floats for nested lists, int64 for a flat list of ints."""
    dtype = torch.int64 if values and isinstance(values[0], int) else torch.float32
    return upload(torch.tensor(values, dtype=dtype), device)


def _filter(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities `[B, V]` after temperature, top-k, top-p and min-p (rows renormalised)."""
    device = logits.device
    vocab = logits.shape[-1]
    # One upload for the four per-row settings (top-k is exact in float32 up to 2**24).
    settings = to_device(
        [
            [p.temperature for p in params],
            [float(p.top_k if p.top_k > 0 else vocab) for p in params],
            [p.top_p for p in params],
            [p.min_p for p in params],
        ],
        device,
    )
    temps, top_ks, top_ps, min_ps = settings
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]
    # Keep a token while the mass strictly before it is below top_p (the first always stays).
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (rank < top_ks[:, None]) & (before < top_ps[:, None])
    keep &= sorted_probs >= min_ps[:, None] * sorted_probs[:, :1]
    sorted_probs = sorted_probs * keep
    probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


@dataclass
class DeviceSample:
    """A step's sampled tokens (and log-probabilities), computed on the device, with their copy
    to the host under way. `tokens` `[B]` stays on the device (the next decode step may read
    it as its input ids); `result()` waits for the copy and builds the host lists."""

    tokens: torch.Tensor
    params: Sequence[SamplingParams]
    _host: list[torch.Tensor]
    _wanted: list[int]
    _event: torch.cuda.Event | None

    def wait(self) -> None:
        """Until the step is done on the device (its copy to the host comes last)."""
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> SampleResult:
        self.wait()
        token_list = self._host[0].tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(self.params)
        if self._wanted:
            chosen, top_vals, top_ids = (t.tolist() for t in self._host[1:])
            for j, i in enumerate(self._wanted):
                n = self.params[i].top_logprobs
                top = tuple(zip(map(int, top_ids[j][:n]), top_vals[j][:n], strict=True))
                logprobs[i] = TokenLogprobs(chosen[j], top)
        return SampleResult(token_list, logprobs)


@functools.cache
def _triton_argmax() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The Triton argmax for CUDA logits where the kernels run (`triton_runs`; torch's runs one
    block a row: 27 µs for a 128k row on the H200), else None: torch's. Imported on first use
    only."""
    if not triton_runs("cuda"):
        return None
    from engine.kernels.argmax import argmax

    return argmax


@functools.cache
def _triton_sampling() -> Callable[..., object] | None:
    """The Triton sampling kernel for CUDA logits where the kernels run (`triton_runs`;
    `_filter` sorts every sampled row: about 1.4 ms of a batch-64 Llama-3 step on the H200),
    else None: the torch path. Imported on first use only."""
    if not triton_runs("cuda"):
        return None
    from engine.kernels.sampling import sample

    return sample


def _uniforms(
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Two uniforms in [0, 1) a row, `[R, 2]` on `device`, drawn there without a host sync: a row
    with its own generator draws from it alone (so a seeded request's tokens do not depend on
    the batch), the others together from `default_generator` (torch's default when None)."""
    shared = [j for j, g in enumerate(generators) if g is None]
    if len(shared) == len(generators):
        return torch.rand(len(generators), 2, device=device, generator=default_generator)
    uniforms = torch.empty(len(generators), 2, device=device)
    if shared:
        draws = torch.rand(len(shared), 2, device=device, generator=default_generator)
        uniforms[to_device(shared, device)] = draws
    for j, gen in enumerate(generators):
        if gen is not None:
            uniforms[j] = torch.rand(2, device=device, generator=gen)
    return uniforms


def _sample_triton(
    kernel: Callable[..., object],
    logits: torch.Tensor,
    tokens: torch.Tensor,
    sampled_rows: list[int],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator | None,
) -> None:
    """`sampled_rows`' tokens into `tokens` by the sampling kernel (`engine.kernels.sampling`):
    no sort, and the rows read where they lie in `logits`."""
    device = logits.device
    chosen = [params[i] for i in sampled_rows]
    # One upload for the four per-row settings; top-k 0 is off.
    settings = to_device(
        [
            [p.temperature for p in chosen],
            [float(max(p.top_k, 0)) for p in chosen],
            [p.top_p for p in chosen],
            [p.min_p for p in chosen],
        ],
        device,
    )
    uniforms = _uniforms([generators[i] for i in sampled_rows], default_generator, device)
    kernel(logits, to_device(sampled_rows, device), settings, uniforms, tokens)


def _sample_torch(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    sampled_rows: list[int],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator | None,
) -> None:
    """`sampled_rows`' tokens into `tokens` by `_filter` and torch.multinomial: the CPU's path
    and the kernel's reference."""
    device = logits.device
    rows = to_device(sampled_rows, device)
    probs = _filter(logits[rows], [params[i] for i in sampled_rows])
    shared = [j for j, i in enumerate(sampled_rows) if generators[i] is None]
    if len(shared) == len(sampled_rows):
        picks = torch.multinomial(probs, 1, generator=default_generator)
        tokens[rows] = picks[:, 0]
    elif shared:
        some = to_device(shared, device)
        picks = torch.multinomial(probs[some], 1, generator=default_generator)
        tokens[rows[some]] = picks[:, 0]
    for j, i in enumerate(sampled_rows):
        gen = generators[i]
        if gen is not None:
            tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]


def sample_on_device(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator | None = None,
    mask: TokenMask | None = None,
) -> DeviceSample:
    """Pick one token per row of `logits` `[B, V]` without waiting for the device: the tokens
    and log-probabilities are copied to the host asynchronously (one copy each).

    `logits` come in the model's dtype. An all-greedy batch with no mask and no
    log-probabilities takes its argmax on them as they are (widening to float32 is exact and
    keeps the order and the first of equal values, so the tokens are the same; a bfloat16
    step then skips the float32 copy: 122 µs of a batch-256 Moonlight step on the H200);
    anything else widens them to float32 first, as the model returned them before.

    A row with its own generator (a seeded request) draws from it alone, so its tokens do not
    depend on what else is in the batch. `mask` (constrained rows) sets the logits of tokens
    their grammars forbid to -inf, in place, before any token is picked; log-probabilities are
    the model's, from the logits before the mask. Sampled rows go through the Triton kernel on
    CUDA (same filters, another stream of random numbers than the torch path's).
    """
    device = logits.device
    wanted = [i for i, p in enumerate(params) if p.wants_logprobs]
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if logits.dtype != torch.float32 and (wanted or sampled_rows or mask is not None):
        logits = logits.float()
    # Row lists as device indices, uploaded without waiting (see to_device).
    wanted_rows = to_device(wanted, device) if wanted else None
    logp = torch.log_softmax(logits[wanted_rows], dim=-1) if wanted_rows is not None else None
    if mask is not None:
        mask.apply(logits)
    fast_argmax = _triton_argmax() if logits.is_cuda else None
    tokens = fast_argmax(logits) if fast_argmax else logits.argmax(dim=-1)
    if sampled_rows:
        kernel = _triton_sampling() if logits.is_cuda else None
        if kernel is not None:
            _sample_triton(
                kernel, logits, tokens, sampled_rows, params, generators, default_generator
            )
        else:
            _sample_torch(logits, tokens, sampled_rows, params, generators, default_generator)
    device_parts = [tokens]
    if logp is not None:
        chosen = logp.gather(1, tokens[wanted_rows][:, None])[:, 0]
        max_n = max(params[i].top_logprobs for i in wanted)
        top_vals, top_ids = logp.topk(max_n, dim=-1) if max_n else (logp[:, :0], logp[:, :0])
        device_parts += [chosen, top_vals, top_ids]
    if logits.is_cuda:
        # Into pinned memory, without waiting; the event marks the copies' end.
        host = [t.to("cpu", non_blocking=True) for t in device_parts]
        event = torch.cuda.Event()
        event.record()
        return DeviceSample(tokens, params, host, wanted, event)
    return DeviceSample(tokens, params, [t.cpu() for t in device_parts], wanted, None)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator | None = None,
    mask: TokenMask | None = None,
) -> SampleResult:
    """`sample_on_device`, waited for."""
    return sample_on_device(logits, params, generators, default_generator, mask).result()
