"""OpenAI (and native /generate) request bodies, parsed and validated into frozen dataclasses.

Everything here is pure: a decoded JSON body goes in, a typed request (``router.app.requests``)
or a ``RequestError`` (400, naming the field, the bad value and the limit) comes out; fields
are read through ``router.app.fields``, output constraints and tools by
``router.app.constraints``. Checks that need the model (vocabulary, context length, chat
template) happen after tokenization, in ``router.app.prompts``.

Unknown fields are ignored, as vLLM and SGLang do; OpenAI fields that pdserve implements only at
their default value (``echo``, penalties, ``logit_bias``...) are refused when set otherwise.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from router.app.constraints import (
    generate_constraint,
    output_constraint,
    parse_tool_choice,
    parse_tools,
)
from router.app.errors import invalid, short, unsupported
from router.app.fields import Fields, is_int, json_type
from router.app.requests import (
    CHAT_ROLES,
    INT32_MAX,
    MAX_BATCH_PROMPTS,
    MAX_COMPLETION_LOGPROBS,
    MAX_N,
    MAX_STOP,
    MAX_TOP_LOGPROBS,
    UINT64,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    Prompt,
    Sampling,
    TokenizeRequest,
)

# ---- shared parts --------------------------------------------------------------------------


def _stop(f: Fields) -> tuple[str, ...]:
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
    if not isinstance(value, list) or not all(is_int(t) for t in value):
        raise invalid(f"{param} must be an array of integers, got {short(value)}", param)
    if not value and not allow_empty:
        raise invalid(f"{param} must not be empty", param)
    negative = [t for t in value if t < 0]
    if negative:
        raise invalid(f"{param} has negative token ids: {negative[:8]}", param)
    return tuple(value)


def _seed(f: Fields) -> int | None:
    seed = f.optional_int("seed", -(1 << 63), UINT64 - 1)
    return None if seed is None else seed % UINT64


def _sampling(f: Fields, max_tokens: int | None, default_max: int | None) -> Sampling:
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


def _stream(f: Fields) -> tuple[bool, bool]:
    """``(stream, include_usage)``; stream_options only make sense when streaming."""
    stream = f.flag("stream", False)
    options = f.raw("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    opts = Fields(options, "stream_options.", "stream_options")
    return stream, opts.flag("include_usage", False)


# ---- /v1/completions -----------------------------------------------------------------------


def parse_completion(body: Any) -> CompletionRequest:
    f = Fields(body)
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
    sampling = replace(sampling, constraint=output_constraint(f))
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
    if all(is_int(t) for t in value):
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
    f = Fields(body)
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
        sampling, logprobs=logprobs, top_logprobs=top_logprobs, constraint=output_constraint(f)
    )
    tools = parse_tools(f.raw("tools"))
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
        tool_choice=parse_tool_choice(f.raw("tool_choice"), tools),
        parallel_tool_calls=f.flag("parallel_tool_calls", True),
        template_kwargs=tuple((kwargs or {}).items()),
        n=n,
        stream=stream,
        include_usage=include_usage,
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
    f = Fields(value, f"{where}.", where)
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
            f"{where}.content must be a string or an array of text parts, got {json_type(content)}",
            f"{where}.content",
        )
    # Other keys (name, tool_calls, tool_call_id, reasoning_content...) are template input.
    return {**value, "role": "system" if role == "developer" else role, "content": content}


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        p = Fields(part, f"{where}[{i}].", f"{where}[{i}]")
        kind = p.text("type")
        if kind != "text":
            raise unsupported(p.name("type"), kind, '"text"')
        texts.append(p.text("text"))
    return "\n".join(texts)


# ---- POST /generate ------------------------------------------------------------------------


def parse_generate(body: Any) -> GenerateRequest:
    """SGLang's ``/generate``: ``text`` or ``input_ids``, and ``sampling_params``."""
    f = Fields(body)
    text, ids = f.raw("text"), f.raw("input_ids")
    if (text is None) == (ids is None):
        raise invalid("send exactly one of text and input_ids", "text")
    prompt: Prompt
    if text is not None:
        if not isinstance(text, str):
            raise invalid(f"text must be a string, got {json_type(text)}", "text")
        prompt = text
    else:
        prompt = _token_ids(ids, "input_ids", False)
    raw = f.raw("sampling_params")
    sp = Fields({} if raw is None else raw, "sampling_params.", "sampling_params")
    # Absent: up to GENERATE_DEFAULT_MAX_TOKENS, clamped to the context (PromptBuilder).
    sampling = _sampling(sp, sp.optional_int("max_new_tokens", 1), None)
    return_logprob = f.flag("return_logprob", False)
    return GenerateRequest(
        prompt=prompt,
        sampling=replace(sampling, logprobs=return_logprob, constraint=generate_constraint(sp)),
        n=sp.integer("n", 1, 1, MAX_N),
        stream=f.flag("stream", False),
        return_logprob=return_logprob,
    )


# ---- POST /tokenize, /detokenize -----------------------------------------------------------


def parse_tokenize(body: Any) -> TokenizeRequest:
    f = Fields(body)
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
        tools=parse_tools(f.raw("tools")),
        template_kwargs=tuple((kwargs or {}).items()),
        add_special_tokens=f.flag("add_special_tokens", True),
        add_generation_prompt=f.flag("add_generation_prompt", True),
    )


def parse_detokenize(body: Any) -> DetokenizeRequest:
    f = Fields(body)
    tokens = f.raw("tokens")
    if tokens is None:
        raise invalid("tokens is required", "tokens", "missing")
    return DetokenizeRequest(f.optional_text("model"), _token_ids(tokens, "tokens", True))
