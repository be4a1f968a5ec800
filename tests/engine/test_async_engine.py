"""AsyncEngine: outputs reach callers in batches when they pile up; errors end the stream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine.async_engine import AsyncEngine, RequestAborted
from engine.config import EngineConfig
from engine.engine import Engine, StepOutput
from engine.sampling import SamplingParams


def out(token: int, finished: bool = False) -> StepOutput:
    return StepOutput("r", token, None, finished, None, 3, token, 0)


def test_iterate_batches_what_has_arrived() -> None:
    async def main() -> list[list[int]]:
        stream: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        for t in (1, 2, 3):
            stream.put_nowait(out(t))
        got = []
        async for outs in AsyncEngine.iterate(stream):
            got.append([o.token_id for o in outs])
            if len(got) == 1:
                stream.put_nowait(out(4, finished=True))
                stream.put_nowait(out(99))  # after the last: never read
        return got

    assert asyncio.run(main()) == [[1, 2, 3], [4]]


def test_iterate_delivers_tokens_before_an_error() -> None:
    async def main() -> list[int]:
        stream: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        stream.put_nowait(out(1))
        stream.put_nowait(RequestAborted("r"))
        seen: list[int] = []
        with pytest.raises(RequestAborted):
            async for outs in AsyncEngine.iterate(stream):
                seen += [o.token_id for o in outs]
        return seen

    assert asyncio.run(main()) == [1]


def test_generate_streams_the_offline_tokens(tiny_models: dict[str, Path]) -> None:
    config = EngineConfig(model_path=str(tiny_models["llama"]), num_pages=64)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    expected = Engine(config).generate([[5, 6, 7]], params)[0].output_ids

    async def main() -> list[int]:
        engine = AsyncEngine(Engine(config))
        engine.start()
        try:
            return [o.token_id async for outs in engine.generate("g", [5, 6, 7], params)
                    for o in outs]  # fmt: skip
        finally:
            engine.stop()

    assert asyncio.run(main()) == expected


def test_command_results_return_before_the_step(tiny_models: dict[str, Path]) -> None:
    """A command's answer (a hand-off's first token, an abort) is settled before the step it
    ran ahead of: a caller waits for its command, not for a decode step as well. Steps are
    let through one permit at a time here; the command's answer arrives while the step after
    it still waits for its permit."""
    import threading

    config = EngineConfig(model_path=str(tiny_models["llama"]), num_pages=64)
    params = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True)
    inner = Engine(config)
    hold, held = threading.Event(), threading.Event()
    permits = threading.Semaphore(0)
    real_step = inner.step

    def gated_step(*args: Any, **kwargs: Any) -> list[StepOutput]:
        if hold.is_set():
            held.set()
            assert permits.acquire(timeout=10)
        return real_step(*args, **kwargs)

    inner.step = gated_step  # type: ignore[method-assign]

    async def main() -> bool:
        engine = AsyncEngine(inner)
        engine.start()
        try:
            stream = engine.generate("busy", [5, 6, 7], params)
            await anext(stream)  # decoding: every iteration steps
            hold.set()
            await asyncio.to_thread(held.wait, 10)  # a step waits for its permit
            found = asyncio.ensure_future(engine.abort("nobody"))
            permits.release()  # that step runs; the next iteration runs the abort, then waits
            answered = await asyncio.wait_for(found, 5)  # while the next step is held
            hold.clear()
            permits.release()
            await engine.abort("busy")
            return answered
        finally:
            hold.clear()
            for _ in range(4):
                permits.release()
            engine.stop()

    assert asyncio.run(main()) is False


def test_a_held_requests_last_output_names_its_pages(tiny_models: dict[str, Path]) -> None:
    """The prefill side's sender reads the held pages from the last output (no second round
    trip to the engine loop): they are the pages `held_pages` returns, until released."""
    engine = Engine(EngineConfig(model_path=str(tiny_models["llama"]), num_pages=64,
                                 page_size=4))  # fmt: skip
    one = SamplingParams(temperature=0, max_new_tokens=1)
    held = engine.add_request(list(range(5, 15)), one, hold_pages=True)
    plain = engine.add_request(list(range(5, 12)), one)
    last: dict[str, StepOutput] = {}
    while engine.has_unfinished():
        last.update((o.request_id, o) for o in engine.step())
    pages = last[held].held_pages
    assert pages is not None and list(pages) == engine.held_pages(held) and len(pages) == 3
    assert last[plain].held_pages is None
    assert engine.release_held(held)
