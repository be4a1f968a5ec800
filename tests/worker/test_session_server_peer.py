"""The workers' session listener (``worker.session_server``) called by a gRPC client built on the
``h2`` library, a maintained HTTP/2 stack, over a loopback socket, with hypothesis choosing the
messages both ways (empty ones, and ones past a frame), the client's metadata and cluster
token, its SETTINGS (initial window, frame size), how its bytes are cut into the listener's
reads, when it grants window, padding, priority, PING, and how the handler ends (any
``grpc-status`` and message); and a client that resets the stream, closes the connection,
half-closes or sends trailers in the middle of a message, or sends a compressed one, which
the listener must report (a status, or its handler cancelled), not hang on.

``session_server`` stays hand-written because grpclib measured 12-34% slower on the router's
hot path (README, "Router alone"); this is what holds it to a maintained peer. The ``h2``
library raises on anything it would not accept (a window or frame size passed, a bad header
block).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import grpc
import h2.errors
import h2.events
import h2.settings
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protos import cluster_token
from protos import h2 as ours
from tests import h2_peer
from tests.h2_peer import (
    GRPC_REQUEST_HEADERS,
    PATH,
    Peer,
    Raw,
    apply_settings_once,
    framed,
    in_steps,
    inside_a_message,
    whole_messages,
)
from worker.session_server import Method, SessionServer

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # "explain" reruns a lot
)
TIMEOUT_S = 10.0  # per example: a hang fails it
SERVER_TOKEN = "s3cret"


@dataclass
class Case:
    """What the ``h2`` client sends and does, and what the handler answers."""

    requests: list[bytes]
    replies: list[bytes]
    token: str | None = None  # what the client sends; the listener wants SERVER_TOKEN if set
    server_token: bool = False
    metadata: list[tuple[str, str]] = field(default_factory=list)
    window: int = 65_535
    max_frame: int = 1 << 14
    grant_at: int = 1
    frame_sizes: list[int] = field(default_factory=lambda: [1 << 14])
    pad: int | None = None
    priority: bool = False
    cuts: list[int] = field(default_factory=list)
    reply_after: int = 0  # requests the handler reads before it replies
    ping: bool = False
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    failure: str | None = None  # reset, close, end_stream, trailers, compressed
    fail_at: int = 0  # an offset inside a request message


@dataclass
class Seen:
    """What the ``h2`` client saw."""

    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    ping_acked: bool = False

    def status(self) -> tuple[grpc.StatusCode, str]:
        fields = self.trailers or self.headers  # trailers only: the status is in the headers
        code = next(c for c in grpc.StatusCode if c.value[0] == int(fields["grpc-status"]))
        return code, urllib.parse.unquote(fields.get("grpc-message", ""))


class Handler:
    """A session method's handler: records the requests, yields the replies once it has
    read ``reply_after`` of them (or all), and ends with the case's status."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.requests: list[bytes] = []
        self.started = False
        self.outcome: str | None = None  # returned, raised, cancelled
        self.done = asyncio.Event()

    async def __call__(self, messages: AsyncIterator[bytes]) -> AsyncGenerator[Raw, None]:
        self.started = True
        case = self.case
        replied = False
        try:
            if case.reply_after == 0:
                replied = True
                for reply in case.replies:
                    yield Raw(reply)
            async for message in messages:
                self.requests.append(message)
                if not replied and len(self.requests) >= case.reply_after:
                    replied = True
                    for reply in case.replies:
                        yield Raw(reply)
            if not replied:
                for reply in case.replies:
                    yield Raw(reply)
            if case.code is not grpc.StatusCode.OK:
                self.outcome = "raised"
                raise ours.StreamError(case.code, case.details)
            self.outcome = "returned"
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        finally:
            self.done.set()


