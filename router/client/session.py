"""What the router sends a worker and what comes back, on one long-lived session stream per
worker (``Decode.Session`` or ``Prefill.Session``) that carries every request the router sends it.

A ``WorkerRequest`` carries the sampling parameters as the wire's ``SamplingParams`` (the
application layer builds them from its own request types). A request's replies come back as
``TokenChunk``s and one ``Finished``, or raise ``WorkerError`` (``router.client.errors``).

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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from protos import common_pb2
from protos.contract import SessionMethod, finish_from_proto
from router.client.errors import WorkerError, status_code_from_int

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerRequest:
    request_id: str  # unique per choice
    token_ids: tuple[int, ...]
    sampling: common_pb2.SamplingParams  # built once, never changed after (copy to vary it)
    stream: bool = True  # tokens as produced; False: all with the last message
    stream_interval: int = 1  # streamed: the worker sends tokens every this many


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the best alternatives, ``(token_id, logprob)``."""

    logprob: float
    top: tuple[tuple[int, float], ...]


# The events and deltas made per token batch are slotted, not frozen: a frozen dataclass
# costs about 1 µs more to build, several times per request. Nothing mutates them.
@dataclass(slots=True)
class TokenChunk:
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]  # parallel to token_ids when asked for, else empty


@dataclass(slots=True)
class Finished:
    reason: str  # "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


WorkerEvent = TokenChunk | Finished


def chunk_from_proto(chunk: common_pb2.StreamChunk) -> TokenChunk:
    """A decode worker's chunk, or a prefill worker's early first token."""
    # Most requests ask for no logprobs: skip building an empty generator per chunk.
    logprobs = chunk.logprobs
    return TokenChunk(
        token_ids=tuple(chunk.token_ids),
        logprobs=tuple(
            TokenLogprob(lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
            for lp in logprobs
        )
        if logprobs
        else (),
    )


def event_from_proto(msg: common_pb2.GenerateResponse, endpoint: str) -> WorkerEvent:
    """One stream message as an event; an ``error`` message raises ``WorkerError``."""
    kind = msg.WhichOneof("response")
    if kind == "chunk":
        return chunk_from_proto(msg.chunk)
    if kind == "complete":
        c = msg.complete
        return Finished(
            reason=finish_from_proto(c.finish_reason),
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cached_tokens=c.cached_tokens,
        )
    if kind == "error":
        # A decode worker whose prefill worker never delivered names it: the failure is
        # charged to that worker (its circuit, the retry's `avoid`), not to the messenger.
        err = msg.error
        raise WorkerError(status_code_from_int(err.code), err.message, err.peer or endpoint)
    raise WorkerError(grpc.StatusCode.INTERNAL, "empty GenerateResponse", endpoint)


def request_to_proto(r: WorkerRequest) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=r.request_id, token_ids=list(r.token_ids), sampling=r.sampling
    )


# -- the session stream ------------------------------------------------------------------------

Submit = TypeVar("Submit")  # what a frame submits: DecodeRequest, PrefillRequest
Reply = TypeVar("Reply")  # what comes back per request: GenerateResponse, PrefillReply


class RequestStream(Generic[Reply]):
    """The messages of one request on a session, in order; ``next`` raises ``WorkerError``
    when the session breaks first. ``close`` before the request ended aborts it."""

    __slots__ = (
        "_error", "_items", "_loop", "_session", "_waiter", "ended", "endpoint", "request_id",
    )  # fmt: skip

    _error: tuple[grpc.StatusCode, str] | None

    def __init__(self, session: Session[Any, Reply], request_id: str) -> None:
        self._items: collections.deque[Reply] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error = None  # the session broke: (status, details)
        self._session: Session[Any, Reply] | None = session
        self.endpoint = session.endpoint
        self._loop = session.loop
        self.request_id = request_id
        self.ended = False  # a Complete or Error came: nothing more will

    def _push(self, msg: Reply, ends: bool) -> None:
        self._items.append(msg)
        self.ended = ends
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: WorkerError) -> None:
        self._error = (error.grpc_code, error.details)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> Reply:
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


# A frame stays under this many bytes (unless one request is larger): gRPC servers refuse
# messages over 4 MiB unless configured otherwise, and a refused frame breaks the session.
FRAME_BYTES = 2 << 20


def _parts(submits: list[Submit]) -> Iterable[list[Submit]]:
    """``submits`` in runs of at most ``FRAME_BYTES``; one run in the usual case."""
    if len(submits) <= 1:
        return (submits,)
    parts: list[list[Submit]] = [[]]
    size = 0
    for request in submits:
        n = request.ByteSize()  # type: ignore[attr-defined]
        if size + n > FRAME_BYTES and parts[-1]:
            parts.append([])
            size = 0
        parts[-1].append(request)
        size += n
    return parts


class Session(Generic[Submit, Reply]):
    """A session call (``stub.Session()``, or a ``router.client.grpc_stream.StreamCall``) and the
    requests it carries. Broken sessions stay broken."""

    def __init__(self, call: Any, endpoint: str, kind: SessionMethod[Submit, Reply]) -> None:
        self.endpoint = endpoint
        self.kind = kind
        self.loop = asyncio.get_running_loop()  # asked once: each call costs a getpid()
        self._call = call
        self._streams: dict[str, RequestStream[Reply]] = {}
        self._submits: list[Submit] = []
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

    def open(self, request: Submit) -> RequestStream[Reply]:
        """Send ``request`` with the next frame; its messages come through the stream."""
        rid = self.kind.request_id(request)
        stream: RequestStream[Reply] = RequestStream(self, rid)
        if self.error is not None:
            stream._fail(self.error)
            return stream
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already open on {self.endpoint}")
        self._streams[rid] = stream
        self._submits.append(request)
        self._wake.set()
        return stream

    def _forget(self, stream: RequestStream[Reply]) -> None:
        rid = stream.request_id
        if self._streams.get(rid) is stream:
            del self._streams[rid]
            if stream.ended or self.error is not None:
                return
            # Not sent yet: drop it rather than send it and its abort.
            for i, request in enumerate(self._submits):
                if self.kind.request_id(request) == rid:
                    del self._submits[i]
                    return
            self._aborts.append(rid)
            self._wake.set()

    async def _write_forever(self) -> None:
        call = self._call
        try:
            while True:
                await self._wake.wait()
                # One more loop turn: the requests whose bodies arrived in this turn join the
                # frame (fewer, fuller frames: each costs grpc.aio far more than its bytes).
                await asyncio.sleep(0)
                self._wake.clear()
                if not (self._submits or self._aborts):
                    continue
                submits, aborts = self._submits, self._aborts
                self._submits, self._aborts = [], []
                for part in _parts(submits):
                    await call.write(self.kind.frame(part, aborts))
                    aborts = []
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
                for msg in self.kind.replies(frame):
                    stream = streams.get(msg.request_id)  # type: ignore[attr-defined]
                    if stream is not None:
                        ends = self.kind.ends(msg)
                        stream._push(msg, ends)
                        if ends:
                            del streams[stream.request_id]
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
