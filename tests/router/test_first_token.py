"""A disaggregated request's first token from the prefill worker's ``first`` reply: sent to the
client before the hand-off ends, dropped from the decode stream that repeats it (whatever its
chunking), checked against it, and the paths where no ``first`` comes left as they were.
Fake workers in this process (tests/router/fake_worker.py); real ones in
tests/e2e/test_first_token.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from protos import common_pb2
from protos.contract import ROLE_DECODE, ROLE_PREFILL
from router.client import dispatch
from router.client.errors import WorkerError
from router.client.session import Finished, TokenChunk, WorkerEvent, WorkerRequest
from router.fleet.worker import WorkerClient
from tests.router.conftest import router_for, run
from tests.router.fake_worker import EOS, Failure, FakeWorker
from tests.router.test_resilience import EXPECTED, native, positional, wait_for

SCRIPT = [65, 66, 67, EOS]  # what both fakes produce for any prompt by default


def request(stream: bool = True, interval: int = 1, logprobs: bool = False) -> WorkerRequest:
    sampling = common_pb2.SamplingParams(max_new_tokens=100, logprobs=logprobs, top_logprobs=2)
    return WorkerRequest("r", (1, 2, 3), sampling, stream, interval)


@asynccontextmanager
async def pair(prefill: FakeWorker, decode: FakeWorker) -> AsyncIterator[tuple[WorkerClient, ...]]:
    """The two fakes started, and the router's clients of them."""
    await prefill.start()
    await decode.start()
    clients = (
        WorkerClient(prefill.endpoint, ROLE_PREFILL),
        WorkerClient(decode.endpoint, ROLE_DECODE),
    )
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()
        await prefill.stop()
        await decode.stop()


async def attempt(
    clients: tuple[WorkerClient, ...],
    req: WorkerRequest,
    seen: Callable[[WorkerEvent], None] = lambda event: None,
) -> list[WorkerEvent]:
    """One disaggregated attempt's events (``seen`` called as each arrives)."""
    p, d = clients
    events: list[WorkerEvent] = []
    gen = dispatch.disaggregated(p.session(), d.session(), req, lambda: None, lambda: None)
    async for event in gen:
        seen(event)
        events.append(event)
    return events


def tokens(events: list[WorkerEvent]) -> list[list[int]]:
    return [list(e.token_ids) for e in events if isinstance(e, TokenChunk)]


def test_first_token_leaves_before_the_handoff_and_is_not_repeated() -> None:
    """The prefill's token arrives while the "pages" are still on their way (1 s here); the
    decode stream's first chunk (three tokens: stream_interval 3) loses only its first token,
    and its logprobs in step."""
    prefill = FakeWorker(role="prefill", send_first=1, handoff_delay_s=1.0)
    decode = FakeWorker(role="decode")

    async def body() -> None:
        async with pair(prefill, decode) as clients:
            start = time.monotonic()
            arrived: list[float] = []
            events = await attempt(
                clients,
                request(interval=3, logprobs=True),
                lambda e: arrived.append(time.monotonic() - start),
            )
        assert tokens(events) == [[65], [66, 67], [EOS]]
        assert arrived[0] < 0.5, arrived
        assert arrived[1] >= 1.0, arrived  # the decode side waited for the "pages"
        for event in events[:-1]:
            assert isinstance(event, TokenChunk)
            # The fake's top alternative of a token is the token itself.
            assert [lp.top[0][0] for lp in event.logprobs] == list(event.token_ids)
            assert all(len(lp.top) == 2 for lp in event.logprobs)
        assert isinstance(events[-1], Finished)
        assert events[-1].cached_tokens == 4  # the prefill's count, merged as before
        assert prefill.first_asked == [True]

    run(body())


def test_early_tokens_spanning_decode_chunks_are_dropped_whole() -> None:
    """Two early tokens and a decode stream of one token a chunk: the two chunks that repeat
    them are not yielded at all (no empty chunk)."""
    prefill = FakeWorker(role="prefill", send_first=2)
    decode = FakeWorker(role="decode")

    async def body() -> None:
        async with pair(prefill, decode) as clients:
            events = await attempt(clients, request(interval=1))
        assert tokens(events) == [[65, 66], [67], [EOS]]

    run(body())