async def _client(peer: Peer, case: Case, seen: Seen) -> None:
    conn = peer.conn
    conn.initiate_connection()
    if case.ping:
        conn.ping(b"h2-peer!")
    sid = conn.get_next_available_stream_id()
    headers = GRPC_REQUEST_HEADERS + case.metadata
    if case.token is not None:
        headers = [*headers, (cluster_token.METADATA_KEY, case.token)]
    priority = {"priority_weight": 200, "priority_depends_on": 0} if case.priority else {}
    conn.send_headers(sid, headers, **priority)  # type: ignore[arg-type]
    out = bytearray(framed(case.requests))
    if case.failure == "compressed":
        out[0] = 1
    elif case.failure is not None:
        del out[case.fail_at :]
    half_closed = settled = False
    while True:
        if not seen.ended:
            peer.send_body(sid, out, case.frame_sizes, case.pad)
            if not out and not half_closed:
                half_closed = True
                if case.failure == "reset":
                    conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                elif case.failure == "close":
                    await peer.flush()
                    await peer.close()
                    return
                elif case.failure == "trailers":
                    conn.send_headers(sid, [("x-trailer", "1")], end_stream=True)
                else:
                    conn.end_stream(sid)
        await peer.flush()
        if case.failure == "reset" and half_closed:
            return
        if seen.ended and (seen.ping_acked or not case.ping):
            break
        events = await peer.receive()
        if events is None:
            break
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                seen.headers = {str(k): str(v) for k, v in event.headers}
            elif isinstance(event, h2.events.TrailersReceived):
                seen.trailers = {str(k): str(v) for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                seen.body += event.data
            elif isinstance(event, h2.events.StreamEnded):
                seen.ended = True
            elif isinstance(event, h2.events.StreamReset):
                raise AssertionError(f"the listener reset the stream ({event.error_code})")
            elif isinstance(event, h2.events.PingAckReceived):
                seen.ping_acked = True
            elif isinstance(event, h2.events.SettingsAcknowledged) and not settled:
                apply_settings_once(conn, case.window, case.max_frame)
                settled = True


async def _settled(server: SessionServer, handler: Handler) -> None:
    """Until the listener holds no stream (a call it forgot would stay there until the
    connection closed) and the handler, if it started, has ended."""
    while (handler.started and not handler.done.is_set()) or any(
        c.streams for c in server.connections
    ):
        await asyncio.sleep(0.005)


def _run(case: Case) -> tuple[Seen, Handler]:
    """The call to the listener, bounded in time; returns once the listener is done with it."""

    async def body() -> tuple[Seen, Handler]:
        handler = Handler(case)
        server = SessionServer(token=SERVER_TOKEN if case.server_token else None)
        port = await server.bind("127.0.0.1", 0)
        server.add(PATH, Method(bytes, handler))
        await server.start()
        seen = Seen()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            peer = Peer(True, reader, writer, case.cuts, case.grant_at)
            try:
                await _client(peer, case, seen)
                await _settled(server, handler)  # the connection still open, but for "close"
                await peer.close()
            finally:
                writer.close()
        finally:
            await server.stop()
        return seen, handler

    return asyncio.run(asyncio.wait_for(body(), TIMEOUT_S))


@SETTINGS
@given(
    requests=h2_peer.payloads,
    replies=h2_peer.payloads,
    token=h2_peer.token,
    token_mode=st.sampled_from(["none", "right", "wrong"]),
    metadata=h2_peer.metadata,
    window=st.integers(min_value=1, max_value=65_535),
    max_frame=st.integers(min_value=1 << 14, max_value=(1 << 24) - 1),
    grant_fraction=st.floats(min_value=0.0, max_value=1.0),
    frame_sizes=h2_peer.frame_sizes,
    pad=h2_peer.padding,
    priority=st.booleans(),
    cuts=h2_peer.cuts,
    reply_after=st.integers(min_value=0, max_value=5),
    ping=st.booleans(),
    code=st.sampled_from(list(grpc.StatusCode)),
    details=h2_peer.status_message,
)
def test_every_message_and_the_status_arrive(
    requests: list[bytes],
    replies: list[bytes],
    token: str | None,
    token_mode: str,
    metadata: list[tuple[str, str]],
    window: int,
    max_frame: int,
    grant_fraction: float,
    frame_sizes: list[int],
    pad: int | None,
    priority: bool,
    cuts: list[int],
    reply_after: int,
    ping: bool,
    code: grpc.StatusCode,
    details: str,
) -> None:
    """Requests reach the handler whole and in order; replies reach the client within its
    windows and frame size, then trailers with the handler's status (any code, any message);
    a call without the cluster token gets UNAUTHENTICATED and never reaches the handler."""
    if token_mode == "right":
        token = SERVER_TOKEN
    elif token_mode == "wrong" and token == SERVER_TOKEN:
        token = None
    window = in_steps(window, len(framed(replies)), 64, 65_535)
    case = Case(
        requests,
        replies,
        token=token,
        server_token=token_mode != "none",
        metadata=metadata,
        window=window,
        max_frame=max_frame,
        grant_at=max(1, int(window * grant_fraction)),  # at most the window: never stuck
        frame_sizes=[in_steps(f, len(framed(requests)), 256, 1 << 14) for f in frame_sizes],
        pad=pad,
        priority=priority,
        cuts=cuts,
        reply_after=reply_after,
        ping=ping,
        code=code,
        details=details,
    )
    seen, handler = _run(case)
    assert seen.ended and seen.headers[":status"] == "200"
    assert seen.headers["content-type"].startswith("application/grpc")
    assert seen.ping_acked == ping
    if token_mode == "wrong":
        assert not handler.started
        assert seen.status() == (grpc.StatusCode.UNAUTHENTICATED, cluster_token.REFUSED)
        return
    assert handler.requests == requests
    assert handler.outcome == ("returned" if code is grpc.StatusCode.OK else "raised")
    assert whole_messages(bytes(seen.body)) == replies
    assert len(seen.body) == len(framed(replies))
    assert seen.status() == (code, "" if code is grpc.StatusCode.OK else details)


@SETTINGS
@given(
    requests=h2_peer.payloads.filter(bool),
    replies=h2_peer.payloads,
    frame_sizes=h2_peer.frame_sizes,
    cuts=h2_peer.cuts,
    reply_after=st.integers(min_value=0, max_value=5),
    failure=st.sampled_from(["reset", "close", "end_stream", "trailers", "compressed"]),
    pick=st.integers(min_value=0),
)
def test_a_client_that_breaks_off_ends_its_call(
    requests: list[bytes],
    replies: list[bytes],
    frame_sizes: list[int],
    cuts: list[int],
    reply_after: int,
    failure: str,
    pick: int,
) -> None:
    """A reset or a closed connection in the middle of a message cancels the handler (if it
    had started) and leaves nothing of the call behind; a half-close or trailers in the
    middle of a message, or a compressed message, end the call with a status (INTERNAL,
    UNIMPLEMENTED), never as if the requests were whole."""
    case = Case(
        requests,
        replies,
        frame_sizes=[in_steps(f, len(framed(requests)), 256, 1 << 14) for f in frame_sizes],
        cuts=cuts,
        reply_after=reply_after,
        failure=failure,
        fail_at=inside_a_message(requests, pick),
    )
    seen, handler = _run(case)
    assert handler.outcome in (None, "cancelled"), handler.outcome
    whole = whole_messages(framed(requests)[: case.fail_at])
    assert handler.requests == whole[: len(handler.requests)]
    if failure in ("reset", "close"):
        return  # _run returned: the listener let go of the call
    assert seen.ended
    code = grpc.StatusCode.UNIMPLEMENTED if failure == "compressed" else grpc.StatusCode.INTERNAL
    assert seen.status()[0] is code, seen.status()


def test_requests_past_the_listeners_receive_window() -> None:
    """Requests larger than the window the listener grants at first (16 MiB): it must grant
    more as it reads, or the call stalls."""
    big = bytes(range(256)) * ((ours.RECEIVE_WINDOW + (1 << 20)) // 256)
    seen, handler = _run(Case([big, b"after"], [b"done"], reply_after=2))
    assert handler.requests == [big, b"after"] and handler.outcome == "returned"
    assert whole_messages(bytes(seen.body)) == [b"done"]
    assert seen.status() == (grpc.StatusCode.OK, "")
