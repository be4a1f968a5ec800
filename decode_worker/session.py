"""The worker side of ``Decode.Session``: many requests over one stream, frames batched.

Each submitted request runs as its own task (``respond`` yields its messages); whatever
messages are ready when the stream can take the next frame go out in it, so a decode step's
tokens for every request on the session leave as one message. An abort in a frame cancels the
request's task, which aborts it in the engine. The stream ending, however it ends, cancels
every request still running on it: nothing outlives the router's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from protos import common_pb2, decode_pb2

log = logging.getLogger(__name__)

Respond = Callable[[decode_pb2.DecodeRequest], AsyncIterator[common_pb2.GenerateResponse]]
Failure = Callable[[str, BaseException], tuple[grpc.StatusCode, str]]


class _Outbox:
    """Responses waiting for the stream, taken all at once."""

    def __init__(self) -> None:
        self.items: list[common_pb2.GenerateResponse] = []
        self.ready = asyncio.Event()

    def put(self, msg: common_pb2.GenerateResponse) -> None:
        self.items.append(msg)
        self.ready.set()

    def error(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        error = common_pb2.Error(code=code.value[0], message=message)
        self.put(common_pb2.GenerateResponse(request_id=request_id, error=error))

    def take(self) -> list[common_pb2.GenerateResponse]:
        items, self.items = self.items, []
        return items


async def serve(
    frames: AsyncIterator[decode_pb2.SessionRequest], respond: Respond, failure: Failure
) -> AsyncIterator[decode_pb2.SessionResponse]:
    """The response frames of one session. ``respond`` raises what fails a request;
    ``failure`` turns that into the status and message its ``Error`` carries."""
    outbox = _Outbox()
    running: dict[str, asyncio.Task[None]] = {}

    async def run(request: decode_pb2.DecodeRequest) -> None:
        rid = request.request.request_id
        try:
            async for msg in respond(request):
                outbox.put(msg)
        except Exception as exc:
            outbox.error(rid, *failure(rid, exc))
        finally:
            if running.get(rid) is asyncio.current_task():
                del running[rid]
            outbox.ready.set()

    async def read() -> None:
        try:
            async for frame in frames:
                for request in frame.submit:
                    rid = request.request.request_id
                    if rid in running:
                        outbox.error(
                            rid,
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"request id {rid!r} is already running in this session",
                        )
                        continue
                    running[rid] = asyncio.create_task(run(request))
                for rid in frame.abort:
                    task = running.pop(rid, None)
                    if task is not None:
                        task.cancel()
        finally:
            outbox.ready.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await outbox.ready.wait()
            outbox.ready.clear()
            if outbox.items:
                yield decode_pb2.SessionResponse(responses=outbox.take())
            if reader.done() and not running:
                # The router closed its side and every request it sent has ended.
                if not reader.cancelled() and reader.exception() is not None:
                    log.warning("session ended: %r", reader.exception())
                return
    finally:
        reader.cancel()
        tasks = list(running.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *tasks, return_exceptions=True)
