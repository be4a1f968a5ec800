"""The offline engine, and the step loop the workers drive.

    engine = Engine(EngineConfig(model_path="models/qwen3"))
    results = engine.generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=16))

A step is: schedule, run the model, sample, apply the tokens, report what progressed.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from engine.config import EngineConfig, ModelConfig
from engine.device import rank_device
from engine.grammar import GrammarBackend, GrammarState
from engine.model_runner import ModelRunner
from engine.page_manager import PageManager
from engine.page_pool import PagePool
from engine.parallel import GroupJoinError, ParallelConfig
from engine.radix_cache import RadixCache
from engine.sampler import DeviceSample, TokenLogprobs, sample_on_device, to_device
from engine.sampling import Constraint, SamplingParams
from engine.scheduler import OutOfPagesError, ScheduledBatch, Scheduler
from engine.sequence import FinishReason, SeqStatus, Sequence
from engine.tokenizer import Tokenizer

# What starting an engine raises for a setting an operator can fix (a device that is not there,
# a model path without a model, a group it cannot join): the command lines print it in one line.
START_ERRORS = (ValueError, FileNotFoundError, GroupJoinError)

log = logging.getLogger(__name__)

_NO_TOKEN = SamplingParams(temperature=0)


@dataclass(frozen=True)
class StepOutput:
    """One request's progress in one step: a new token, and whether it is done."""

    request_id: str
    token_id: int
    logprobs: TokenLogprobs | None
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    # time.monotonic() (this process) when the request's first prefill step was scheduled;
    # None for a request whose KV arrived by transfer. Timing only: not part of equality.
    prefill_started_at: float | None = field(default=None, compare=False)
    # Prefill side: the prompt's pages a finished `hold_pages` request holds (`held_pages`), in
    # its last output, so that a sender needs no second round trip to the engine loop.
    held_pages: tuple[int, ...] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class _Launched:
    """A step on the device whose sampled tokens are not applied yet; `gen`: the engine's
    count of forward passes launched, this one's."""

    batch: ScheduledBatch
    sample: DeviceSample
    gen: int


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprobs | None]
    num_cached_tokens: int


