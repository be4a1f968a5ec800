"""Response shapes: OpenAI's (completions, chat) and SGLang's (/generate), streamed or whole.

One ``Renderer`` per request accumulates its choices' deltas and produces either SSE events
(``delta`` for each delta, ``tail`` at the end) or the whole JSON reply (``reply``). Logprobs
follow OpenAI: completions give parallel lists ``tokens``, ``token_logprobs``,
``top_logprobs`` (dicts token -> logprob) and ``text_offset``; chat gives ``{"content":
[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.app.choice import ChoiceDelta
from router.app.detokenizer import TokenTexts
from router.app.parsers.chat_output import ChatOutputFormat, ChatOutputStream, openai_tool_calls
from router.client.session import TokenLogprob

DONE = b"data: [DONE]\n\n"


def sse(payload: Any) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class ChoiceAccumulator:
    """Everything one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: ChoiceDelta | None = None  # the delta that ended the choice

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.last = delta

    @property
    def finish_reason(self) -> str | None:
        return self.last.finish_reason if self.last else None


class Renderer(abc.ABC):
    """Turns one request's choice deltas into its response. Choice ``i * n + j`` is sample
    ``j`` of prompt ``i``."""

    def __init__(self, request_id: str, model: str, num_choices: int, n: int) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.n = n
        self.choices = {i: ChoiceAccumulator() for i in range(num_choices)}

    def add(self, delta: ChoiceDelta) -> None:
        self.choices[delta.index].add(delta)

    def usage(self) -> dict[str, Any]:
        """Prompt tokens count once per prompt however many samples it has, as in OpenAI."""
        prompt = completion = cached = 0
        for index, acc in self.choices.items():
            if acc.last is None:
                continue
            completion += acc.last.completion_tokens
            if index % self.n == 0:
                prompt += acc.last.prompt_tokens
                cached += acc.last.cached_tokens
        return usage(prompt, completion, cached)

    @abc.abstractmethod
    def delta(self, delta: ChoiceDelta) -> list[bytes]:
        """SSE events for one delta (already added); may be none."""

    def tail(self) -> list[bytes]:
        """SSE events after the last delta, before ``[DONE]``."""
        return []

    @abc.abstractmethod
    def reply(self) -> Any:
        """The whole JSON reply, once every choice has ended."""


# ---- /v1/completions ----------------------------------------------------------------------


