"""Constrained decoding in the engine: the grammar backend (vocabulary, padding, compile cache
and errors), every constraint kind on a random-weight model, and the grammar state through
overlapped scheduling, preemption and a migrated request's replay."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine, GenerationResult
from engine.grammar import GrammarBackend, bounded_strings_as_patterns
from engine.sampling import Constraint, SamplingParams
from engine.sequence import FinishReason
from engine.tokenizer import Tokenizer
from router.app.requests import Constraint as RouterConstraint
from router.app.requests import Sampling, sampling_to_proto
from tests import grammar_cases as cases
from worker.convert import sampling_from_proto

FAMILY = "llama"


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models[FAMILY]


@pytest.fixture(scope="module")
def engine(model: Path) -> Engine:
    return Engine(EngineConfig(model_path=str(model), max_total_tokens=8192))


def allowed(mask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = [(int(mask_row[i // 32]) >> (i % 32)) & 1 for i in range(vocab)]
    return [i for i, b in enumerate(bits) if b]


def test_padded_vocabulary_is_masked_and_eos_waits_for_the_end(model: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(model)
    vocab = tokenizer.vocab_size + 40  # a padded lm_head: logits wider than the tokenizer
    eos = min(tokenizer.eos_token_ids)
    backend = GrammarBackend(tokenizer, vocab, {eos}, torch.device("cpu"))
    state = backend.state(Constraint("regex", "ab?"))
    mask = backend.token_mask([None, state])
    assert mask is not None and mask.rows == [1]
    ids = allowed(mask.bitmask[1], vocab)
    assert ids and max(ids) < tokenizer.vocab_size and eos not in ids
    assert {tokenizer.decode([i]) for i in ids} <= {"a", "ab"}
    logits = torch.zeros(2, vocab)
    mask.apply(logits)
    assert torch.isfinite(logits[0]).all()  # an unconstrained row is untouched
    assert torch.isfinite(logits[1]).nonzero()[:, 0].tolist() == ids
    state.accept(tokenizer.encode("a", add_special_tokens=False)[0])
    mask = backend.token_mask([state])
    assert mask is not None
    after = allowed(mask.bitmask[0], vocab)
    assert eos in after and all(tokenizer.decode([i]) == "b" for i in after if i != eos)
    assert state.accept(eos) and state.is_terminated


@pytest.mark.parametrize(
    ("constraint", "fragment"),
    [
        (Constraint("json_schema", '{"type": "foo"}'), 'Unsupported type "foo"'),
        (Constraint("json_schema", '{"type": '), "Failed to parse JSON"),
        (Constraint("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}'), "minimum"),
        (Constraint("regex", "(ab"), "parenthesis is not closed"),
        (Constraint("regex", "[z-a]"), "regex"),
        (Constraint("ebnf", 'start ::= "a"'), 'root rule with name "root" is not found'),
        (Constraint("ebnf", 'root ::= "a" |'), "EBNF parser error"),
        (Constraint("structural_tag", '{"type": "nope"}'), "structural_tag"),
    ],
)
def test_compile_errors_name_the_problem(
    engine: Engine, constraint: Constraint, fragment: str
) -> None:
    future = engine.compile_constraint(constraint)
    assert engine.compile_constraint(constraint) is future  # cached, errors too
    with pytest.raises(ValueError, match="does not compile") as info:
        future.result(timeout=30)
    assert fragment in str(info.value)
    assert "/project/cpp" not in str(info.value)  # xgrammar's source locations are dropped
    with pytest.raises(ValueError, match=re.escape(fragment)):
        engine.add_request([5, 6], SamplingParams(max_new_tokens=4, constraint=constraint))
    assert not engine.has_unfinished()


def test_length_bounds_become_patterns() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 3},
            "b": {"type": ["string", "null"], "minLength": 2},
            "c": {"type": "string", "maxLength": 3, "pattern": "^x+$"},
            "d": {"enum": [{"type": "string", "maxLength": 1}]},
        },
    }
    props = bounded_strings_as_patterns(schema)["properties"]
    assert props["a"] == {"type": "string", "pattern": "^.{0,3}$"}
    assert props["b"] == {"type": ["string", "null"], "pattern": "^.{2,}$"}
    assert props["c"] == schema["properties"]["c"]  # type: ignore[index]
    assert props["d"] == schema["properties"]["d"]  # type: ignore[index]


def run_all_kinds(engine: Engine) -> list[tuple[str, GenerationResult]]:
    """Every kind, in one batch, greedy and sampled in turn."""
    named: list[tuple[str, Constraint]] = [
        (f"schema:{n}", Constraint("json_schema", json.dumps(cases.SCHEMAS[n])))
        for n in ("flat", "nested", "object_array", "any_of", "tuple")
    ]
    named += [(f"regex:{n}", Constraint("regex", cases.REGEXES[n])) for n in ("phone", "ip")]
    named += [(f"ebnf:{n}", Constraint("ebnf", cases.EBNF[n][0])) for n in ("arith", "list")]
    named.append(("json_object", Constraint("json_object")))
    # (xgrammar's json_schema format inside a structural tag allows free whitespace, which a
    # random model fills until max_tokens: a regex keeps the content bounded.)
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<call>",
            "content": {"type": "regex", "pattern": cases.REGEXES["phone"]},
            "end": "</call>",
        },
    }
    named.append(("structural_tag", Constraint("structural_tag", json.dumps(tag))))
    params = [
        SamplingParams(
            temperature=i % 2,
            seed=i,
            max_new_tokens=cases.MAX_TOKENS,
            constraint=c,
            logprobs=True,
            top_logprobs=2,
        )
        for i, (_, c) in enumerate(named)
    ]
    results = engine.generate([f"request {i}:" for i in range(len(named))], params)
    return [(name, r) for (name, _), r in zip(named, results, strict=True)]


def test_every_kind_yields_valid_output(engine: Engine) -> None:
    for name, r in run_all_kinds(engine):
        assert r.finish_reason is FinishReason.STOP, (name, r.text)
        assert r.output_ids[-1] in engine.eos_token_ids  # the grammar ended at an EOS
        text = r.text or ""
        kind, _, case = name.partition(":")
        if kind == "schema":
            cases.check_schema(case, text)
        elif kind == "regex":
            cases.check_regex(case, text)
        elif kind == "ebnf":
            cases.check_ebnf(case, text)
        elif kind == "json_object":
            assert isinstance(json.loads(text), dict), text
        else:
            assert text.startswith("<call>") and text.endswith("</call>"), text
            cases.check_regex("phone", text.removeprefix("<call>").removesuffix("</call>"))
        # Log-probabilities are the model's, before the mask: finite for every token.
        assert all(lp is not None and math.isfinite(lp.logprob) for lp in r.logprobs)


def test_overlap_and_preemption_keep_the_grammar_state(model: Path) -> None:
    """Constrained requests next to unconstrained ones: the same tokens with overlapped
    scheduling on and off, and in a pool so small that requests are preempted and
    recomputed (the grammar state survives)."""
    schema = Constraint("json_schema", json.dumps(cases.SCHEMAS["const"]))
    regex = Constraint("regex", cases.REGEXES["date"])
    params = [
        SamplingParams(temperature=0, max_new_tokens=40, constraint=schema),
        SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=5, max_new_tokens=40, constraint=regex),
        SamplingParams(temperature=0, max_new_tokens=40, constraint=schema),
    ]
    prompts = [list(range(10, 30)), [40, 41, 42], list(range(50, 70)), list(range(10, 30))]
    outputs = {}
    for name, overlap, pages in (("big", True, 100), ("plain", False, 100), ("tight", True, 11)):
        engine = Engine(
            EngineConfig(
                model_path=str(model),
                num_pages=pages,
                page_size=8,
                disable_overlap_schedule=not overlap,
            )
        )
        results = engine.generate(prompts, params)
        outputs[name] = [r.output_ids for r in results]
        if name == "tight":
            assert engine.scheduler.num_preemptions > 0
        assert engine.num_free_pages == engine.pool.num_pages
        cases.check_schema("const", results[0].text or "")
        cases.check_regex("date", results[2].text or "")
    assert outputs["big"] == outputs["plain"] == outputs["tight"]
    assert outputs["big"][0] == outputs["big"][3]  # the same prompt: a prefix-cache hit


def test_constrained_decode_steps_run_overlapped(model: Path) -> None:
    """Overlapped scheduling with constrained requests: each decode step after the first is
    launched before the step it follows is applied, and its mask is filled after that step's
    tokens advanced the grammars (forward, then apply, then mask); the tokens are the plain
    loop's."""
    schema = Constraint("json_schema", json.dumps(cases.SCHEMAS["const"]))
    params = [
        SamplingParams(temperature=0, max_new_tokens=40, constraint=schema),
        SamplingParams(temperature=0.8, seed=3, max_new_tokens=25, ignore_eos=True),
    ]
    prompts = [list(range(10, 30)), [40, 41, 42]]
    outputs = []
    for overlap in (True, False):
        engine = Engine(
            EngineConfig(model_path=str(model), num_pages=100, page_size=8,
                         disable_overlap_schedule=not overlap)
        )  # fmt: skip
        events = trace_steps(engine)
        results = engine.generate(prompts, params)
        outputs.append([r.output_ids for r in results])
        cases.check_schema("const", results[0].text or "")
        assert engine.num_free_pages == engine.pool.num_pages
        trace = " ".join(events)
        if overlap:
            # Steps ahead of the host, each masked only after the step before it applied.
            assert trace.count("ahead apply mask") >= 10, trace
        else:
            assert "ahead" not in trace
    assert outputs[0] == outputs[1]


