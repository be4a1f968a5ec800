"""Overlapped scheduling gives exactly the plain loop's tokens, log-probabilities and page
accounting, through arrivals, aborts, stops and pool pressure. (It is on by default, so the
rest of the suite runs through it too; on the H200 the GPU greedy checks run with it on.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine, StepOutput
from engine.sampling import SamplingParams
from engine.sequence import Sequence


def run(engine: Engine, script: list[tuple[int, str, list[int], SamplingParams]],
        aborts: dict[int, str]) -> dict[str, list[tuple[int, bool]]]:  # fmt: skip
    """Step `engine`, adding request (rid, prompt, params) at its step and aborting at others,
    until all finish; each request's (token, finished) in order."""
    seen: dict[str, list[tuple[int, bool]]] = {}
    step = 0
    pending = sorted(script, key=lambda s: s[0])
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(prompt, params, request_id=rid)
        if step in aborts:
            engine.abort(aborts[step])
        out: list[StepOutput] = engine.step()
        for o in out:
            seen.setdefault(o.request_id, []).append((o.token_id, o.finished))
            if o.logprobs is not None:
                seen[o.request_id].append((round(o.logprobs.logprob * 1e4), False))
        step += 1
        assert step < 500
    return seen


@pytest.mark.parametrize(("family", "page_size", "num_pages"), [
    ("llama", 1, 400), ("qwen3-moe", 4, 60), ("deepseek-v3", 16, 40),
])  # fmt: skip
def test_overlap_equals_the_plain_loop(
    tiny_models: dict[str, Path], family: str, page_size: int, num_pages: int
) -> None:
    greedy = SamplingParams(temperature=0, max_new_tokens=9, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=7, seed=3, ignore_eos=True)
    with_lp = SamplingParams(
        temperature=0, max_new_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=2
    )
    stop_at = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(7, 11, 19))
    script = [
        (0, "a", [5, 6, 7, 8, 9], greedy),
        (0, "b", [3, 4], seeded),
        (2, "c", list(range(3, 30)), with_lp),
        (4, "d", [9, 9, 9], greedy),
        (5, "e", [12, 13, 14, 15], stop_at),
        (9, "f", [20, 21], greedy),
        (9, "g", [22, 23, 24], seeded),
    ]
    results = {}
    for overlap in (True, False):
        engine = Engine(
            EngineConfig(
                model_path=str(tiny_models[family]),
                num_pages=num_pages,
                page_size=page_size,
                max_running_requests=6,
                disable_overlap_schedule=not overlap,
            )
        )
        assert engine.overlap is overlap
        results[overlap] = run(engine, script, aborts={7: "d"})
        assert not engine.has_unfinished()
        assert engine.num_free_pages == engine.pool.num_pages
    # An abort lands at a step count; overlapped, outputs arrive a step later, so the aborted
    # request has shown a prefix of the plain loop's tokens (or the same).
    aborted = {k: results[k].pop("d", []) for k in results}
    assert aborted[True] == aborted[False][: len(aborted[True])]
    assert results[True] == results[False]
    assert results[True]["a"][-1] == (results[True]["a"][-1][0], True)


def test_overlap_launches_each_step_before_applying_the_one_before(
    tiny_models: dict[str, Path],
) -> None:
    """The prefill's token comes from its call, after decode step 1 was launched (its input
    the prefill's sample, on the device); each later call launches the next step, then
    applies one: one token a call, none lost to a call that only launches."""
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models["llama"]), num_pages=64, disable_overlap_schedule=False
        )
    )
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    first = engine.step()  # the prefill, applied at once: its token
    assert [o.num_output_tokens for o in first] == [1]
    assert engine._launched is not None and engine._launched.batch.is_decode  # step 1
    assert [o.num_output_tokens for o in engine.step()] == [2]  # step 2 launched, 1 applied
    assert [o.num_output_tokens for o in engine.step()] == [3]
    last = engine.step()
    assert [(o.num_output_tokens, o.finished) for o in last] == [(4, True)]
    assert not engine.has_unfinished() and engine.step() == []
    assert engine.num_free_pages == engine.pool.num_pages


