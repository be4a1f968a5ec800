"""The router's HTTP endpoints: OpenAI's, SGLang's /generate, /tokenize, models, health and
metrics.

Follow one request: ``Handlers.completions`` parses the body (``router.app.protocol``),
tokenizes and checks it (``router.app.prompts``), runs one worker stream per choice
(``WorkerPool.generate`` through ``router.app.choice``), and writes SSE events or one JSON
reply (``router.app.responses``). Errors are ``RequestError``s (or the worker client's errors),
turned into OpenAI error bodies by ``RouterServer.dispatch``. A client that goes away cancels
the handler (``router.app.http``), which closes every choice's worker calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import urllib.parse
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from router.app import responses as R
from router.app.choice import ChoiceDecoder, ChoiceDelta, ChoiceSpec, merge, run_choice
from router.app.detokenizer import TokenTexts
from router.app.errors import RequestError, from_worker, invalid
from router.app.http import Connection
from router.app.parsers.chat_output import ChatOutputFormat
from router.app.parsers.reasoning import REASONING_FORMATS
from router.app.parsers.tool_calls import TOOL_CALL_PARSERS, ToolCallParser
from router.app.parsers.tool_grammar import reasoning_mode, tool_call_constraint
from router.app.prompts import PreparedPrompt, PromptBuilder
from router.app.protocol import (
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_generate,
    parse_tokenize,
)
from router.app.requests import ChatRequest, Constraint, sampling_to_proto
from router.app.routes import EventStream, Reply, Request, Response
from router.client.errors import NoUsableWorker, WorkerError
from router.client.session import WorkerRequest
from router.metrics import CONTENT_TYPE, TokenTimer

if TYPE_CHECKING:
    from router.app.server import Router

log = logging.getLogger(__name__)

T = TypeVar("T")


# Request ids: the router process's random prefix (which process served it), then 96 random
# bits, so that nobody can guess another client's ids (workers accept Abort by id).
_ID_PREFIX = os.urandom(6).hex()


def _new_id(kind: str) -> str:
    return f"{kind}{_ID_PREFIX}{os.urandom(12).hex()}"  # about 0.5 µs


# Bodies above this are tokenized off the event loop.
_THREAD_TOKENIZE_BYTES = 16 << 10


def _json(payload: Any) -> Response:
    return Response(orjson.dumps(payload))


class Handlers:
    """The endpoints' handlers, over one ``Router``."""

    def __init__(self, router: Router) -> None:
        self.r = router
        self.texts = TokenTexts(router.tokenizer)
        self.interval = router.config.stream_interval
        self._special: dict[tuple[Any, Any], bool] = {}  # see _special_markers

    async def completions(self, request: Request, conn: Connection) -> Reply:
        timer = TokenTimer(self.r.metrics)
        raw = request.body
        req = parse_completion(_decode_json(raw))
        self._check_model(req.model)
        self._check_fanout(len(req.prompts), req.n)
        prompts = await self._prepare(raw, lambda b: b.completion(req))
        rid = _new_id("cmpl-")
        specs = [
            _spec(rid, i * req.n + j, p, j, req.stream, self.interval)
            for i, p in enumerate(prompts)
            for j in range(req.n)
        ]
        renderer = R.CompletionRenderer(
            rid, self.r.model.name, len(specs), req.n, self.texts, req.logprobs is not None,
            req.include_usage,
        )  # fmt: skip
        return await self._respond(conn, specs, renderer, req.stream, timer)

    async def chat(self, request: Request, conn: Connection) -> Reply:
        timer = TokenTimer(self.r.metrics)
        raw = request.body
        req = parse_chat(_decode_json(raw))
        self._check_model(req.model)
        self._check_fanout(1, req.n)
        tool_parser = self._tool_parser(req)
        prompt = await self._prepare(raw, lambda b: b.chat(req))
        output, prompt = self._chat_output(req, tool_parser, prompt)
        skip = output is None or not self._special_markers(output)
        rid = _new_id("chatcmpl-")
        specs = [_spec(rid, j, prompt, j, req.stream, self.interval, skip) for j in range(req.n)]
        renderer = R.ChatRenderer(
            rid, self.r.model.name, req.n, self.texts, req.sampling.logprobs, req.include_usage,
            output,
        )  # fmt: skip
        return await self._respond(conn, specs, renderer, req.stream, timer)

    async def tokenize(self, request: Request, conn: Connection) -> Response:
        """vLLM's and SGLang's ``/tokenize``: ids of a prompt or of chat messages."""
        raw = request.body
        req = parse_tokenize(_decode_json(raw))
        if req.model is not None:
            self._check_model(req.model)
        ids = await self._prepare(raw, lambda b: b.tokens(req))
        ctx = self.r.model.context_length
        return _json({"tokens": ids, "count": len(ids), "max_model_len": ctx})

    async def detokenize(self, request: Request, conn: Connection) -> Response:
        """``/detokenize``: the text of token ids (special tokens kept)."""
        raw = request.body
        req = parse_detokenize(_decode_json(raw))
        if req.model is not None:
            self._check_model(req.model)
        ctx, vocab = self.r.model.context_length, self.r.model.vocab_size
        if len(req.tokens) > ctx:
            raise invalid(
                f"tokens holds {len(req.tokens)} ids; at most the context length, {ctx}",
                "tokens",
                "context_length_exceeded",
            )
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise invalid(
                f"tokens has ids outside the vocabulary [0, {vocab}): {bad[:8]}", "tokens"
            )
        text = await self._prepare(
            raw, lambda b: b.tokenizer.decode(req.tokens, skip_special_tokens=False)
        )
        return _json({"prompt": text})

    def _special_markers(self, output: ChatOutputFormat) -> bool:
        """Whether a marker the parsers read is a special token of this tokenizer (as tool
        tags are in some checkpoints): the text must then keep special tokens."""
        key = (output.tools, output.reasoning)
        found = self._special.get(key)
        if found is None:
            tokenizer = self.r.tokenizer
            found = False
            for marker in output.markers():
                ids = tokenizer.encode(marker, add_special_tokens=False)
                if len(ids) == 1 and tokenizer.decode(ids) == "":
                    found = True
            self._special[key] = found
        return found

    def _tool_parser(self, req: ChatRequest) -> type[ToolCallParser] | None:
        """The tool-call parser for ``req``: none without tools or with tool_choice "none";
        a 400 for a forced call without ``--tool-call-parser`` (its format is unknown)."""
        if not req.tools or req.tool_choice.mode == "none":
            return None
        name = self.r.config.tool_call_parser
        if name is None:
            if req.tool_choice.mode != "auto":
                raise invalid(
                    f"tool_choice={req.tool_choice.openai()!r} needs the router started with "
                    "--tool-call-parser (the model's tool-call format)",
                    "tool_choice",
                )
            return None
        return TOOL_CALL_PARSERS[name]

    def _chat_output(
        self, req: ChatRequest, tool_parser: type[ToolCallParser] | None, prompt: PreparedPrompt
    ) -> tuple[ChatOutputFormat | None, PreparedPrompt]:
        """How the reply's text splits into reasoning, content and tool calls (None: it is
        all content), and the prompt, whose sampling carries the grammar of a forced tool
        call (tool_choice required or a named function)."""
        reasoning = REASONING_FORMATS.get(self.r.config.reasoning_parser or "")
        if tool_parser is None and reasoning is None:
            return None, prompt
        # The chat template may have opened (or closed) the reasoning at the prompt's end.
        tail = ""
        if reasoning is not None:
            tail = self.r.tokenizer.decode(prompt.token_ids[-8:], skip_special_tokens=False)
        if tool_parser is not None and req.tools:
            try:
                constraint = tool_call_constraint(
                    tool_parser, req.tools, req.tool_choice.openai(),
                    reasoning_mode(reasoning, tail), req.parallel_tool_calls,
                )  # fmt: skip
            except ValueError as exc:
                raise invalid(f"tools cannot be made into a grammar: {exc}", "tools") from None
            if constraint is not None:
                if prompt.sampling.constraint is not None:
                    raise invalid(
                        f"tool_choice={req.tool_choice.openai()!r} constrains the output to a "
                        "tool call; send no response_format, regex or ebnf with it",
                        "tool_choice",
                    )
                sampling = replace(prompt.sampling, constraint=Constraint(*constraint))
                prompt = replace(prompt, sampling=sampling)
        return ChatOutputFormat(tool_parser, reasoning, tail), prompt

    async def generate(self, request: Request, conn: Connection) -> Reply:
        timer = TokenTimer(self.r.metrics)
        raw = request.body
        req = parse_generate(_decode_json(raw))
        self._check_fanout(1, req.n)
        prompt = await self._prepare(raw, lambda b: b.generate(req))
        rid = _new_id("")
        specs = [_spec(rid, j, prompt, j, req.stream, self.interval) for j in range(req.n)]
        renderer = R.GenerateRenderer(
            rid, self.r.model.name, req.n, len(prompt.token_ids), req.return_logprob
        )
        return await self._respond(conn, specs, renderer, req.stream, timer)

    def _check_fanout(self, prompts: int, n: int) -> None:
        """A 400 naming the limit when the request asks for more sequences than allowed."""
        limit = self.r.config.max_sequences_per_request
        if prompts * n > limit:
            raise invalid(
                f"this request asks for {prompts * n} sequences ({prompts} prompts x n={n}); "
                f"at most {limit} per request (--max-sequences-per-request)",
                "n",
                "too_many_sequences",
            )

    def _card(self) -> dict[str, Any]:
        m = self.r.model
        return {
            "id": m.name,
            "object": "model",
            "created": self.r.created,
            "owned_by": "pdserve",
            "root": self.r.config.model_path,
            "max_model_len": m.context_length,
        }

    async def models(self, request: Request, conn: Connection) -> Response:
        return _json({"object": "list", "data": [self._card()]})

    async def model(self, request: Request, conn: Connection) -> Response:
        """``GET /v1/models/{id}`` (an id may hold one ``/``, as ``org/name``): the card, or
        404 ``model_not_found``."""
        self._check_model(urllib.parse.unquote("/".join(request.params.values())))
        return _json(self._card())

    async def health(self, request: Request, conn: Connection) -> Response:
        states = await self.r.pool.health()
        ok = self.r.pool.usable(states)
        body = {"status": "ok" if ok else "unavailable", "workers": states}
        return Response(orjson.dumps(body), 200 if ok else 503)

    async def metrics(self, request: Request, conn: Connection) -> Response:
        self.r.tally.flush()
        return Response(self.r.metrics.render(), content_type=CONTENT_TYPE)

    # -- helpers -------------------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.r.model.name:
            raise RequestError(
                404,
                f"The model {name!r} does not exist; this server serves {self.r.model.name!r}",
                "model",
                "model_not_found",
            )

    async def _prepare(self, raw: bytes, fn: Callable[[PromptBuilder], T]) -> T:
        if len(raw) > _THREAD_TOKENIZE_BYTES:
            return await asyncio.to_thread(fn, self.r.builder)
        return fn(self.r.builder)

    async def _respond(
        self,
        conn: Connection,
        specs: list[ChoiceSpec],
        renderer: R.Renderer,
        stream: bool,
        timer: TokenTimer,
    ) -> Reply:
        """Run every choice on the workers; answer with SSE or one JSON reply."""
        tokenizer, eos = self.r.tokenizer, self.r.tokenizer.eos_token_ids
        if not stream and len(specs) == 1:
            # The usual request: its decoder reads the worker events here, with one async
            # layer fewer than ``run_choice`` on the way.
            decoder = ChoiceDecoder(specs[0], tokenizer, eos, timer)
            async with contextlib.aclosing(self.r.pool.generate(specs[0].request)) as events:
                async for event in events:
                    delta = decoder.feed(event)
                    if delta is not None:
                        renderer.add(delta)
                    if decoder.stopped:
                        break
        else:
            choices = [run_choice(s, self.r.pool.generate, tokenizer, eos, timer) for s in specs]
            deltas = choices[0] if len(choices) == 1 else merge(choices)
            if stream:
                return await _stream(conn, deltas, renderer, self._finished(renderer, timer))
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    renderer.add(delta)
        self._finished(renderer, timer)()
        return _json(renderer.reply())

    def _finished(self, renderer: R.Renderer, timer: TokenTimer) -> Callable[[], None]:
        def done() -> None:
            usage = renderer.usage()
            self.r.tally.tokens(usage["prompt_tokens"], usage["completion_tokens"])
            self.r.auth.charge(usage["prompt_tokens"] + usage["completion_tokens"])
            timer.done()

        return done


