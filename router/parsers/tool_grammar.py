"""The grammar that makes a model call a tool: ``tool_choice`` "required" or a named function.

xgrammar ships structural tags for each model family's tool-call format
(``xgrammar.get_model_structural_tag``): the calls wrapped in the family's markers, each
call's arguments constrained to its tool's parameter schema. ``tool_call_constraint`` picks
the one of the request's ``--tool-call-parser`` and returns it as a constraint the workers
compile, ``("structural_tag", JSON)``; the parser then reads the calls back from the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

from router.parsers.reasoning import ReasoningFormat
from router.parsers.tool_calls import ToolCallParser

ReasoningMode = Literal["enabled", "disabled", "auto"]


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
    output first reasons ("enabled": the prompt opened the reasoning; "auto": it may open
    it). ValueError if xgrammar refuses the tools."""
    if tool_choice in ("auto", "none"):
        return None
    import xgrammar
    from xgrammar.structural_tag import SequenceFormat, TagsWithSeparatorFormat, TriggeredTagsFormat

    tag = xgrammar.get_model_structural_tag(
        parser.xgrammar_format,
        tools=[dict(t) for t in tools],
        tool_choice=cast(Any, tool_choice),
        reasoning=reasoning,
        parallel_tool_calls=parallel_tool_calls,
    )
    # "required" in the Hermes format is free text in which a call must come somewhere, so a
    # weak model could write text forever: here the output is the calls alone.
    fmt = tag.format
    calls = fmt.elements[-1] if isinstance(fmt, SequenceFormat) else fmt
    if isinstance(calls, TriggeredTagsFormat):
        strict = TagsWithSeparatorFormat(
            tags=calls.tags,
            separator="\n",
            at_least_one=True,
            stop_after_first=calls.stop_after_first,
        )
        if isinstance(fmt, SequenceFormat):
            fmt.elements[-1] = strict
        else:
            tag.format = strict
    return "structural_tag", tag.model_dump_json()


def reasoning_mode(fmt: ReasoningFormat | None, prompt_tail: str) -> ReasoningMode:
    """How the grammar treats a reasoning block before the calls: xgrammar's structural
    tags know ``<think>`` blocks; "enabled" when the prompt opened one, "auto" when the
    output may, "disabled" without a reasoning parser or when the prompt closed it."""
    if fmt is None or ("<think>", "</think>") not in fmt.markers:
        return "disabled"
    if prompt_tail.rstrip().endswith("<think>"):
        return "enabled"
    return "auto" if fmt.starts_inside(prompt_tail) is None else "disabled"
