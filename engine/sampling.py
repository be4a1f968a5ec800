"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20
# Below this, temperature scaling overflows float32; such requests are sampled greedily.
MIN_TEMPERATURE = 1e-5
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match (constrained decoding), and the key under which its
    compiled grammar is cached.

    `spec` is the JSON schema as JSON text (`json_schema`), a regex (`regex`), an EBNF grammar
    whose start rule is `root` (`ebnf`, xgrammar's dialect), or an xgrammar structural tag as
    JSON text (`structural_tag`); `json_object` (any JSON object) takes no spec. Whether the
    spec compiles is checked by `engine.grammar`, which raises ValueError naming the problem.
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(
                f"constraint kind must be one of {CONSTRAINT_KINDS}, got {self.kind!r}"
            )
        if not isinstance(self.spec, str):
            raise ValueError(f"a {self.kind} constraint's spec must be a string")
        if self.kind == "json_object" and self.spec:
            raise ValueError("a json_object constraint takes no spec")
        if self.kind != "json_object" and not self.spec.strip():
            raise ValueError(f"a {self.kind} constraint needs a non-empty spec")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    `temperature == 0` is greedy. `top_k` of -1 (or 0) and `top_p == 1` disable those filters.
    `logprobs` asks for the sampled token's log-probability (under the model's unscaled
    distribution, before any constraint's mask) and `top_logprobs` for that many alternatives
    at each step.

    `constraint` restricts every output token to those its grammar allows; the request stops
    when the grammar has ended (at an EOS it allowed). `resumed_output_tokens`: the last this
    many prompt tokens are output of an earlier attempt of the same request (a migrated
    request), which the constraint's state replays before the first new token.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Constraint | None = None
    resumed_output_tokens: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled), 0 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        bad = [t for t in self.stop_token_ids if not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"stop_token_ids must be non-negative integers, got {bad}")
        if self.resumed_output_tokens < 0:
            raise ValueError(
                f"resumed_output_tokens must be >= 0, got {self.resumed_output_tokens}"
            )
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0
