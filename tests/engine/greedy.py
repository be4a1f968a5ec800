"""Comparing greedy tokens with the reference, allowing only near-ties to flip."""

from __future__ import annotations

from dataclasses import dataclass

from tests.engine.reference import Reference


@dataclass(frozen=True)
class Divergence:
    prompt: int
    step: int
    ours: int
    theirs: int
    gap: float  # reference logit of its own token minus that of ours, at the divergent step


def divergences(outputs: list[list[int]], ref: Reference) -> list[Divergence]:
    """The first divergent step of every prompt whose tokens differ from the reference. Up to
    that step both saw the same tokens, so the reference's logits there rank both choices."""
    found = []
    for p, (ours, theirs) in enumerate(zip(outputs, ref.tokens, strict=True)):
        for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            if a != b:
                logits = ref.logits[p][step]
                found.append(Divergence(p, step, a, b, float(logits[b] - logits[a])))
                break
    return found


def assert_greedy_matches(outputs: list[list[int]], ref: Reference, near_tie: float = 0.0) -> None:
    """Equal tokens; or, with `near_tie` > 0 (a GPU, where cuBLAS picks other reduction orders
    than transformers' calls), every prompt's first divergence is a flip between two tokens
    whose reference logits are within `near_tie`."""
    if outputs == ref.tokens:
        return
    found = divergences(outputs, ref)
    far = [d for d in found if d.gap > near_tie]
    assert not far, f"greedy tokens diverge beyond a near-tie ({near_tie}): {found}"