def test_look_ahead_leaves_out_requests_ending_by_length(tiny_models: dict[str, Path]) -> None:
    """The step launched ahead holds only the requests the step before does not end by length
    (their last token, or the context's end): a request's last token launches no step of its
    own, and a batch whose requests all end together launches none after their last token.
    Tokens equal the plain loop's (the others' input ids gathered on the device)."""
    results = {}
    for overlap in (True, False):
        engine = Engine(
            EngineConfig(
                model_path=str(tiny_models["llama"]),
                num_pages=64,
                context_length=24,
                disable_overlap_schedule=not overlap,
            )
        )
        sizes: list[int] = []
        inner = engine.runner.forward_decode

        def counted(
            seqs: list[Sequence], *args: Any, _inner: Any = inner, _sizes: list[int] = sizes,
            **kwargs: Any,
        ) -> Any:  # fmt: skip
            _sizes.append(len(seqs))
            return _inner(seqs, *args, **kwargs)

        engine.runner.forward_decode = counted  # type: ignore[method-assign]
        for rid, prompt, max_new in (
            ("a", [5, 6, 7], 3),
            ("b", [3, 4, 5, 6], 6),
            ("c", [8] * 19, 9),
        ):
            params = SamplingParams(temperature=0, max_new_tokens=max_new, ignore_eos=True)
            engine.add_request(prompt, params, request_id=rid)
        seen: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for o in engine.step():
                seen.setdefault(o.request_id, []).append(o.token_id)
        results[overlap] = seen
        # c ends at the context's end (19 + 5 = 24 tokens), a after 3 tokens, b after 6: the
        # prefill makes each one's first token, then decode steps of 3, 3 (a's last), 2, 2
        # (c's last), 1 (b's last), and nothing after b's last token.
        assert sizes == [3, 3, 2, 2, 1], (overlap, sizes)
        assert {k: len(v) for k, v in seen.items()} == {"a": 3, "b": 6, "c": 5}
        assert engine.num_free_pages == engine.pool.num_pages
    assert results[True] == results[False]


def test_pages_freed_under_a_step_in_flight_go_to_transfers_last(
    tiny_models: dict[str, Path],
) -> None:
    """A request that ends while the step ahead is in flight frees its pages at once; a local
    request may take them (its writes follow that step on the device), but a KV transfer,
    written by another process, gets other pages until that step is done; with no others
    free, the engine waits for the step and then gives them."""
    engine = Engine(EngineConfig(model_path=str(tiny_models["llama"]), num_pages=40, page_size=4))
    assert engine.overlap
    short = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    long = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    engine.add_request(list(range(3, 12)), short, request_id="short")  # a part page at its end
    engine.add_request(list(range(20, 27)), long, request_id="long")
    held: list[int] = []
    ended = False
    while not ended:
        seq = engine.scheduler.requests.get("short")
        held = list(seq.page_table) if seq is not None else held
        ended = any(o.request_id == "short" and o.finished for o in engine.step())
    assert engine._launched is not None  # the long request's step ahead
    unsettled = engine._unsettled_pages()
    assert unsettled and unsettled <= set(held)
    assert all(engine.pool.is_free(p) for p in unsettled)
    pages = engine.reserve_transfer(list(range(40, 46)), long, "transfer-1")
    assert unsettled.isdisjoint(pages)
    # Every free page unsettled: the engine waits for the step in flight, then takes any.
    engine._unsettled = {p: engine._launches for p in range(engine.pool.num_pages)}
    more = engine.reserve_transfer(list(range(50, 56)), long, "transfer-2")
    assert more and not engine._unsettled
    assert engine._synced == engine._launches
    for rid in ("transfer-1", "transfer-2", "long"):
        engine.abort(rid)
    while engine.has_unfinished() or engine._launched is not None:
        engine.step()
    engine.flush_cache()
    assert engine.num_free_pages == engine.pool.num_pages