def trace_steps(engine: Engine) -> list[str]:
    """A list that records, in order, the engine's decode forward passes ("forward", or
    "ahead" for a step launched before the one it follows was applied), its tokens' apply
    ("apply") and each mask fill with a constrained row ("mask")."""
    events: list[str] = []
    runner, grammar, scheduler = engine.runner, engine.grammar, engine.scheduler
    assert grammar is not None
    forward_decode, token_mask, postprocess = (
        runner.forward_decode,
        grammar.token_mask,
        scheduler.postprocess,
    )

    def traced_forward(*args, **kwargs):
        events.append("ahead" if kwargs.get("device_ids") is not None else "forward")
        return forward_decode(*args, **kwargs)

    def traced_mask(states):
        if any(s is not None for s in states):
            events.append("mask")
        return token_mask(states)

    def traced_apply(*args):
        events.append("apply")
        return postprocess(*args)

    runner.forward_decode = traced_forward  # type: ignore[method-assign]
    grammar.token_mask = traced_mask  # type: ignore[method-assign]
    scheduler.postprocess = traced_apply  # type: ignore[method-assign]
    return events


def test_a_migrated_request_replays_its_tokens(engine: Engine) -> None:
    """A request resumed with its first k output tokens in the prompt goes on exactly as the
    uninterrupted one (the grammar state replays them); tokens the grammar refuses are bad
    input."""
    c = Constraint("json_schema", json.dumps(cases.SCHEMAS["nested"]))
    prompt = [7, 8, 9, 10]
    whole = engine.generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=200, constraint=c)
    )
    out = whole[0].output_ids
    k = len(out) // 2
    resumed = SamplingParams(
        temperature=0, max_new_tokens=200 - k, constraint=c, resumed_output_tokens=k
    )
    rest = engine.generate([prompt + out[:k]], resumed)
    assert out[:k] + rest[0].output_ids == out
    bad = engine.tokenizer.encode("}", add_special_tokens=False)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="does not match"):
        engine.add_request(prompt + bad, replace_resumed(resumed, len(bad)))
    with pytest.raises(ValueError, match="fewer than"):
        engine.add_request([1, 2], replace_resumed(resumed, 2))


