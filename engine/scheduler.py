"""Continuous batching: which sequences run in the next step, and what their results mean.

A step is either a prefill step (new, chunked or preempted requests, up to the prefill token
budget) or a decode step (every running request, one token each). Prefill goes first, as in
SGLang, so new requests join the running batch as early as possible. When decode runs out of
pages the newest running request is preempted: its pages go back (its computed prefix stays in
the radix cache) and it is recomputed later from its prompt plus the tokens it has so far.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.page_manager import PageManager
from engine.sampler import SampleResult
from engine.sequence import FinishReason, SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledBatch:
    """Sequence `seqs[i]` computes `extend_lens[i]` tokens from its `num_computed_tokens`."""

    seqs: list[Sequence]
    extend_lens: list[int]
    is_decode: bool

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)


class Scheduler:
    def __init__(self, config: EngineConfig, pages: PageManager, context_length: int) -> None:
        self.config = config
        self.pages = pages
        self.context_length = context_length
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add(self, seq: Sequence) -> None:
        """Queue a request, refusing one that could never be served."""
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.num_tokens == 0:
            raise ValueError("the prompt is empty; at least one token is needed")
        if seq.num_tokens >= self.context_length:
            raise ValueError(
                f"the prompt has {seq.num_tokens} tokens, but the context length is "
                f"{self.context_length} (prompt tokens must be fewer, to leave room for output)"
            )
        longest = min(seq.num_tokens + seq.sampling.max_new_tokens, self.context_length)
        need = self.pages.pages_for(longest)
        if need > self.pages.pool.num_pages:
            raise ValueError(
                f"the request may grow to {longest} tokens ({need} pages of "
                f"{self.pages.page_size}), but the KV pool has only "
                f"{self.pages.pool.num_pages} pages; lower max_new_tokens or enlarge the pool"
            )
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when there is nothing to run."""
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.config.prefill_token_budget
        seqs: list[Sequence] = []
        lens: list[int] = []
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) >= self.config.max_running_requests:
                break
            if not seq.page_table:
                self.pages.match_prefix(seq)
            remaining = seq.num_tokens - seq.num_computed_tokens
            if self.config.chunked_prefill_enabled:
                n = min(remaining, budget)
            elif remaining > budget and seqs:
                break  # unchunked: a long prompt runs alone in its own step
            else:
                n = remaining
            started = len(seq.page_table) > seq.num_cached_pages
            if not self._admit(seq, seq.num_computed_tokens + n, started, len(seqs)):
                if not started:
                    # Only the head of the queue, mid-prefill, may hold pages while waiting.
                    self.pages.release(seq)
                    seq.num_computed_tokens = 0
                break
            seqs.append(seq)
            lens.append(n)
            budget -= n
            if n < remaining:
                break  # the rest of this prompt comes in later steps
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        return ScheduledBatch(seqs, lens, is_decode=False) if seqs else None

    def _admit(self, seq: Sequence, num_tokens: int, started: bool, num_admitted: int) -> bool:
        """Reserve pages for a prefill step, keeping a page of headroom per running request
        (so admission does not force the next decode step to preempt) unless `seq` is
        already under way."""
        if not started:
            need = self.pages.pages_for(num_tokens) - len(seq.page_table)
            headroom = len(self.running) + num_admitted
            if self.pages.num_available < need + headroom:
                return False
        return self.pages.reserve(seq, num_tokens)

    def _schedule_decode(self) -> ScheduledBatch | None:
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if self.pages.reserve(seq, seq.num_tokens):
                i += 1
            else:
                self._preempt(self.running.pop())
        if not self.running:
            return None
        return ScheduledBatch(list(self.running), [1] * len(self.running), is_decode=True)

    def _preempt(self, seq: Sequence) -> None:
        self.pages.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # The head of the queue may be mid-prefill and hold pages; queue behind it, so that
        # only the head ever holds pages while waiting (which rules out a deadlock).
        head_busy = bool(self.waiting) and bool(self.waiting[0].page_table)
        self.waiting.insert(1 if head_busy else 0, seq)

    def postprocess(self, batch: ScheduledBatch, result: SampleResult) -> list[Sequence]:
        """Apply a step's sampled tokens; return the sequences that got a new token."""
        progressed = []
        for seq, n, token, logprob in zip(
            batch.seqs, batch.extend_lens, result.token_ids, result.logprobs, strict=True
        ):
            if seq.is_finished:
                continue  # aborted while the step ran
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                self.pages.cache_unfinished(seq)  # a prefill chunk: its sample is not a token
                continue
            seq.token_ids.append(token)
            seq.output_logprobs.append(logprob)
            progressed.append(seq)
            reason = seq.check_stop(self.context_length)
            if reason is not None:
                self._finish(seq, reason)
            elif not batch.is_decode:
                self.pages.cache_unfinished(seq)
        return progressed

    def abort(self, request_id: str) -> Sequence | None:
        """Stop a request at any stage and free its pages; None if it is unknown or done."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, FinishReason.ABORT)
        return seq

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pages.release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self.requests[seq.request_id]
