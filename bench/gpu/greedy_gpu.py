"""Greedy tokens of the engine on a GPU against transformers, per family and attention backend,
in float32 on the tiny checkpoints: prints each prompt's first divergence with the reference
logit gap there (a near-tie when tiny), for transformers on the CPU and on the same GPU.

    python3 -m bench.gpu.greedy_gpu          # on the GPU machine, from the repo root
"""

from __future__ import annotations

from pathlib import Path

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.testing.tiny_models import write_tiny_models
from tests.engine.greedy import divergences
from tests.engine.reference import MAX_NEW_TOKENS, reference

GREEDY = SamplingParams(temperature=0, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def main() -> None:
    models = write_tiny_models(Path("/tmp/pdserve-tiny"))
    for family, path in models.items():
        refs = {dev: reference(path, device=dev) for dev in ("cpu", "cuda")}
        flips = divergences(refs["cuda"].tokens, refs["cpu"])
        print(f"{family}: transformers cuda vs cpu: {[(d.prompt, d.step, d.gap) for d in flips]}")
        for backend in ("torch", "triton"):
            for graphs in (True, False):
                engine = Engine(
                    EngineConfig(
                        model_path=str(path),
                        num_pages=256,
                        page_size=16,
                        device="cuda",
                        attention_backend=backend,
                        disable_cuda_graph=not graphs,
                    )
                )
                outs = [r.output_ids for r in engine.generate(refs["cpu"].prompts, GREEDY)]
                for dev, ref in refs.items():
                    found = [(d.prompt, d.step, f"{d.gap:.2e}") for d in divergences(outs, ref)]
                    print(f"  {backend:6} graphs={graphs!s:5} vs transformers on {dev}: {found}")
                del engine


if __name__ == "__main__":
    main()
