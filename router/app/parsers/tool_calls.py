"""Tool calls in a model's output text, one parser per model family's format.

Every format is a run of calls, each ``call_begin HEADER ARGUMENTS call_end``, optionally
inside a section (``section_begin ... section_end``) and after ordinary text:

- DeepSeek-V3 (and R1): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME``
  then the arguments in a fenced json block and ``<｜tool▁call▁end｜>``, calls separated by a
  newline, then ``<｜tool▁calls▁end｜>``;
- Hermes (Qwen2.5, Qwen3): ``<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>``,
  no section;
- Kimi-K2: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX``
  ``<|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>``.

A ``ToolCallParser`` reads one choice's text as it streams (``feed``, then ``finish``): text
before the calls comes out as content; each call as OpenAI-style deltas, the first with its
id and name, the next ones with fragments of its arguments as written. Markers split across
deltas are held back until they can be told apart from text, so the output does not depend on
how the text was split. Output that does not follow the format never raises: a malformed call
comes out as content (``malformed`` is set). ``parse`` reads a whole text the same way and
falls back to the text as plain content if anything in it was malformed.
"""

from __future__ import annotations

import abc
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text as the model wrote it


@dataclass
class ToolCallDelta:
    """Part of call ``index``: its first delta has ``id`` and ``name``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def openai(self) -> dict[str, Any]:
        """As an item of a chunk's ``delta.tool_calls``."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ToolStreamDelta:
    """What one ``feed`` (or ``finish``) produced: content, and call deltas merged per call."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call(self, delta: ToolCallDelta) -> None:
        add_call(self.calls, delta)


def add_call(calls: list[ToolCallDelta], delta: ToolCallDelta) -> None:
    """Append ``delta`` to ``calls``, merged into the last one if it continues that call."""
    last = calls[-1] if calls else None
    if last is not None and last.index == delta.index and delta.id is None:
        last.arguments += delta.arguments
    else:
        calls.append(delta)


def new_call_id() -> str:
    """A tool call's id: 96 random bits, as nobody should guess another client's ids."""
    return f"call_{secrets.token_hex(12)}"


class _State(Enum):
    TEXT = "text"  # ordinary text, watching for section_begin
    SECTION = "section"  # between calls: expecting call_begin or section_end
    HEADER = "header"  # after call_begin: the function's name
    ARGS = "args"  # the arguments, streamed until call_end
    BODY = "body"  # a call whose header did not parse: held whole until call_end


class ToolCallParser(abc.ABC):
    """One choice's tool calls, parsed as its text streams in. Subclasses give the markers
    of their format and read a call's header; the base class does the rest."""

    names: ClassVar[tuple[str, ...]]  # --tool-call-parser values
    # xgrammar.get_model_structural_tag's name of the format (the tests check the grammar of
    # router.app.parsers.tool_grammar against that one)
    xgrammar_format: ClassVar[str]
    section_begin: ClassVar[str]  # starts the calls (the first call_begin for Hermes)
    section_end: ClassVar[str | None]  # None: no section, calls run to the end of the text
    call_begin: ClassVar[str]
    call_end: ClassVar[str]
    header_end: ClassVar[re.Pattern[str]]  # ends a call's header; the arguments follow
    # What may stand between the arguments and call_end (besides whitespace): its prefixes
    # are held back from the streamed arguments, and the whole of it is cut from the final.
    args_closer: ClassVar[str] = ""
    max_header: ClassVar[int] = 512  # a header longer than this is malformed
    markers: ClassVar[tuple[str, ...]] = ()  # others inside a call (header separators)

    def __init__(self) -> None:
        self._state = _State.TEXT
        self._buf = ""  # text not yet handed out, in the current state
        self._name = ""  # the current call's function
        self._sent = ""  # the current call's arguments handed out so far
        self._in_section = False  # a call has been seen since section_begin
        self._out = ToolStreamDelta()
        self.calls: list[ToolCall] = []
        self.malformed = False

    # -- format-specific ---------------------------------------------------------------------

    @abc.abstractmethod
    def call_name(self, header: str) -> str | None:
        """The function named by ``header`` (the text between call_begin and header_end),
        or None if it does not follow the format."""

    def whole_call(self, body: str) -> ToolCall | None:
        """A call read whole from ``body`` (between call_begin and call_end) when its header
        did not parse; None: it is not a call."""
        return None

    # -- streaming -----------------------------------------------------------------------------

    def feed(self, text: str) -> ToolStreamDelta:
        """The content and call deltas that ``text`` (the next part of the output) makes."""
        self._buf += text
        self._run()
        return self._take()

    def finish(self) -> ToolStreamDelta:
        """The output has ended: what was held back, as content where no call completed."""
        self._run()
        state, buf = self._state, self._buf
        if state is _State.TEXT:
            self._emit(buf)
        elif state is _State.SECTION:
            if buf.strip():  # the start of a marker, cut off
                self._emit(buf)
                self.malformed = True
        elif state in (_State.HEADER, _State.BODY):
            self._emit(self.call_begin + buf)
            self.malformed = True
        else:  # ARGS: a call cut off (finish_reason "length"): what was streamed stays
            self.malformed = True
        self._buf = ""
        return self._take()

    @property
    def called(self) -> bool:
        """A call has begun (the reply's finish_reason becomes "tool_calls")."""
        return bool(self.calls) or self._state is _State.ARGS

    @classmethod
    def parse(cls, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of a whole output; ``(text, [])`` if anything in it was
        malformed, as the text is then better read as it is."""
        parser = cls()
        content = parser.feed(text).content + parser.finish().content
        if parser.malformed or not parser.calls:
            return text, []
        return content, parser.calls

    def _take(self) -> ToolStreamDelta:
        out, self._out = self._out, ToolStreamDelta()
        return out

    def _emit(self, content: str) -> None:
        self._out.content += content

    def _run(self) -> None:
        while self._step():
            pass

    def _step(self) -> bool:
        """Advance on the buffered text; True if the state changed (go again)."""
        state = self._state
        if state is _State.TEXT:
            return self._text()
        if state is _State.SECTION:
            return self._section()
        if state is _State.HEADER:
            return self._header()
        if state is _State.ARGS:
            return self._args()
        return self._body()

    def _text(self) -> bool:
        buf = self._buf
        at = buf.find(self.section_begin)
        if at < 0:
            keep = partial_suffix(buf, self.section_begin)
            self._emit(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        self._emit(buf[:at])
        self._buf = buf[at + len(self.section_begin) :]
        if self.section_end is None:  # the marker was the call's own begin
            self._state = _State.HEADER
        else:
            self._state, self._in_section = _State.SECTION, False
        return True

    def _section(self) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith(self.call_begin):
            self._buf = rest[len(self.call_begin) :]
            self._state = _State.HEADER
            return True
        end = self.section_end
        if end is not None and rest.startswith(end):
            self._buf = rest[len(end) :]
            self._state = _State.TEXT
            return True
        if not rest or self.call_begin.startswith(rest) or (end and end.startswith(rest)):
            return False  # whitespace, or the start of a marker: wait
        # Text where a call should be: Hermes calls are simply over; elsewhere malformed.
        if end is not None:
            self.malformed = True
            if not self._in_section:
                self._emit(self.section_begin)
        self._state = _State.TEXT
        return True

    def _header(self) -> bool:
        buf = self._buf
        stop = buf.find(self.call_end)
        scope = buf if stop < 0 else buf[:stop]
        match = self.header_end.search(scope)
        if match is None or match.start() > self.max_header:
            if stop >= 0 or len(buf) > self.max_header + 64:
                self._state = _State.BODY
                return True
            return False
        name = self.call_name(buf[: match.start()])
        if name is None:
            self._state = _State.BODY
            return True
        index = len(self.calls)
        self._out.add_call(ToolCallDelta(index, new_call_id(), name))
        self._name = name
        self._buf, self._sent = buf[match.end() :], ""
        self._state, self._in_section = _State.ARGS, True
        return True

    def _args(self) -> bool:
        raw = self._buf
        stop = raw.find(self.call_end)
        if stop < 0:
            text = raw.lstrip()
            text = text[: len(text) - partial_suffix(text, self.call_end)]
            self._send(_cut_closer(text, self.args_closer, whole=False))
            return False
        final = _cut_closer(raw[:stop].lstrip(), self.args_closer, whole=True)
        self._send(final)
        if not _is_json(final):
            self.malformed = True
        self.calls.append(ToolCall(self._name, final))
        self._buf = raw[stop + len(self.call_end) :]
        self._state = _State.SECTION
        return True

    def _send(self, arguments: str) -> None:
        """Hand out what ``arguments`` (all of the call's so far) adds to what was sent."""
        sent = self._sent
        if len(arguments) <= len(sent):
            return
        if not arguments.startswith(sent):  # cannot happen: the held-back end is prefix-closed
            self.malformed = True
            return
        self._out.add_call(ToolCallDelta(len(self.calls), arguments=arguments[len(sent) :]))
        self._sent = arguments

    def _body(self) -> bool:
        buf = self._buf
        stop = buf.find(self.call_end)
        if stop < 0:
            return False
        call = self.whole_call(buf[:stop])
        if call is None:
            self.malformed = True
            self._emit(self.call_begin + buf[: stop + len(self.call_end)])
            self._buf = buf[stop + len(self.call_end) :]
            self._state = _State.TEXT
            return True
        self._out.add_call(ToolCallDelta(len(self.calls), new_call_id(), call.name, call.arguments))
        self.calls.append(call)
        self._buf = buf[stop + len(self.call_end) :]
        self._state, self._in_section = _State.SECTION, True
        return True


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _cut_closer(text: str, closer: str, whole: bool) -> str:
    """``text`` without trailing whitespace, ``closer`` and whitespace. Streaming (``whole``
    False), any prefix of ``closer`` is cut too: the text after it may still be the end."""
    text = text.rstrip()
    if closer:
        if whole:
            text = text.removesuffix(closer)
        else:
            for k in range(len(closer), 0, -1):
                if text.endswith(closer[:k]):
                    text = text[:-k]
                    break
    return text.rstrip()


def _is_json(text: str) -> bool:
    try:
        json.loads(text, strict=False)  # control characters in strings, as models write them
    except (ValueError, RecursionError):
        return False
    return True


# ---- the formats ---------------------------------------------------------------------------


class DeepSeekV3Parser(ToolCallParser):
    """DeepSeek-V3 / V3-0324 / R1, as their published chat template writes calls."""

    names = ("deepseekv3", "deepseek_v3")
    xgrammar_format = "deepseek_r1"
    section_begin = "<｜tool▁calls▁begin｜>"
    section_end = "<｜tool▁calls▁end｜>"
    call_begin = "<｜tool▁call▁begin｜>"
    call_end = "<｜tool▁call▁end｜>"
    header_end = re.compile(r"\n```json\n")
    args_closer = "```"
    markers = ("<｜tool▁sep｜>",)
    _HEADER = re.compile(r"\s*(\w+)<｜tool▁sep｜>(\S+)\s*", re.DOTALL)

    def call_name(self, header: str) -> str | None:
        match = self._HEADER.fullmatch(header)
        return match.group(2) if match and match.group(1) == "function" else None


class HermesParser(ToolCallParser):
    """Qwen2.5 and Qwen3 (Hermes style): a JSON object per call between tags."""

    names = ("qwen25", "qwen3", "qwen", "hermes")
    xgrammar_format = "qwen_3"
    section_begin = "<tool_call>"
    section_end = None
    call_begin = "<tool_call>"
    call_end = "</tool_call>"
    header_end = re.compile(r'"arguments"\s*:')
    args_closer = "}"  # the object's own brace, after the arguments
    _HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*', re.DOTALL)

    def call_name(self, header: str) -> str | None:
        match = self._HEADER.fullmatch(header)
        if match is None:
            return None
        try:
            name = json.loads(match.group(1))
        except ValueError:
            return None
        return name if isinstance(name, str) and name else None

    def whole_call(self, body: str) -> ToolCall | None:
        """Keys in another order (arguments first): read the object whole."""
        try:
            obj = json.loads(body, strict=False)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return ToolCall(obj["name"], text)


class KimiK2Parser(ToolCallParser):
    """Kimi-K2: calls named ``functions.NAME:IDX`` in a tool-calls section."""

    names = ("kimi_k2",)
    xgrammar_format = "kimi"
    section_begin = "<|tool_calls_section_begin|>"
    section_end = "<|tool_calls_section_end|>"
    call_begin = "<|tool_call_begin|>"
    call_end = "<|tool_call_end|>"
    header_end = re.compile(re.escape("<|tool_call_argument_begin|>"))
    markers = ("<|tool_call_argument_begin|>",)
    _HEADER = re.compile(r"\s*(?:functions\.)?(\S+):\d+\s*", re.DOTALL)

    def call_name(self, header: str) -> str | None:
        match = self._HEADER.fullmatch(header)
        return match.group(1) if match else None


def _formats() -> Iterator[type[ToolCallParser]]:
    yield from (DeepSeekV3Parser, HermesParser, KimiK2Parser)


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    name: cls for cls in _formats() for name in cls.names
}
