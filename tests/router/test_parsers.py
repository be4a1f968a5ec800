"""Tool-call and reasoning parsers: raw model output in each family's format gives the
expected calls and reasoning, whole and streamed in any split; malformed output never raises
and falls back to plain content."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.app.parsers.chat_output import ChatOutputFormat
from router.app.parsers.reasoning import REASONING_FORMATS
from router.app.parsers.tool_calls import (
    TOOL_CALL_PARSERS,
    DeepSeekV3Parser,
    HermesParser,
    KimiK2Parser,
    ToolCall,
    ToolCallParser,
)

WEATHER = ToolCall("get_weather", '{"city": "Paris", "unit": "c"}')
NESTED = ToolCall("add", '{"a": {"b": [1, 2, {"c": "}\\n```<"}]}, "d": "◁ 🚀"}')
EMPTY = ToolCall("now", "{}")


def deepseek(content: str, *calls: ToolCall) -> str:
    body = "\n".join(
        f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{c.name}\n```json\n{c.arguments}\n```"
        "<｜tool▁call▁end｜>"
        for c in calls
    )
    return f"{content}<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>"


def hermes(content: str, *calls: ToolCall) -> str:
    body = "\n".join(
        f'<tool_call>\n{{"name": "{c.name}", "arguments": {c.arguments}}}\n</tool_call>'
        for c in calls
    )
    return f"{content}{body}"


def kimi(content: str, *calls: ToolCall) -> str:
    body = "".join(
        f"<|tool_call_begin|>functions.{c.name}:{i}<|tool_call_argument_begin|>{c.arguments}"
        "<|tool_call_end|>"
        for i, c in enumerate(calls)
    )
    return f"{content}<|tool_calls_section_begin|>{body}<|tool_calls_section_end|>"


WRITERS = {DeepSeekV3Parser: deepseek, HermesParser: hermes, KimiK2Parser: kimi}
CONTENTS = ["", "Let me look that up. ", "a < b and {json}: ```\n"]
CALLS = [(WEATHER,), (NESTED, EMPTY), (EMPTY, WEATHER, NESTED)]


def stream(parser: type[ToolCallParser], parts: list[str]) -> tuple[str, list[ToolCall], bool]:
    """Feed ``parts`` and rebuild what a client would: content, calls from their deltas."""
    p = parser()
    content, ids = "", set()
    calls: dict[int, list[str]] = {}
    for delta in [*(p.feed(part) for part in parts), p.finish()]:
        content += delta.content
        for d in delta.calls:
            if d.id is not None:
                assert d.index == len(calls) and d.name and d.id.startswith("call_")
                assert d.id not in ids
                ids.add(d.id)
                calls[d.index] = [d.name, d.arguments]
            else:
                assert d.name is None and d.arguments
                calls[d.index][1] += d.arguments
    return content, [ToolCall(n, a) for n, a in calls.values()], p.malformed


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def test_registry() -> None:
    assert TOOL_CALL_PARSERS["deepseekv3"] is DeepSeekV3Parser
    assert TOOL_CALL_PARSERS["qwen25"] is TOOL_CALL_PARSERS["hermes"] is HermesParser
    assert TOOL_CALL_PARSERS["kimi_k2"] is KimiK2Parser


@pytest.mark.parametrize("parser", list(WRITERS))
@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("calls", CALLS)
def test_whole_and_char_by_char(
    parser: type[ToolCallParser], content: str, calls: tuple[ToolCall, ...]
) -> None:
    text = WRITERS[parser](content, *calls)
    got_content, got_calls = parser.parse(text)
    assert got_content == content and got_calls == list(calls)
    assert all(json.loads(c.arguments) is not None for c in got_calls)
    assert stream(parser, list(text)) == (content, list(calls), False)


@pytest.mark.parametrize("parser", list(WRITERS))
def test_plain_text_is_content(parser: type[ToolCallParser]) -> None:
    for text in ["", "hello", "a <tool", "<｜tool▁call", "<|tool_calls", 'x {"name": 1}']:
        assert parser.parse(text) == (text, [])
        assert stream(parser, list(text)) == (text, [], False)


@settings(max_examples=60, deadline=None)
@given(
    parser=st.sampled_from(list(WRITERS)),
    content=st.sampled_from(CONTENTS),
    calls=st.sampled_from(CALLS),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_streamed_in_any_split_equals_whole(
    parser: type[ToolCallParser], content: str, calls: tuple[ToolCall, ...], cuts: list[int]
) -> None:
    text = WRITERS[parser](content, *calls)
    assert stream(parser, split(text, cuts)) == (content, list(calls), False)


def test_format_variants() -> None:
    # Hermes: keys in another order, text after the calls, no newline inside the tags.
    text = 'Hi<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>\nbye'
    assert HermesParser.parse(text) == ("Hi\nbye", [ToolCall("f", '{"x": 1}')])
    assert stream(HermesParser, list(text))[:2] == ("Hi\nbye", [ToolCall("f", '{"x": 1}')])
    # Kimi: a dotted name, and the section's end missing at the end of the output.
    text = "<|tool_calls_section_begin|><|tool_call_begin|>functions.a.b:3"
    text += '<|tool_call_argument_begin|>{"q": 1}<|tool_call_end|>'
    assert KimiK2Parser.parse(text) == ("", [ToolCall("a.b", '{"q": 1}')])
    # DeepSeek: text after the calls is content.
    text = deepseek("", WEATHER) + " done"
    assert DeepSeekV3Parser.parse(text) == (" done", [WEATHER])


MALFORMED = {
    DeepSeekV3Parser: [
        "<｜tool▁calls▁begin｜>nonsense",
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"a": ',
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>oops<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        deepseek("x", ToolCall("f", "{not json")),
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>" + "f" * 2000,
    ],
    HermesParser: [
        '<tool_call>\n{"name": "f", "arguments": {"a": 1',
        "<tool_call>not json</tool_call> after",
        '<tool_call>{"name": 5}</tool_call>',
        hermes("", ToolCall("f", "[1, 2")),
        "<tool_call>" + "x" * 3000,
    ],
    KimiK2Parser: [
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f<|tool_call_argument_begin|>{}",
        "<|tool_calls_section_begin|> hello",
        kimi("", ToolCall("f", '{"a": }')),
    ],
}


@pytest.mark.parametrize(
    ("parser", "text"), [(p, t) for p, texts in MALFORMED.items() for t in texts]
)
def test_malformed_is_content(parser: type[ToolCallParser], text: str) -> None:
    assert parser.parse(text) == (text, [])
    for parts in (list(text), [text], split(text, [7, 40, 41])):
        content, calls, malformed = stream(parser, parts)  # never raises
        assert malformed
        # Whatever was not read as a call's arguments came out as content, in order.
        assert len(content) + sum(len(c.arguments) for c in calls) <= len(text)


# ---- reasoning -------------------------------------------------------------------------------


def split_reasoning(name: str, parts: list[str], tail: str = "") -> tuple[str | None, str]:
    splitter = REASONING_FORMATS[name].splitter(tail)
    reasoning, content = "", ""
    for r, c in [*(splitter.feed(p) for p in parts), splitter.finish()]:
        reasoning += r
        content += c
    return (reasoning if splitter.reasoned else None), content


REASONING_CASES = [
    # (parser, prompt tail, output, reasoning, content)
    ("qwen3", "<|im_start|>assistant\n", "<think>\nHmm.\n</think>\n\nParis.", "Hmm.", "Paris."),
    ("qwen3", "assistant\n", "Paris.", None, "Paris."),
    ("qwen3", "assistant\n", "  Paris <think>", None, "  Paris <think>"),
    ("qwen3", "assistant\n<think>\n\n</think>\n\n", "<think>x", None, "<think>x"),
    ("qwen3", "assistant\n<think>\n", "A < B.\n</think>\n\nYes.", "A < B.", "Yes."),
    ("qwen3", "assistant\n", "<think>cut off while thinkin", "cut off while thinkin", ""),
    ("deepseek-r1", "<｜Assistant｜><think>\n", "Let me see.</think>4", "Let me see.", "4"),
    ("deepseek-r1", "<｜Assistant｜>", "<think>\nLet me see.\n</think>\n\n4", "Let me see.", "4"),
    ("deepseek-r1", "<｜Assistant｜>", "Let me see.\n</think>4", "Let me see.", "4"),
    ("deepseek-r1", "<｜Assistant｜></think>", "4", None, "4"),
    ("kimi", "<|im_assistant|>assistant<|im_middle|>", "◁think▷Hmm◁/think▷Hi", "Hmm", "Hi"),
    ("kimi", "<|im_middle|>", "<think>Hmm</think>Hi", "Hmm", "Hi"),
    ("kimi", "<|im_middle|>", "Hi ◁/think▷", None, "Hi ◁/think▷"),
]


@pytest.mark.parametrize(("name", "tail", "text", "reasoning", "content"), REASONING_CASES)
def test_reasoning_split(
    name: str, tail: str, text: str, reasoning: str | None, content: str
) -> None:
    assert REASONING_FORMATS[name].split(text, tail) == (reasoning, content)
    assert split_reasoning(name, list(text), tail) == (reasoning, content)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(REASONING_CASES), cuts=st.lists(st.integers(0, 1000), max_size=12))
def test_reasoning_streamed_in_any_split(
    case: tuple[str, str, str, str | None, str], cuts: list[int]
) -> None:
    name, tail, text, reasoning, content = case
    assert split_reasoning(name, split(text, cuts), tail) == (reasoning, content)


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 1000), max_size=20), parser=st.sampled_from(list(WRITERS)))
def test_reasoning_then_tool_calls(cuts: list[int], parser: type[ToolCallParser]) -> None:
    """The reasoning is split off first; tool calls are read from the answer after it (a call
    written inside the reasoning is only reasoning)."""
    thought = "I should call " + WRITERS[parser]("", EMPTY)
    text = f"<think>{thought}</think>\n\n" + WRITERS[parser]("Checking. ", WEATHER)
    fmt = ChatOutputFormat(parser, REASONING_FORMATS["qwen3"], "<|im_start|>assistant\n")
    whole = fmt.parse(text)
    assert (whole.reasoning, whole.content, whole.tool_calls) == (thought, "Checking. ", (WEATHER,))
    out = fmt.stream()
    deltas = [*(out.feed(p) for p in split(text, cuts)), out.finish()]
    assert "".join(d.reasoning for d in deltas) == thought
    assert "".join(d.content for d in deltas) == "Checking. "
    calls = [c for d in deltas for c in d.tool_calls]
    assert calls[0].name == WEATHER.name and out.called
    assert "".join(c.arguments for c in calls) == WEATHER.arguments


def pieces(parser: type[ToolCallParser]) -> st.SearchStrategy[str]:
    """Texts made of the format's markers, fragments of them, JSON and noise."""
    markers = [parser.section_begin, parser.call_begin, parser.call_end, *parser.markers]
    if parser.section_end:
        markers.append(parser.section_end)
    parts = st.sampled_from(
        [
            *markers,
            *(m[: len(m) // 2] for m in markers),
            "function",
            "functions.f:0",
            '{"name": "f", "arguments": ',
            '{"a": 1}',
            "}",
            "```",
            "\n```json\n",
            " ",
            "\n",
            "x",
            '"',
        ]
    )
    return st.lists(parts, max_size=14).map("".join)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), parser=st.sampled_from(list(WRITERS)))
def test_any_text_any_split_same_output_never_raises(
    data: st.DataObject, parser: type[ToolCallParser]
) -> None:
    text = data.draw(pieces(parser))
    cuts = data.draw(st.lists(st.integers(0, 1000), max_size=10))
    whole = stream(parser, [text])
    assert stream(parser, split(text, cuts)) == whole
    content, calls = parser.parse(text)
    if not whole[2]:  # well-formed: the whole parse agrees with the stream
        assert (content, calls) == whole[:2] or not calls
    else:
        assert (content, calls) == (text, [])


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(REASONING_FORMATS)),
    tail=st.sampled_from(["", "<think>\n", "</think>", "◁think▷"]),
    text=st.lists(
        st.sampled_from(
            ["<think>", "</think>", "◁think▷", "◁/think▷", "<thi", "◁/", " ", "a", "\n"]
        ),
        max_size=10,
    ).map("".join),
    cuts=st.lists(st.integers(0, 1000), max_size=8),
)
def test_reasoning_any_text_any_split(name: str, tail: str, text: str, cuts: list[int]) -> None:
    assert split_reasoning(name, split(text, cuts), tail) == REASONING_FORMATS[name].split(
        text, tail
    )
