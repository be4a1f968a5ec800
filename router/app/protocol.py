"""OpenAI (and native /generate) request bodies, parsed and validated into frozen dataclasses.

Everything here is pure: a decoded JSON body goes in, a typed request or a ``RequestError``
(400, naming the field, the bad value and the limit) comes out. Checks that need the model
(vocabulary, context length, chat template) happen after tokenization, in ``router.prompts``.

Unknown fields are ignored, as vLLM and SGLang do; OpenAI fields that pdserve implements only at
their default value (``echo``, penalties, ``logit_bias``...) are refused when set otherwise.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

import jsonschema

from protos import common_pb2
from router.app.errors import RequestError, invalid, short, unsupported

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


# ---- field readers -----------------------------------------------------------------------


class _Fields:
    """Typed reads of one JSON object's fields; every failure names ``prefix + field``."""

    def __init__(self, body: Any, prefix: str = "", what: str = "request body") -> None:
        if not isinstance(body, dict):
            raise invalid(
                f"{what} must be a JSON object, got {_json_type(body)}", prefix.rstrip(".") or None
            )
        self.body: dict[str, Any] = body
        self.prefix = prefix

    def name(self, field: str) -> str:
        return f"{self.prefix}{field}"

    def raw(self, field: str) -> Any:
        return self.body.get(field)

    def flag(self, field: str, default: bool) -> bool:
        value = self.body.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._type(field, value, "a boolean")
        return value

    def optional_int(self, field: str, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.body.get(field)
        if value is None:
            return None
        if not _is_int(value):
            raise self._type(field, value, "an integer")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                bounds = f">= {lo}"
            elif lo is None:
                bounds = f"<= {hi}"
            else:
                bounds = f"in [{lo}, {hi}]"
            raise invalid(f"{self.name(field)} must be {bounds}, got {value}", self.name(field))
        return int(value)

    def integer(
        self, field: str, default: int, lo: int | None = None, hi: int | None = None
    ) -> int:
        value = self.optional_int(field, lo, hi)
        return default if value is None else value

    def number(
        self, field: str, default: float, lo: float, hi: float, lo_open: bool = False
    ) -> float:
        value = self.body.get(field)
        if value is None:
            return default
        if not _is_number(value) or not math.isfinite(value):
            raise self._type(field, value, "a finite number")
        if (value <= lo if lo_open else value < lo) or value > hi:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise invalid(
                f"{self.name(field)} must be in {interval}, got {value!r}", self.name(field)
            )
        return float(value)

    def optional_text(self, field: str) -> str | None:
        value = self.body.get(field)
        if value is not None and not isinstance(value, str):
            raise self._type(field, value, "a string")
        return value

    def text(self, field: str) -> str:
        value = self.optional_text(field)
        if value is None:
            raise invalid(f"{self.name(field)} is required", self.name(field), "missing")
        return value

    def only_default(self, field: str, allowed: tuple[Any, ...], text: str) -> None:
        """Refuse ``field`` unless absent or equal to one of ``allowed`` (booleans apart)."""
        value = self.body.get(field)
        if value is None or any(
            isinstance(value, bool) == isinstance(a, bool) and value == a for a in allowed
        ):
            return
        raise unsupported(self.name(field), value, text)

    def _type(self, field: str, value: Any, expected: str) -> RequestError:
        return invalid(
            f"{self.name(field)} must be {expected}, got {_json_type(value)} {short(value)}",
            self.name(field),
            "invalid_type",
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


# ---- shared parts --------------------------------------------------------------------------


def _stop(f: _Fields) -> tuple[str, ...]:
    value = f.raw("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"stop must be a string or an array of strings, got {short(value)}", "stop")
    if len(stops) > MAX_STOP:
        raise invalid(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise invalid("stop strings must not be empty", "stop")
    return tuple(dict.fromkeys(stops))


def _token_ids(value: Any, param: str, allow_empty: bool) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise invalid(f"{param} must be an array of integers, got {short(value)}", param)
    if not value and not allow_empty:
        raise invalid(f"{param} must not be empty", param)
    negative = [t for t in value if t < 0]
    if negative:
        raise invalid(f"{param} has negative token ids: {negative[:8]}", param)
    return tuple(value)


def _seed(f: _Fields) -> int | None:
    seed = f.optional_int("seed", -(1 << 63), UINT64 - 1)
    return None if seed is None else seed % UINT64


def _sampling(f: _Fields, max_tokens: int | None, default_max: int | None) -> Sampling:
    """The fields every OpenAI endpoint shares, plus vLLM/SGLang's sampling extensions."""
    for penalty in ("presence_penalty", "frequency_penalty"):
        f.only_default(penalty, (0,), "0")
    f.only_default("repetition_penalty", (1,), "1")
    f.only_default("logit_bias", ({},), "{}")
    top_k = f.integer("top_k", -1, -1, INT32_MAX)
    stop_ids = f.raw("stop_token_ids")
    return Sampling(
        temperature=f.number("temperature", 1.0, 0.0, 2.0),
        top_p=f.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=-1 if top_k == 0 else top_k,
        min_p=f.number("min_p", 0.0, 0.0, 1.0),
        seed=_seed(f),
        max_tokens=max_tokens if max_tokens is not None else default_max,
        stop=_stop(f),
        stop_token_ids=() if stop_ids is None else _token_ids(stop_ids, "stop_token_ids", True),
        ignore_eos=f.flag("ignore_eos", False),
    )


def _stream(f: _Fields) -> tuple[bool, bool]:
    """``(stream, include_usage)``; stream_options only make sense when streaming."""
    stream = f.flag("stream", False)
    options = f.raw("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    opts = _Fields(options, "stream_options.", "stream_options")
    return stream, opts.flag("include_usage", False)


# ---- /v1/completions -----------------------------------------------------------------------


def parse_completion(body: Any) -> CompletionRequest:
    f = _Fields(body)
    model = f.text("model")
    f.only_default("echo", (False,), "false")
    f.only_default("suffix", ("",), "null")
    n = f.integer("n", 1, 1, MAX_N)
    best_of = f.optional_int("best_of")
    if best_of is not None and best_of != n:
        raise unsupported("best_of", best_of, f"null or equal to n ({n})")
    logprobs = f.optional_int("logprobs", 0, MAX_COMPLETION_LOGPROBS)
    max_tokens = f.optional_int("max_tokens", 1)
    sampling = _sampling(f, max_tokens, 16)
    if logprobs is not None:
        sampling = replace(sampling, logprobs=True, top_logprobs=logprobs)
    sampling = replace(sampling, constraint=_constraint(f))
    stream, include_usage = _stream(f)
    return CompletionRequest(
        model=model,
        prompts=_prompts(f.raw("prompt")),
        sampling=sampling,
        n=n,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
    )


def _prompts(value: Any) -> tuple[Prompt, ...]:
    """``prompt``: a string, strings, token ids, or lists of token ids."""
    if value is None:
        raise invalid("prompt is required", "prompt", "missing")
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value:
        raise invalid(
            "prompt must be a string, an array of strings, an array of token ids or an array of "
            f"token-id arrays, got {short(value)}",
            "prompt",
        )
    if all(_is_int(t) for t in value):
        return (_token_ids(value, "prompt", False),)
    if len(value) > MAX_BATCH_PROMPTS:
        raise invalid(
            f"prompt holds {len(value)} prompts; at most {MAX_BATCH_PROMPTS} per request", "prompt"
        )
    if all(isinstance(p, str) for p in value):
        return tuple(value)
    if all(isinstance(p, list) for p in value):
        return tuple(_token_ids(p, f"prompt[{i}]", False) for i, p in enumerate(value))
    raise invalid(
        f"prompt array must hold only strings, only token ids or only token-id arrays, got "
        f"{short(value)}",
        "prompt",
    )


# ---- /v1/chat/completions ------------------------------------------------------------------


def parse_chat(body: Any) -> ChatRequest:
    f = _Fields(body)
    model = f.text("model")
    n = f.integer("n", 1, 1, MAX_N)
    max_tokens = f.optional_int("max_tokens", 1)
    max_completion = f.optional_int("max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid(
            f"max_tokens ({max_tokens}) and max_completion_tokens ({max_completion}) disagree; "
            "send one of them",
            "max_completion_tokens",
        )
    limit = max_completion if max_completion is not None else max_tokens
    sampling = _sampling(f, limit, None)
    logprobs = f.flag("logprobs", False)
    top_logprobs = f.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    sampling = replace(
        sampling, logprobs=logprobs, top_logprobs=top_logprobs, constraint=_constraint(f)
    )
    tools = _tools(f.raw("tools"))
    kwargs = f.raw("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise invalid(
            f"chat_template_kwargs must be an object, got {short(kwargs)}", "chat_template_kwargs"
        )
    stream, include_usage = _stream(f)
    return ChatRequest(
        model=model,
        messages=_messages(f.raw("messages")),
        sampling=sampling,
        tools=tools,
        tool_choice=_tool_choice(f.raw("tool_choice"), tools),
        parallel_tool_calls=f.flag("parallel_tool_calls", True),
        template_kwargs=tuple((kwargs or {}).items()),
        n=n,
        stream=stream,
        include_usage=include_usage,
    )


# ---- constrained decoding -------------------------------------------------------------------


def _constraint(f: _Fields) -> Constraint | None:
    """The output constraint of a completion or chat request: ``response_format`` (OpenAI's
    json_object and json_schema, SGLang's structural_tag) or SGLang's ``regex`` and ``ebnf``;
    at most one of them."""
    found: list[tuple[str, Constraint]] = []
    fmt = _response_format(f.raw("response_format"))
    if fmt is not None:
        found.append(("response_format", fmt))
    for field in ("regex", "ebnf"):
        text = f.optional_text(field)
        if text is not None:
            found.append((field, _text_constraint(field, text, field)))
    return _one_constraint(found)


def _generate_constraint(sp: _Fields) -> Constraint | None:
    """``/generate``'s constraint: SGLang's ``sampling_params`` json_schema (JSON text),
    regex, ebnf or structural_tag (JSON text); at most one of them."""
    found = [
        (sp.name(kind), _text_constraint(kind, text, sp.name(kind)))
        for kind in ("json_schema", "regex", "ebnf", "structural_tag")
        if (text := sp.optional_text(kind)) is not None
    ]
    return _one_constraint(found)


def _one_constraint(found: list[tuple[str, Constraint]]) -> Constraint | None:
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise invalid(f"a request takes at most one output constraint; got {names}", found[1][0])
    return found[0][1] if found else None


def _text_constraint(kind: str, text: str, param: str) -> Constraint:
    if not text.strip():
        raise invalid(f"{param} must not be empty", param)
    if kind in ("json_schema", "structural_tag"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise invalid(f"{param} is not valid JSON: {exc}", param) from None
        if not isinstance(value, dict):
            raise invalid(f"{param} must be a JSON object, got {_json_type(value)}", param)
    return Constraint(kind, text)


def _response_format(value: Any) -> Constraint | None:
    if value is None:
        return None
    f = _Fields(value, "response_format.", "response_format")
    kind = f.text("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        if f.raw("json_schema") is None:
            raise invalid(
                'response_format.json_schema is required when type is "json_schema"',
                "response_format.json_schema",
                "missing",
            )
        js = _Fields(f.raw("json_schema"), f.name("json_schema."), "response_format.json_schema")
        js.optional_text("name")
        js.flag("strict", False)  # the grammar is always strict: no keys the schema lacks
        schema = js.raw("schema")
        if not isinstance(schema, dict):
            raise invalid(
                f"{js.name('schema')} must be a JSON schema object, got {_json_type(schema)} "
                f"{short(schema)}",
                js.name("schema"),
            )
        return Constraint("json_schema", json.dumps(schema))
    if kind == "structural_tag":
        return Constraint("structural_tag", json.dumps(value))
    raise unsupported(
        "response_format.type", kind, '"text", "json_object", "json_schema" or "structural_tag"'
    )


def _messages(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None:
        raise invalid("messages is required", "messages", "missing")
    if not isinstance(value, list) or not value:
        raise invalid(f"messages must be a non-empty array, got {short(value)}", "messages")
    return tuple(_message(i, m) for i, m in enumerate(value))


def _message(index: int, value: Any) -> dict[str, Any]:
    """A message as the chat template sees it: text content, ``developer`` as ``system``."""
    where = f"messages[{index}]"
    f = _Fields(value, f"{where}.", where)
    role = f.text("role")
    if role not in CHAT_ROLES:
        raise invalid(
            f"{where}.role must be one of {list(CHAT_ROLES)}, got {role!r}", f"{where}.role"
        )
    content = f.raw("content")
    if isinstance(content, list):
        content = _text_parts(content, f"{where}.content")
    elif content is None:
        if role != "assistant":
            raise invalid(f"{where}.content is required for role {role!r}", f"{where}.content")
    elif not isinstance(content, str):
        raise invalid(
            f"{where}.content must be a string or an array of text parts, got "
            f"{_json_type(content)}",
            f"{where}.content",
        )
    # Other keys (name, tool_calls, tool_call_id, reasoning_content...) are template input.
    return {**value, "role": "system" if role == "developer" else role, "content": content}


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        p = _Fields(part, f"{where}[{i}].", f"{where}[{i}]")
        kind = p.text("type")
        if kind != "text":
            raise unsupported(p.name("type"), kind, '"text"')
        texts.append(p.text("text"))
    return "\n".join(texts)


def _tools(value: Any) -> tuple[dict[str, Any], ...] | None:
    """``tools``: function tools with distinct names and parameters that are JSON Schemas;
    an empty array is no tools."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid(f"tools must be an array, got {short(value)}", "tools")
    if len(value) > MAX_TOOLS:
        raise invalid(f"tools holds {len(value)} tools; at most {MAX_TOOLS}", "tools")
    names: set[str] = set()
    for i, tool in enumerate(value):
        f = _Fields(tool, f"tools[{i}].", f"tools[{i}]")
        if f.raw("type") != "function":
            raise unsupported(f.name("type"), f.raw("type"), '"function"')
        fn = _Fields(f.raw("function"), f"tools[{i}].function.", f"tools[{i}].function")
        name = fn.text("name")
        if not TOOL_NAME.fullmatch(name):
            raise invalid(
                f"{fn.name('name')} must be 1 to 64 letters, digits, underscores or dashes, "
                f"got {short(name)}",
                fn.name("name"),
            )
        if name in names:
            raise invalid(f"tools has two functions named {name!r}", fn.name("name"))
        names.add(name)
        fn.optional_text("description")
        fn.flag("strict", False)
        _parameters(fn.raw("parameters"), fn.name("parameters"))
    return tuple(value) or None


def _parameters(schema: Any, param: str) -> None:
    """A function's ``parameters``: absent, or a JSON Schema object."""
    if schema is None:
        return
    if not isinstance(schema, dict):
        raise invalid(f"{param} must be a JSON Schema object, got {short(schema)}", param)
    dialect = schema.get("$schema")
    if dialect is not None and not isinstance(dialect, str):
        raise invalid(f"{param}.$schema must be a string, got {short(dialect)}", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.path)
        raise invalid(f"{param}{where} is not a valid JSON Schema: {exc.message}", param) from None
    except RecursionError:
        raise invalid(f"{param} nests too deeply", param) from None


def _tool_choice(value: Any, tools: tuple[dict[str, Any], ...] | None) -> ToolChoice:
    """``tool_choice``, checked against ``tools``; absent: "auto" with tools, else "none"."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise invalid(
                f'tool_choice must be "none", "auto", "required" or a named function, got '
                f"{short(value)}",
                "tool_choice",
            )
        choice = ToolChoice(value)
    else:
        f = _Fields(value, "tool_choice.", "tool_choice")
        if f.raw("type") != "function":
            raise invalid(
                f'tool_choice.type must be "function", got {short(f.raw("type"))}',
                "tool_choice.type",
            )
        fn = _Fields(f.raw("function"), "tool_choice.function.", "tool_choice.function")
        choice = ToolChoice("function", fn.text("name"))
    if choice.mode == "none":
        return choice
    if not tools:
        raise invalid(
            f"tool_choice={short(choice.openai())} is only allowed when tools are given",
            "tool_choice",
        )
    names = [t["function"]["name"] for t in tools]
    if choice.function is not None and choice.function not in names:
        raise invalid(
            f"tool_choice names function {choice.function!r}, which is not in tools "
            f"({', '.join(names)})",
            "tool_choice.function.name",
        )
    return choice


# ---- POST /generate ------------------------------------------------------------------------


def parse_generate(body: Any) -> GenerateRequest:
    """SGLang's ``/generate``: ``text`` or ``input_ids``, and ``sampling_params``."""
    f = _Fields(body)
    text, ids = f.raw("text"), f.raw("input_ids")
    if (text is None) == (ids is None):
        raise invalid("send exactly one of text and input_ids", "text")
    prompt: Prompt
    if text is not None:
        if not isinstance(text, str):
            raise invalid(f"text must be a string, got {_json_type(text)}", "text")
        prompt = text
    else:
        prompt = _token_ids(ids, "input_ids", False)
    raw = f.raw("sampling_params")
    sp = _Fields({} if raw is None else raw, "sampling_params.", "sampling_params")
    # Absent: up to GENERATE_DEFAULT_MAX_TOKENS, clamped to the context (PromptBuilder).
    sampling = _sampling(sp, sp.optional_int("max_new_tokens", 1), None)
    return_logprob = f.flag("return_logprob", False)
    return GenerateRequest(
        prompt=prompt,
        sampling=replace(sampling, logprobs=return_logprob, constraint=_generate_constraint(sp)),
        n=sp.integer("n", 1, 1, MAX_N),
        stream=f.flag("stream", False),
        return_logprob=return_logprob,
    )


# ---- POST /tokenize, /detokenize -----------------------------------------------------------


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


def parse_tokenize(body: Any) -> TokenizeRequest:
    f = _Fields(body)
    prompt, messages = f.raw("prompt"), f.raw("messages")
    if (prompt is None) == (messages is None):
        raise invalid("send exactly one of prompt and messages", "prompt")
    kwargs = f.raw("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise invalid(
            f"chat_template_kwargs must be an object, got {short(kwargs)}", "chat_template_kwargs"
        )
    return TokenizeRequest(
        model=f.optional_text("model"),
        prompt=f.optional_text("prompt"),
        messages=None if messages is None else _messages(messages),
        tools=_tools(f.raw("tools")),
        template_kwargs=tuple((kwargs or {}).items()),
        add_special_tokens=f.flag("add_special_tokens", True),
        add_generation_prompt=f.flag("add_generation_prompt", True),
    )


def parse_detokenize(body: Any) -> DetokenizeRequest:
    f = _Fields(body)
    tokens = f.raw("tokens")
    if tokens is None:
        raise invalid("tokens is required", "tokens", "missing")
    return DetokenizeRequest(f.optional_text("model"), _token_ids(tokens, "tokens", True))
