"""The grammar that makes a model call a tool: ``tool_choice`` "required" or a named function.

The grammar is an xgrammar structural tag (the JSON that ``xgrammar.Grammar.from_structural_tag``
compiles): the calls in the ``--tool-call-parser``'s format, wrapped in its markers, each
call's arguments constrained to its tool's parameter schema, optionally after a reasoning
block. The workers compile it; the parser reads the calls back from the output. The tags are
written here rather than taken from ``xgrammar.get_model_structural_tag`` because importing
xgrammar pulls in torch and transformers (seconds, and hundreds of MB per router process);
the tests check that they equal xgrammar's own for each format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from router.app.parsers.reasoning import ReasoningFormat
from router.app.parsers.tool_calls import (
    DeepSeekV3Parser,
    HermesParser,
    KimiK2Parser,
    ToolCallParser,
)

ReasoningMode = Literal["enabled", "disabled", "auto"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def tool_call_constraint(
    parser: type[ToolCallParser],
    tools: Sequence[dict[str, Any]],
    tool_choice: str | dict[str, Any],
    reasoning: ReasoningMode = "disabled",
    parallel_tool_calls: bool = True,
) -> tuple[str, str] | None:
    """``(kind, spec)`` of the grammar for ``tool_choice`` ("required" or
    ``{"type": "function", "function": {"name": ...}}``) over ``tools`` in ``parser``'s
    format; None for "auto" and "none", which leave the model free. ``reasoning``: the
    output first reasons ("enabled": the prompt opened the reasoning; "auto": the output may
    open it). A named function is called once; "required" makes at least one call (exactly
    one without ``parallel_tool_calls``)."""
    if isinstance(tool_choice, str):
        if tool_choice in ("auto", "none"):
            return None
        allowed = [t["function"] for t in tools]
    else:
        name = tool_choice["function"]["name"]
        allowed = [t["function"] for t in tools if t["function"]["name"] == name]
        parallel_tool_calls = False
    if not allowed:
        raise ValueError(f"tool_choice {tool_choice!r} leaves no tool to call")
    calls = _calls(parser, allowed, parallel_tool_calls)
    fmt = calls if reasoning == "disabled" else _sequence(_reasoning(parser, reasoning), calls)
    return "structural_tag", json.dumps({"type": "structural_tag", "format": fmt})


def reasoning_mode(fmt: ReasoningFormat | None, prompt_tail: str) -> ReasoningMode:
    """How the grammar treats a reasoning block before the calls (structural tags know
    ``<think>`` blocks): "enabled" when the prompt opened one, "auto" when the output may,
    "disabled" without a reasoning parser or when the prompt closed it."""
    if fmt is None or (THINK_OPEN, THINK_CLOSE) not in fmt.markers:
        return "disabled"
    if prompt_tail.rstrip().endswith(THINK_OPEN):
        return "enabled"
    return "auto" if fmt.starts_inside(prompt_tail) is None else "disabled"


def _calls(
    parser: type[ToolCallParser], functions: list[dict[str, Any]], parallel: bool
) -> dict[str, Any]:
    """One or more calls (one without ``parallel``) of ``functions`` in ``parser``'s format."""
    tags = [_tag(parser, f["name"], f.get("parameters")) for f in functions]
    separator = "\n" if parser is not KimiK2Parser else ""
    run = {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": separator,
        "at_least_one": True,
        "stop_after_first": not parallel,
    }
    if parser.section_end is None:
        return run
    return {"type": "tag", "begin": parser.section_begin, "content": run, "end": parser.section_end}


def _tag(parser: type[ToolCallParser], name: str, schema: Any) -> dict[str, Any]:
    """One call of function ``name``, its arguments under ``schema`` (None: any JSON)."""
    arguments = {"type": "json_schema", "json_schema": True if schema is None else schema}
    if parser is DeepSeekV3Parser:
        begin = f"{parser.call_begin}function<｜tool▁sep｜>{name}\n```json\n"
        return _tag_of(begin, arguments, f"\n```{parser.call_end}")
    if parser is HermesParser:
        begin = f'{parser.call_begin}\n{{"name": "{name}", "arguments": '
        return _tag_of(begin, arguments, f"}}\n{parser.call_end}")
    if parser is KimiK2Parser:
        content = _sequence(
            {"type": "regex", "pattern": r"\d+"},
            {"type": "const_string", "value": "<|tool_call_argument_begin|>"},
            arguments,
        )
        return _tag_of(f"{parser.call_begin}functions.{name}:", content, parser.call_end)
    raise ValueError(f"no tool-call grammar for the {parser.names[0]} format")


def _reasoning(parser: type[ToolCallParser], mode: ReasoningMode) -> dict[str, Any]:
    """A thought before the calls: its opening in the prompt ("enabled") or optional ("auto")."""
    thought = _tag_of(
        "" if mode == "enabled" else THINK_OPEN,
        {"type": "any_text", "excludes": [THINK_OPEN, THINK_CLOSE]},
        THINK_CLOSE,
    )
    if parser is HermesParser:  # Qwen3 writes a blank line after the thought
        thought = _sequence(thought, {"type": "const_string", "value": "\n\n"})
    return thought if mode == "enabled" else {"type": "optional", "content": thought}


def _tag_of(begin: str, content: dict[str, Any], end: str) -> dict[str, Any]:
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def _sequence(*elements: dict[str, Any]) -> dict[str, Any]:
    return {"type": "sequence", "elements": list(elements)}
