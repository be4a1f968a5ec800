"""Reference outputs from Hugging Face transformers on the same checkpoints."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

MAX_NEW_TOKENS = 12


def make_prompts(vocab_size: int, seed: int = 7) -> list[list[int]]:
    """Prompts of different lengths; the last three share a 24-token prefix."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    shared = ids(24)
    return [ids(1), ids(5), ids(17), ids(40), shared + ids(9), shared + ids(3), shared + ids(20)]


@dataclass(frozen=True)
class Reference:
    prompts: list[list[int]]
    tokens: list[list[int]]
    logits: list[torch.Tensor]  # [max_new_tokens, vocab] per prompt

    def first(self, n: int, rows: slice = slice(None)) -> Reference:
        """The prompts of `rows`, each with its first `n` reference tokens."""
        return Reference(
            self.prompts[rows],
            [t[:n] for t in self.tokens[rows]],
            [x[:n] for x in self.logits[rows]],
        )


@cache
def reference(
    model_dir: Path, max_new_tokens: int = MAX_NEW_TOKENS, device: str = "cpu"
) -> Reference:
    """Greedy `generate()` of transformers for `make_prompts`, with EOS disabled, in float32
    on `device` (compare an engine on a GPU with transformers on the same GPU: tiny random
    models have near-ties that another device's rounding can flip)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device).eval()
    prompts = make_prompts(model.config.vocab_size)
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt], device=device), generation_config=gen)
            tokens.append(out.sequences[0, len(prompt) :].tolist())
            logits.append(torch.cat(out.logits).float().cpu())
    return Reference(prompts, tokens, logits)
