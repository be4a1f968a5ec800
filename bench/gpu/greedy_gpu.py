"""Greedy tokens of the engine on a GPU, on the tiny checkpoints, per family:

- float32: the Triton backend, with CUDA graphs and without, against transformers on the same
  GPU (and on the CPU); each prompt's first divergence is printed with the reference logit
  gap there (none is expected; with graphs, prompts over 8 tokens prefill through the
  piecewise graphs, and how many did is printed); then with graphs again, the prompts
  arriving two at a time every other call in prefill steps of 16 tokens (`staggered`:
  prefills launched ahead of the step in flight, a prefill's or a decode step's, and chunked
  prompts);
- bfloat16: the Triton backend with graphs against the torch backend run eagerly in bfloat16;
  a first divergence is printed with the torch run's log-probability gap between its token and
  ours at that step (a near-tie when tiny), with how many of its tokens tie its own there;
  where ours is not among its best `MAX_TOP_LOGPROBS`, the gap is at least that to the last
  of them (printed as ">=").

    python3 -m bench.gpu.greedy_gpu          # on the GPU machine, from the repo root
    python3 -m bench.gpu.greedy_gpu deepseek-v3 qwen3-moe   # only these families
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampler import TokenLogprobs
from engine.sampling import MAX_TOP_LOGPROBS, SamplingParams
from engine.testing.tiny_models import write_tiny_models
from tests.engine.greedy import divergences
from tests.engine.reference import MAX_NEW_TOKENS, reference

GREEDY = SamplingParams(temperature=0, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
WITH_LOGPROBS = SamplingParams(
    temperature=0,
    max_new_tokens=MAX_NEW_TOKENS,
    ignore_eos=True,
    logprobs=True,
    top_logprobs=MAX_TOP_LOGPROBS,
)


def engine(
    path: Path, dtype: str, backend: str, graphs: bool, step_tokens: int | None = None
) -> Engine:
    chunks = {} if step_tokens is None else {"chunked_prefill_size": step_tokens}
    return Engine(
        EngineConfig(
            **chunks,  # type: ignore[arg-type]
            model_path=str(path),
            num_pages=256,
            page_size=16,
            device="cuda",
            dtype=dtype,
            attention_backend=backend,
            disable_cuda_graph=not graphs,
            cuda_graph_max_bs=8,
        )
    )


def staggered(eng: Engine, prompts: list[list[int]], every: int = 2) -> list[list[int]]:
    """Greedy tokens of `prompts`, two of them added every `every` calls (the later ones
    arriving while earlier prefills and decode steps run), in prompt order."""
    rids: list[str] = []
    outs: dict[str, list[int]] = {}
    pending = list(prompts)
    call = 0
    while pending or eng.has_unfinished():
        if call % every == 0:
            for prompt in pending[:2]:
                rids.append(eng.add_request(prompt, GREEDY))
            del pending[:2]
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o.token_id)
        call += 1
    return [outs[rid] for rid in rids]


def main(families: list[str]) -> None:
    models = write_tiny_models(Path("/tmp/pdserve-tiny"))
    unknown = set(families) - set(models)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; choose from {sorted(models)}")
    for family, path in models.items():
        if families and family not in families:
            continue
        refs = {dev: reference(path, device=dev) for dev in ("cpu", "cuda")}
        prompts = refs["cpu"].prompts
        flips = divergences(refs["cuda"].tokens, refs["cpu"])
        print(f"{family}: transformers cuda vs cpu: {[(d.prompt, d.step, d.gap) for d in flips]}")
        for graphs in (True, False):
            eng = engine(path, "float32", "triton", graphs)
            outs = [r.output_ids for r in eng.generate(prompts, GREEDY)]
            pieces = eng.runner.pieces.runs if eng.runner.pieces is not None else 0
            del eng
            for dev, ref in refs.items():
                found = [(d.prompt, d.step, f"{d.gap:.2e}") for d in divergences(outs, ref)]
                print(f"  float32 triton graphs={graphs!s:5} vs transformers {dev}: {found}"
                      f"{f' ({pieces} prefills in pieces)' if pieces else ''}")  # fmt: skip
        eng = engine(path, "float32", "triton", graphs=True, step_tokens=16)
        outs = staggered(eng, prompts)
        del eng
        found = [(d.prompt, d.step, f"{d.gap:.2e}") for d in divergences(outs, refs["cuda"])]
        print(f"  float32 triton graphs, staggered in 16-token steps vs transformers cuda: {found}")
        eng = engine(path, "bfloat16", "torch", graphs=False)
        base = eng.generate(prompts, WITH_LOGPROBS)
        del eng
        eng = engine(path, "bfloat16", "triton", graphs=True)
        ours = [r.output_ids for r in eng.generate(prompts, GREEDY)]
        del eng
        report = []
        for p, (b, o) in enumerate(zip(base, ours, strict=True)):
            for step, (x, y) in enumerate(zip(b.output_ids, o, strict=True)):
                if x != y:
                    report.append((p, step, *near_tie(b.logprobs[step], y)))
                    break
        print(f"  bfloat16 triton+graphs vs torch eager: {report}")


def near_tie(lp: TokenLogprobs | None, ours: int) -> tuple[str, str]:
    """The torch run's log-probability gap at a divergence between its token and `ours`
    (">=" the gap to its last listed alternative where ours is not listed), and how many of
    its listed tokens tie its own exactly."""
    if lp is None or not lp.top:
        return "no log-probabilities", ""
    alts = dict(lp.top)
    ties = sum(1 for value in alts.values() if value == lp.logprob)
    if ours in alts:
        return f"{lp.logprob - alts[ours]:.2e}", f"{ties} tied"
    return f">={lp.logprob - min(alts.values()):.2e}", f"{ties} tied"


if __name__ == "__main__":
    main(sys.argv[1:])
