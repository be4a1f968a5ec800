"""One gRPC bidirectional-streaming call on its own HTTP/2 connection, run by the event loop.

grpc.aio runs every call through gRPC core's own threads: each message crosses from a
polling thread to the event loop and back, which costs the router more CPU than the rest of
a request, and about 150 µs of latency per round trip at low load. A worker session is one
long-lived stream carrying every request of one router process, so the router speaks the
gRPC wire protocol for it directly (HTTP/2 frames, RFC 9113; length-prefixed protobuf
messages; ``grpc-status`` trailers) over an asyncio connection. The worker side is the
ordinary grpcio server. Everything else the router sends a worker (health, GetInfo,
GetLoad) stays on grpcio, and ``--worker-transport grpcio`` puts the sessions back on it.

What it implements of HTTP/2 is what one client stream needs: SETTINGS (acknowledged;
the peer's frame size and window honoured), flow control both ways, PING (answered; sent as
keepalive: no answer within ``keepalive_s`` breaks the call with UNAVAILABLE), GOAWAY and
RST_STREAM (the call fails), and header blocks decoded with HPACK (``hpack``; sent ones are
literals). Its interface is the part of ``grpc.aio.StreamStreamCall`` that
``router.session.Session`` uses: ``write``, ``read`` (``grpc.aio.EOF`` at the end),
``cancel``, ``done``, ``code``; failures are ``grpc.aio.AioRpcError``.
"""

from __future__ import annotations

import asyncio
import collections
import struct
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, cast

import grpc
import hpack

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9,
)  # fmt: skip
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x4, 0x5
CANCEL = 0x8
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM = 1  # the call's stream id: the connection carries this one stream
RECEIVE_WINDOW = 1 << 24  # what we let the worker send ahead of our reading
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384

