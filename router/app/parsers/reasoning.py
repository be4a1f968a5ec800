"""A thinking model's reasoning, split from its answer: ``--reasoning-parser``.

DeepSeek-R1 and Qwen3 think between ``<think>`` and ``</think>``; Kimi's thinking models
between ``◁think▷`` and ``◁/think▷`` (Kimi-VL-Thinking, k1.5) or ``<think>`` and ``</think>``
(Kimi-K2-Thinking), both taken. Where the output starts depends on the chat template: one
that ends the prompt with the opening marker (DeepSeek-R1-0528, Qwen3-Thinking-2507) leaves
the output inside the reasoning; one that ends it with the closing marker (thinking switched
off) leaves it outside; otherwise the output opens the reasoning itself, or, for DeepSeek-R1,
which always thinks, may start inside without a marker.

A ``ReasoningSplitter`` reads one choice's text as it streams, holding back what may be the
start of a marker, and hands out reasoning and content deltas; whitespace around the
reasoning and between it and the answer is dropped. Output without a closing marker is all
reasoning once inside it (a reply cut off while thinking).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from router.app.parsers.tool_calls import partial_suffix


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    markers: tuple[tuple[str, str], ...]  # (open, close); the first is the default
    always_thinks: bool = False  # output without an opening marker is reasoning anyway

    def starts_inside(self, prompt_tail: str) -> bool | None:
        """True: the prompt (its last characters ``prompt_tail``) opened the reasoning;
        False: it closed it; None: the output decides."""
        tail = prompt_tail.rstrip()
        if any(tail.endswith(open_) for open_, _ in self.markers):
            return True
        if any(tail.endswith(close) for _, close in self.markers):
            return False
        return None

    def splitter(self, prompt_tail: str) -> ReasoningSplitter:
        return ReasoningSplitter(self, prompt_tail)

    def split(self, text: str, prompt_tail: str) -> tuple[str | None, str]:
        """``(reasoning, content)`` of a whole output; reasoning None if there was none."""
        splitter = self.splitter(prompt_tail)
        r1, c1 = splitter.feed(text)
        r2, c2 = splitter.finish()
        return (r1 + r2 if splitter.reasoned else None), c1 + c2


REASONING_FORMATS: dict[str, ReasoningFormat] = {
    f.name: f
    for f in (
        ReasoningFormat("deepseek-r1", (("<think>", "</think>"),), always_thinks=True),
        ReasoningFormat("qwen3", (("<think>", "</think>"),)),
        ReasoningFormat("kimi", (("◁think▷", "◁/think▷"), ("<think>", "</think>"))),
    )
}


class _State(Enum):
    START = "start"  # before the first non-space character: is it an opening marker?
    INSIDE = "inside"  # reasoning, until the closing marker
    AFTER = "after"  # the answer; leading whitespace dropped
    CONTENT = "content"  # the answer, passed through


class ReasoningSplitter:
    """One choice's reasoning and content, as its text streams in."""

    def __init__(self, fmt: ReasoningFormat, prompt_tail: str) -> None:
        self.fmt = fmt
        inside = fmt.starts_inside(prompt_tail)
        self._close = fmt.markers[0][1]
        if inside:
            tail = prompt_tail.rstrip()
            self._close = next(c for o, c in fmt.markers if tail.endswith(o))
        self._state = {True: _State.INSIDE, False: _State.CONTENT, None: _State.START}[inside]
        self._buf = ""
        self._started = False  # reasoning text handed out (its leading space is dropped)
        self.reasoned = self._state is _State.INSIDE

    def feed(self, text: str) -> tuple[str, str]:
        """``(reasoning, content)`` that ``text``, the next part of the output, makes."""
        self._buf += text
        reasoning, content = [], []
        while True:
            state, buf = self._state, self._buf
            if state is _State.CONTENT:
                content.append(buf)
                self._buf = ""
                break
            if state is _State.AFTER:
                rest = buf.lstrip()
                if rest:
                    self._state = _State.CONTENT
                self._buf = rest
                if not rest:
                    break
                continue
            if state is _State.START:
                if not self._start(buf):
                    break
                continue
            at = buf.find(self._close)
            if at >= 0:
                reasoning.append(self._reasoning(buf[:at].rstrip()))
                self._buf = buf[at + len(self._close) :]
                self._state = _State.AFTER
                continue
            # Hold back a possible closing marker, and trailing space (it may precede one).
            keep = partial_suffix(buf, self._close)
            text_ = buf[: len(buf) - keep]
            ready = text_.rstrip()
            reasoning.append(self._reasoning(ready))
            self._buf = buf[len(ready) :]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The output has ended: what was held back."""
        state, buf = self._state, self._buf
        self._buf = ""
        if state is _State.START:
            if self.fmt.always_thinks and buf.strip():
                self.reasoned = True
                return self._reasoning(buf.strip()), ""
            return "", buf
        if state is _State.INSIDE:
            keep = buf.rstrip()
            return self._reasoning(keep), ""
        return "", buf if state is _State.CONTENT else ""

    def _start(self, buf: str) -> bool:
        """Decide from the start of the output; False: wait for more."""
        rest = buf.lstrip()
        for open_, close in self.fmt.markers:
            if rest.startswith(open_):
                self._buf, self._close = rest[len(open_) :], close
                self._state, self.reasoned = _State.INSIDE, True
                return True
        if not rest or any(o.startswith(rest) for o, _ in self.fmt.markers):
            return False
        if self.fmt.always_thinks:  # thinking without the opening marker
            self._buf = rest
            self._state, self.reasoned = _State.INSIDE, True
        else:
            self._state = _State.CONTENT
        return True

    def _reasoning(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text
