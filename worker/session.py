"""The worker side of ``Decode.Session`` and ``Prefill.Session``: many requests over one
stream, frames batched.

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import grpc

from protos import common_pb2
from protos.contract import SessionMethod

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Item = TypeVar("Item")

Failure = Callable[[str, BaseException], tuple[grpc.StatusCode, str]]

# Options of a worker's gRPC server: routers keep their sessions open for the worker's life and
# ping them (--worker-keepalive) to notice a worker that hangs without closing its sockets;
# let them ping as often as they like, with or without data flowing.
SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
)


class _Outbox(Generic[Item]):
    """Replies waiting for the stream, taken all at once."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.ready = asyncio.Event()

    def put(self, msg: Item) -> None:
        self.items.append(msg)
        self.ready.set()

    def take(self) -> list[Item]:
        items, self.items = self.items, []
        return items


async def serve(
    frames: AsyncIterator[Any],
    respond: Callable[[Request], AsyncIterator[Item]],
    failure: Failure,
    kind: SessionMethod[Request, Item],
) -> AsyncGenerator[Any, None]:
    """The reply frames of one session. ``respond`` raises what fails a request;
    ``failure`` turns that into the status and message its error reply carries."""
    outbox: _Outbox[Item] = _Outbox()
    running: dict[str, asyncio.Task[None]] = {}

    def error(rid: str, code: grpc.StatusCode, message: str, peer: str = "") -> None:
        msg = common_pb2.Error(code=code.value[0], message=message, peer=peer)
        outbox.put(kind.error(rid, msg))

    async def run(request: Request) -> None:
        rid = kind.request_id(request)
        try:
            async for msg in respond(request):
                outbox.put(msg)
        except Exception as exc:
            # A failure caused by another worker names it (worker.convert.PeerFailure).
            peer = getattr(exc, "peer", "")
            error(rid, *failure(rid, exc), peer if isinstance(peer, str) else "")
        finally:
            if running.get(rid) is asyncio.current_task():
                del running[rid]
            outbox.ready.set()

    async def read() -> None:
        try:
            async for frame in frames:
                for request in kind.submits(frame):
                    rid = kind.request_id(request)
                    if rid in running:
                        error(
                            rid,
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"request id {rid!r} is already running in this session",
                        )
                        continue
                    running[rid] = asyncio.create_task(run(request))
                for rid in kind.aborts(frame):
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
                yield kind.reply_frame(outbox.take())
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
