"""gRPC over HTTP/2 (RFC 9113), hand-written: the wire under the router's session streams.

A session stream is one long-lived gRPC call carrying every request a router process sends one
worker. grpc.aio runs calls through gRPC core's threads, and each message crossing between a
polling thread and the event loop costs more CPU than the work it asks for (and about 150 µs
per round trip at low load). So both ends speak the protocol on the event loop, as two thin
ends on this module: the router's client (``router.client.grpc_stream``) and the workers'
listener (``worker.session_server``). Either still talks to any gRPC peer.

Why not a maintained library (issue 22): the router's sessions on ``grpclib`` (asyncio gRPC on
the ``h2`` library), measured in turns with this code (README, "Router alone"), did 12.7%
fewer requests/s at 32 connections (median 5,178 against 5,931; router CPU 138 against 125 µs
per request) and 34% fewer at 1 connection, past the 10% the issue accepts. So it stays, held
to the ``h2`` library as its peer with hypothesis: this module by
``tests/router/test_h2_peer.py``, the client by ``tests/router/test_grpc_stream_peer.py``, the
listener by ``tests/worker/test_session_server_peer.py``.

Here: frames, gRPC's header blocks, messages and status, and ``Connection``, what both ends
share: SETTINGS (the peer's frame size and initial window honoured), PING, flow control both
ways, header blocks decoded with HPACK (``hpack``; the ones it sends are literals). Subclasses
handle streams opening, messages, resets and GOAWAY.
"""

from __future__ import annotations

import asyncio
import struct
import urllib.parse
from collections.abc import Iterator
from typing import cast

import grpc
import hpack

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9,
)  # fmt: skip
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = (
    0x3, 0x4, 0x5,
)  # fmt: skip
NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, CANCEL = 0x0, 0x1, 0x7, 0x8
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RECEIVE_WINDOW = 1 << 24  # what we let the peer send ahead of our reading, per stream and in all
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
MAX_MESSAGE = 64 << 20  # a message past this fails its stream with RESOURCE_EXHAUSTED

U32 = struct.Struct(">I")
CODES = {code.value[0]: code for code in grpc.StatusCode}


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return U32.pack(len(payload))[1:] + bytes((kind, flags)) + U32.pack(stream) + payload


