"""The hand-written HTTP/2 layer (``protos/h2.py``) against a maintained HTTP/2 stack, the
``h2`` library, as its peer, with hypothesis choosing the messages, the metadata, the peer's
windows and frame size, how the bytes are cut into reads, and when the peer grants window.

``protos/h2.py`` stays hand-written because the maintained stacks measured slower on the
router's hot path (README, "Router alone"); these tests hold it to what the library accepts
and sends: frames, header blocks (CONTINUATION included), flow control both ways, PING, and
the ``grpc-status`` trailers. Bytes travel in memory (``Wire``), both stacks sans-IO.
"""

from __future__ import annotations

import itertools
import struct
import urllib.parse
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import h2 as ours

GRPC_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/pdserve.Decode/Session"),
    (":authority", "worker"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


class Wire:
    """The transport ``protos.h2.Connection`` writes to: bytes kept for the peer."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def take(self) -> bytes:
        data, self.out = bytes(self.out), bytearray()
        return data


class Ours(ours.Connection):
    """Our end of the connection, recording what it sees; a stream opens on its HEADERS."""

    def __init__(self) -> None:
        super().__init__()
        self.wire = Wire()
        self.connection_made(self.wire)  # type: ignore[arg-type]
        self.seen: list[tuple[Any, ...]] = []

    def on_headers(self, stream_id: int, fields: dict[str, str], end_stream: bool) -> None:
        if stream_id not in self.streams:
            self.streams[stream_id] = ours.Stream(stream_id, self.peer_window)
        self.seen.append(("headers", stream_id, fields, end_stream))

    def on_message(self, stream: ours.Stream, payload: bytes) -> None:
        self.seen.append(("message", stream.id, payload))

    def on_end_stream(self, stream: ours.Stream) -> None:
        self.seen.append(("end", stream.id))

    def on_stream_error(self, stream: ours.Stream, error: ours.StreamError) -> None:
        raise AssertionError(f"stream {stream.id} failed: {error.code} {error.details}")

    def on_reset(self, stream_id: int, code: int) -> None:
        self.seen.append(("reset", stream_id, code))

    def on_goaway(self, last_stream: int, code: int, debug: str) -> None:
        self.seen.append(("goaway", last_stream, code))

    def on_ping_ack(self) -> None:
        self.seen.append(("ping_ack",))

    def on_protocol_error(self, exc: Exception) -> None:
        raise AssertionError(f"protos.h2 could not read the peer's frames: {exc!r}")


def _client(window: int | None = None, max_frame: int | None = None) -> h2.connection.H2Connection:
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    peer.initiate_connection()
    changes: dict[h2.settings.SettingCodes | int, int] = {}
    if window is not None:
        changes[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = window
    if max_frame is not None:
        changes[h2.settings.SettingCodes.MAX_FRAME_SIZE] = max_frame
    if changes:
        peer.update_settings(changes)
    return peer


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` in pieces at the offsets ``cuts`` (taken modulo its length): TCP reads."""
    if not data:
        return []
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _to_ours(conn: Ours, data: bytes, cuts: list[int]) -> None:
    for piece in _cut(data, cuts):
        conn.data_received(piece)


def _to_peer(peer: h2.connection.H2Connection, data: bytes, cuts: list[int]) -> list[Any]:
    events: list[Any] = []
    for piece in _cut(data, cuts):
        events += peer.receive_data(piece)
    return events


def _connect(peer: h2.connection.H2Connection, conn: Ours, cuts: list[int]) -> list[Any]:
    """The preface and both SETTINGS exchanged (``protos.h2``'s server reads the preface)."""
    hello = peer.data_to_send()
    assert hello.startswith(ours.PREFACE)
    conn.send(conn.settings())
    _to_ours(conn, hello[len(ours.PREFACE) :], cuts)
    return _to_peer(peer, conn.wire.take(), cuts)


def _grpc_messages(data: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        flag, size = data[at], struct.unpack_from(">I", data, at + 1)[0]
        assert flag == 0
        out.append(data[at + 5 : at + 5 + size])
        at += 5 + size
    assert at == len(data)
    return out


messages = st.lists(st.binary(max_size=40_000), min_size=1, max_size=6)
cuts = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=12)
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=3000
).map(str.strip)  # h2 refuses values with surrounding whitespace
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    payloads=messages,
    metadata=st.lists(header_text, max_size=12),
    frame_sizes=st.lists(st.integers(min_value=1, max_value=1 << 14), min_size=1, max_size=8),
    read_cuts=cuts,
)
def test_reads_what_h2_sends(
    payloads: list[bytes], metadata: list[str], frame_sizes: list[int], read_cuts: list[int]
) -> None:
    """A request stream from h2 (long header blocks go in CONTINUATION frames, DATA frames of
    any size, a PING) arrives whole and in order; what we answer h2 accepts."""
    peer, conn = _client(), Ours()
    _connect(peer, conn, read_cuts)
    sid = peer.get_next_available_stream_id()
    extra = [(f"x-meta-{i}", v) for i, v in enumerate(metadata)]
    peer.send_headers(sid, GRPC_HEADERS + extra)
    body = b"".join(ours.message(p) for p in payloads)
    at, i = 0, 0
    while at < len(body):
        size = min(frame_sizes[i % len(frame_sizes)], len(body) - at)
        assert size <= peer.local_flow_control_window(sid), "our window is 16 MiB"
        peer.send_data(sid, body[at : at + size])
        at += size
        i += 1
    peer.end_stream(sid)
    peer.ping(b"pdserve!")
    _to_ours(conn, peer.data_to_send(), read_cuts)
    events = _to_peer(peer, conn.wire.take(), read_cuts)
    assert any(isinstance(e, h2.events.PingAckReceived) for e in events)
    kinds = [s[0] for s in conn.seen]
    assert kinds == ["headers"] + ["message"] * len(payloads) + ["end"]
    fields = conn.seen[0][2]
    assert fields[":path"] == "/pdserve.Decode/Session"
    assert all(fields[k] == v for k, v in extra)
    assert [s[2] for s in conn.seen[1:-1]] == payloads


