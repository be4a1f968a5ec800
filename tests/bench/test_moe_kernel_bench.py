"""bench/moe_kernel.py's fused-shared shapes: the shared experts are stacked after the routed
ones and every token gets them with weight 1.0, as the engine's shared-expert fusion routes."""

from __future__ import annotations

import torch

from bench.moe_kernel import SHAPES, make_layers, make_step, with_shared


def test_shared_experts_are_appended_to_every_token() -> None:
    shape = SHAPES["moonlight-16b-a3b-fused"]
    assert (shape.stacked, shape.pairs) == (66, 8)
    weights = torch.rand(3, 6)
    ids = torch.randint(0, 64, (3, 6))
    w, i = with_shared(shape, weights, ids)
    assert torch.equal(i[:, :6], ids) and torch.equal(i[:, 6:], torch.tensor([[64, 65]] * 3))
    assert torch.equal(w[:, :6], weights) and torch.equal(w[:, 6:], torch.ones(3, 2))
    plain = SHAPES["moonlight-16b-a3b"]
    assert with_shared(plain, weights, ids) == (weights, ids)


def test_a_fused_step_routes_over_the_stacked_weights() -> None:
    shape = SHAPES["tiny-fused"]
    layers = make_layers(shape, 1, torch.device("cpu"), torch.float32)
    assert layers[0].w13.shape[0] == layers[0].w2.shape[0] == shape.stacked
    step = make_step(shape, 5, layers, torch.zeros(shape.experts), seed=0)
    weights, ids = step.routed[0]
    assert ids.shape == weights.shape == (5, shape.pairs)
    assert (ids[:, : shape.top_k] < shape.experts).all()
    assert (ids[:, shape.top_k :] >= shape.experts).all()
