"""Serves an engine instance (one rank, or N expert-parallel ranks) to asyncio code.

The local `Engine` is rank 0. A thread runs the lockstep loop (`engine.dp`): every engine call
becomes a `Command` for one rank, run between steps, so no engine needs locks; step outputs
travel back to each request's asyncio queue through the event loop. With N ranks, requests go
to the data-parallel rank with the fewest requests in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from engine.dp import ALL_RANKS, Command, CommandResult, Iteration, LockstepRank, RankLoad
from engine.engine import Engine, StepOutput
from engine.sampler import TokenLogprobs
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # an idle instance still iterates this often, to notice a dead rank


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (a rank died or the engine failed); nothing is served."""


class RequestAborted(Exception):
    """Ends the stream of a request that `AsyncEngine.abort` stopped."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} was aborted")
        self.request_id = request_id


Stream = asyncio.Queue[StepOutput | BaseException]


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        if engine.parallel.rank != 0:
            raise ValueError("AsyncEngine drives rank 0 of an instance")
        self.engine = engine
        self.world = engine.parallel.ep_size
        self._lockstep = LockstepRank(engine)
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[str, Stream] = {}
        self._rank_of: dict[str, int] = {}
        self._quarantine_rank: dict[int, int] = {}
        self._loads: list[RankLoad] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def loads(self) -> list[RankLoad]:
        """Every rank's load after the latest iteration."""
        return list(self._loads)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,), name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- commands ---------------------------------------------------------------------------

    async def _command(self, rank: int, op: str, *args: Any) -> Any:
        if not self.alive:
            raise EngineDeadError(f"the engine loop is not running: {self.error!r}")
        cid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[cid] = future
        self._commands.put(Command(cid, rank, op, args))
        return await future

    def _pick_rank(self, request_id: str) -> int:
        """The data-parallel rank with the fewest requests in flight (lowest rank on ties)."""
        counts = [0] * self.world
        for rank in self._rank_of.values():
            counts[rank] += 1
        rank = counts.index(min(counts))
        self._rank_of[request_id] = rank
        return rank

    async def prepare(self, sampling: SamplingParams) -> None:
        """Compile the request's constraint, if any, on the grammar backend's threads: the
        request waits here, never on the engine loop, which keeps stepping the others. Raises
        ValueError naming the problem when the constraint does not compile, or does not
        within the engine's `grammar_compile_timeout_s` (the compile goes on, cached, in the
        background: a later request with the same constraint may find it done)."""
        if sampling.constraint is None:
            return
        timeout_s = self.engine.config.grammar_compile_timeout_s
        compiled = asyncio.wrap_future(self.engine.compile_constraint(sampling.constraint))
        compiled.add_done_callback(_retrieve)  # a failure after the timeout is nobody's to read
        try:
            await asyncio.wait_for(asyncio.shield(compiled), timeout_s)
        except TimeoutError:
            raise ValueError(
                f"the output constraint did not compile within {timeout_s:g} s "
                "(--grammar-compile-timeout); simplify it"
            ) from None

    async def reserve_transfer(
        self, prompt_ids: Sequence[int], sampling: SamplingParams, request_id: str
    ) -> tuple[int, list[int]]:
        """Pages for a prompt whose KV arrives by transfer: (rank, page ids on that rank)."""
        await self.prepare(sampling)
        rank = self._pick_rank(request_id)
        try:
            pages = await self._command(
                rank, "reserve_transfer", list(prompt_ids), sampling, request_id
            )
        except BaseException:
            self._rank_of.pop(request_id, None)
            raise
        return rank, pages

    async def complete_transfer(
        self, request_id: str, token_id: int, logprobs: TokenLogprobs | None
    ) -> StepOutput:
        out: StepOutput = await self._command(
            self._rank_of[request_id], "complete_transfer", request_id, token_id, logprobs
        )
        if out.finished:
            self._rank_of.pop(request_id, None)
        return out

    async def quarantine_transfer(self, request_id: str, key: int) -> bool:
        """End a request whose KV is arriving but keep its pages (see `Engine`), and end its
        stream; False if it was not waiting for its KV (then nothing is kept)."""
        rank = self._rank_of.pop(request_id, 0)
        kept = bool(await self._command(rank, "quarantine_transfer", request_id, key))
        if kept:
            self._quarantine_rank[key] = rank
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(RequestAborted(request_id))
        return kept

    async def release_quarantine(self, key: int) -> bool:
        rank = self._quarantine_rank.pop(key, None)
        if rank is None:
            return False
        return bool(await self._command(rank, "release_quarantine", key))

    async def held_pages(self, request_id: str) -> list[int]:
        pages: list[int] = await self._command(0, "held_pages", request_id)
        return pages

    async def release_held(self, request_id: str) -> bool:
        return bool(await self._command(0, "release_held", request_id))

    async def rebalance_experts(self) -> dict[str, tuple[float, float]]:
        """EPLB now, on every rank; per layer the max/mean rank load before and after."""
        report: dict[str, tuple[float, float]] = await self._command(ALL_RANKS, "rebalance_experts")
        return report

    async def expert_loads(self) -> dict[str, list[int]]:
        """Routing counts per logical expert of every MoE layer, over all ranks."""
        loads: dict[str, list[int]] = await self._command(ALL_RANKS, "expert_loads")
        return loads

    async def expert_imbalance(self) -> dict[str, tuple[float, float]]:
        report: dict[str, tuple[float, float]] = await self._command(ALL_RANKS, "expert_imbalance")
        return report

    async def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is, free its pages, and end its stream."""
        rank = self._rank_of.pop(request_id, 0)
        found = bool(await self._command(rank, "abort", request_id))
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(RequestAborted(request_id))
        return found

    # -- streams ----------------------------------------------------------------------------

    def open_stream(self, request_id: str) -> Stream:
        """Register a request's output queue; must happen before its first token can come."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: Stream = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def has_streams(self) -> bool:
        """Whether any request's output is still being streamed to a caller."""
        return bool(self._streams)

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        hold_pages: bool = False,
    ) -> AsyncIterator[list[StepOutput]]:
        """Yield the request's outputs, in batches, until it finishes; aborts it if the caller
        stops early."""
        await self.prepare(sampling)
        stream = self.open_stream(request_id)
        finished = False
        try:
            rank = 0 if hold_pages else self._pick_rank(request_id)
            self._rank_of[request_id] = rank
            await self._command(
                rank, "add_request", list(prompt_ids), sampling, request_id, hold_pages
            )
            async for outs in self.iterate(stream):
                finished = outs[-1].finished
                yield outs
        finally:
            self.close_stream(request_id)
            if not finished and self.alive:
                await asyncio.shield(self.abort(request_id))
            self._rank_of.pop(request_id, None)

    @staticmethod
    async def iterate(stream: Stream) -> AsyncIterator[list[StepOutput]]:
        """The stream's outputs until the last, each time all that have arrived: a consumer
        slower than the engine (a busy network) gets several tokens in one batch."""
        while True:
            batch = [await stream.get()]
            while not stream.empty() and not _ends(batch[-1]):
                batch.append(stream.get_nowait())
            error = next((x for x in batch if isinstance(x, BaseException)), None)
            outs = [x for x in batch if not isinstance(x, BaseException)]
            if outs:
                yield outs
            if error is not None:
                raise error
            if outs and outs[-1].finished:
                return

    def _settle(self, results: list[CommandResult]) -> None:
        """Event loop: settle command futures (a result seen before settles nothing)."""
        for res in results:
            # A command for every rank answers once per rank: the first (rank 0's) settles it.
            future = self._futures.pop(res.cid, None)
            if future is None or future.done():
                continue
            if res.error is not None:
                future.set_exception(res.error)
            else:
                future.set_result(res.value)

    def _deliver(self, it: Iteration) -> None:
        """Event loop: settle command futures and hand outputs to their streams."""
        self._settle(it.results)
        for _, out in it.outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
            if out.finished:
                self._rank_of.pop(out.request_id, None)
        self._loads = it.loads

    # -- the loop thread --------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        busy = False
        try:
            while not self._stopping.is_set():
                commands = self._drain(block=not busy)
                # Rank 0's command results go back before the step runs: a hand-off's first
                # token (complete_transfer) does not wait a decode step to reach its client.
                it = self._lockstep.iterate(
                    commands, early=lambda res: loop.call_soon_threadsafe(self._settle, res)
                )
                busy = any(load.num_running or load.num_waiting for load in it.loads)
                loop.call_soon_threadsafe(self._deliver, it)
            if self.world > 1:
                self._lockstep.iterate(stop=True)
        except BaseException as exc:
            log.exception("engine loop failed; failing every live request")
            self.error = exc
            loop.call_soon_threadsafe(self._fail_all, exc)

    def _drain(self, block: bool) -> list[Command]:
        commands = []
        try:
            if block:
                commands.append(self._commands.get(timeout=_IDLE_WAIT_S))
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return commands

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineDeadError(f"the engine failed: {exc!r}")
        for stream in self._streams.values():
            stream.put_nowait(error)
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()


def _ends(item: StepOutput | BaseException) -> bool:
    return isinstance(item, BaseException) or item.finished


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
