"""The grammar of ``tool_choice`` "required" or a named function: compiled by xgrammar with
the tiny checkpoint's real tokenizer and sampled from random logits (the worst model there
is), every output must hold a call that the format's parser reads back and whose arguments
validate against the tool's parameter schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import torch
import xgrammar

from engine.testing.tiny_models import VOCAB_SIZE
from router.app.parsers.reasoning import REASONING_FORMATS
from router.app.parsers.tool_calls import (
    DeepSeekV3Parser,
    HermesParser,
    KimiK2Parser,
    ToolCallParser,
)
from router.app.parsers.tool_grammar import reasoning_mode, tool_call_constraint

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {
                    "guests": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string", "maxLength": 6},
                                "age": {"type": "number", "minimum": 0, "maximum": 120},
                            },
                            "required": ["name"],
                        },
                        "minItems": 1,
                        "maxItems": 2,
                    },
                    "room": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                    "vip": {"type": "boolean"},
                },
                "required": ["guests", "vip"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PARSERS = [DeepSeekV3Parser, HermesParser, KimiK2Parser]
MAX_STEPS = 4000


@pytest.fixture(scope="module")
def compiler(model_dir: Path) -> xgrammar.GrammarCompiler:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    return xgrammar.GrammarCompiler(
        xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB_SIZE)
    )


def sample(compiler: xgrammar.GrammarCompiler, spec: str, seed: int, prefix: str = "") -> list[int]:
    """Token ids drawn from random logits under the grammar (after the forced ``prefix``)
    until it ends."""
    grammar = xgrammar.Grammar.from_structural_tag(spec)
    matcher = xgrammar.GrammarMatcher(compiler.compile_grammar(grammar))
    if prefix:
        assert matcher.accept_string(prefix)
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB_SIZE)
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    while not matcher.is_terminated():
        assert len(ids) < MAX_STEPS, "the grammar did not end"
        matcher.fill_next_token_bitmask(bitmask)
        logits = torch.rand(1, VOCAB_SIZE, generator=generator)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask)
        token = int(logits.argmax())
        assert matcher.accept_token(token)
        ids.append(token)
    return ids


def check_calls(parser: type[ToolCallParser], text: str, names: set[str]) -> int:
    content, calls = parser.parse(text)
    assert calls, f"no call read from {text!r}"
    assert content.strip() == ""
    for call in calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments, strict=False), SCHEMAS[call.name])
    return len(calls)


@pytest.mark.parametrize("parser", PARSERS)
def test_required_makes_valid_calls(
    compiler: xgrammar.GrammarCompiler, tokenizer: Any, parser: type[ToolCallParser]
) -> None:
    constraint = tool_call_constraint(parser, TOOLS, "required")
    assert constraint is not None
    kind, spec = constraint
    assert kind == "structural_tag"
    counts = []
    for seed in range(4):
        ids = sample(compiler, spec, seed)
        assert ids[-1] in tokenizer.eos_token_ids  # the grammar ends with a stop token
        counts.append(check_calls(parser, tokenizer.decode(ids[:-1]), set(SCHEMAS)))
    assert min(counts) >= 1


@pytest.mark.parametrize("parser", PARSERS)
def test_named_function_is_called_once(
    compiler: xgrammar.GrammarCompiler, tokenizer: Any, parser: type[ToolCallParser]
) -> None:
    choice = {"type": "function", "function": {"name": "book"}}
    constraint = tool_call_constraint(parser, TOOLS, choice)
    assert constraint is not None
    for seed in range(3):
        ids = sample(compiler, constraint[1], seed)
        assert check_calls(parser, tokenizer.decode(ids[:-1]), {"book"}) == 1


def test_one_call_when_parallel_calls_are_off(
    compiler: xgrammar.GrammarCompiler, tokenizer: Any
) -> None:
    constraint = tool_call_constraint(HermesParser, TOOLS, "required", parallel_tool_calls=False)
    assert constraint is not None
    for seed in range(3):
        ids = sample(compiler, constraint[1], seed)
        assert check_calls(HermesParser, tokenizer.decode(ids[:-1]), set(SCHEMAS)) == 1


def test_calls_after_reasoning_the_prompt_opened(
    compiler: xgrammar.GrammarCompiler, tokenizer: Any
) -> None:
    """Qwen3 thinking: the template opened ``<think>``; the grammar lets the model finish its
    thought (given here), then forces the call, and the splitter and parser read both."""
    qwen3 = REASONING_FORMATS["qwen3"]
    tail = "<|im_start|>assistant\n<think>\n"
    mode = reasoning_mode(qwen3, tail)
    assert mode == "enabled"
    constraint = tool_call_constraint(HermesParser, TOOLS, "required", mode)
    assert constraint is not None
    thought = "Sunny?\n</think>\n\n"
    ids = sample(compiler, constraint[1], 0, prefix=thought)
    reasoning, content = qwen3.split(thought + tokenizer.decode(ids[:-1]), tail)
    assert reasoning == "Sunny?"
    check_calls(HermesParser, content, set(SCHEMAS))


def call_tags(node: Any, parser: type[ToolCallParser]) -> list[Any]:
    """Every tag of one call inside a structural tag (its pydantic form)."""
    if isinstance(node, list):
        return [t for item in node for t in call_tags(item, parser)]
    if not isinstance(node, pydantic.BaseModel):
        return []
    begin = getattr(node, "begin", None)
    if (
        getattr(node, "type", None) == "tag"
        and isinstance(begin, str)
        and parser.call_begin in begin
    ):
        return [node]
    return [t for name in type(node).model_fields for t in call_tags(getattr(node, name), parser)]


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("reasoning", ["disabled", "enabled", "auto"])
def test_call_tags_are_xgrammars_own(parser: type[ToolCallParser], reasoning: Any) -> None:
    """The router writes the tags itself (xgrammar would bring torch into it): each call's
    tag equals the one xgrammar ships for the format."""
    constraint = tool_call_constraint(parser, TOOLS, "required", reasoning)
    assert constraint is not None
    ours = xgrammar.StructuralTag.model_validate_json(constraint[1])
    theirs = xgrammar.get_model_structural_tag(
        parser.xgrammar_format, tools=list(TOOLS), tool_choice="required", reasoning=reasoning
    )
    assert call_tags(ours, parser) == call_tags(theirs, parser)
    assert len(call_tags(ours, parser)) == len(TOOLS)
    if parser is DeepSeekV3Parser:
        assert ours == theirs


def test_free_choices_have_no_grammar() -> None:
    assert tool_call_constraint(HermesParser, TOOLS, "auto") is None
    assert tool_call_constraint(HermesParser, TOOLS, "none") is None
    assert reasoning_mode(None, "") == "disabled"
    assert reasoning_mode(REASONING_FORMATS["qwen3"], "assistant\n") == "auto"
    assert reasoning_mode(REASONING_FORMATS["qwen3"], "<think>\n\n</think>\n\n") == "disabled"