def _traced(engine: Engine) -> list[tuple[str, tuple[tuple[str, int], ...]]]:
    """Record the engine's prefill launches and applies in order, each with its batch as
    (request id, tokens) pairs."""
    trace: list[tuple[str, tuple[tuple[str, int], ...]]] = []
    launch, apply = engine._launch, engine._apply

    def key(batch: Any) -> tuple[tuple[str, int], ...]:
        return tuple((s.request_id, n) for s, n in zip(batch.seqs, batch.extend_lens, strict=True))

    def traced_launch(batch: Any, device_ids: Any = None) -> Any:
        if not batch.is_decode:
            trace.append(("launch", key(batch)))
        return launch(batch, device_ids)

    def traced_apply(launched: Any) -> Any:
        kind = "apply-decode" if launched.batch.is_decode else "apply"
        trace.append((kind, key(launched.batch)))
        return apply(launched)

    engine._launch = traced_launch  # type: ignore[method-assign]
    engine._apply = traced_apply  # type: ignore[method-assign]
    return trace


def _prefill_run(
    tiny_models: dict[str, Path],
    overlap: bool,
    prompts: dict[str, list[int]],
    aborts: dict[int, str] | None = None,
    **config: Any,
) -> tuple[list[list[tuple[str, int]]], list[tuple[str, tuple[tuple[str, int], ...]]], Engine]:
    """Every prompt queued at once, greedy, 3 tokens each: each call's outputs as (request id,
    token), the prefill trace, and the engine (its pages checked back)."""
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models[config.pop("family", "llama")]),
            disable_overlap_schedule=not overlap,
            **config,
        )
    )
    trace = _traced(engine)
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    for rid, prompt in prompts.items():
        engine.add_request(prompt, params, request_id=rid)
    calls: list[list[tuple[str, int]]] = []
    while engine.has_unfinished() or engine._launched is not None:
        if aborts and len(calls) in aborts:
            engine.abort(aborts[len(calls)])
        calls.append([(o.request_id, o.token_id) for o in engine.step()])
        assert len(calls) < 200
    engine.flush_cache()
    assert engine.num_free_pages == engine.pool.num_pages
    return calls, trace, engine


def _launched_ahead(trace: list[tuple[str, tuple[tuple[str, int], ...]]]) -> int:
    """How many prefills were launched while an earlier one's tokens were not yet applied."""
    pending, ahead = 0, 0
    for kind, _ in trace:
        if kind == "launch":
            ahead += pending > 0
            pending += 1
        elif kind == "apply":
            pending -= 1
    return ahead


@pytest.mark.parametrize("family", ["llama", "qwen3-moe", "deepseek-v3"])
def test_back_to_back_prefills_launch_ahead_with_the_plain_loops_batches(
    tiny_models: dict[str, Path], family: str
) -> None:
    """Requests queued together and prefilled over several steps (whole prompts, up to 12
    tokens a step): overlapped, each prefill after the first is launched before the one
    before it is applied, with the plain loop's batches, and each call returns what the
    plain loop's returns (the same tokens, at the same call)."""
    prompts = {
        f"r{i}": [3 + i, 40 + 2 * i, 9, 17 + i, 5, 30 - i, 11][: 4 + i % 4] for i in range(9)
    }
    runs = {
        overlap: _prefill_run(
            tiny_models,
            overlap,
            prompts,
            family=family,
            num_pages=200,
            page_size=4,
            chunked_prefill_size=-1,
            max_prefill_tokens=12,
        )
        for overlap in (True, False)
    }
    calls, trace, _ = runs[True]
    plain_calls, plain_trace, _ = runs[False]
    assert _launched_ahead(plain_trace) == 0
    assert _launched_ahead(trace) >= 2
    launches = [b for kind, b in trace if kind == "launch"]
    assert launches == [b for kind, b in plain_trace if kind == "launch"]
    # The prefills' calls match one for one (the decode steps after them come a call later,
    # as overlapped decode does); every request's tokens match.
    assert calls[: len(launches)] == plain_calls[: len(launches)]
    assert _tokens(calls) == _tokens(plain_calls)


