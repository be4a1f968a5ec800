"""The workers' session listener: ``Decode.Session`` and ``Prefill.Session`` served on the
event loop, on a port of its own (``--session-port``), beside the grpcio server that serves
every method.

A router sends all of its requests to a worker over one session stream, so what each frame
costs to receive and send is paid per decode step for every request in flight. Served by
grpc.aio, each message crosses between gRPC core's polling threads and the event loop; here
the frames are read and written by the loop itself, so the engine's step loop and the session
share the interpreter with less in between. It is plain gRPC over HTTP/2: a grpcio client can
call it, and the router finds the port in ``GetInfo`` (``session_port``). The grpcio server
keeps serving the same sessions, for clients that only know the worker's main port.

Hand-written, the server end of ``protos.h2`` (which has the protocol), because grpclib
measured 12-34% slower on the router's hot path (README, "Router alone"; ``protos.h2`` has the
numbers); ``tests/worker/test_session_server_peer.py`` fuzzes it with an ``h2``-library client.
What is its own: the client preface, streams opening as calls (the token, the method), each
call's handler as a task, and stopping.

A call's handler gets the request messages as an async iterator and yields the replies; its
stream ends with ``grpc-status`` 0 when the handler returns, the status of a
``protos.h2.StreamError`` it raises, INTERNAL when it raises anything else or the client's
half ends inside a message, INVALID_ARGUMENT when a message cannot be parsed, and
UNAVAILABLE when the listener stops. A reset stream or a lost connection cancels the handler
(the session's requests are then aborted in the engine).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from protos import cluster_token, h2
from protos.cluster_tls import ClusterTls

log = logging.getLogger(__name__)

MAX_STREAMS = 100


@dataclass(frozen=True)
class Method:
    """A bidirectional-streaming method: how to parse its requests, and its handler."""

    parse: Callable[[bytes], Any]
    serve: Callable[[AsyncIterator[Any]], AsyncGenerator[Any, None]]


class _Call:
    """One stream being served."""

    __slots__ = ("begun", "ended", "failure", "headers_sent", "inbox", "stream", "task", "waiter")

    def __init__(self, stream: h2.Stream) -> None:
        self.stream = stream
        self.inbox: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None  # the handler waiting for a message
        self.ended = False  # the client's half is closed (``stream.closed``: it reset it)
        self.failure: h2.StreamError | None = None  # what ends the call, if not its handler
        self.headers_sent = False
        self.task: asyncio.Task[None] | None = None
        self.begun = False  # the task has taken its first step

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def cancel(self) -> None:
        """Cancel the handler. A task cancelled before its first step would skip its own
        clean-up (the call left behind, no trailers sent); one that has not begun yet finds
        the stream closed or ``failure`` set when it does, and ends at once."""
        if self.task is not None and self.begun:
            self.task.cancel()


class _ServerConnection(h2.Connection):
    def __init__(self, server: SessionServer) -> None:
        super().__init__()
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._calls: dict[int, _Call] = {}
        self._preface = bytearray()  # the client preface, until whole
        self._greeted = False
        self._last_stream = 0
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.connections.add(self)
        self.send(self.settings((h2.SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._server.connections.discard(self)
        for call in self._calls.values():
            call.stream.close()
            call.cancel()

    def data_received(self, data: bytes) -> None:
        if not self._greeted:
            self._preface += data
            if len(self._preface) < len(h2.PREFACE):
                if not h2.PREFACE.startswith(self._preface):
                    self._close_bad("not an HTTP/2 client preface")
                return
            if not self._preface.startswith(h2.PREFACE):
                self._close_bad("not an HTTP/2 client preface")
                return
            self._greeted = True
            data = bytes(self._preface[len(h2.PREFACE) :])
            self._preface = bytearray()
        super().data_received(data)

    def _close_bad(self, why: str) -> None:
        log.warning("session listener: closing a connection: %s", why)
        self.send(h2.goaway(self._last_stream, h2.PROTOCOL_ERROR))
        if self.transport is not None:
            self.transport.close()

    def goaway(self) -> None:
        """Take no new streams; the open ones go on."""
        self._closing = True
        self.send(h2.goaway(self._last_stream, h2.NO_ERROR))

    # -- streams ---------------------------------------------------------------------------

    def on_headers(self, stream_id: int, fields: dict[str, str], end_stream: bool) -> None:
        call = self._calls.get(stream_id)
        if call is not None:  # trailers from the client: its half is over
            self.on_end_stream(call.stream)
            return
        if stream_id <= self._last_stream or not stream_id & 1:
            raise ValueError(f"stream id {stream_id} does not open a new client stream")
        self._last_stream = stream_id
        if self._closing or len(self._calls) >= MAX_STREAMS:
            self.reset(stream_id, h2.REFUSED_STREAM)
            return
        path = fields.get(":path", "")
        check = self._server.token_check
        if check is not None and not check.ok(fields.get(cluster_token.METADATA_KEY)):
            code = grpc.StatusCode.UNAUTHENTICATED
            self._end_call(stream_id, code, cluster_token.REFUSED)
            return
        method = self._server.methods.get(path)
        if method is None or not h2.is_grpc(fields):
            code = grpc.StatusCode.UNIMPLEMENTED
            self._end_call(stream_id, code, f"method {path!r} is not served on this port")
            return
        stream = h2.Stream(stream_id, self.peer_window)
        call = _Call(stream)
        call.ended = end_stream
        self.streams[stream_id] = stream
        self._calls[stream_id] = call
        call.task = self._loop.create_task(self._run(call, method))

    def on_message(self, stream: h2.Stream, payload: bytes) -> None:
        call = self._calls[stream.id]
        call.inbox.append(payload)
        call.wake()

    def on_end_stream(self, stream: h2.Stream) -> None:
        call = self._calls.get(stream.id)
        if call is not None:
            call.ended = True
            call.wake()

    def on_stream_error(self, stream: h2.Stream, error: h2.StreamError) -> None:
        call = self._calls.get(stream.id)
        if call is not None and call.failure is None:
            call.failure = error
            call.cancel()

    def on_reset(self, stream_id: int, code: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            call.stream.close()
            call.cancel()

    def on_goaway(self, last_stream: int, code: int, debug: str) -> None:
        pass  # the client closes the connection when it is done with it

    def on_protocol_error(self, exc: Exception) -> None:
        self._close_bad(repr(exc))

    async def _messages(self, call: _Call, parse: Callable[[bytes], Any]) -> AsyncIterator[Any]:
        """The call's request messages, until the client's half ends."""
        while True:
            if call.inbox:
                payload = call.inbox.popleft()
                try:
                    msg = parse(payload)
                except Exception as exc:
                    call.failure = h2.StreamError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse a request: {exc!r}"
                    )
                    raise call.failure from exc
                yield msg
            elif call.ended:
                return
            else:
                call.waiter = self._loop.create_future()
                try:
                    await call.waiter
                finally:
                    call.waiter = None

    async def _serve(self, call: _Call, method: Method) -> None:
        """The handler's replies sent as they come, until it returns or the call is reset."""
        stream = call.stream
        async with contextlib.aclosing(method.serve(self._messages(call, method.parse))) as out:
            async for reply in out:
                if not call.headers_sent:
                    self.send(self.headers(stream.id, h2.RESPONSE_HEADERS))
                    call.headers_sent = True
                await self.send_message(stream, reply.SerializeToString())
                if stream.closed:
                    return

    async def _run(self, call: _Call, method: Method) -> None:
        call.begun = True
        stream = call.stream
        status: tuple[grpc.StatusCode, str] = (grpc.StatusCode.OK, "")
        try:
            if not stream.closed and call.failure is None:  # else over before the handler began
                await self._serve(call, method)
        except asyncio.CancelledError:
            if stream.closed:
                return
            status = (grpc.StatusCode.UNAVAILABLE, "the worker's session listener stopped")
        except h2.StreamError as exc:  # the handler's own status, as context.abort gives it
            status = (exc.code, exc.details)
        except Exception as exc:
            log.exception("session call on stream %d failed", stream.id)
            status = (grpc.StatusCode.INTERNAL, repr(exc))
        finally:
            self._calls.pop(stream.id, None)
            self.streams.pop(stream.id, None)
        if call.failure is not None:
            status = (call.failure.code, call.failure.details)
        if stream.closed or self.transport is None:
            return
        self._end_call(stream.id, *status, headers_sent=call.headers_sent)

    def _end_call(
        self, stream_id: int, code: grpc.StatusCode, details: str, headers_sent: bool = False
    ) -> None:
        block = h2.trailers(code, details, headers_sent)
        self.send(self.headers(stream_id, block, end_stream=True))

    async def stop(self, grace_s: float | None) -> None:
        """GOAWAY, let the calls end for up to ``grace_s``, then end them and close."""
        self.goaway()
        tasks = [c.task for c in self._calls.values() if c.task is not None]
        if tasks and grace_s:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()


class SessionServer:
    """Serves session methods, by gRPC path (``/pdserve.Decode/Session``), on one port:
    ``bind`` (the port is known), ``add`` the methods, ``start``."""

    def __init__(self, token: str | None = None, tls: ClusterTls | None = None) -> None:
        """``token``: the cluster token every call must carry (``protos.cluster_token``);
        ``tls``: serve over mutual TLS (``protos.cluster_tls``)."""
        self.methods: dict[str, Method] = {}
        self.token_check = None if token is None else cluster_token.TokenCheck(token)
        self._ssl = None if tls is None else tls.server_context
        self.connections: set[_ServerConnection] = set()
        self._server: asyncio.Server | None = None

    def add(self, path: str, method: Method) -> None:
        self.methods[path] = method

    async def bind(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port), accepting nobody yet; returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self),
            host,
            port,
            backlog=1024,
            start_serving=False,
            ssl=self._ssl,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._server is None:
            raise RuntimeError("bind the session listener before starting it")
        await self._server.start_serving()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop listening; calls in progress get ``grace_s`` to end (they end UNAVAILABLE)."""
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(c.stop(grace_s) for c in list(self.connections)))
        if self._server is not None:
            await self._server.wait_closed()
