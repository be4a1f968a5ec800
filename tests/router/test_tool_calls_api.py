"""Tool calls, reasoning and /tokenize through the real router's HTTP API, read with the
official ``openai`` client, against a fake worker that answers with a scripted model output
(the random-weight models of the end-to-end tests rarely call a tool)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from engine.tokenizer import Tokenizer
from tests.router.conftest import router_for, run
from tests.router.fake_worker import FakeWorker

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
TOOLS: Any = [WEATHER_TOOL, TIME_TOOL]
MESSAGES: Any = [{"role": "user", "content": "Weather in Paris?"}]
HERMES_REPLY = (
    "<think>\nThe user wants weather.\n</think>\n\nLet me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris 🚀"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
)
CALLS = [("get_weather", '{"city": "Paris 🚀"}'), ("now", "{}")]


def scripted(tokenizer: Tokenizer, text: str) -> FakeWorker:
    ids = tokenizer.encode(text)
    return FakeWorker(reply=lambda prompt: list(ids), context_length=2048)


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_tool_calls_and_reasoning_whole_and_streamed(model_dir: Path, tokenizer: Tokenizer) -> None:
    async def body() -> None:
        async with router_for(
            model_dir,
            workers=(scripted(tokenizer, HERMES_REPLY),),
            tool_call_parser="qwen25",
            reasoning_parser="qwen3",
        ) as r:
            c = client(r.url)
            whole = await c.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS)
            choice = whole.choices[0]
            assert choice.finish_reason == "tool_calls"
            message = choice.message
            assert message.content == "Let me check.\n"
            assert (message.model_extra or {})["reasoning_content"] == "The user wants weather."
            calls = message.tool_calls or []
            assert [(t.function.name, t.function.arguments) for t in calls] == CALLS  # type: ignore[union-attr]
            assert len({t.id for t in calls}) == 2 and all(t.id.startswith("call_") for t in calls)

            stream = await c.chat.completions.create(
                model="tiny", messages=MESSAGES, tools=TOOLS, stream=True
            )
            reasoning, content, finish = "", "", None
            streamed: dict[int, dict[str, Any]] = {}
            async for chunk in stream:
                delta = chunk.choices[0].delta
                reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                content += delta.content or ""
                for t in delta.tool_calls or []:
                    if t.id is not None:
                        assert t.index not in streamed and t.type == "function"
                        assert t.function is not None and t.function.name
                        streamed[t.index] = {"name": t.function.name, "args": ""}
                    assert t.function is not None
                    streamed[t.index]["args"] += t.function.arguments or ""
                finish = chunk.choices[0].finish_reason or finish
            assert reasoning == "The user wants weather." and content == "Let me check.\n"
            assert [(s["name"], s["args"]) for _, s in sorted(streamed.items())] == CALLS
            assert finish == "tool_calls"

            # tool_choice "none": the calls stay text; the reasoning is still split off.
            plain = await c.chat.completions.create(
                model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none"
            )
            assert plain.choices[0].message.tool_calls is None
            assert plain.choices[0].finish_reason == "stop"
            assert plain.choices[0].message.content == HERMES_REPLY.split("</think>\n\n")[1]

    run(body())


@pytest.mark.parametrize(
    ("parser", "text", "calls"),
    [
        (
            "deepseekv3",
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```"
            "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            [("now", "{}")],
        ),
        (
            "kimi_k2",
            "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
            "<|tool_calls_section_end|>",
            [("get_weather", '{"city": "Oslo"}')],
        ),
    ],
)
def test_each_format_through_the_router(
    model_dir: Path, tokenizer: Tokenizer, parser: str, text: str, calls: list[tuple[str, str]]
) -> None:
    async def body() -> None:
        async with router_for(
            model_dir, workers=(scripted(tokenizer, text),), tool_call_parser=parser
        ) as r:
            reply = await client(r.url).chat.completions.create(
                model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required"
            )
            message = reply.choices[0].message
            got = [(t.function.name, t.function.arguments) for t in message.tool_calls or []]  # type: ignore[union-attr]
            assert got == calls and message.content is None
            assert "reasoning_content" not in (message.model_extra or {})

    run(body())


def test_without_a_parser_tools_are_content(model_dir: Path, tokenizer: Tokenizer) -> None:
    async def body() -> None:
        async with router_for(model_dir, workers=(scripted(tokenizer, HERMES_REPLY),)) as r:
            c = client(r.url)
            reply = await c.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS)
            assert reply.choices[0].message.content == HERMES_REPLY
            assert reply.choices[0].message.tool_calls is None
            with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
                await c.chat.completions.create(
                    model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required"
                )

    run(body())


BAD_REQUESTS = [
    ({"tool_choice": "required"}, "tool_choice", "only allowed when tools are given"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
        "tool_choice.function.name",
        "'fly', which is not in tools",
    ),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "'always'"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "must be a JSON object"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}]},
        "tools[0].function.parameters",
        "not a valid JSON Schema",
    ),
]


def test_bad_tools_are_400_and_the_router_keeps_serving(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    async def body() -> None:
        async with router_for(
            model_dir, workers=(scripted(tokenizer, "ok"),), tool_call_parser="hermes"
        ) as r:
            for fields, param, fragment in BAD_REQUESTS:
                status, reply = await r.post(
                    "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, **fields}
                )
                assert status == 400, reply
                err = reply["error"]
                assert err["type"] == "invalid_request_error" and err["param"] == param
                assert fragment in err["message"], err["message"]
            ok = await client(r.url).chat.completions.create(
                model="tiny", messages=MESSAGES, tools=TOOLS
            )
            assert ok.choices[0].message.content == "ok"

    run(body())


def test_tokenize_detokenize(model_dir: Path, tokenizer: Tokenizer) -> None:
    async def body() -> None:
        async with router_for(model_dir, workers=(scripted(tokenizer, "ok"),)) as r:
            text = "The KV cache stores héllo 🚀"
            status, reply = await r.post("/tokenize", {"model": "tiny", "prompt": text})
            assert status == 200 and reply["tokens"] == tokenizer.encode(text)
            assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 2048
            status, back = await r.post("/detokenize", {"model": "tiny", "tokens": reply["tokens"]})
            assert status == 200 and back == {"prompt": text}
            # Messages go through the chat template, tools included.
            bare = (await r.post("/tokenize", {"messages": MESSAGES}))[1]
            with_tools = (await r.post("/tokenize", {"messages": MESSAGES, "tools": TOOLS}))[1]
            rendered = tokenizer.apply_chat_template(MESSAGES, True, TOOLS)
            assert with_tools["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
            assert with_tools["count"] > bare["count"]
            for path, payload, param in [
                ("/detokenize", {"tokens": [1, 512]}, "tokens"),
                ("/detokenize", {"tokens": [-1]}, "tokens"),
                ("/detokenize", {"tokens": "abc"}, "tokens"),
                ("/detokenize", {"tokens": [1] * 2049}, "tokens"),
                ("/tokenize", {"prompt": "x", "messages": MESSAGES}, "prompt"),
                ("/tokenize", {"prompt": "x" * 10**6}, "prompt"),
                ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, None),
            ]:
                status, err = await r.post(path, payload)
                assert status == 400, (path, payload, err)
                assert param is None or err["error"]["param"] == param
            status, err = await r.post("/tokenize", {"model": "other", "prompt": "x"})
            assert status == 404 and err["error"]["code"] == "model_not_found"

    run(body())


def test_markers_that_are_special_tokens_are_kept(model_dir: Path, tmp_path: Path) -> None:
    """Some checkpoints mark their tool-call tags special; the text the parser reads must keep
    them (decoding skips special tokens otherwise)."""
    import shutil

    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    backend.add_special_tokens(["<tool_call>", "</tool_call>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(model_dir / "tokenizer_config.json", tmp_path)
    special = Tokenizer.from_pretrained(tmp_path)
    text = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    ids = special.encode(text)
    assert special.decode(ids) == '\n{"name": "now", "arguments": {}}\n'  # tags dropped

    async def body() -> None:
        worker = FakeWorker(reply=lambda prompt: list(ids), context_length=2048, vocab_size=520)
        async with router_for(tmp_path, workers=(worker,), tool_call_parser="hermes") as r:
            c = client(r.url)
            for stream in (False, True):
                calls: list[tuple[str, str]] = []
                if stream:
                    async for chunk in await c.chat.completions.create(
                        model="tiny", messages=MESSAGES, tools=TOOLS, stream=True
                    ):
                        for t in chunk.choices[0].delta.tool_calls or []:
                            assert t.function is not None
                            calls.append((t.function.name or "", t.function.arguments or ""))
                else:
                    reply = await c.chat.completions.create(
                        model="tiny", messages=MESSAGES, tools=TOOLS
                    )
                    for call in reply.choices[0].message.tool_calls or []:
                        fn: Any = call.function  # type: ignore[union-attr]
                        calls.append((fn.name, fn.arguments))
                assert "".join(n for n, _ in calls) == "now"
                assert "".join(a for _, a in calls) == "{}"

    run(body())
