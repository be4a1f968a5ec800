"""One long-lived ``Decode.Session`` stream per worker, carrying every request the router sends
it.

A gRPC call per request costs the router more than everything else it does for the request
(grpc.aio hands each message between its polling thread and the event loop). A session pays
that once per frame instead: the frames going out batch the requests submitted (and aborted)
since the last one, and a frame coming back carries the tokens of every request the worker
stepped. ``open`` registers a request and queues it; its ``RequestStream`` yields that request's
messages. When the stream breaks (the worker died, or its address stopped answering) every
request on it fails with the stream's status, and the next ``open`` starts a new session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

import grpc

from protos import common_pb2, decode_pb2, decode_pb2_grpc
from router.events import WorkerError

log = logging.getLogger(__name__)


class RequestStream:
    """The messages of one request on a session, in order; ``next`` raises ``WorkerError``
    when the session breaks first. ``close`` before the request ended aborts it."""

    __slots__ = (
        "_error", "_items", "_loop", "_session", "_waiter", "ended", "endpoint", "request_id",
    )  # fmt: skip

    _error: tuple[grpc.StatusCode, str] | None

    def __init__(self, session: Session, request_id: str) -> None:
        self._items: collections.deque[common_pb2.GenerateResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error = None  # the session broke: (status, details)
        self._session: Session | None = session
        self.endpoint = session.endpoint
        self._loop = session.loop
        self.request_id = request_id
        self.ended = False  # a Complete or Error came: nothing more will

    def _push(self, msg: common_pb2.GenerateResponse) -> None:
        self._items.append(msg)
        if msg.WhichOneof("response") != "chunk":
            self.ended = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: WorkerError) -> None:
        self._error = (error.grpc_code, error.details)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> common_pb2.GenerateResponse:
        while not self._items:
            if self._error is not None:
                code, details = self._error
                raise WorkerError(code, details, self.endpoint)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def close(self) -> None:
        """Stop listening; abort the request on the worker unless it ended."""
        session, self._session = self._session, None
        if session is not None:
            session._forget(self)


class Session:
    """A ``Decode.Session`` call and the requests it carries. Broken sessions stay broken."""

    def __init__(self, stub: decode_pb2_grpc.DecodeStub, endpoint: str) -> None:
        self.endpoint = endpoint
        self.loop = asyncio.get_running_loop()  # asked once: each call costs a getpid()
        self._call: Any = stub.Session()
        self._streams: dict[str, RequestStream] = {}
        self._submits: list[decode_pb2.DecodeRequest] = []
        self._aborts: list[str] = []
        self._wake = asyncio.Event()
        self.error: WorkerError | None = None  # set once broken
        self._writer = asyncio.create_task(self._write_forever())
        self._reader = asyncio.create_task(self._read_forever())

    @property
    def broken(self) -> bool:
        return self.error is not None

    def __len__(self) -> int:
        return len(self._streams)

    def open(self, request: decode_pb2.DecodeRequest) -> RequestStream:
        """Send ``request`` with the next frame; its messages come through the stream."""
        rid = request.request.request_id
        stream = RequestStream(self, rid)
        if self.error is not None:
            stream._fail(self.error)
            return stream
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already open on {self.endpoint}")
        self._streams[rid] = stream
        self._submits.append(request)
        self._wake.set()
        return stream

    def _forget(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            if not stream.ended and self.error is None:
                self._aborts.append(stream.request_id)
                self._wake.set()

    async def _write_forever(self) -> None:
        call = self._call
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not (self._submits or self._aborts):
                    continue
                frame = decode_pb2.SessionRequest(submit=self._submits, abort=self._aborts)
                self._submits, self._aborts = [], []
                await call.write(frame)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._break(WorkerError(exc.code(), exc.details() or "", self.endpoint))
        except Exception as exc:  # the call ended under us (asyncio.InvalidStateError...)
            self._break(self._ended_error(exc))

    async def _read_forever(self) -> None:
        call = self._call
        streams = self._streams
        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    break
                for msg in frame.responses:
                    stream = streams.get(msg.request_id)
                    if stream is not None:
                        stream._push(msg)
                        if stream.ended:
                            del streams[msg.request_id]
            self._break(
                WorkerError(
                    grpc.StatusCode.UNAVAILABLE, "the worker ended the session", self.endpoint
                )
            )
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._break(WorkerError(exc.code(), exc.details() or "", self.endpoint))
        except Exception as exc:
            log.exception("session with %s failed", self.endpoint)
            self._break(WorkerError(grpc.StatusCode.INTERNAL, repr(exc), self.endpoint))

    def _ended_error(self, exc: BaseException) -> WorkerError:
        code = grpc.StatusCode.UNAVAILABLE
        with contextlib.suppress(Exception):
            if self._call.done():
                return WorkerError(self._call.code() or code, "session ended", self.endpoint)
        return WorkerError(code, f"session ended: {exc!r}", self.endpoint)

    def _break(self, error: WorkerError) -> None:
        """Fail every request on the session; it takes no more."""
        if self.error is not None:
            return
        self.error = error
        if error.grpc_code is not grpc.StatusCode.CANCELLED:
            log.warning(
                "session with %s broke (%s: %s); %d requests on it fail",
                self.endpoint, error.grpc_code.name, error.details, len(self._streams),
            )  # fmt: skip
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(error)
        self._call.cancel()
        for task in (self._writer, self._reader):
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        self._break(WorkerError(grpc.StatusCode.CANCELLED, "the router closed", self.endpoint))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._writer, self._reader, return_exceptions=True)
