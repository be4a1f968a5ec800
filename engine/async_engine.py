"""Drives an `Engine` on its own thread and serves it to asyncio code (the gRPC workers).

Every engine call runs on the engine thread, between steps, so the engine itself needs no
locks. Outputs travel back to each request's asyncio queue through the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from engine.engine import Engine, StepOutput
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")

_IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class RequestAborted(Exception):
    """Ends the stream of a request that `AsyncEngine.abort` stopped."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} was aborted")
        self.request_id = request_id


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,), name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the engine thread and return its result (or raise its error)."""
        if not self.alive:
            raise EngineDeadError(f"the engine thread is not running: {self.error!r}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def command() -> None:
            try:
                result = fn(self.engine)
            except BaseException as exc:  # delivered to the caller, not raised here
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._commands.put(command)
        return await future

    async def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is, free its pages, and end its stream."""
        found = await self.call(lambda e: e.abort(request_id))
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(RequestAborted(request_id))
        return found

    def open_stream(self, request_id: str) -> asyncio.Queue[StepOutput | BaseException]:
        """Register a request's output queue; must happen before its first token can come."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        hold_pages: bool = False,
    ) -> AsyncIterator[StepOutput]:
        """Yield the request's outputs until it finishes; aborts it if the caller stops early."""
        stream = self.open_stream(request_id)
        finished = False
        try:
            await self.call(lambda e: e.add_request(prompt_ids, sampling, request_id, hold_pages))
            async for out in self.iterate(stream):
                finished = out.finished
                yield out
        finally:
            self.close_stream(request_id)
            if not finished and self.alive:
                await asyncio.shield(self.call(lambda e: e.abort(request_id)))

    @staticmethod
    async def iterate(
        stream: asyncio.Queue[StepOutput | BaseException],
    ) -> AsyncIterator[StepOutput]:
        while True:
            item = await stream.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def deliver(self, outputs: list[StepOutput]) -> None:
        """Engine thread: hand outputs to their streams (called through the event loop)."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    # -- the engine thread ------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.engine.has_work())
                if self.engine.has_work():
                    outputs = self.engine.step()
                    if outputs:
                        loop.call_soon_threadsafe(self.deliver, outputs)
        except BaseException as exc:
            log.exception("engine thread failed; failing every live request")
            self.error = exc
            loop.call_soon_threadsafe(self._fail_all, exc)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else None
            if command is not None:
                command()
            while True:
                self._commands.get_nowait()()
        except queue.Empty:
            pass

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineDeadError(f"the engine failed: {exc!r}")
        for stream in self._streams.values():
            stream.put_nowait(error)


def _settle(future: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]
