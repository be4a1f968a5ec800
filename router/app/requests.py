"""The requests the router serves, as frozen dataclasses: what ``router.app.protocol`` parses a
body into, with the limits it checks; and ``sampling_to_proto``, what the workers get of a
choice's sampling."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from protos import common_pb2

MAX_N = 16
MAX_STOP = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
MAX_BATCH_PROMPTS = 256
GENERATE_DEFAULT_MAX_TOKENS = 128  # /generate without max_new_tokens, as SGLang
UINT64 = 1 << 64
INT32_MAX = (1 << 31) - 1  # the largest top_k the workers' protocol carries
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_TOOLS = 128  # as OpenAI's API
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")

Prompt = str | tuple[int, ...]  # text to tokenize, or token ids as given


@dataclass(frozen=True)
class Constraint:
    """What a choice's output must match (constrained decoding); mirrors
    ``pdserve.Constraint``. ``spec``: the JSON schema as JSON text, the regex, the EBNF grammar
    (start rule ``root``) or the xgrammar structural tag as JSON text; none for json_object.
    Workers compile it; one that does not compile fails the request with a 400 naming why."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(
                f"constraint kind must be one of {CONSTRAINT_KINDS}, got {self.kind!r}"
            )


@dataclass(frozen=True)
class Sampling:
    """How one choice is sampled and when it stops; mirrors ``pdserve.SamplingParams``.

    ``max_tokens`` None means "up to the context length" (chat without a limit). ``stop``
    strings are matched by the router; ``stop_token_ids`` by the worker. ``seed`` is already
    reduced to an unsigned 64-bit value. ``constraint``: at most one per request.
    ``resumed_output_tokens``: the prompt's last this many tokens are output an earlier
    attempt delivered (a migrated request); a constraint replays them.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Constraint | None = None
    resumed_output_tokens: int = 0

    def for_choice(self, index: int) -> Sampling:
        """The parameters of choice ``index`` of n: a seeded request uses seed + index."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index) % UINT64)


def sampling_to_proto(s: Sampling) -> common_pb2.SamplingParams:
    """What the workers get of ``s`` (stop strings stay with the router, which matches them)."""
    if s.max_tokens is None:
        raise ValueError("max_tokens must be resolved before a request goes to a worker")
    msg = common_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        max_new_tokens=s.max_tokens,
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
    )
    if s.seed is not None:
        msg.seed = s.seed
    c = s.constraint
    if c is not None:
        if c.kind == "json_object":
            msg.json_object = True
        else:
            setattr(msg, c.kind, c.spec)
    if s.resumed_output_tokens:
        msg.resumed_output_tokens = s.resumed_output_tokens
    return msg


@dataclass(frozen=True)
class CompletionRequest:
    """POST /v1/completions. Choice ``i * n + j`` is sample ``j`` of ``prompts[i]``."""

    model: str
    prompts: tuple[Prompt, ...]
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # number of alternatives per token, None: no logprobs


@dataclass(frozen=True)
class ToolChoice:
    """``tool_choice``: "none", "auto", "required", or ``function`` (the one named)."""

    mode: str = "none"
    function: str | None = None

    def openai(self) -> str | dict[str, Any]:
        if self.function is None:
            return self.mode
        return {"type": "function", "function": {"name": self.function}}


@dataclass(frozen=True)
class ChatRequest:
    """POST /v1/chat/completions; ``messages`` are normalized for the chat template."""

    model: str
    messages: tuple[dict[str, Any], ...]
    sampling: Sampling
    tools: tuple[dict[str, Any], ...] | None = None
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    n: int = 1
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class GenerateRequest:
    """POST /generate, SGLang's native API: one prompt, token ids out."""

    prompt: Prompt
    sampling: Sampling
    n: int = 1
    stream: bool = False
    return_logprob: bool = False


@dataclass(frozen=True)
class TokenizeRequest:
    """POST /tokenize (vLLM's and SGLang's): a ``prompt``, or ``messages`` through the chat
    template."""

    model: str | None
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


@dataclass(frozen=True)
class DetokenizeRequest:
    model: str | None
    tokens: tuple[int, ...]
