"""One request's state as it moves through the engine."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.sampler import TokenLogprobs
from engine.sampling import SamplingParams

if TYPE_CHECKING:
    import numpy as np
    import torch

    from engine.grammar import GrammarState
    from engine.radix_cache import RadixNode


log = logging.getLogger(__name__)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Decode side of a disaggregated request: pages reserved, KV arriving from a prefill worker.
    TRANSFERRING = "transferring"
    # Prefill side: finished, pages kept (locked) until the KV has been sent.
    HELD = "held"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an EOS or stop token, or the end of the constraint's grammar
    LENGTH = "length"  # max_new_tokens or the context length
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    """A request: its tokens, its pages and how far its KV has been computed.

    `page_table[i]` backs tokens `[i * page_size, (i + 1) * page_size)`. The first
    `num_cached_pages` pages belong to the radix cache (held by the lock on `cache_node`); the
    rest belong to this sequence. `num_computed_tokens` tokens have their KV in those pages.
    `grammar` (a constrained request) has accepted every output token so far: it survives
    preemption, whose recompute changes no token.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    hold_pages: bool = False
    status: SeqStatus = SeqStatus.WAITING
    page_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_pages: int = 0
    cache_node: RadixNode | None = None
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    output_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    grammar: GrammarState | None = None
    # time.monotonic() when its first prefill step was scheduled (its forward follows at once);
    # a recompute after preemption keeps it. Servers split time to first token with it.
    prefill_started_at: float | None = None
    # The prompt's ids as an int64 array, made when the request arrives, so that a prefill step
    # copies its rows in one numpy slice instead of converting a list of Python ints while the
    # device waits (8 x 2,048 tokens: 289 -> 6 µs on a 2-core host). None: the list serves.
    prompt_array: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in (SeqStatus.FINISHED, SeqStatus.HELD)

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        """A new output token (which the grammar, if any, accepts)."""
        self.token_ids.append(token_id)
        self.output_logprobs.append(logprobs)
        if self.grammar is not None and not self.grammar.accept(token_id):
            log.error("request %s: its grammar refused token %d", self.request_id, token_id)

    def check_stop(self, context_length: int) -> FinishReason | None:
        """Why the sequence should stop after its newest token, if it should."""
        if self.grammar is not None:
            if self.grammar.rejected:
                # The mask allowed a token the matcher refuses: a bug, never the client's.
                return FinishReason.ABORT
            if self.grammar.is_terminated:
                return FinishReason.STOP
        last = self.token_ids[-1]
        if last in self.sampling.stop_token_ids:
            return FinishReason.STOP
        if not self.sampling.ignore_eos and last in self.eos_token_ids:
            return FinishReason.STOP
        return FinishReason.LENGTH if self.ends_by_length(context_length) else None

    def ends_by_length(self, context_length: int, ahead: int = 0) -> bool:
        """Whether the sequence has reached its token limit or the context's end, or will
        have after `ahead` more tokens whatever they are (the overlapped scheduler's look-ahead
        asks with 1 about the token being computed now)."""
        return (
            self.num_output_tokens + ahead >= self.sampling.max_new_tokens
            or self.num_tokens + ahead >= context_length
        )
