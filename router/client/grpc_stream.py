"""One gRPC bidirectional-streaming call on its own HTTP/2 connection, run by the event loop.

The router's session with a worker (``router.client.session``) rides this instead of grpc.aio.
The peer is a worker's session listener, or any gRPC server (``--worker-transport grpcio`` puts
the sessions back on grpc.aio). Everything else the router sends a worker (health, GetInfo,
GetLoad) stays on grpcio.

Hand-written, the client end of ``protos.h2`` (which has the protocol), because grpclib
measured 12-34% slower on the router's hot path (README, "Router alone"; ``protos.h2`` has the
numbers); ``tests/router/test_grpc_stream_peer.py`` fuzzes it against an ``h2``-library server.

What is its own: connecting (TLS, the cluster token), one client stream, PING sent as keepalive
(no answer within ``keepalive_s`` breaks the call with UNAVAILABLE), and GOAWAY, RST_STREAM
and the trailers ending the call. Its interface is the part of
``grpc.aio.StreamStreamCall`` that ``router.client.session.Session`` uses: ``write``, ``read``
(``grpc.aio.EOF`` at the end), ``cancel``, ``done``, ``code``; failures are
``grpc.aio.AioRpcError``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import grpc

from protos import cluster_token, h2
from protos.cluster_tls import SERVER_NAME, ClusterTls

STREAM = 1  # the call's stream id: the connection carries this one stream


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class StreamCall(h2.Connection):
    """The call to ``path`` on ``endpoint`` (``host:port``); connects at once, in the
    background: ``write`` and ``read`` wait for the connection. ``parse`` turns a message's
    bytes into the response type."""

    def __init__(
        self,
        endpoint: str,
        path: str,
        parse: Callable[[bytes], Any],
        keepalive_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        token: str | None = None,
        tls: ClusterTls | None = None,
    ) -> None:
        """``token``: the cluster token to send (``protos.cluster_token``); ``tls``: connect
        over mutual TLS (``protos.cluster_tls``)."""
        super().__init__()
        self.endpoint = endpoint
        self._token = token
        self._tls = tls
        self._path = path
        self._parse = parse
        self._keepalive_s = keepalive_s
        self._loop = asyncio.get_running_loop()
        self._stream = h2.Stream(STREAM, h2.DEFAULT_WINDOW)
        self.streams[STREAM] = self._stream
        self._status: tuple[grpc.StatusCode, str] | None = None  # set once the call is over
        self._messages: collections.deque[Any] = collections.deque()
        self._reader: asyncio.Future[None] | None = None  # a read waiting for messages
        self._last_heard = time.monotonic()
        self._ping_sent: float | None = None
        self._connected: asyncio.Task[None] = self._loop.create_task(
            self._connect(connect_timeout_s)
        )
        self._keepalive: asyncio.Task[None] | None = None
        self.reached = False  # the connection was made

    # -- the call --------------------------------------------------------------------------

    async def write(self, message: Any) -> None:
        """Send one message; waits while the worker's flow-control window is full."""
        if not self._connected.done():
            await asyncio.wait({self._connected})  # never raises: failures set the status
        self._raise_if_over()
        await self.send_message(self._stream, message.SerializeToString())
        self._raise_if_over()

    async def read(self) -> Any:
        """The next message; ``grpc.aio.EOF`` after the last of a call that ended OK."""
        while not self._messages:
            if self._status is not None:
                code, details = self._status
                if code is grpc.StatusCode.OK:
                    return grpc.aio.EOF
                raise _error(code, details)
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return self._messages.popleft()

    def cancel(self) -> bool:
        if self._status is not None:
            return False
        self.reset(STREAM, h2.CANCEL)
        self._end(grpc.StatusCode.CANCELLED, "cancelled by the router")
        return True

    def done(self) -> bool:
        return self._status is not None

    def code(self) -> grpc.StatusCode | None:
        return None if self._status is None else self._status[0]

    def _raise_if_over(self) -> None:
        if self._status is not None:
            code, details = self._status
            if code is grpc.StatusCode.OK:
                code, details = grpc.StatusCode.INTERNAL, "write after the call ended"
            raise _error(code, details)

    # -- connection ------------------------------------------------------------------------

    async def _connect(self, timeout_s: float) -> None:
        host, _, port = self.endpoint.rpartition(":")
        try:
            tls: dict[str, Any] = {}
            if self._tls is not None:
                tls = {"ssl": self._tls.client_context, "server_hostname": SERVER_NAME}
            await asyncio.wait_for(
                self._loop.create_connection(lambda: self, host.strip("[]"), int(port), **tls),
                timeout_s,
            )
        except (OSError, TimeoutError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._end(grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.endpoint}: {exc!r}")
            return
        self._keepalive = self._loop.create_task(self._keep_alive())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._status is not None:  # cancelled while connecting
            transport.close()
            return
        super().connection_made(transport)
        self.reached = True
        metadata = {} if self._token is None else {cluster_token.METADATA_KEY: self._token}
        headers = h2.request_headers(self._path, self.endpoint, metadata)
        self.send(h2.PREFACE + self.settings() + self.headers(STREAM, headers))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._end(grpc.StatusCode.UNAVAILABLE, f"connection to {self.endpoint} lost: {exc!r}")

    async def _keep_alive(self) -> None:
        """Ping after ``keepalive_s`` of silence; no answer within as long ends the call."""
        period = self._keepalive_s
        while self._status is None:
            await asyncio.sleep(period / 4)
            now = time.monotonic()
            if self._ping_sent is not None:
                if now - self._ping_sent > period:
                    self._end(
                        grpc.StatusCode.UNAVAILABLE,
                        f"keepalive ping to {self.endpoint} unanswered for {period:g}s",
                    )
                continue
            if now - self._last_heard > period and self.transport is not None:
                self._ping_sent = now
                self.send(h2.frame(h2.PING, 0, 0, b"pdserve!"))

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        """The call is over with ``code``; wakes whoever waits, closes the connection."""
        if self._status is not None:
            return
        self._status = (code, details)
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)
        self._stream.close()
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()
        if not self._connected.done():
            self._connected.cancel()
        if self.transport is not None:
            self.transport.close()

    # -- receiving -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._last_heard = time.monotonic()
        super().data_received(data)
        if self._messages and self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def on_message(self, stream: h2.Stream, payload: bytes) -> None:
        self._messages.append(self._parse(payload))

    def on_end_stream(self, stream: h2.Stream) -> None:
        self._end(grpc.StatusCode.INTERNAL, h2.NO_STATUS)

    def on_stream_error(self, stream: h2.Stream, error: h2.StreamError) -> None:
        self.reset(STREAM, h2.CANCEL)
        self._end(error.code, error.details)

    def on_protocol_error(self, exc: Exception) -> None:
        self._end(grpc.StatusCode.INTERNAL, f"bad HTTP/2 from {self.endpoint}: {exc!r}")

    def on_ping_ack(self) -> None:
        self._ping_sent = None

    def on_reset(self, stream_id: int, code: int) -> None:
        self._end(grpc.StatusCode.UNAVAILABLE, f"the worker reset the stream (HTTP/2 {code})")

    def on_goaway(self, last_stream: int, code: int, debug: str) -> None:
        if code != h2.NO_ERROR or last_stream < STREAM:
            self._end(grpc.StatusCode.UNAVAILABLE, f"the worker went away ({code}: {debug})")
        # A graceful GOAWAY that covers this stream lets it finish.

    def on_headers(self, stream_id: int, fields: dict[str, str], end_stream: bool) -> None:
        status = h2.response_status(fields, end_stream)
        if status is not None:
            self._end(*status)