class CompletionRenderer(Renderer):
    def __init__(
        self,
        request_id: str,
        model: str,
        num_choices: int,
        n: int,
        texts: TokenTexts,
        logprobs: bool,
        include_usage: bool,
    ) -> None:
        super().__init__(request_id, model, num_choices, n)
        self.texts = texts
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._offsets: dict[int, int] = {}  # streamed text length per choice, for text_offset

    def delta(self, delta: ChoiceDelta) -> list[bytes]:
        if not (delta.text or delta.logprobs or delta.finish_reason):
            return []
        lp = self._logprobs(delta.index, delta.token_ids, delta.logprobs)
        choice = {
            "index": delta.index,
            "text": delta.text,
            "logprobs": lp,
            "finish_reason": delta.finish_reason,
        }
        chunk = self._envelope([choice])
        if self.include_usage:
            chunk["usage"] = None
        return [sse(chunk)]

    def tail(self) -> list[bytes]:
        return [sse({**self._envelope([]), "usage": self.usage()})] if self.include_usage else []

    def reply(self) -> Any:
        choices = [
            {
                "index": index,
                "text": "".join(acc.text),
                "logprobs": self._logprobs(index, acc.token_ids, acc.logprobs),
                "finish_reason": acc.finish_reason,
            }
            for index, acc in sorted(self.choices.items())
        ]
        return {**self._envelope(choices), "usage": self.usage()}

    def _envelope(self, choices: list[Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _logprobs(
        self, index: int, token_ids: tuple[int, ...] | list[int], logprobs: Any
    ) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        offset = self._offsets.get(index, 0)
        tokens, offsets = [], []
        for tid in token_ids:
            text = self.texts.text(tid)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [
                self._top(tid, lp) for tid, lp in zip(token_ids, logprobs, strict=False)
            ],
            "text_offset": offsets,
        }

    def _top(self, token_id: int, lp: TokenLogprob) -> dict[str, float]:
        if not lp.top:  # logprobs=0: the sampled token alone, as vLLM answers
            return {self.texts.text(token_id): lp.logprob}
        return {self.texts.text(t): v for t, v in lp.top}


# ---- /v1/chat/completions -----------------------------------------------------------------


class ChatRenderer(Renderer):
    """Chat replies; with an ``output`` format, each choice's text is split into
    ``reasoning_content``, ``content`` and ``tool_calls`` (``router.app.parsers``), and a choice
    that called a tool and stopped finishes with "tool_calls"."""

    def __init__(
        self,
        request_id: str,
        model: str,
        num_choices: int,
        texts: TokenTexts,
        logprobs: bool,
        include_usage: bool,
        output: ChatOutputFormat | None = None,
    ) -> None:
        super().__init__(request_id, model, num_choices, num_choices)
        self.texts = texts
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.output = output
        self._started: set[int] = set()
        self._streams: dict[int, ChatOutputStream] = {}

    def delta(self, delta: ChoiceDelta) -> list[bytes]:
        out = []
        i = delta.index
        if i not in self._started:  # OpenAI opens each choice with the role
            self._started.add(i)
            out.append(self._chunk(i, {"role": "assistant", "content": ""}, None, None))
        lp = None
        if self.logprobs and delta.logprobs:
            lp = self._logprobs(delta.token_ids, delta.logprobs)
        finish = delta.finish_reason
        if self.output is None:
            if delta.text or lp is not None:
                out.append(self._chunk(i, {"content": delta.text}, None, lp))
        else:
            stream = self._streams.get(i)
            if stream is None:
                stream = self._streams[i] = self.output.stream()
            parts = stream.feed(delta.text)
            if finish is not None:
                parts.extend(stream.finish())
                if finish == "stop" and stream.called:
                    finish = "tool_calls"
            fields = parts.openai()
            if fields or lp is not None:
                out.append(self._chunk(i, fields, None, lp))
        if finish is not None:
            out.append(self._chunk(i, {}, finish, None))
        return out

    def tail(self) -> list[bytes]:
        if not self.include_usage:
            return []
        return [sse({**self._envelope("chat.completion.chunk", []), "usage": self.usage()})]

    def reply(self) -> Any:
        choices = []
        for index, acc in sorted(self.choices.items()):
            message, finish = self._message("".join(acc.text), acc.finish_reason)
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": self._logprobs(acc.token_ids, acc.logprobs),
                    "finish_reason": finish,
                }
            )
        return {**self._envelope("chat.completion", choices), "usage": self.usage()}

    def _message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        if self.output is None:
            return {"role": "assistant", "content": text, "refusal": None}, finish
        parsed = self.output.parse(text)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if self.output.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            message["tool_calls"] = openai_tool_calls(parsed.tool_calls)
            message["content"] = parsed.content or None
            if finish == "stop":
                finish = "tool_calls"
        message["refusal"] = None
        return message, finish

    def _chunk(
        self, index: int, delta: dict[str, Any], finish: str | None, lp: dict[str, Any] | None
    ) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        chunk = self._envelope("chat.completion.chunk", [choice])
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def _envelope(self, obj: str, choices: list[Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _logprobs(
        self, token_ids: tuple[int, ...] | list[int], logprobs: Any
    ) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        texts = self.texts
        content = [
            {
                "token": texts.text(tid),
                "logprob": lp.logprob,
                "bytes": texts.raw_bytes(tid),
                "top_logprobs": [
                    {"token": texts.text(t), "logprob": v, "bytes": texts.raw_bytes(t)}
                    for t, v in lp.top
                ],
            }
            for tid, lp in zip(token_ids, logprobs, strict=False)
        ]
        return {"content": content, "refusal": None}


# ---- POST /generate (SGLang's native shape) -----------------------------------------------


class GenerateRenderer(Renderer):
    """SGLang's shape: one result (a list when n > 1); streamed events carry the text and
    output ids so far (cumulative), as SGLang's do."""

    def __init__(
        self, request_id: str, model: str, n: int, prompt_tokens: int, return_logprob: bool
    ) -> None:
        super().__init__(request_id, model, n, n)
        self.prompt_tokens = prompt_tokens
        self.return_logprob = return_logprob

    def delta(self, delta: ChoiceDelta) -> list[bytes]:
        if not (delta.text or delta.token_ids or delta.finish_reason):
            return []
        return [sse(self._result(delta.index))]

    def reply(self) -> Any:
        results = [self._result(i) for i in sorted(self.choices)]
        return results if self.n > 1 else results[0]

    def _result(self, index: int) -> dict[str, Any]:
        acc = self.choices[index]
        meta: dict[str, Any] = {
            "id": f"{self.id}-{index}",
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(acc.token_ids),
            "cached_tokens": acc.last.cached_tokens if acc.last else 0,
            "finish_reason": _finish_reason_info(acc.last),
        }
        if self.return_logprob:
            meta["output_token_logprobs"] = [
                [lp.logprob, tid, None]
                for tid, lp in zip(acc.token_ids, acc.logprobs, strict=False)
            ]
        result: dict[str, Any] = {
            "text": "".join(acc.text),
            "output_ids": list(acc.token_ids),
            "meta_info": meta,
        }
        if self.n > 1:
            result["index"] = index
        return result


def _finish_reason_info(last: ChoiceDelta | None) -> dict[str, Any] | None:
    """SGLang's ``meta_info.finish_reason``: ``{"type": ..., "matched"/"length": ...}``."""
    if last is None or last.finish_reason is None:
        return None
    if last.finish_reason == "length":
        return {"type": "length", "length": last.completion_tokens}
    if last.finish_reason == "stop":
        return {"type": "stop", "matched": last.matched}
    return {"type": last.finish_reason}