def _spec(
    rid: str,
    index: int,
    prompt: PreparedPrompt,
    sample: int,
    stream: bool,
    interval: int,
    skip_special_tokens: bool = True,
) -> ChoiceSpec:
    """Choice ``index``. Its tokens come as produced (``interval`` at a time) when the client
    streams or stop strings must be watched (to stop the worker early); otherwise all at once
    with the last."""
    sampling = prompt.sampling.for_choice(sample)
    request = WorkerRequest(
        f"{rid}-{index}",
        prompt.token_ids,
        sampling_to_proto(sampling),
        stream or bool(sampling.stop),
        interval,
    )
    return ChoiceSpec(index, request, sampling, skip_special_tokens)


def _decode_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from None


async def _stream(
    conn: Connection,
    deltas: AsyncGenerator[ChoiceDelta, None],
    renderer: R.Renderer,
    on_success: Callable[[], None],
) -> EventStream:
    """SSE: the headers go out with the first delta, so an error before any output is still
    an HTTP error status; a later error is an ``{"error": ...}`` event before ``[DONE]``."""
    async with contextlib.aclosing(deltas):
        first = await anext(deltas, None)
        response = conn.stream("text/event-stream", {"Cache-Control": "no-cache"})
        try:
            delta = first
            while delta is not None:
                renderer.add(delta)
                events = renderer.delta(delta)
                if events:
                    await response.write(b"".join(events))
                delta = await anext(deltas, None)
            await response.write(b"".join(renderer.tail()) + R.DONE)
            on_success()
        except (RequestError, WorkerError, NoUsableWorker) as caught:
            error = caught if isinstance(caught, RequestError) else from_worker(caught)
            response.outcome = error.status
            await response.write(R.sse(error.body()) + R.DONE)
        except ConnectionResetError:
            response.outcome = 499
            return response
        await response.end()
        return response