class Engine:
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        model_config = ModelConfig.from_pretrained(config.model_path)
        self.model_config = model_config
        self.context_length = config.context_length or model_config.max_position_embeddings
        if self.context_length > model_config.max_position_embeddings:
            raise ValueError(
                f"context_length {self.context_length} exceeds the model's "
                f"max_position_embeddings {model_config.max_position_embeddings}"
            )
        self.device = rank_device(config.device, rank)
        self.parallel = ParallelConfig(config.ep_size, rank, config.ep_num_redundant_experts)
        self.runner = ModelRunner(model_config, config, self.device, self.parallel)
        self.pool = PagePool(self.runner.kv_cache.num_pages)
        cache = None if config.disable_radix_cache else RadixCache(config.page_size, self.pool.free)
        self.cache = cache
        self.pages = PageManager(self.pool, cache, config.page_size)
        self.scheduler = Scheduler(config, self.pages, self.context_length)
        has_tokenizer = (Path(config.model_path) / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_pretrained(config.model_path) if has_tokenizer else None
        eos = set(model_config.eos_token_ids) | _generation_eos(Path(config.model_path))
        if self.tokenizer is not None:
            eos |= self.tokenizer.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        # Constrained decoding: the grammar's vocabulary is the logits' width, the model's.
        self.grammar: GrammarBackend | None = None
        if self.tokenizer is not None:
            self.grammar = GrammarBackend(
                self.tokenizer,
                model_config.vocab_size,
                self.eos_token_ids,
                self.device.torch_device,
            )
        self._generator = torch.Generator(device=self.device.torch_device)
        self._generator.manual_seed(config.seed)
        # Overlapped scheduling: while the device runs a decode step, the host prepares and
        # launches the next one (its input ids are the first step's samples, on the device)
        # before applying the first step's tokens. Not with expert parallelism (lockstep).
        self.overlap = not config.disable_overlap_schedule and not self.parallel.enabled
        self._launched: _Launched | None = None
        # Pages freed while a forward pass that may still write them runs (a request that ended
        # as the step ahead was launched: that step writes its next slot): page -> the count
        # of forward passes launched then. Local users of such a page write it after that pass,
        # in stream order; a KV transfer's writer is another process, so `reserve_transfer`
        # avoids them until the pass is known done (`_synced`).
        self._launches = 0
        self._synced = 0
        self._unsettled: dict[int, int] = {}
        self.pool.on_free = self._note_freed

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Seq[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        hold_pages: bool = False,
    ) -> str:
        """Queue a request (text needs the model's tokenizer); returns its id.

        Raises ValueError for an empty prompt, a token id outside the vocabulary, a prompt that
        does not fit the context, or a request the KV pool could never hold. With
        `hold_pages`, the request keeps its pages after it finishes, until `release_held`
        (a prefill worker sends them first).
        """
        seq = self._new_sequence(prompt, sampling, request_id)
        seq.hold_pages = hold_pages
        self.scheduler.add(seq)
        return seq.request_id

    def reserve_transfer(
        self, prompt_ids: Seq[int], sampling: SamplingParams, request_id: str
    ) -> list[int]:
        """Decode side: reserve pages for a prompt whose KV another worker will write.

        Returns the page ids, one per `page_size` prompt tokens. Raises ValueError for bad
        input and OutOfPagesError when the pool cannot take the request now.
        """
        seq = self._new_sequence(list(prompt_ids), sampling, request_id)
        unsettled = self._unsettled_pages()
        if unsettled:
            try:
                return self.scheduler.add_transferring(seq, avoid=unsettled)
            except OutOfPagesError:
                self._wait_for_launched()  # then every page is settled
        return self.scheduler.add_transferring(seq)

    def _note_freed(self, pages: list[int]) -> None:
        if self._launches > self._synced:  # a forward pass launched since may write them
            for page in pages:
                self._unsettled[page] = self._launches

    def _unsettled_pages(self) -> set[int]:
        """Free pages a forward pass not known done may still write."""
        self._drop_settled()
        return set(self._unsettled)

    def _drop_settled(self) -> None:
        if self._unsettled:
            self._unsettled = {p: g for p, g in self._unsettled.items() if g > self._synced}

    def _wait_for_launched(self) -> None:
        if self._launched is not None:
            self._launched.sample.wait()
            self._synced = max(self._synced, self._launched.gen)
        self._unsettled.clear()

    def complete_transfer(
        self, request_id: str, token_id: int, logprobs: TokenLogprobs | None
    ) -> StepOutput:
        """Decode side: the prompt's KV has arrived; the first token joins the running batch."""
        self.validate_token_ids([token_id], "first token")
        return self._output(self.scheduler.complete_transfer(request_id, token_id, logprobs))

    def quarantine_transfer(self, request_id: str, key: int) -> bool:
        """Decode side: end a request whose KV has not arrived, keeping its pages reserved
        under `key` (a write may still land in them) until `release_quarantine(key)`."""
        return self.scheduler.quarantine(request_id, key)

    def release_quarantine(self, key: int) -> bool:
        return self.scheduler.release_quarantined(key)

    def held_pages(self, request_id: str) -> list[int]:
        """Prefill side: the pages of a finished request that holds them for sending."""
        seq = self.scheduler.held.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} holds no pages")
        return self._prompt_pages(seq)

    def _prompt_pages(self, seq: Sequence) -> list[int]:
        return seq.page_table[: self.pages.pages_for(seq.num_prompt_tokens)]

    def release_held(self, request_id: str) -> bool:
        return self.scheduler.release_held(request_id)

    def compile_constraint(self, constraint: Constraint) -> Future[Any]:
        """Start compiling `constraint` on the grammar backend's threads (or find it cached);
        the future's result raises ValueError naming the problem if it does not compile.
        Thread-safe: a server awaits it before `add_request`, which then finds it compiled."""
        return self._grammar_backend().compile(constraint)

    def _grammar_backend(self) -> GrammarBackend:
        if self.grammar is None:
            raise ValueError(
                f"{self.config.model_path} has no tokenizer.json; constrained decoding needs one"
            )
        return self.grammar

    def _grammar_state(self, sampling: SamplingParams, ids: list[int]) -> GrammarState | None:
        if sampling.constraint is None:
            return None
        resumed = sampling.resumed_output_tokens
        if resumed >= len(ids):
            raise ValueError(
                f"resumed_output_tokens ({resumed}) must be fewer than the prompt's "
                f"{len(ids)} tokens"
            )
        return self._grammar_backend().state(sampling.constraint, ids[len(ids) - resumed :])

    def _new_sequence(
        self, prompt: str | Seq[int], sampling: SamplingParams | None, request_id: str | None
    ) -> Sequence:
        sampling = sampling or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model_path} has no tokenizer.json; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        self.validate_token_ids(ids, "prompt")
        self.validate_token_ids(list(sampling.stop_token_ids), "stop_token_ids")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device.torch_device)
            generator.manual_seed(sampling.seed)
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        return Sequence(
            request_id=rid,
            token_ids=ids,
            num_prompt_tokens=len(ids),
            sampling=sampling,
            eos_token_ids=self.eos_token_ids,
            generator=generator,
            grammar=self._grammar_state(sampling, ids),
            prompt_array=np.asarray(ids, dtype=np.int64),  # ids checked in range above
        )

    def validate_token_ids(self, ids: list[int], what: str) -> None:
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} has token ids outside the vocabulary [0, {vocab}): {bad[:8]}")

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its pages; False if it is not live."""
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def step_in_flight(self) -> bool:
        """Whether a step launched ahead (overlapped scheduling) awaits the next call."""
        return self._launched is not None

    def has_work(self) -> bool:
        """Whether `step` would run anything (requests arriving by transfer do not count)."""
        return bool(self.scheduler.num_waiting or self.scheduler.num_running)

    # -- the step loop ----------------------------------------------------------------------

    def step(self, idle_forward: bool = False) -> list[StepOutput]:
        """Run one batch. With `idle_forward` (expert parallelism: another rank has work), a
        rank with nothing to run still runs the model on no tokens, to join the collectives.

        With overlapped scheduling a decode step's outputs come from the next call: that call
        launches the following decode step first, then applies the earlier step's tokens. A
        step ahead with constrained requests launches its forward pass only, and samples once
        the earlier step's tokens have advanced the grammars that mask it: the host fills the
        mask while the device runs the forward pass. A prefill step's outputs come from the
        same call, as in the plain loop; that call first launches the step after it. Every
        call applying a step launches the step the plain loop would run next before it
        applies (`_launch_ahead`): the prefill of waiting requests, or the running requests'
        decode step, so that the host's work between two steps runs beside the device's."""
        prev = self._launched
        if prev is not None:
            self._launched = None
            return self._apply_after_ahead(prev)
        batch = self.scheduler.schedule()
        if batch is None and idle_forward:
            self.runner.forward_idle()
            return []
        if batch is None:
            if self.scheduler.num_waiting:
                # Nothing runs, so every page is reclaimable: admission must succeed.
                raise RuntimeError(
                    f"scheduler stalled with {self.scheduler.num_waiting} waiting requests "
                    f"and {self.num_free_pages} reclaimable pages"
                )
            return []
        launched = self._launch(batch)
        if self.overlap and batch.is_decode:
            self._launched = launched
            return []
        if self.overlap:
            return self._apply_after_ahead(launched)
        return self._apply(launched)

    def _apply_after_ahead(self, prev: _Launched) -> list[StepOutput]:
        """Launch the step after `prev` (overlapped scheduling: `_launch_ahead`), then apply
        `prev`'s tokens; the step launched ahead is applied by the next call."""
        outputs = self._launch_ahead(prev)
        if outputs is None:
            outputs = self._apply(prev)
        if self._launched is not None and all(seq.is_finished for seq in self._launched.batch.seqs):
            self._launched = None  # every request of the step ahead has ended
        return outputs

    def _launch_ahead(self, prev: _Launched) -> list[StepOutput] | None:
        """While the device runs step `prev`, launch the step the plain loop would run after
        it: with requests waiting, their prefill (`_launch_prefill_ahead`); else the decode
        step of the running requests (`Scheduler.schedule_lookahead`), whose inputs are
        `prev`'s samples, still on the device, for `prev`'s requests and the host's last
        tokens for the others. A decode step ahead with constrained requests launches its
        forward pass only, and samples once `prev`'s tokens have advanced the grammars that
        mask it (the host fills the mask while the device runs the forward pass): then
        `prev` is applied here, and its outputs returned; else None."""
        if self.scheduler.num_waiting:
            self._launch_prefill_ahead(prev.batch)
            return None
        ahead = self.scheduler.schedule_lookahead(prev.batch)
        if ahead is None:
            return None
        ids = self._ahead_ids(prev, ahead)
        if _constrained(ahead):
            logits = self._forward(ahead, device_ids=ids)
            outputs = self._apply(prev)
            self._launched = self._sample(ahead, logits, ahead_of_host=True)
            return outputs
        self._launched = self._launch(ahead, device_ids=ids)
        return None

    def _ahead_ids(self, prev: _Launched, ahead: ScheduledBatch) -> torch.Tensor:
        """The input ids `[B]` of decode step `ahead` on the device: `prev`'s samples for its
        requests, the host's last token for the others."""
        tokens = prev.sample.tokens
        row = {id(seq): i for i, seq in enumerate(prev.batch.seqs)}
        picks = [row.get(id(seq), -1) for seq in ahead.seqs]
        if picks == list(range(len(prev.batch.seqs))):
            return tokens
        if min(picks) >= 0:
            return tokens[to_device(picks, tokens.device)]
        host = [
            -1 if i >= 0 else seq.token_ids[-1] for seq, i in zip(ahead.seqs, picks, strict=True)
        ]
        sampled = tokens[to_device([max(i, 0) for i in picks], tokens.device)]
        given = to_device(host, tokens.device)
        return torch.where(given >= 0, given, sampled)

    def _launch_prefill_ahead(self, prev: ScheduledBatch) -> None:
        """Overlapped scheduling of prefills: while the device runs step `prev` and requests
        wait, schedule, prepare and launch the prefill the plain loop would run after it
        (`Scheduler.schedule_prefill_lookahead`), if there is one, before `prev`'s tokens are
        applied; its own are applied by the next call."""
        ahead = self.scheduler.schedule_prefill_lookahead(prev)
        if ahead is not None:
            self._launched = self._launch(ahead)

    def _launch(self, batch: ScheduledBatch, device_ids: torch.Tensor | None = None) -> _Launched:
        """Run `batch` and sample, without waiting for the device. `device_ids`: a decode
        step's input tokens, still on the device (the step before it is not applied yet, so
        every sequence is one position further than the host has recorded)."""
        logits = self._forward(batch, device_ids)
        return self._sample(batch, logits, ahead_of_host=device_ids is not None)

    def _forward(self, batch: ScheduledBatch, device_ids: torch.Tensor | None) -> torch.Tensor:
        self._launches += 1
        if device_ids is None:
            return self.runner.forward(batch)
        positions = batch.prefix_lens  # the look-ahead's starts
        return self.runner.forward_decode(batch.seqs, positions, device_ids=device_ids)

    def _sample(
        self, batch: ScheduledBatch, logits: torch.Tensor, ahead_of_host: bool
    ) -> _Launched:
        """Sample `batch`'s logits, masked by its constrained requests' grammars as they stand.
        `ahead_of_host`: a decode step launched before the step it follows was applied (its
        sequences are one token further than the host has recorded). A request that has ended
        meanwhile (its token is thrown away) takes a greedy pick, with no mask."""
        # A prefill chunk that does not reach the prompt's end yields no token: pick greedily
        # there, so that a seeded request draws from its generator once per token exactly.
        params, generators, grammars = [], [], []
        for seq, n, start in zip(batch.seqs, batch.extend_lens, batch.prefix_lens, strict=True):
            yields_token = ahead_of_host or start + n >= seq.num_tokens
            if seq.is_finished:
                yields_token = False
            params.append(seq.sampling if yields_token else _NO_TOKEN)
            generators.append(seq.generator if yields_token else None)
            grammars.append(seq.grammar if yields_token else None)
        # Filled on the host while the device runs the forward pass, applied on the device.
        mask = self.grammar.token_mask(grammars) if self.grammar is not None else None
        sample = sample_on_device(logits, params, generators, self._generator, mask)
        return _Launched(batch, sample, self._launches)

    def _apply(self, launched: _Launched) -> list[StepOutput]:
        result = launched.sample.result()
        self._synced = max(self._synced, launched.gen)  # it and every pass before it are done
        self._drop_settled()
        return [self._output(s) for s in self.scheduler.postprocess(launched.batch, result)]

    def _output(self, seq: Sequence) -> StepOutput:
        held = seq.status is SeqStatus.HELD
        return StepOutput(
            request_id=seq.request_id,
            token_id=seq.token_ids[-1],
            logprobs=seq.output_logprobs[-1],
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_prefix_hit_tokens,
            prefill_started_at=seq.prefill_started_at,
            held_pages=tuple(self._prompt_pages(seq)) if held else None,
        )

    def generate(
        self,
        prompts: Seq[str] | Seq[Seq[int]],
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Run prompts to completion, in one continuous batch; results in prompt order."""
        if isinstance(sampling, SamplingParams) or sampling is None:
            params = [sampling or SamplingParams()] * len(prompts)
        else:
            params = list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs: list[Sequence] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                rid = self.add_request(cast("str | Seq[int]", prompt), p)
                seqs.append(self.scheduler.requests[rid])
        except ValueError:
            for seq in seqs:  # all or nothing: a refused prompt leaves nothing queued
                self.scheduler.abort(seq.request_id)
            raise
        while any(not s.is_finished for s in seqs):
            self.step()
        return [self._result(s) for s in seqs]

    def _result(self, seq: Sequence) -> GenerationResult:
        out = seq.output_ids
        text = self.tokenizer.decode(out) if self.tokenizer is not None else None
        return GenerationResult(
            request_id=seq.request_id,
            prompt_ids=seq.token_ids[: seq.num_prompt_tokens],
            output_ids=out,
            text=text,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs),
            num_cached_tokens=seq.num_prefix_hit_tokens,
        )

    # -- accounting -------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        """Pages free now or held only by the prefix cache (reclaimable at any time)."""
        return self.pages.num_available

    def flush_cache(self) -> None:
        """Drop the prefix cache (only when no request is live)."""
        if self.scheduler.has_unfinished():
            raise ValueError("cannot flush the prefix cache while requests are live")
        if self.cache is not None:
            self.cache.reset()


def _constrained(batch: ScheduledBatch) -> bool:
    return any(seq.grammar is not None for seq in batch.seqs)


def _generation_eos(model_dir: Path) -> set[int]:
    """EOS ids from generation_config.json, which may add to config.json's."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}
