"""The ``h2`` library, a maintained HTTP/2 stack, as the peer of the hand-written gRPC ends on a
loopback socket: what ``tests/router/test_grpc_stream_peer.py`` (an ``h2`` server against
``router.client.grpc_stream``) and ``tests/worker/test_session_server_peer.py`` (an ``h2``
client against ``worker.session_server``) share.

The gRPC framing here (length prefixes, ``grpc-message`` percent-encoding) is written from the
gRPC over HTTP/2 specification, not taken from ``protos.h2``, so that the two are checked
against each other rather than against themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hypothesis import strategies as st

PATH = "/pdserve.Decode/Session"
GRPC_REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", PATH),
    (":authority", "worker"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


class Raw:
    """A message already serialized: what the hand-written ends send when given bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # protobuf's name
        return self.data


def framed(payloads: list[bytes]) -> bytes:
    """Length-prefixed, uncompressed gRPC messages."""
    return b"".join(b"\x00" + struct.pack(">I", len(p)) + p for p in payloads)


def whole_messages(body: bytes) -> list[bytes]:
    """The complete messages at the start of ``body`` (a partial one at its end left out)."""
    out, at = [], 0
    while len(body) - at >= 5:
        flag, size = body[at], struct.unpack_from(">I", body, at + 1)[0]
        if flag != 0:
            raise AssertionError(f"a message with compression flag {flag}")
        if len(body) - at - 5 < size:
            break
        out.append(body[at + 5 : at + 5 + size])
        at += 5 + size
    return out


def inside_a_message(payloads: list[bytes], pick: int) -> int:
    """An offset into ``framed(payloads)`` that falls strictly inside a message (not on a
    boundary), chosen by ``pick``; the messages before it are whole."""
    starts = set(itertools.accumulate((5 + len(p) for p in payloads), initial=0))
    inner = [i for i in range(1, len(framed(payloads))) if i not in starts]
    return inner[pick % len(inner)]


def percent_encode(text: str) -> str:
    """``grpc-message`` as the specification asks: UTF-8 bytes outside 0x20..0x7E, and ``%``,
    as ``%XX``; spaces too, since ``h2`` refuses a value with whitespace at either end."""
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode()
    )


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` in pieces at the offsets ``cuts`` (taken modulo its length)."""
    if not data:
        return []
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def in_steps(value: int, total: int, steps: int, most: int) -> int:
    """``value`` raised, if need be, so that ``total`` bytes go in about ``steps`` windows or
    frames of it (a window of 1 byte for 300 KB is 300,000 round trips), and at most ``most``."""
    return min(max(value, total // steps), most)


class Peer:
    """One ``h2`` connection on a socket. What it sends goes out in the pieces ``cuts``
    chooses, the event loop turning between them so that the other end reads them apart;
    what it receives comes back as ``h2`` events. It grants flow-control window (stream and
    connection alike) once ``grant_at`` bytes have come in since the last grant."""

    def __init__(
        self,
        client_side: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cuts: list[int],
        grant_at: int,
    ) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        )
        self.reader = reader
        self.writer = writer
        self.cuts = cuts
        self.grant_at = grant_at
        self._pending = 0  # bytes received since the last grant

    async def flush(self) -> None:
        for piece in cut(self.conn.data_to_send(), self.cuts):
            self.writer.write(piece)
            await self.writer.drain()
            for _ in range(2):  # one turn for the write, one for the other end's read
                await asyncio.sleep(0)

    async def receive(self) -> list[h2.events.Event] | None:
        """The events of the next read; None once the other end closed."""
        data = await self.reader.read(1 << 16)
        if not data:
            return None
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._received(event)
        return events

    def _received(self, event: h2.events.DataReceived) -> None:
        self._pending += event.flow_controlled_length
        if self._pending >= self.grant_at:
            self.conn.increment_flow_control_window(self._pending)
            if event.stream_id in self.conn.streams and not event.stream_ended:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.increment_flow_control_window(self._pending, event.stream_id)
            self._pending = 0

    def send_body(
        self, stream_id: int, out: bytearray, frame_sizes: list[int], pad: int | None
    ) -> None:
        """Send what the windows and the frame size allow of ``out`` (taken from it), in DATA
        frames of ``frame_sizes`` in turn, each padded with ``pad`` bytes where it fits."""
        conn = self.conn
        for size in itertools.cycle(frame_sizes):
            room = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            padding = pad if pad is not None and room > pad + 1 else None
            n = min(size, len(out), room - (0 if padding is None else padding + 1))
            if n <= 0:
                return
            conn.send_data(stream_id, bytes(out[:n]), pad_length=padding)
            del out[:n]

    async def close(self) -> None:
        """Half-close (FIN, so nothing in flight is lost), wait for the other end to close."""
        if self.writer.can_write_eof():
            self.writer.write_eof()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.reader.read(), 5)
        self.writer.close()


# -- strategies --------------------------------------------------------------------------------


def _payload(size: int, seed: bytes) -> bytes:
    return (seed * (size // len(seed) + 1))[:size]


# Messages of 0 bytes, a few, and past one frame (16 KiB) and one default window (64 KiB).
payload = st.builds(
    _payload,
    st.one_of(st.just(0), st.integers(1, 300), st.integers(16_000, 70_000)),
    st.binary(min_size=1, max_size=16),
)
payloads = st.lists(payload, max_size=5)
cuts = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=10)
frame_sizes = st.lists(st.integers(min_value=1, max_value=1 << 14), min_size=1, max_size=4)
padding = st.none() | st.integers(min_value=0, max_value=255)
header_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=2000
).map(str.strip)  # h2 refuses values with whitespace at either end
metadata = st.lists(
    st.tuples(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20).map(
            lambda k: "x-" + k
        ),
        header_value,
    ),
    max_size=10,
)
# A grpc-message of any few characters, or a long one: past a frame (16 KiB), short of the
# header list hpack accepts by default (64 KiB).
status_message = st.text(max_size=300) | st.builds(
    lambda n, seed: (seed * n)[:n],
    st.integers(17_000, 30_000),
    st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="%"),
        min_size=1,
        max_size=4,
    ),
)
token = st.none() | st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64
)


def apply_settings_once(conn: h2.connection.H2Connection, window: int, max_frame: int) -> None:
    """The peer's window and frame size, sent once its first SETTINGS is acknowledged: h2
    applies the values of a second SETTINGS still in flight at the first ACK. The larger
    frame size is accepted from now on (RFC 9113 §6.5.3: the other end may use it as soon as
    it has the SETTINGS); h2 waits for the ACK, and under load read the ACK and a frame of
    the new size in an order that made it refuse the frame."""
    conn.update_settings(
        {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
        }
    )
    conn.max_inbound_frame_size = max(conn.max_inbound_frame_size, max_frame)
    conn.incoming_buffer.max_frame_size = conn.max_inbound_frame_size