def goaway(last_stream: int, code: int) -> bytes:
    return frame(GOAWAY, 0, 0, U32.pack(last_stream) + U32.pack(code))


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


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def status_fields(code: grpc.StatusCode, details: str) -> bytes:
    """The ``grpc-status`` and ``grpc-message`` (percent-encoded, as gRPC asks) of a call."""
    fields = literal(b"grpc-status", str(code.value[0]).encode())
    if details:
        # Spaces too: HTTP/2 forbids a value that starts or ends with one (RFC 9113 §8.2.1).
        message = urllib.parse.quote(details, safe="!\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        fields += literal(b"grpc-message", message.encode())
    return fields


def status_of(fields: dict[str, str]) -> tuple[grpc.StatusCode, str]:
    code = CODES.get(int(fields["grpc-status"]), grpc.StatusCode.UNKNOWN)
    return code, urllib.parse.unquote(fields.get("grpc-message", ""))


# -- gRPC's header blocks (gRPC over HTTP/2: requests, responses, trailers) ------------------

RESPONSE_HEADERS = b"\x88" + literal(b"content-type", b"application/grpc")  # :status 200
NO_STATUS = "the stream ended without a grpc-status"


def request_headers(path: str, authority: str, metadata: dict[str, str]) -> bytes:
    """The header block that opens a call to ``path``, with ``metadata`` (ASCII)."""
    block = b"".join(
        (
            b"\x83\x86",  # :method POST, :scheme http (static table entries 3 and 6)
            literal(b":path", path.encode()),
            literal(b":authority", authority.encode()),
            literal(b"content-type", b"application/grpc"),
            literal(b"te", b"trailers"),
            literal(b"user-agent", b"pdserve-router"),
        )
    )
    return block + b"".join(literal(k.encode(), v.encode()) for k, v in metadata.items())


def is_grpc(fields: dict[str, str]) -> bool:
    """A request's header block asks for gRPC."""
    return fields.get("content-type", "").startswith("application/grpc")


def trailers(code: grpc.StatusCode, details: str, headers_sent: bool) -> bytes:
    """The header block that ends a call with ``code``; with the response headers before it
    when none were sent (gRPC's trailers-only answer)."""
    fields = status_fields(code, details)
    return fields if headers_sent else RESPONSE_HEADERS + fields


def response_status(fields: dict[str, str], end_stream: bool) -> tuple[grpc.StatusCode, str] | None:
    """What a header block from the server says of the call: how it ended (an answer that is
    not HTTP 200 is UNAVAILABLE, trailers carry ``grpc-status``), or None: it goes on."""
    status = fields.get(":status")
    if status is not None and status != "200":
        return grpc.StatusCode.UNAVAILABLE, f"the worker answered HTTP {status}"
    if "grpc-status" in fields:
        return status_of(fields)
    if end_stream:
        return grpc.StatusCode.INTERNAL, NO_STATUS
    return None


def message(payload: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return b"\x00" + U32.pack(len(payload)) + payload


class StreamError(Exception):
    """What ends one stream (not the connection) with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _cut_short(stream: Stream) -> StreamError:
    """The peer ended ``stream`` with part of a message unsent: not a clean end."""
    return StreamError(
        grpc.StatusCode.INTERNAL,
        f"the stream ended inside a message ({len(stream.body)} bytes of it received)",
    )


class Stream:
    """One stream's flow-control state and message buffers."""

    __slots__ = ("body", "closed", "id", "outbox", "unacked", "window", "writable")

    def __init__(self, stream_id: int, window: int) -> None:
        self.id = stream_id
        self.window = window  # what we may send on it
        self.outbox = bytearray()  # message bytes waiting for window
        self.body = bytearray()  # DATA payloads not yet whole messages
        self.unacked = 0  # bytes received since our last WINDOW_UPDATE for it
        self.writable: asyncio.Future[None] | None = None  # a writer waiting for window
        self.closed = False  # nothing more goes out on it

    def messages(self, payload: bytes) -> Iterator[bytes]:
        """The whole messages ``payload`` completes."""
        body = self.body
        body += payload
        at = 0
        try:
            while len(body) - at >= 5:
                size = U32.unpack_from(body, at + 1)[0]
                if size > MAX_MESSAGE:
                    raise StreamError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"message of {size} bytes is over the limit of {MAX_MESSAGE}",
                    )
                if len(body) - at < 5 + size:
                    break
                if body[at]:
                    raise StreamError(
                        grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not accepted"
                    )
                yield bytes(body[at + 5 : at + 5 + size])
                at += 5 + size
        finally:
            del body[:at]

    def wake_writer(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def close(self) -> None:
        """Send nothing more on it (the call is over, or the peer reset it): what waits in
        the outbox is dropped and a writer waiting for window returns."""
        self.closed = True
        del self.outbox[:]
        self.wake_writer()


class Connection(asyncio.Protocol):
    """One HTTP/2 connection's frames. Subclasses keep their streams in ``streams`` and
    implement the ``on_*`` hooks; ``data_received`` of a subclass that reads a preface first
    passes the rest here."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.peer_window = DEFAULT_WINDOW  # the peer's initial stream window
        self._conn_window = DEFAULT_WINDOW  # what we may send on the connection
        self._max_frame = DEFAULT_FRAME
        self._unacked = 0  # bytes received since our last connection WINDOW_UPDATE
        self._inbox = bytearray()
        self._header_block = bytearray()  # a header block awaiting its CONTINUATION frames
        self._header_stream = 0
        self._header_end_stream = False
        self._decoder = hpack.Decoder()

    # -- hooks -----------------------------------------------------------------------------

    def on_headers(self, stream_id: int, fields: dict[str, str], end_stream: bool) -> None:
        raise NotImplementedError

    def on_message(self, stream: Stream, payload: bytes) -> None:
        raise NotImplementedError

    def on_end_stream(self, stream: Stream) -> None:
        """The peer sent END_STREAM on a DATA frame."""
        raise NotImplementedError

    def on_stream_error(self, stream: Stream, error: StreamError) -> None:
        raise NotImplementedError

    def on_reset(self, stream_id: int, code: int) -> None:
        raise NotImplementedError

    def on_goaway(self, last_stream: int, code: int, debug: str) -> None:
        raise NotImplementedError

    def on_ping_ack(self) -> None:
        pass

    def on_protocol_error(self, exc: Exception) -> None:
        """A frame that cannot be read: the connection cannot go on."""
        raise NotImplementedError

    # -- sending ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def settings(self, *pairs: tuple[int, int]) -> bytes:
        """Our SETTINGS (with a large initial window) and the connection's window raised to
        match, as one write."""
        body = b"".join(struct.pack(">HI", k, v) for k, v in pairs)
        body += struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW)
        grant = U32.pack(RECEIVE_WINDOW - DEFAULT_WINDOW)
        return frame(SETTINGS, 0, 0, body) + frame(WINDOW_UPDATE, 0, 0, grant)

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def headers(self, stream_id: int, block: bytes, end_stream: bool = False) -> bytes:
        """The frames of one header block: HEADERS, then CONTINUATION frames for what passes
        the peer's frame size (a long ``grpc-message`` does)."""
        step = self._max_frame
        flags = END_STREAM if end_stream else 0
        if len(block) <= step:
            return frame(HEADERS, flags | END_HEADERS, stream_id, block)
        pieces = [block[i : i + step] for i in range(0, len(block), step)]
        last = len(pieces) - 1
        return frame(HEADERS, flags, stream_id, pieces[0]) + b"".join(
            frame(CONTINUATION, END_HEADERS if i == last else 0, stream_id, piece)
            for i, piece in enumerate(pieces[1:], 1)
        )

    def reset(self, stream_id: int, code: int) -> None:
        self.send(frame(RST_STREAM, 0, stream_id, U32.pack(code)))

    def queue(self, stream: Stream, payload: bytes) -> None:
        """Send one message on ``stream`` as far as the windows allow; the rest waits in its
        outbox (``writable`` wakes once it is empty)."""
        stream.outbox += message(payload)
        self.pump(stream)

    async def send_message(self, stream: Stream, payload: bytes) -> None:
        """Send one message on ``stream``; returns once the windows let it all out, or the
        stream is closed."""
        self.queue(stream, payload)
        while stream.outbox and not stream.closed:
            stream.writable = asyncio.get_running_loop().create_future()
            await stream.writable

    def pump(self, stream: Stream) -> None:
        """Send what the windows allow of ``stream``'s outbox, in frames the peer accepts."""
        transport = self.transport
        outbox = stream.outbox
        if transport is None or not outbox:
            return
        size = min(len(outbox), self._conn_window, stream.window)
        if size <= 0:
            return
        chunk = bytes(outbox[:size])
        del outbox[:size]
        self._conn_window -= size
        stream.window -= size
        step = self._max_frame
        if size <= step:
            transport.write(frame(DATA, 0, stream.id, chunk))
        else:
            transport.write(
                b"".join(
                    frame(DATA, 0, stream.id, chunk[i : i + step]) for i in range(0, size, step)
                )
            )
        if not outbox:
            stream.wake_writer()

    def _pump_all(self) -> None:
        for stream in list(self.streams.values()):
            self.pump(stream)

    # -- receiving -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        inbox = self._inbox
        inbox += data
        at = 0
        end = len(inbox)
        try:
            while end - at >= 9 and self.transport is not None:
                length = int.from_bytes(inbox[at : at + 3], "big")
                if length > DEFAULT_FRAME:  # the largest we accept: we never raise it
                    raise ValueError(f"a frame of {length} bytes (at most {DEFAULT_FRAME})")
                if end - at < 9 + length:
                    break
                kind, flags = inbox[at + 3], inbox[at + 4]
                stream = U32.unpack_from(inbox, at + 5)[0] & 0x7FFFFFFF
                payload = bytes(inbox[at + 9 : at + 9 + length])
                at += 9 + length
                self._on_frame(kind, flags, stream, payload)
        except Exception as exc:
            self.on_protocol_error(exc)
        del inbox[:at]

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind in (HEADERS, CONTINUATION):
            self._on_headers(kind, flags, stream_id, payload)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif kind == PING:
            if flags & ACK:
                self.on_ping_ack()
            else:
                self.send(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = U32.unpack(payload)[0] & 0x7FFFFFFF
            if stream_id == 0:
                self._conn_window += increment
                self._pump_all()
            else:
                stream = self.streams.get(stream_id)
                if stream is not None:
                    stream.window += increment
                    self.pump(stream)
        elif kind == RST_STREAM:
            self.on_reset(stream_id, U32.unpack(payload)[0])
        elif kind == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.on_goaway(last & 0x7FFFFFFF, code, payload[8:].decode(errors="replace"))
        # PRIORITY, PUSH_PROMISE and unknown frame types are ignored (RFC 9113 §4.1, §5.5).

    def _on_settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                for stream in self.streams.values():
                    stream.window += value - self.peer_window
                self.peer_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self._max_frame = value
        self.send(frame(SETTINGS, ACK, 0))
        self._pump_all()

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        received = len(payload)
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        grants = b""
        self._unacked += received
        if self._unacked > RECEIVE_WINDOW // 2:
            grants = frame(WINDOW_UPDATE, 0, 0, U32.pack(self._unacked))
            self._unacked = 0
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.unacked += received
            if stream.unacked > RECEIVE_WINDOW // 2 and not flags & END_STREAM:
                grants += frame(WINDOW_UPDATE, 0, stream_id, U32.pack(stream.unacked))
                stream.unacked = 0
        if grants:
            self.send(grants)
        if stream is None:
            return  # a stream we reset or ended: its bytes still count for the connection
        try:
            for msg in stream.messages(payload):
                self.on_message(stream, msg)
        except StreamError as exc:
            self.on_stream_error(stream, exc)
            return
        if flags & END_STREAM:
            if stream.body:
                self.on_stream_error(stream, _cut_short(stream))
            else:
                self.on_end_stream(stream)

    def _on_headers(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == HEADERS:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY:
                payload = payload[5:]
            self._header_block = bytearray(payload)
            self._header_stream = stream_id
            self._header_end_stream = bool(flags & END_STREAM)
        else:
            self._header_block += payload
        if not flags & END_HEADERS:
            return
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in self._decoder.decode(bytes(self._header_block))
        }
        self._header_block = bytearray()
        stream = self.streams.get(self._header_stream)
        if self._header_end_stream and stream is not None and stream.body:
            self.on_stream_error(stream, _cut_short(stream))  # trailers inside a message
            return
        self.on_headers(self._header_stream, fields, self._header_end_stream)
