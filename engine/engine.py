"""The offline engine, and the step loop the workers drive.

    engine = Engine(EngineConfig(model_path="models/qwen3"))
    results = engine.generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=16))

A step is: schedule, run the model, sample, apply the tokens, report what progressed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from engine.config import EngineConfig, ModelConfig
from engine.device import resolve_device
from engine.model_runner import ModelRunner
from engine.page_manager import PageManager
from engine.page_pool import PagePool
from engine.radix_cache import RadixCache
from engine.sampler import TokenLogprobs, sample
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Sequence
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """One request's progress in one step: a new token, and whether it is done."""

    request_id: str
    token_id: int
    logprobs: TokenLogprobs | None
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int


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
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_config = ModelConfig.from_pretrained(config.model_path)
        self.model_config = model_config
        self.context_length = config.context_length or model_config.max_position_embeddings
        if self.context_length > model_config.max_position_embeddings:
            raise ValueError(
                f"context_length {self.context_length} exceeds the model's "
                f"max_position_embeddings {model_config.max_position_embeddings}"
            )
        self.device = resolve_device(config.device)
        self.runner = ModelRunner(model_config, config, self.device)
        self.pool = PagePool(self.runner.kv_cache.num_pages)
        cache = None if config.disable_radix_cache else RadixCache(config.page_size, self.pool.free)
        self.cache = cache
        self.pages = PageManager(self.pool, cache, config.page_size)
        self.scheduler = Scheduler(config, self.pages, self.context_length)
        has_tokenizer = (Path(config.model_path) / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_pretrained(config.model_path) if has_tokenizer else None
        eos = set(model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos |= self.tokenizer.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        self._generator = torch.Generator(device=self.device.torch_device)
        self._generator.manual_seed(config.seed)
        self._ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Seq[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request (text needs the model's tokenizer); returns its id.

        Raises ValueError for an empty prompt, a token id outside the vocabulary, a prompt that
        does not fit the context, or a request the KV pool could never hold.
        """
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
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seq = Sequence(
            request_id=rid,
            token_ids=ids,
            num_prompt_tokens=len(ids),
            sampling=sampling,
            eos_token_ids=self.eos_token_ids,
            generator=generator,
        )
        self.scheduler.add(seq)
        return rid

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

    # -- the step loop ----------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            if self.scheduler.num_waiting:
                # Nothing runs, so every page is reclaimable: admission must succeed.
                raise RuntimeError(
                    f"scheduler stalled with {self.scheduler.num_waiting} waiting requests "
                    f"and {self.num_free_pages} reclaimable pages"
                )
            return []
        logits = self.runner.forward(batch)
        result = sample(
            logits,
            [s.sampling for s in batch.seqs],
            [s.generator for s in batch.seqs],
            self._generator,
        )
        return [
            StepOutput(
                request_id=seq.request_id,
                token_id=seq.token_ids[-1],
                logprobs=seq.output_logprobs[-1],
                finished=seq.is_finished,
                finish_reason=seq.finish_reason,
                num_prompt_tokens=seq.num_prompt_tokens,
                num_cached_tokens=seq.num_prefix_hit_tokens,
            )
            for seq in self.scheduler.postprocess(batch, result)
        ]

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
        for prompt, p in zip(prompts, params, strict=True):
            rid = self.add_request(cast("str | Seq[int]", prompt), p)
            seqs.append(self.scheduler.requests[rid])
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