def replace_resumed(p: SamplingParams, n: int) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature,
        max_new_tokens=p.max_new_tokens,
        constraint=p.constraint,
        resumed_output_tokens=n,
    )


def test_a_slow_compile_does_not_hold_up_other_requests(model: Path) -> None:
    """The serving engine compiles on the grammar backend's threads: an unconstrained request
    runs to its end while a large schema is still compiling."""
    props = {
        f"k{i}": {
            "type": "object",
            "properties": {
                f"x{j}": {"type": "string", "pattern": f"^[a-z]{{1,{j + 1}}}$"} for j in range(8)
            },
        }
        for i in range(150)
    }
    slow = Constraint("json_schema", json.dumps({"type": "object", "properties": props}))

    async def scenario() -> tuple[float, float]:
        serving = AsyncEngine(Engine(EngineConfig(model_path=str(model), max_total_tokens=4096)))
        serving.start()
        try:

            async def finish_time(rid: str, sampling: SamplingParams) -> float:
                async for _ in serving.generate(rid, [5, 6, 7], sampling):
                    pass
                return time.perf_counter()

            constrained = asyncio.ensure_future(
                finish_time("c", SamplingParams(max_new_tokens=1, constraint=slow))
            )
            await asyncio.sleep(0)
            plain = await finish_time("p", SamplingParams(temperature=0, max_new_tokens=8))
            return plain, await constrained
        finally:
            serving.stop()

    plain_done, constrained_done = asyncio.run(scenario())
    assert plain_done < constrained_done