def _tokens(calls: list[list[tuple[str, int]]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for call in calls:
        for rid, token in call:
            out.setdefault(rid, []).append(token)
    return out


def test_prefill_lookahead_waits_for_a_prefix_in_flight(tiny_models: dict[str, Path]) -> None:
    """A queued prompt that shares whole pages with a prompt of the prefill in flight waits for
    it to be applied: it then finds those pages cached, as in the plain loop."""
    shared = [7, 8, 9, 10, 11, 12, 13, 14]
    prompts = {"a": [*shared, 1, 2, 3], "b": [*shared, 4, 5], "c": [20, 21, 22]}
    hits = {}
    for overlap in (True, False):
        calls, trace, _ = _prefill_run(
            tiny_models, overlap, prompts, num_pages=100, page_size=4, chunked_prefill_size=11
        )
        launches = [b for kind, b in trace if kind == "launch"]
        assert launches[0] == (("a", 11),)
        assert launches[1] == (("b", 2), ("c", 3))  # b's 8 shared tokens came from the cache
        assert _launched_ahead(trace) == 0
        hits[overlap] = _tokens(calls)
    assert hits[True] == hits[False]


def test_the_rest_of_a_chunked_prompt_goes_out_ahead(tiny_models: dict[str, Path]) -> None:
    """Each chunk of a long prompt is launched while the chunk before it runs, from where that
    one ends (its tokens not yet applied), and the requests behind it follow the same way;
    the batches, tokens and page accounting are the plain loop's."""
    prompts = {"long": list(range(3, 30)), "x": [5, 6, 7], "y": [8, 9, 10], "z": [11, 12]}
    runs = {
        overlap: _prefill_run(
            tiny_models, overlap, prompts, num_pages=100, page_size=4, chunked_prefill_size=10
        )
        for overlap in (True, False)
    }
    calls, trace, _ = runs[True]
    launches = [b for kind, b in trace if kind == "launch"]
    assert launches == [b for kind, b in runs[False][1] if kind == "launch"]
    assert launches == [
        (("long", 10),), (("long", 10),), (("long", 7), ("x", 3)), (("y", 3), ("z", 2))
    ]  # fmt: skip
    assert _launched_ahead(trace) == 3
    assert calls[:4] == runs[False][0][:4]
    assert _tokens(calls) == _tokens(runs[False][0])


@pytest.mark.parametrize("family", ["llama", "deepseek-v3"])
@pytest.mark.parametrize("short_prefill_tokens", [0, 256])
def test_chunks_launched_ahead_give_the_one_step_tokens(
    tiny_models: dict[str, Path], family: str, short_prefill_tokens: int
) -> None:
    """Prompts prefilled in chunks of 5 tokens, each launched ahead of the one before (MLA's
    extend included, or run as decode rows), against the same prompts prefilled whole in one
    step: the same tokens."""
    prompts = {f"p{i}": [(7 * i + 3 * j) % 90 + 5 for j in range(9 + 4 * i)] for i in range(4)}
    chunked, trace, _ = _prefill_run(tiny_models, True, prompts, family=family, num_pages=200,
                                     page_size=4, chunked_prefill_size=5,
                                     short_prefill_tokens=short_prefill_tokens)  # fmt: skip
    whole, _, _ = _prefill_run(tiny_models, True, prompts, family=family, num_pages=200,
                               page_size=4, chunked_prefill_size=4096)  # fmt: skip
    assert _launched_ahead(trace) >= 10
    assert _tokens(chunked) == _tokens(whole)


def test_prefill_lookahead_waits_when_free_pages_are_short(tiny_models: dict[str, Path]) -> None:
    """With too few free pages for the next batch beside the one in flight, the next prefill
    waits for the first's results (which may free pages), as in the plain loop."""
    prompts = {f"r{i}": [3 + i] * 8 + [40 + i] for i in range(4)}
    runs = {
        overlap: _prefill_run(
            tiny_models,
            overlap,
            prompts,
            num_pages=8,
            page_size=4,
            chunked_prefill_size=9,
            max_running_requests=2,
        )
        for overlap in (True, False)
    }
    assert _launched_ahead(runs[True][1]) == 0
    assert _tokens(runs[True][0]) == _tokens(runs[False][0])


def test_an_abort_under_a_prefill_launched_ahead_frees_its_pages_once(
    tiny_models: dict[str, Path],
) -> None:
    """A request aborted while its prefill runs ahead: its output never comes, its pages go
    back once (checked at the end), and the other requests' tokens are the plain loop's."""
    prompts = {f"r{i}": [3 + i, 9, 10 + i, 4, 5 + i] for i in range(6)}
    config: dict[str, Any] = {"num_pages": 100, "page_size": 4, "chunked_prefill_size": 10}
    calls, trace, _ = _prefill_run(tiny_models, True, prompts, aborts={1: "r3"}, **config)
    plain_calls, _, _ = _prefill_run(tiny_models, False, prompts, **config)
    assert _launched_ahead(trace) >= 1
    assert ("launch", (("r2", 5), ("r3", 5))) in trace  # launched ahead at the first call
    tokens = _tokens(calls)
    assert "r3" not in tokens
    assert tokens == {k: v for k, v in _tokens(plain_calls).items() if k != "r3"}


def _arrivals_run(
    tiny_models: dict[str, Path], overlap: bool, arrivals: dict[int, dict[str, list[int]]],
    max_new: dict[str, int],
) -> tuple[dict[str, list[StepOutput]], list[tuple[str, tuple[tuple[str, int], ...]]]]:  # fmt: skip
    """Requests added before the calls that `arrivals` names, greedy: each request's outputs,
    and the trace."""
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_models["llama"]),
            num_pages=100,
            page_size=4,
            disable_overlap_schedule=not overlap,
        )
    )
    trace = _traced(engine)
    seen: dict[str, list[StepOutput]] = {}
    call = 0
    while call <= max(arrivals) or engine.has_unfinished() or engine._launched is not None:
        for rid, prompt in arrivals.get(call, {}).items():
            params = SamplingParams(temperature=0, max_new_tokens=max_new[rid], ignore_eos=True)
            engine.add_request(prompt, params, request_id=rid)
        for o in engine.step():
            seen.setdefault(o.request_id, []).append(o)
        call += 1
        assert call < 100
    engine.flush_cache()
    assert engine.num_free_pages == engine.pool.num_pages
    return seen, trace