_U32 = struct.Struct(">I")
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _U32.pack(len(payload))[1:] + bytes((kind, flags)) + _U32.pack(stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1 integer."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, new name, no Huffman (§6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class StreamCall(asyncio.Protocol):
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
    ) -> None:
        self.endpoint = endpoint
        self._path = path
        self._parse = parse
        self._keepalive_s = keepalive_s
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._status: tuple[grpc.StatusCode, str] | None = None  # set once the call is over
        self._messages: collections.deque[Any] = collections.deque()
        self._reader: asyncio.Future[None] | None = None  # a read waiting for messages
        self._writable: asyncio.Future[None] | None = None  # a write waiting for window
        self._inbox = bytearray()  # frames not parsed yet
        self._body = bytearray()  # DATA payloads not yet whole messages
        self._headers = bytearray()  # a header block awaiting its CONTINUATION frames
        self._headers_end = False
        self._decoder = hpack.Decoder()
        self._outbox = bytearray()  # message bytes waiting for send window
        self._conn_window = DEFAULT_WINDOW
        self._stream_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self._max_frame = DEFAULT_FRAME
        self._unacked = 0  # bytes received since our last WINDOW_UPDATE
        self._last_heard = time.monotonic()
        self._ping_sent: float | None = None
        self._connected: asyncio.Task[None] = self._loop.create_task(
            self._connect(connect_timeout_s)
        )
        self._keepalive: asyncio.Task[None] | None = None

    # -- the call --------------------------------------------------------------------------

    async def write(self, message: Any) -> None:
        """Send one message; waits while the worker's flow-control window is full."""
        if not self._connected.done():
            await asyncio.wait({self._connected})  # never raises: failures set the status
        self._raise_if_over()
        payload = message.SerializeToString()
        self._outbox += b"\x00" + _U32.pack(len(payload)) + payload
        self._pump()
        while self._outbox and self._status is None:
            self._writable = self._loop.create_future()
            await self._writable
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
        if self._transport is not None:
            self._transport.write(_frame(RST_STREAM, 0, STREAM, _U32.pack(CANCEL)))
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
            await asyncio.wait_for(
                self._loop.create_connection(lambda: self, host.strip("[]"), int(port)), timeout_s
            )
        except (OSError, TimeoutError, ValueError) as exc:
            self._end(grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.endpoint}: {exc!r}")
            return
        self._keepalive = self._loop.create_task(self._keep_alive())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._status is not None:  # cancelled while connecting
            transport.close()
            return
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        headers = b"".join(
            (
                b"\x83\x86",  # :method POST, :scheme http (static table entries 3 and 6)
                _literal(b":path", self._path.encode()),
                _literal(b":authority", self.endpoint.encode()),
                _literal(b"content-type", b"application/grpc"),
                _literal(b"te", b"trailers"),
                _literal(b"user-agent", b"pdserve-router"),
            )
        )
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW)
        transport.write(
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, _U32.pack(RECEIVE_WINDOW - DEFAULT_WINDOW))
            + _frame(HEADERS, END_HEADERS, STREAM, headers)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
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
            if now - self._last_heard > period and self._transport is not None:
                self._ping_sent = now
                self._transport.write(_frame(PING, 0, 0, b"pdserve!"))

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        """The call is over with ``code``; wakes whoever waits, closes the connection."""
        if self._status is not None:
            return
        self._status = (code, details)
        for waiter in (self._reader, self._writable):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()
        if not self._connected.done():
            self._connected.cancel()
        if self._transport is not None:
            self._transport.close()

    # -- sending ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Send what the windows allow, in frames the peer accepts."""
        transport = self._transport
        if transport is None or not self._outbox:
            return
        window = min(self._conn_window, self._stream_window)
        if window <= 0:
            return
        size = min(len(self._outbox), window)
        chunk = bytes(self._outbox[:size])
        del self._outbox[:size]
        self._conn_window -= size
        self._stream_window -= size
        step = self._max_frame
        if size <= step:
            transport.write(_frame(DATA, 0, STREAM, chunk))
        else:
            transport.write(
                b"".join(_frame(DATA, 0, STREAM, chunk[i : i + step]) for i in range(0, size, step))
            )
        if not self._outbox and self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- receiving -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._last_heard = time.monotonic()
        inbox = self._inbox
        inbox += data
        at = 0
        end = len(inbox)
        try:
            while end - at >= 9:
                length = int.from_bytes(inbox[at : at + 3], "big")
                if end - at < 9 + length:
                    break
                kind, flags = inbox[at + 3], inbox[at + 4]
                stream = _U32.unpack_from(inbox, at + 5)[0] & 0x7FFFFFFF
                payload = bytes(inbox[at + 9 : at + 9 + length])
                at += 9 + length
                self._on_frame(kind, flags, stream, payload)
                if self._status is not None:
                    break
        except Exception as exc:  # a protocol error: the connection cannot go on
            self._end(grpc.StatusCode.INTERNAL, f"bad HTTP/2 from {self.endpoint}: {exc!r}")
        del inbox[:at]
        if self._messages and self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == DATA:
            self._on_data(flags, payload)
        elif kind in (HEADERS, CONTINUATION):
            self._on_headers(kind, flags, payload)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif kind == PING:
            if flags & ACK:
                self._ping_sent = None
            elif self._transport is not None:
                self._transport.write(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
            if stream == 0:
                self._conn_window += increment
            else:
                self._stream_window += increment
            self._pump()
        elif kind == RST_STREAM:
            code = _U32.unpack(payload)[0]
            self._end(grpc.StatusCode.UNAVAILABLE, f"the worker reset the stream (HTTP/2 {code})")
        elif kind == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            if code != 0 or (last & 0x7FFFFFFF) < STREAM:
                debug = payload[8:].decode(errors="replace")
                self._end(grpc.StatusCode.UNAVAILABLE, f"the worker went away ({code}: {debug})")
            # A graceful GOAWAY that covers this stream lets it finish.

    def _on_settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                self._stream_window += value - self._peer_initial_window
                self._peer_initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self._max_frame = value
        if self._transport is not None:
            self._transport.write(_frame(SETTINGS, ACK, 0))
        self._pump()

    def _on_data(self, flags: int, payload: bytes) -> None:
        self._unacked += len(payload)
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        body = self._body
        body += payload
        at = 0
        while len(body) - at >= 5:
            size = _U32.unpack_from(body, at + 1)[0]
            if len(body) - at < 5 + size:
                break
            if body[at]:
                raise ValueError("compressed message (the router asks for none)")
            self._messages.append(self._parse(bytes(body[at + 5 : at + 5 + size])))
            at += 5 + size
        del body[:at]
        if self._unacked > RECEIVE_WINDOW // 2 and self._transport is not None:
            grant = _U32.pack(self._unacked)
            self._unacked = 0
            self._transport.write(
                _frame(WINDOW_UPDATE, 0, 0, grant) + _frame(WINDOW_UPDATE, 0, STREAM, grant)
            )
        if flags & END_STREAM:
            self._end(grpc.StatusCode.INTERNAL, "the stream ended without a grpc-status")

    def _on_headers(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == HEADERS:
            self._headers_end = bool(flags & END_STREAM)
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY:
                payload = payload[5:]
            self._headers = bytearray(payload)
        else:
            self._headers += payload
        if not flags & END_HEADERS:
            return
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in self._decoder.decode(bytes(self._headers))
        }
        self._headers = bytearray()
        status = fields.get(":status")
        if status is not None and status != "200":
            self._end(grpc.StatusCode.UNAVAILABLE, f"the worker answered HTTP {status}")
        elif "grpc-status" in fields:
            code = _CODES.get(int(fields["grpc-status"]), grpc.StatusCode.UNKNOWN)
            self._end(code, urllib.parse.unquote(fields.get("grpc-message", "")))
        elif self._headers_end:
            self._end(grpc.StatusCode.INTERNAL, "the stream ended without a grpc-status")