def test_a_decode_stream_that_repeats_another_token_fails_loudly() -> None:
    """The decode worker would continue something the client never got: DATA_LOSS, charged to
    it and not retried; both sides end."""
    prefill = FakeWorker(role="prefill", send_first=1, reply=lambda prompt: [99, 66, 67])
    decode = FakeWorker(role="decode")

    async def body() -> None:
        async with pair(prefill, decode) as clients:
            got: list[WorkerEvent] = []
            with pytest.raises(WorkerError) as info:
                await attempt(clients, request(interval=2), got.append)
            assert tokens(got) == [[99]]
            err = info.value
            assert err.grpc_code is grpc.StatusCode.DATA_LOSS and not err.retryable
            assert err.endpoint == decode.endpoint
            assert "[65]" in err.details and "[99]" in err.details
            await wait_for(lambda: decode.running == 0)

    run(body())


@pytest.mark.parametrize("stream", [True, False])
def test_without_a_first_reply_every_token_comes_from_decode(stream: bool) -> None:
    """A request not streamed does not ask for the early token; a prefill worker that predates
    it (``send_first`` 0) ignores the ask: either way the decode stream carries every token."""
    prefill = FakeWorker(role="prefill", send_first=0 if stream else 1)
    decode = FakeWorker(role="decode")

    async def body() -> None:
        async with pair(prefill, decode) as clients:
            events = await attempt(clients, request(stream=stream, interval=2))
        assert tokens(events) == [[65, 66], [67, EOS]]
        assert prefill.first_asked == [stream]

    run(body())


def test_a_handoff_that_fails_after_the_first_token_fails_the_attempt() -> None:
    """The token went out, then the prefill failed (its KV write, say) before the decode side
    sent anything: the attempt fails with the prefill's error, as before any token."""
    prefill = FakeWorker(
        role="prefill",
        send_first=1,
        handoff_delay_s=0.2,
        fail=Failure(grpc.StatusCode.UNAVAILABLE, "kv write failed", after_tokens=1),
    )
    decode = FakeWorker(role="decode", transfer_timeout_s=5)

    async def body() -> None:
        async with pair(prefill, decode) as clients:
            got: list[WorkerEvent] = []
            with pytest.raises(WorkerError) as info:
                await attempt(clients, request(), got.append)
            assert tokens(got) == [[65]]
            assert info.value.grpc_code is grpc.StatusCode.UNAVAILABLE
            assert info.value.endpoint == prefill.endpoint
            assert "kv write failed" in info.value.details
            # The decode side, still waiting for the pages, was aborted.
            (rid,) = [r.request_id for r in decode.requests]
            await wait_for(lambda: rid in decode.aborts and decode.running == 0)

    run(body())


def test_after_an_early_token_a_failed_handoff_migrates_with_exact_output(model_dir: Path) -> None:
    """Through the router: the client got the first token from the failing prefill worker; the
    request moves (prompt plus that token) to the other pair and the stream is exact."""
    bad = FakeWorker(
        role="prefill",
        reply=positional,
        send_first=1,
        fail=Failure(grpc.StatusCode.UNAVAILABLE, "kv write failed", after_tokens=1),
    )
    good = FakeWorker(role="prefill", reply=positional, send_first=1)
    decode = FakeWorker(role="decode", reply=positional)

    async def body() -> None:
        async with router_for(
            model_dir, prefill=(bad, good), decode=(decode,), policy="round_robin"
        ) as r:
            status, events = await r.sse("/generate", {**native(), "stream": True})
            assert status == 200 and events[-1] == "[DONE]"
            assert events[-2]["output_ids"] == EXPECTED
            assert events[-2]["meta_info"]["completion_tokens"] == len(EXPECTED)
            (moved,) = good.requests
            assert list(moved.token_ids) == [1, 2, 3, 103]
            assert moved.sampling.max_new_tokens == 49
            async with r.http.get(r.url + "/metrics") as resp:
                text = await resp.text()
            assert (
                'pdserve:router_migrations_total{code="UNAVAILABLE",model_name="tiny"} 1.0' in text
            )
            await wait_for(lambda: decode.running == 0)

    run(body())