def test_a_decode_step_ahead_takes_each_input_from_where_it_is(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a prefill launched ahead of a decode step (requests arriving while others
    decode), the next decode step goes out before that prefill is applied: the new requests'
    inputs are the prefill's samples on the device, the others' their last tokens from the
    host. Tokens equal the plain loop's."""
    kinds: list[tuple[bool, ...]] = []  # per decode step ahead: each row's input from `prev`
    inner = Engine._ahead_ids

    def recorded(self: Engine, prev: Any, ahead: Any) -> Any:
        row = {id(seq) for seq in prev.batch.seqs}
        kinds.append(tuple(id(seq) in row for seq in ahead.seqs))
        return inner(self, prev, ahead)

    monkeypatch.setattr(Engine, "_ahead_ids", recorded)
    arrivals = {0: {"a": [5, 6, 7, 8, 9], "b": [3, 4]}, 4: {"c": [20, 21, 22]}}
    max_new = {"a": 8, "b": 8, "c": 4}
    runs = {o: _arrivals_run(tiny_models, o, arrivals, max_new) for o in (True, False)}
    assert (False, False, True) in kinds  # a and b from the host, c from the prefill
    assert (True, True) in kinds  # the first decode step, ahead of a and b's prefill
    tokens = {v: {k: [o.token_id for o in outs] for k, outs in runs[v][0].items()} for v in runs}
    assert tokens[True] == tokens[False]


def test_a_request_joining_by_transfer_keeps_the_step_ahead(tiny_models: dict[str, Path]) -> None:
    """A running request ready on the host (a KV transfer's, joined since the step in flight
    was launched) rides in the next decode step ahead at its own position; one not ready
    stops the look-ahead."""
    engine = Engine(EngineConfig(model_path=str(tiny_models["llama"]), num_pages=64))
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    engine.add_request([5, 6, 7], params, request_id="a")
    engine.step()  # a's prefill; its first decode step launched ahead
    prev = engine._launched
    assert prev is not None and prev.batch.is_decode
    pages = engine.reserve_transfer([9, 10, 11, 12], params, "t")
    assert pages
    engine.complete_transfer("t", 13, None)  # t's KV "arrived": it is ready to decode
    t = engine.scheduler.requests["t"]
    a = engine.scheduler.requests["a"]
    ahead = engine.scheduler.schedule_lookahead(prev.batch)
    assert ahead is not None and ahead.seqs == [a, t]
    assert ahead.starts == [a.num_computed_tokens + 1, 4]  # a one past the step in flight
    t.num_computed_tokens -= 1  # not ready: the plain order
    assert engine.scheduler.schedule_lookahead(prev.batch) is None
    t.num_computed_tokens += 1
    for rid in ("a", "t"):
        engine.abort(rid)
    while engine._launched is not None:
        engine.step()
    engine.flush_cache()
    assert engine.num_free_pages == engine.pool.num_pages


def test_a_prefill_goes_out_before_the_decode_step_in_flight_is_applied(
    tiny_models: dict[str, Path],
) -> None:
    """Requests arriving while a decode step runs: their prefill is launched before that step
    is applied (the plain loop's next batch), and every request's tokens are the plain loop's."""
    arrivals = {0: {"a": [5, 6, 7, 8, 9], "b": [3, 4]}, 4: {"c": [20, 21, 22], "d": [30, 31]}}
    max_new = {"a": 8, "b": 8, "c": 4, "d": 4}
    runs = {o: _arrivals_run(tiny_models, o, arrivals, max_new) for o in (True, False)}
    trace = runs[True][1]
    launch = trace.index(("launch", (("c", 3), ("d", 2))))
    assert trace[launch + 1][0] == "apply-decode"  # the step in flight, applied after it
    assert ("launch", (("c", 3), ("d", 2))) in runs[False][1]
    tokens = {v: {k: [o.token_id for o in outs] for k, outs in runs[v][0].items()} for v in runs}
    assert tokens[True] == tokens[False]


def test_a_prefill_waits_for_pages_a_finishing_request_publishes(
    tiny_models: dict[str, Path],
) -> None:
    """A request arriving while the step that ends another runs, with a prompt that continues
    the other's prompt and first token: the step's end publishes the page holding that token,
    so the new prefill waits for it and finds it cached, as in the plain loop."""
    first = _arrivals_run(tiny_models, False, {0: {"a": list(range(10, 17))}}, {"a": 2})[0]
    t1 = first["a"][0].token_id
    arrivals = {0: {"a": list(range(10, 17))}, 2: {"b": [*range(10, 17), t1, 50, 51]}}
    max_new = {"a": 2, "b": 3}
    runs = {o: _arrivals_run(tiny_models, o, arrivals, max_new) for o in (True, False)}
    for overlap, (seen, trace) in runs.items():
        assert seen["b"][0].num_cached_tokens == 8, overlap  # a's two pages, t1 in the second
        assert [o.token_id for o in seen["b"]] == [o.token_id for o in runs[False][0]["b"]]
        launch = trace.index(("launch", (("b", 2),)))
        assert trace[launch - 1][0] == "apply-decode"  # a's last step, applied before it
        assert trace[launch + 1] == ("apply", (("b", 2),))
