"""Stop strings over streamed text, matched as OpenAI does: output ends before the first match.

"First" is the match that completes first in the text, which is where generation would stop;
the answer does not depend on how the text was split into deltas.

Text that might be the start of a stop string is held back (at most ``max_len - 1``
characters) until the next delta settles it, so a client never sees text that a later match
would have cut off.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopResult:
    """What may be sent now, and the stop string that ended the text (None: not stopped)."""

    text: str
    matched: str | None = None


class StopMatcher:
    """Feed text deltas; emits text that cannot be part of a stop string. One per choice."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not s for s in stops):
            raise ValueError(f"stop strings must be non-empty, got {stops!r}")
        self._stops = stops
        self._hold_max = max((len(s) for s in stops), default=1) - 1
        self._pending = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        return self._matched

    def feed(self, delta: str) -> StopResult:
        """Add text; after a match, everything further is dropped."""
        if self._matched is not None:
            return StopResult("", self._matched)
        text = self._pending + delta
        if not self._stops:
            self._pending = ""
            return StopResult(text)
        # The first match is the one completed first (generation would have stopped there);
        # of those ending at the same place, the one starting first.
        first: tuple[int, int, str] | None = None
        for stop in self._stops:
            at = text.find(stop)
            if at >= 0:
                key = (at + len(stop), at, stop)
                first = key if first is None or key < first else first
        if first is not None:
            _, at, stop = first
            self._matched = stop
            self._pending = ""
            return StopResult(text[:at], stop)
        hold = self._partial_suffix(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return StopResult(text[: len(text) - hold])

    def flush(self) -> str:
        """The stream ended without a match: release what was held back."""
        text, self._pending = self._pending, ""
        return "" if self._matched is not None else text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        for k in range(min(len(text), self._hold_max), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                return k
        return 0
