"""Stop strings over streamed text: output ends before the first match, wherever deltas split."""

from __future__ import annotations

import random

import pytest

from router.app.stop import StopMatcher


def reference(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """The text before the match that completes first (earliest start on a tie), and it."""
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    _, at, stop = min(hits)
    return text[:at], stop


def run(deltas: list[str], stops: tuple[str, ...]) -> tuple[str, str | None]:
    m = StopMatcher(stops)
    out, held_max = [], max((len(s) for s in stops), default=1) - 1
    consumed = ""
    for delta in deltas:
        consumed += delta
        result = m.feed(delta)
        out.append(result.text)
        if result.matched is not None:
            return "".join(out), result.matched
        # Only a possible stop-string prefix is held back, never more.
        assert len(consumed) - len("".join(out)) <= held_max
    out.append(m.flush())
    return "".join(out), m.matched


def split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize(
    ("deltas", "stops", "expected"),
    [
        (["Hello wor", "ld. Bye"], ("world",), ("Hello ", "world")),
        (["abc"], ("c", "bc"), ("a", "bc")),  # same end: the earlier start wins
        (["ab", "c"], ("bc", "abcd"), ("a", "bc")),
        (["cbaa"], (" ", "b", "cba"), ("c", "b")),  # "b" completes before "cba" would
        (["cb", "aa"], (" ", "b", "cba"), ("c", "b")),
        (["x", "y", "z"], ("yz",), ("x", "yz")),
        (["no match", " here"], ("stop",), ("no match here", None)),
        (["st", "o"], ("stop",), ("sto", None)),  # held back, then released at the end
        (["🚀", "🤖 ok"], ("🤖",), ("🚀", "🤖")),
        (["aaa", "ab"], ("aab",), ("aa", "aab")),
        ([""], ("a",), ("", None)),
    ],
)
def test_cases(deltas: list[str], stops: tuple[str, ...], expected: tuple[str, str | None]) -> None:
    assert run(deltas, stops) == expected


def test_random_splits_match_reference() -> None:
    rng = random.Random(0)
    alphabet = "ab c🚀"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        stops = tuple(
            {
                "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                for _ in range(rng.randint(1, 4))
            }
        )
        assert run(split(text, rng), stops) == reference(text, stops), (text, stops)


def test_no_stops_passes_everything_through() -> None:
    m = StopMatcher(())
    assert m.feed("abc").text == "abc" and m.flush() == ""


def test_after_match_everything_is_dropped() -> None:
    m = StopMatcher(("x",))
    assert m.feed("axb").text == "a"
    assert m.feed("more").text == "" and m.flush() == "" and m.matched == "x"


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(("",))
