"""From a parsed request to token ids the workers accept: tokenize, template, check limits.

The checks that need the model live here: token ids inside the vocabulary, a prompt that fits
the context with room for ``max_tokens`` (400 ``context_length_exceeded`` naming both
numbers), and chat-template failures (400 naming the template's complaint).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from engine.tokenizer import Tokenizer
from router.app.errors import invalid
from router.app.requests import (
    GENERATE_DEFAULT_MAX_TOKENS,
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    Prompt,
    Sampling,
    TokenizeRequest,
)
from router.fleet.compat import ModelInfo


@dataclass(frozen=True)
class PreparedPrompt:
    """One prompt ready for the workers, with its sampling resolved against the context."""

    token_ids: tuple[int, ...]
    sampling: Sampling  # max_tokens is set


class PromptBuilder:
    """Tokenizes and checks prompts for one model. Safe to call from worker threads."""

    def __init__(self, tokenizer: Tokenizer, model: ModelInfo) -> None:
        self.tokenizer = tokenizer
        self.model = model
        # No token covers more characters than the longest vocabulary entry (a byte-level
        # entry has a character per byte, and a decoded character is at least one byte), so a
        # prompt longer than this cannot fit the context whatever it holds: refused before
        # tokenizing, which for megabytes of text takes seconds and gigabytes.
        longest = max(
            (len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size)), default=1
        )
        self.max_prompt_chars = model.context_length * max(1, longest)

    def check_sizes(self, texts: Iterable[tuple[str, int]]) -> None:
        """A 400 for a prompt whose characters (``(param, characters)`` pairs) could never
        fit the context: cheap, so the handler calls it before tokenizing anything."""
        for param, chars in texts:
            if chars > self.max_prompt_chars:
                raise invalid(
                    f"{param} has {chars} characters; it cannot fit this model's context of "
                    f"{self.model.context_length} tokens (at most {self.max_prompt_chars} "
                    "characters)",
                    param,
                    "context_length_exceeded",
                )

    def completion(self, request: CompletionRequest) -> list[PreparedPrompt]:
        params = "prompt" if len(request.prompts) == 1 else "prompt[{}]"
        self.check_sizes(
            (params.format(i), len(p)) for i, p in enumerate(request.prompts) if isinstance(p, str)
        )
        return [
            self._prepare(self._ids(p), request.sampling, params.format(i))
            for i, p in enumerate(request.prompts)
        ]

    def chat(self, request: ChatRequest) -> PreparedPrompt:
        self.check_sizes([("messages", _text_size(request.messages))])
        ids = self._chat_ids(request.messages, request.tools, True, request.template_kwargs)
        return self._prepare(ids, request.sampling, "messages")

    def tokens(self, request: TokenizeRequest) -> list[int]:
        """POST /tokenize: the prompt's ids, or the messages' through the chat template.
        Sizes are checked (a prompt that cannot fit is refused before tokenizing), but not
        against the context: the count is what the client wants to know."""
        if request.prompt is not None:
            self.check_sizes([("prompt", len(request.prompt))])
            return self.tokenizer.encode(request.prompt, request.add_special_tokens)
        messages = request.messages or ()
        self.check_sizes([("messages", _text_size(messages))])
        return self._chat_ids(
            messages, request.tools, request.add_generation_prompt, request.template_kwargs
        )

    def _chat_ids(
        self,
        messages: tuple[dict[str, Any], ...],
        tools: tuple[dict[str, Any], ...] | None,
        add_generation_prompt: bool,
        template_kwargs: tuple[tuple[str, Any], ...],
    ) -> list[int]:
        try:
            return self.tokenizer.encode_chat(
                [dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None if tools is None else [dict(t) for t in tools],
                **dict(template_kwargs),
            )
        except (ValueError, TypeError) as exc:
            raise invalid(str(exc), "messages") from exc

    def generate(self, request: GenerateRequest) -> PreparedPrompt:
        param = "text" if isinstance(request.prompt, str) else "input_ids"
        if isinstance(request.prompt, str):
            self.check_sizes([(param, len(request.prompt))])
        return self._prepare(
            self._ids(request.prompt), request.sampling, param, GENERATE_DEFAULT_MAX_TOKENS
        )

    def _ids(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _prepare(
        self, ids: list[int], sampling: Sampling, param: str, default_max: int | None = None
    ) -> PreparedPrompt:
        """Check ``ids``; an unset ``max_tokens`` becomes what the context has room for, capped
        at ``default_max`` when given."""
        ctx = self.model.context_length
        if not ids:
            raise invalid(f"{param} is empty after tokenization", param)
        self._check_vocab(ids, param)
        if sampling.stop_token_ids:
            self._check_vocab(list(sampling.stop_token_ids), "stop_token_ids")
        if len(ids) >= ctx:
            raise invalid(
                f"This model's maximum context length is {ctx} tokens, but the prompt has "
                f"{len(ids)} tokens ({param}); at least one token must be left for the completion",
                param,
                "context_length_exceeded",
            )
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            max_tokens = min(ctx - len(ids), default_max or ctx)
        elif len(ids) + max_tokens > ctx:
            raise invalid(
                f"This model's maximum context length is {ctx} tokens, but {len(ids) + max_tokens} "
                f"were requested ({len(ids)} in the prompt, {max_tokens} for the completion); "
                f"reduce the prompt or max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        if max_tokens != sampling.max_tokens:
            sampling = replace(sampling, max_tokens=max_tokens)
        return PreparedPrompt(tuple(ids), sampling)

    def _check_vocab(self, ids: list[int], param: str) -> None:
        vocab = self.model.vocab_size
        if not ids or max(ids) < vocab:
            return
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise invalid(
                f"{param} has token ids outside the vocabulary [0, {vocab}): {bad[:8]}", param
            )


def _text_size(value: Any) -> int:
    """Characters of every string in a JSON value (the messages of a chat request); iterative,
    as the value may nest deeply."""
    size, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return size