def test_the_constraint_travels_router_to_worker() -> None:
    for kind, spec in [
        ("json_schema", '{"type": "object"}'),
        ("json_object", ""),
        ("regex", "a+"),
        ("ebnf", 'root ::= "a"'),
        ("structural_tag", '{"type": "structural_tag"}'),
    ]:
        sampling = Sampling(max_tokens=5, constraint=RouterConstraint(kind, spec))
        got = sampling_from_proto(sampling_to_proto(sampling))
        assert got.constraint == Constraint(kind, spec)
        assert got.resumed_output_tokens == 0
    resumed = Sampling(max_tokens=5, constraint=RouterConstraint("regex", "a+"),
                       resumed_output_tokens=3)  # fmt: skip
    assert sampling_from_proto(sampling_to_proto(resumed)).resumed_output_tokens == 3
    assert sampling_from_proto(sampling_to_proto(Sampling(max_tokens=5))).constraint is None


def test_structural_tag_json_elements_allow_no_free_whitespace(model: Path) -> None:
    """A structural tag's JSON-schema element compiles as `json_schema` constraints do, with
    no whitespace between tokens (a weak model would fill its budget with it)."""
    tokenizer = Tokenizer.from_pretrained(model)
    backend = GrammarBackend(
        tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids, torch.device("cpu")
    )
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}
    tag = {
        "type": "structural_tag",
        "format": {"type": "tag", "begin": "<", "end": ">",
                   "content": {"type": "json_schema", "json_schema": schema}},
    }  # fmt: skip
    state = backend.state(Constraint("structural_tag", json.dumps(tag)))
    for token in tokenizer.encode("<{", add_special_tokens=False):
        assert state.accept(token)
    mask = backend.token_mask([state])
    assert mask is not None
    texts = {tokenizer.decode([i]) for i in allowed(mask.bitmask[0], tokenizer.vocab_size)}
    assert texts and all(not t[:1].isspace() for t in texts), texts
    assert '"' in texts


def test_a_compile_past_the_timeout_fails_the_request_and_finishes_in_the_background(
    model: Path,
) -> None:
    """--grammar-compile-timeout: the request gets a ValueError (a 400) naming the flag; the
    compile goes on and is cached, so the same constraint later runs; the engine serves on."""
    props = {
        f"k{i}": {"type": "string", "pattern": f"^[a-z]{{{i + 1},{i + 40}}}$"} for i in range(60)
    }
    slow = Constraint("json_schema", json.dumps({"type": "object", "properties": props}))

    async def scenario() -> None:
        config = EngineConfig(
            model_path=str(model), max_total_tokens=4096, grammar_compile_timeout_s=0.001
        )
        serving = AsyncEngine(Engine(config))
        serving.start()
        try:
            sampling = SamplingParams(max_new_tokens=2, constraint=slow)
            with pytest.raises(ValueError, match="--grammar-compile-timeout"):
                async for _ in serving.generate("slow", [5, 6, 7], sampling):
                    pass
            await asyncio.wrap_future(serving.engine.compile_constraint(slow))  # done by now
            outs = [
                o async for batch in serving.generate("again", [5, 6, 7], sampling) for o in batch
            ]
            assert outs[-1].finished
            plain = SamplingParams(temperature=0, max_new_tokens=2)
            outs = [o async for batch in serving.generate("plain", [5, 6, 7], plain) for o in batch]
            assert len(outs) == 2
        finally:
            serving.stop()

    asyncio.run(scenario())
