"""One chat request's output split into reasoning, content and tool calls.

The reasoning comes first (``--reasoning-parser``); the tool calls are read from what
follows it (``--tool-call-parser``, when the request has tools and ``tool_choice`` is not
"none"). ``ChatOutputFormat.stream`` follows one choice as it streams; ``parse`` reads a
whole reply the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router.app.parsers.reasoning import ReasoningFormat
from router.app.parsers.tool_calls import (
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    ToolStreamDelta,
    add_call,
    new_call_id,
)


@dataclass(frozen=True)
class ChatOutput:
    reasoning: str | None
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass
class ChatOutputDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ChatOutputDelta) -> None:
        """Append ``other``, the next delta of the same choice."""
        self.reasoning += other.reasoning
        self.content += other.content
        for call in other.tool_calls:
            add_call(self.tool_calls, call)

    def openai(self) -> dict[str, Any]:
        """As a chunk's ``delta``: only the fields that have something."""
        fields: dict[str, Any] = {}
        if self.reasoning:
            fields["reasoning_content"] = self.reasoning
        if self.content:
            fields["content"] = self.content
        if self.tool_calls:
            fields["tool_calls"] = [c.openai() for c in self.tool_calls]
        return fields


@dataclass(frozen=True)
class ChatOutputFormat:
    """How the output of one request splits; ``prompt_tail`` is the end of its prompt (with
    special tokens), where a chat template may have opened or closed the reasoning."""

    tools: type[ToolCallParser] | None = None
    reasoning: ReasoningFormat | None = None
    prompt_tail: str = ""

    def stream(self) -> ChatOutputStream:
        return ChatOutputStream(self)

    def markers(self) -> list[str]:
        """Every marker the parsers look for."""
        found: list[str] = []
        if self.reasoning is not None:
            found += [m for pair in self.reasoning.markers for m in pair]
        if self.tools is not None:
            t = self.tools
            found += [t.section_begin, t.call_begin, t.call_end, *t.markers]
            if t.section_end is not None:
                found.append(t.section_end)
        return found

    def parse(self, text: str) -> ChatOutput:
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text, self.prompt_tail)
        if self.tools is None:
            return ChatOutput(reasoning, text)
        content, calls = self.tools.parse(text)
        return ChatOutput(reasoning, content, tuple(calls))


class ChatOutputStream:
    """One choice's deltas as its text streams in."""

    def __init__(self, fmt: ChatOutputFormat) -> None:
        self._reasoning = None if fmt.reasoning is None else fmt.reasoning.splitter(fmt.prompt_tail)
        self._tools = None if fmt.tools is None else fmt.tools()

    @property
    def called(self) -> bool:
        """A tool call was made: the choice finishes with "tool_calls"."""
        return self._tools is not None and self._tools.called

    def feed(self, text: str) -> ChatOutputDelta:
        if self._reasoning is None:
            return self._content("", text, final=False)
        reasoning, content = self._reasoning.feed(text)
        return self._content(reasoning, content, final=False)

    def finish(self) -> ChatOutputDelta:
        if self._reasoning is None:
            return self._content("", "", final=True)
        reasoning, content = self._reasoning.finish()
        return self._content(reasoning, content, final=True)

    def _content(self, reasoning: str, content: str, final: bool) -> ChatOutputDelta:
        if self._tools is None:
            return ChatOutputDelta(reasoning, content)
        out = self._tools.feed(content) if content else ToolStreamDelta()
        if final:
            tail = self._tools.finish()
            out.content += tail.content
            for call in tail.calls:
                add_call(out.calls, call)
        return ChatOutputDelta(reasoning, out.content, out.calls)


def openai_tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """A whole reply's ``message.tool_calls``, each with a fresh id."""
    return [
        {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in calls
    ]