@SETTINGS
@given(
    payloads=messages,
    window=st.integers(min_value=1, max_value=65_535),
    max_frame=st.integers(min_value=1 << 14, max_value=(1 << 24) - 1),
    ack_every=st.integers(min_value=1, max_value=5),
    read_cuts=cuts,
    code=st.sampled_from(list(grpc.StatusCode)),
    details=st.text(max_size=200),
)
def test_sends_within_the_windows_h2_grants(
    payloads: list[bytes],
    window: int,
    max_frame: int,
    ack_every: int,
    read_cuts: list[int],
    code: grpc.StatusCode,
    details: str,
) -> None:
    """Replies to a peer with a small stream window (and the connection's 65,535 bytes) wait
    for its WINDOW_UPDATEs and never pass a window or its frame size (h2 raises on either);
    the trailers carry the status and the percent-encoded message."""
    peer, conn = _client(window, max_frame), Ours()
    _connect(peer, conn, read_cuts)
    sid = peer.get_next_available_stream_id()
    peer.send_headers(sid, GRPC_HEADERS)
    _to_ours(conn, peer.data_to_send(), read_cuts)
    _to_peer(peer, conn.wire.take(), read_cuts)  # the ACK of the peer's SETTINGS
    head = ours.literal(b":status", b"200") + ours.literal(b"content-type", b"application/grpc")
    conn.send(ours.frame(ours.HEADERS, ours.END_HEADERS, sid, head))
    stream = conn.streams[sid]
    for p in payloads:
        conn.queue(stream, p)
    received = bytearray()
    trailers: dict[str, str] | None = None
    ended = False
    pending = 0  # bytes read but not yet granted back
    total = sum(5 + len(p) for p in payloads)
    sent_trailers = False
    for _ in range(100_000):
        if not sent_trailers and not stream.outbox and len(received) == total:
            sent_trailers = True
            conn.send(
                ours.frame(
                    ours.HEADERS,
                    ours.END_HEADERS | ours.END_STREAM,
                    sid,
                    ours.status_fields(code, details),
                )
            )
        data = conn.wire.take()
        for event in _to_peer(peer, data, read_cuts):
            if isinstance(event, h2.events.DataReceived):
                received += event.data
                pending += event.flow_controlled_length
            elif isinstance(event, h2.events.TrailersReceived):
                trailers = {str(k): str(v) for k, v in event.headers}
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
        if pending and (pending >= ack_every or not data):
            peer.acknowledge_received_data(pending, sid)
            pending = 0
        grants = peer.data_to_send()
        if grants:
            _to_ours(conn, grants, read_cuts)
        if ended:
            break
        if not data and not grants and not pending:
            raise AssertionError(
                f"stuck: {len(stream.outbox)} bytes waiting, stream window {stream.window}"
            )
    assert ended and trailers is not None
    assert _grpc_messages(bytes(received)) == payloads
    assert trailers["grpc-status"] == str(code.value[0])
    assert urllib.parse.unquote(trailers.get("grpc-message", "")) == details
    assert ours.status_of(trailers) == (code, details)
