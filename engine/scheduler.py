"""Continuous batching: which sequences run in the next step, and what their results mean.

A step is either a prefill step (new, chunked or preempted requests, up to the prefill token
budget) or a decode step (every running request, one token each). Prefill goes first, as in
SGLang, so new requests join the running batch as early as possible. When decode runs out of
pages the newest running request is preempted: its pages go back (its computed prefix stays in
the radix cache) and it is recomputed later from its prompt plus the tokens it has so far.
"""

from __future__ import annotations

import operator
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.page_manager import PageManager
from engine.sampler import SampleResult, TokenLogprobs
from engine.sequence import FinishReason, SeqStatus, Sequence


class OutOfPagesError(RuntimeError):
    """The pool cannot take this request now (it could later): retry elsewhere or later."""


@dataclass(frozen=True)
class ScheduledBatch:
    """Sequence `seqs[i]` computes `extend_lens[i]` tokens from its `num_computed_tokens`, or
    from `starts[i]` where given: a step scheduled while the step before it is in flight (not
    yet applied to `num_computed_tokens`), such as a prompt's next chunk or a decode step
    ahead."""

    seqs: list[Sequence]
    extend_lens: list[int]
    is_decode: bool
    starts: list[int] | None = None

    @property
    def prefix_lens(self) -> list[int]:
        """Each sequence's first position in this step."""
        if self.starts is not None:
            return list(self.starts)
        return [seq.num_computed_tokens for seq in self.seqs]

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
        # Disaggregation: decode-side requests whose KV is arriving, prefill-side requests
        # whose pages are kept until sent.
        self.transferring: dict[str, Sequence] = {}
        self.held: dict[str, Sequence] = {}
        # Decode-side requests given up on while a peer may still write their pages: the pages
        # stay reserved, under the transfer's key, until the peer acknowledges.
        self.quarantined: dict[int, Sequence] = {}
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
        self._validate(seq)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def add_transferring(self, seq: Sequence, avoid: Collection[int] = ()) -> list[int]:
        """Reserve pages for a prompt whose KV another worker computes; returns the page ids,
        none of them in `avoid`.

        Admits only if the pool can hold the prompt plus a page of new tokens, with a page of
        headroom per running request; raises OutOfPagesError otherwise.
        """
        self._validate(seq)
        live = len(self.running) + len(self.transferring)
        if live >= self.config.max_running_requests:
            raise OutOfPagesError(
                f"no room for request {seq.request_id}: {len(self.running)} running and "
                f"{len(self.transferring)} arriving requests reach max_running_requests="
                f"{self.config.max_running_requests}"
            )
        need = self.pages.pages_for(seq.num_tokens + 1)
        headroom = live  # a page held back per live request
        if self.pages.num_available < need + headroom or not self.pages.reserve(
            seq, seq.num_tokens, avoid
        ):
            raise OutOfPagesError(
                f"no room for request {seq.request_id}: needs {need} pages, "
                f"{self.pages.num_available} available with {headroom} held back for "
                f"{len(self.running)} running and {len(self.transferring)} arriving requests"
            )
        seq.status = SeqStatus.TRANSFERRING
        self.requests[seq.request_id] = seq
        self.transferring[seq.request_id] = seq
        return list(seq.page_table)

    def complete_transfer(
        self, request_id: str, token_id: int, logprob: TokenLogprobs | None
    ) -> Sequence:
        """The prompt's KV has arrived with its first token: join the running batch."""
        seq = self.transferring.pop(request_id, None)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not waiting for a KV transfer")
        seq.num_computed_tokens = seq.num_tokens
        seq.append_token(token_id, logprob)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        reason = seq.check_stop(self.context_length)
        if reason is not None:
            self._finish(seq, reason)
        return seq

    def quarantine(self, request_id: str, key: int) -> bool:
        """End a request whose KV is arriving, but keep its pages reserved under `key` until
        `release_quarantined(key)`: the sender may still write into them. The request id is
        free again at once. False (nothing done) unless the request is waiting for its KV."""
        seq = self.transferring.pop(request_id, None)
        if seq is None:
            return False
        if key in self.quarantined:
            self.transferring[request_id] = seq
            raise ValueError(f"pages are already quarantined under {key}")
        del self.requests[request_id]
        seq.finish_reason = FinishReason.ABORT
        self.quarantined[key] = seq
        return True

    def release_quarantined(self, key: int) -> bool:
        """Free the pages quarantined under `key`; False if there are none."""
        seq = self.quarantined.pop(key, None)
        if seq is None:
            return False
        self.pages.release(seq)
        seq.status = SeqStatus.FINISHED
        return True

    def release_held(self, request_id: str) -> bool:
        """Free the pages a finished prefill-side request kept for sending."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self.pages.release(seq)
        seq.status = SeqStatus.FINISHED
        return True

    def _validate(self, seq: Sequence) -> None:
        if seq.request_id in self.requests or seq.request_id in self.held:
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

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when there is nothing to run."""
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(
        self, in_flight: tuple[Sequence, int] | None = None
    ) -> ScheduledBatch | None:
        """The next prefill step. `in_flight`: the queue's head and the position its prompt
        reaches once the chunk of it in flight is applied (`schedule_prefill_lookahead`)."""
        budget = self.config.prefill_token_budget
        seqs: list[Sequence] = []
        lens: list[int] = []
        starts: list[int] = []
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) >= self.config.max_running_requests:
                break
            if not seq.page_table:
                self.pages.match_prefix(seq)
            start = seq.num_computed_tokens
            if in_flight is not None and seq is in_flight[0]:
                start = in_flight[1]
            remaining = seq.num_tokens - start
            n = self._chunk(remaining, budget, bool(seqs))
            if n is None:
                break
            started = len(seq.page_table) > seq.num_cached_pages
            if not self._admit(seq, start + n, started, len(seqs)):
                if not started:
                    # Only the head of the queue, mid-prefill, may hold pages while waiting.
                    self.pages.release(seq)
                    seq.num_computed_tokens = 0
                break
            seqs.append(seq)
            lens.append(n)
            starts.append(start)
            budget -= n
            if seq.prefill_started_at is None:
                seq.prefill_started_at = time.monotonic()
            if n < remaining:
                break  # the rest of this prompt comes in later steps
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        if not seqs:
            return None
        return ScheduledBatch(seqs, lens, is_decode=False, starts=starts if in_flight else None)

    def _chunk(self, remaining: int, budget: int, others: bool) -> int | None:
        """The tokens of a prompt with `remaining` to compute that a prefill step with `budget`
        tokens left takes; None when it waits for a later step (unchunked, a long prompt runs
        alone in its own step, so not beside `others`)."""
        if self.config.chunked_prefill_enabled:
            return min(remaining, budget)
        if remaining > budget and others:
            return None
        return remaining

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

    def schedule_lookahead(self, prev: ScheduledBatch) -> ScheduledBatch | None:
        """Overlapped scheduling: the decode step after `prev` (a decode or prefill step whose
        tokens are not applied yet), with pages reserved for it; None when that step cannot be
        known without them (requests are waiting, a running request is not ready to decode,
        or pages ran short: the plain path then admits, preempts or finishes) or has no
        sequence.

        Its sequences are the running ones in their order, each with its first position
        (`starts`): one of `prev`'s decodes the position after `prev`'s token (its input, the
        token `prev` samples, read on the device); any other, ready on the host (a request
        that joined since: a KV transfer's, or one whose prefill was applied), its own last
        token. A sequence that `prev`'s token ends by length (its last allowed token, or the
        end of the context) is left out, as the plain loop would have finished it: a step
        launched for it would compute a token that is thrown away (at the end of a batch of
        requests of one length, a whole step of device time the host then waits behind)."""
        if self.waiting:
            return None
        running = self.running
        k = len(prev.seqs)
        if prev.is_decode and len(running) >= k and all(map(operator.is_, running, prev.seqs)):
            # The common case, `prev`'s requests first and in order: no map to build.
            ends: dict[int, int] = {}
            prev_ends = [start + 1 for start in prev.prefix_lens]
        else:
            ends = {
                id(seq): start + n
                for seq, n, start in zip(prev.seqs, prev.extend_lens, prev.prefix_lens, strict=True)
            }
            k, prev_ends = 0, []
        seqs: list[Sequence] = []
        starts: list[int] = []
        for i, seq in enumerate(running):
            end = prev_ends[i] if i < k else ends.get(id(seq))
            if end is not None:
                # Leave out what the step in flight ends by length, whatever its token.
                if seq.ends_by_length(self.context_length, ahead=1):
                    continue
                start = end
            elif seq.num_computed_tokens == seq.num_tokens - 1:
                start = seq.num_computed_tokens
            else:
                return None
            seqs.append(seq)
            starts.append(start)
        for seq, start in zip(seqs, starts, strict=True):
            if not self.pages.reserve(seq, start + 1):
                return None
        if not seqs:
            return None
        return ScheduledBatch(seqs, [1] * len(seqs), is_decode=True, starts=starts)

    def schedule_prefill_lookahead(self, prev: ScheduledBatch) -> ScheduledBatch | None:
        """Overlapped scheduling of prefills: the prefill step after `prev` (a prefill or
        decode step whose tokens are not applied yet), when it is the batch the plain loop
        would schedule once `prev` is applied; None otherwise (the plain order follows: apply,
        then schedule).

        A prompt that `prev` chunked continues from the end of its chunk in flight (its KV
        written before, in the device's order). Applying `prev` could change the batch in
        three ways, each ruled out first, by `_schedule_prefill`'s walk over the queue without
        its effects:
        - a request under way that `prev` does not continue (preempted, or mid-prompt without
          a chunk in flight) waits for the plain order: every other request walked is new (no
          pages, nothing computed);
        - `prev`'s sequences publish pages to the prefix cache (a prefill's prompt pages; a
          finishing request's computed ones): no request walked may find, at the page after
          its cached prefix, the tokens of such a page at the same place (`_could_share`);
        - `prev`'s requests finish and give back running slots and pages: the batch must fit
          the slots and the free pages as they stand, with `_admit`'s headroom (no eviction,
          so the cache's order is untouched too).
        Then `_schedule_prefill` runs: the batch the plain loop would have run. (Requests that
        arrive while `prev` runs join the step after, which the plain loop could have taken.)"""
        if not self.waiting:
            return None
        cfg = self.config
        ps = self.pages.page_size
        budget = cfg.prefill_token_budget
        need = count = 0
        in_flight: tuple[Sequence, int] | None = None
        for seq in self.waiting:
            if budget <= 0:
                break
            if seq.page_table or seq.num_computed_tokens:
                end = _chunk_in_flight(seq, prev)
                if count or end is None:
                    return None
                start = end  # the head, continuing
                in_flight = (seq, start)
                held = len(seq.page_table)
            else:
                start = self.pages.peek_prefix(seq)
                if self.pages.cache is not None and _could_share(seq, start // ps, prev, ps):
                    return None
                held = start // ps
            remaining = seq.num_tokens - start
            n = self._chunk(remaining, budget, bool(count))
            if n is None:
                break
            need += max(0, self.pages.pages_for(start + n) - held)
            count += 1
            budget -= n
            if n < remaining:
                break
        if not count or len(self.running) + count > cfg.max_running_requests:
            return None
        # `_admit`'s headroom counts each admitted request twice (running, and admitted).
        if self.pages.pool.num_free < need + len(self.running) + 2 * count:
            return None
        return self._schedule_prefill(in_flight)

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
            seq.append_token(token, logprob)
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
            held = self.held.get(request_id)
            if held is not None:
                self.release_held(request_id)
            return held
        self._finish(seq, FinishReason.ABORT)
        return seq

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.TRANSFERRING:
            del self.transferring[seq.request_id]
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish_reason = reason
        del self.requests[seq.request_id]
        if seq.hold_pages and reason is not FinishReason.ABORT:
            self.pages.cache_unfinished(seq)  # keeps the prompt's pages locked in the cache
            seq.status = SeqStatus.HELD
            self.held[seq.request_id] = seq
            return
        self.pages.release(seq)
        seq.status = SeqStatus.FINISHED


def _chunk_in_flight(seq: Sequence, prev: ScheduledBatch) -> int | None:
    """Where prefill `prev`'s chunk of `seq`'s prompt ends, when it stops short of the
    prompt's end (the rest waits at the queue's head); None otherwise."""
    if prev.is_decode:
        return None
    for other, n, start in zip(prev.seqs, prev.extend_lens, prev.prefix_lens, strict=True):
        if other is seq:
            return start + n if start + n < seq.num_tokens else None
    return None


def _could_share(seq: Sequence, page: int, prev: ScheduledBatch, page_size: int) -> bool:
    """Whether applying `prev` could lengthen `seq`'s cached prefix of `page` pages: some
    sequence of `prev` publishes its page `page` then (past the pages it has in the cache
    now, up to those its computed tokens will fill) with the tokens `seq` has there. A
    necessary condition for a longer match (its earlier pages are not compared)."""
    end = (page + 1) * page_size
    if end > seq.num_tokens - 1:  # `match_prefix` leaves the last token out
        return False
    mine: tuple[int, ...] | None = None
    for other, n, start in zip(prev.seqs, prev.extend_lens, prev.prefix_lens, strict=True):
        if other.num_cached_pages <= page < (start + n) // page_size:
            if mine is None:
                mine = tuple(seq.token_ids[end - page_size : end])
            if tuple(other.token_ids[end - page_size : end]) == mine:
                return True
    return False
