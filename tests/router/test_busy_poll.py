"""Busy polling (``--busy-poll-us``): after client traffic the loop polls instead of sleeping,
until the window after the last traffic has passed; then it sleeps again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer
from router.app.busy_poll import BusyPoll
from router.config import RouterConfig
from tests.router.conftest import router_for, run
from tests.router.fake_worker import FakeWorker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_window_is_validated(model_dir: Path) -> None:
    async def body() -> None:
        with pytest.raises(ValueError, match="--busy-poll-us"):
            BusyPoll(0)

    run(body())
    with pytest.raises(ValueError, match="--busy-poll-us must be in"):
        RouterConfig(model_path=str(model_dir), workers=("127.0.0.1:1",), busy_poll_us=-1)


def test_each_kick_extends_the_window_and_polling_ends_after_it() -> None:
    async def body() -> None:
        clock = Clock()
        poll = BusyPoll(1_000_000, clock)  # a 1 s window on the fake clock
        assert not poll.spinning
        poll.kick()
        await turns()
        assert poll.spinning
        clock.now = 0.5
        poll.kick()  # open until 1.5 now
        clock.now = 1.2
        await turns()
        assert poll.spinning
        clock.now = 1.6
        await turns()
        assert not poll.spinning
        poll.kick()  # traffic again: polling resumes
        await turns()
        assert poll.spinning
        poll.close()
        poll.kick()  # a kick between close and the next turn does not keep it going
        await turns()
        assert not poll.spinning
        poll.kick()  # closed: no more polling
        await turns()
        assert not poll.spinning

    run(body())


SCHEDSTAT = Path("/proc/thread-self/schedstat")


def blocked_s() -> float:
    """A clock of the time this thread has spent blocked (asleep, as in ``epoll_wait``): wall
    time less its CPU time less the time it waited, runnable, for a CPU (schedstat's
    run_delay). A loaded host moves time from the CPU into the wait, not into this clock."""
    run_delay_ns = int(SCHEDSTAT.read_text().split()[1])
    return time.monotonic() - time.thread_time() - run_delay_ns / 1e9


@pytest.mark.skipif(not SCHEDSTAT.exists(), reason="needs Linux's /proc/thread-self/schedstat")
def test_it_polls_through_the_window_then_sleeps() -> None:
    """Real time: the loop never blocks while the window is open (timers still fire in it), so
    it burns whatever CPU the host gives it; once the window has passed it sleeps and burns
    next to none. CPU time alone measures the host's load too: on 2 cores with 4 test
    processes and 2 busy loops, the polling loop got 19 ms of CPU in its 100 ms."""

    async def body() -> None:
        poll = BusyPoll(200_000)
        blocked = blocked_s()
        poll.kick()
        await asyncio.sleep(0.1)  # a timer fires while polling
        polling_blocked = blocked_s() - blocked
        await asyncio.sleep(0.15)
        assert not poll.spinning
        blocked, cpu = blocked_s(), time.process_time()
        await asyncio.sleep(0.2)
        idle_cpu = time.process_time() - cpu
        idle_blocked = blocked_s() - blocked
        assert polling_blocked < 0.02, polling_blocked
        assert idle_blocked > 0.15, idle_blocked  # the clock sees sleep as sleep
        assert idle_cpu < 0.02, idle_cpu

    run(body())


def test_router_polls_after_a_reply_and_stops_when_closed(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(" polled")
    worker = FakeWorker(reply=lambda prompt: list(ids))

    async def body() -> None:
        async with router_for(model_dir, workers=(worker,), busy_poll_us=1_000_000) as r:
            poll = r.server.busy_poll
            assert poll is not None and not poll.spinning
            status, reply = await r.post(
                "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4}
            )
            assert status == 200 and reply["choices"][0]["text"] == " polled"
            assert poll.spinning  # the 1 s window after the reply is open
        await turns()
        assert not poll.spinning  # closing the server ended it

    run(body())


def test_router_does_not_poll_by_default(model_dir: Path, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" slept")
    worker = FakeWorker(reply=lambda prompt: list(ids))

    async def body() -> None:
        async with router_for(model_dir, workers=(worker,)) as r:
            assert r.server.busy_poll is None and r.server.http.on_traffic is None
            status, _ = await r.post(
                "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4}
            )
            assert status == 200

    run(body())
