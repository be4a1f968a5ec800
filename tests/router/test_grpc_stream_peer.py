"""The router's session client (``router.client.grpc_stream``) against a gRPC server built on the
``h2`` library, a maintained HTTP/2 stack, over a loopback socket, with hypothesis choosing the
messages both ways (empty ones, and ones past a frame), the server's metadata, its SETTINGS
(initial window, frame size), how its bytes are cut into the client's reads, when it grants
window, padding, PING, and how the call ends: trailers with any ``grpc-status`` and
``grpc-message``, trailers only, or a reset, a closed connection, a GOAWAY, trailers or
END_STREAM in the middle of a message, which the client must report as an error, not a hang.

``grpc_stream`` stays hand-written because grpclib measured 12-34% slower on the router's hot
path (README, "Router alone"); this is what holds it to a maintained peer. The ``h2`` library
raises on anything it would not accept (a window or frame size passed, a bad header block).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import h2.errors
import h2.events
import h2.settings
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protos import cluster_token
from protos import h2 as ours
from router.client.grpc_stream import StreamCall
from tests import h2_peer
from tests.h2_peer import (
    PATH,
    Peer,
    Raw,
    apply_settings_once,
    framed,
    in_steps,
    inside_a_message,
    whole_messages,
)

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # "explain" reruns a lot
)
TIMEOUT_S = 10.0  # per example: a hang fails it


@dataclass
class Case:
    """What the client sends, and what the ``h2`` server does."""

    requests: list[bytes]
    replies: list[bytes]
    token: str | None = None
    metadata: list[tuple[str, str]] = field(default_factory=list)
    trailing_metadata: list[tuple[str, str]] = field(default_factory=list)
    window: int = 65_535
    max_frame: int = 1 << 14
    grant_at: int = 1
    frame_sizes: list[int] = field(default_factory=lambda: [1 << 14])
    pad: int | None = None
    cuts: list[int] = field(default_factory=list)
    reply_after: int = 0  # requests received before the server starts replying
    trailers_only: bool = False  # no replies: one HEADERS with the status
    ping: bool = False
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    failure: str | None = None  # reset, close, goaway, trailers, end_stream, http_503
    fail_on_requests: bool = False  # fail while receiving the requests, not the replies
    fail_at: int = 0  # an offset inside a message of the side that fails


@dataclass
class Seen:
    """What the ``h2`` server saw."""

    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ping_acked: bool = False


@dataclass
class Outcome:
    """What the client saw: the replies, and the error that ended the call (None: EOF)."""

    replies: list[bytes]
    error: grpc.aio.AioRpcError | None
    in_write: bool = False  # the error came from a write


async def _serve(peer: Peer, case: Case, seen: Seen) -> None:
    conn = peer.conn
    conn.initiate_connection()
    if case.ping:
        conn.ping(b"h2-peer!")
    await peer.flush()
    request_bytes = len(framed(case.requests))
    out = bytearray(framed(case.replies))
    failing_replies = case.failure is not None and not case.fail_on_requests
    if failing_replies and case.failure != "http_503":
        del out[case.fail_at :]
    sid: int | None = None
    replying = ended = settled = False
    while not ended:
        events = await peer.receive()
        if events is None:
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                sid = event.stream_id
                seen.headers = {str(k): str(v) for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                seen.body += event.data
            elif isinstance(event, h2.events.PingAckReceived):
                seen.ping_acked = True
            elif isinstance(event, h2.events.SettingsAcknowledged) and not settled:
                apply_settings_once(conn, case.window, case.max_frame)
                settled = True
        if sid is None:
            await peer.flush()
            continue
        if case.fail_on_requests and len(seen.body) >= case.fail_at:
            await _fail(peer, sid, case)
            return
        if case.ping and not seen.ping_acked:
            await peer.flush()
            continue  # the answer to our PING comes before the call ends
        all_in = len(seen.body) >= request_bytes
        if case.trailers_only and not failing_replies:
            if all_in:
                block = [(":status", "200"), ("content-type", "application/grpc")]
                conn.send_headers(sid, block + _trailers(case), end_stream=True)
                ended = True
            await peer.flush()
            continue
        if not replying and (all_in or len(whole_messages(bytes(seen.body))) >= case.reply_after):
            if case.failure == "http_503" and failing_replies:
                await _fail(peer, sid, case)
                return
            head = [(":status", "200"), ("content-type", "application/grpc")]
            conn.send_headers(sid, head + case.metadata)
            replying = True
        if replying:
            peer.send_body(sid, out, case.frame_sizes, case.pad)
            if not out and all_in:
                if failing_replies:
                    await peer.flush()
                    await _fail(peer, sid, case)
                    return
                conn.send_headers(sid, _trailers(case), end_stream=True)
                ended = True
        await peer.flush()
    await peer.close()


def _trailers(case: Case) -> list[tuple[str, str]]:
    fields = [("grpc-status", str(case.code.value[0]))]
    if case.details:
        fields.append(("grpc-message", h2_peer.percent_encode(case.details)))
    return fields + case.trailing_metadata


async def _fail(peer: Peer, sid: int, case: Case) -> None:
    conn = peer.conn
    if case.failure == "reset":
        conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    elif case.failure == "goaway":
        conn.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR, last_stream_id=sid)
    elif case.failure == "trailers":
        conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    elif case.failure == "end_stream":
        conn.end_stream(sid)
    elif case.failure == "http_503":
        conn.send_headers(sid, [(":status", "503")], end_stream=True)
    await peer.flush()  # "close": nothing more than the half-close
    await peer.close()


async def _call(endpoint: str, case: Case) -> Outcome:
    call = StreamCall(endpoint, PATH, bytes, keepalive_s=60, token=case.token)
    replies: list[bytes] = []
    try:
        for payload in case.requests:
            await call.write(Raw(payload))
    except grpc.aio.AioRpcError as exc:
        return Outcome(replies, exc, in_write=True)
    try:
        while (reply := await call.read()) is not grpc.aio.EOF:
            replies.append(reply)
    except grpc.aio.AioRpcError as exc:
        return Outcome(replies, exc)
    finally:
        call.cancel()
    return Outcome(replies, None)


def _run(case: Case) -> tuple[Seen, Outcome]:
    """The call against the ``h2`` server, both bounded in time."""

    async def body() -> tuple[Seen, Outcome]:
        seen = Seen()
        served: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await _serve(Peer(False, reader, writer, case.cuts, case.grant_at), case, seen)
                served.set_result(None)
            except Exception as exc:
                served.set_exception(exc)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            # An error of the h2 server (it refused what the client sent) comes out at once.
            outcome, _ = await asyncio.gather(_call(f"127.0.0.1:{port}", case), served)
            return seen, outcome
        finally:
            server.close()

    return asyncio.run(asyncio.wait_for(body(), TIMEOUT_S))


def _check_request_side(seen: Seen, case: Case) -> None:
    headers = seen.headers
    assert headers[":method"] == "POST" and headers[":scheme"] == "http"
    assert headers[":path"] == PATH
    assert headers["content-type"] == "application/grpc" and headers["te"] == "trailers"
    assert headers.get(cluster_token.METADATA_KEY) == case.token


@SETTINGS
@given(
    requests=h2_peer.payloads,
    replies=h2_peer.payloads,
    token=h2_peer.token,
    metadata=h2_peer.metadata,
    trailing_metadata=h2_peer.metadata,
    window=st.integers(min_value=1, max_value=65_535),
    max_frame=st.integers(min_value=1 << 14, max_value=(1 << 24) - 1),
    grant_fraction=st.floats(min_value=0.0, max_value=1.0),
    frame_sizes=h2_peer.frame_sizes,
    pad=h2_peer.padding,
    cuts=h2_peer.cuts,
    reply_after=st.integers(min_value=0, max_value=5),
    trailers_only=st.booleans(),
    ping=st.booleans(),
    code=st.sampled_from(list(grpc.StatusCode)),
    details=h2_peer.status_message,
)
def test_every_message_and_the_status_arrive(
    requests: list[bytes],
    replies: list[bytes],
    token: str | None,
    metadata: list[tuple[str, str]],
    trailing_metadata: list[tuple[str, str]],
    window: int,
    max_frame: int,
    grant_fraction: float,
    frame_sizes: list[int],
    pad: int | None,
    cuts: list[int],
    reply_after: int,
    trailers_only: bool,
    ping: bool,
    code: grpc.StatusCode,
    details: str,
) -> None:
    """Requests reach the server whole and in order within its windows and frame size;
    replies and the trailers' status (any code, any message) reach the caller."""
    window = in_steps(window, len(framed(requests)), 64, 65_535)
    case = Case(
        requests,
        replies,
        token=token,
        metadata=metadata,
        trailing_metadata=trailing_metadata,
        window=window,
        max_frame=max_frame,
        grant_at=max(1, int(window * grant_fraction)),  # at most the window: never stuck
        frame_sizes=[in_steps(f, len(framed(replies)), 256, 1 << 14) for f in frame_sizes],
        pad=pad,
        cuts=cuts,
        reply_after=reply_after,
        trailers_only=trailers_only and not replies,
        ping=ping,
        code=code,
        details=details,
    )
    seen, outcome = _run(case)
    _check_request_side(seen, case)
    assert whole_messages(bytes(seen.body)) == requests
    assert len(seen.body) == len(framed(requests))
    assert seen.ping_acked == ping
    assert outcome.replies == replies
    if code is grpc.StatusCode.OK:
        assert outcome.error is None
    else:
        assert outcome.error is not None and not outcome.in_write
        assert (outcome.error.code(), outcome.error.details()) == (code, details)


@SETTINGS
@given(
    requests=h2_peer.payloads.filter(bool),
    replies=h2_peer.payloads.filter(bool),
    window=st.integers(min_value=1, max_value=65_535),
    grant_fraction=st.floats(min_value=0.0, max_value=1.0),
    cuts=h2_peer.cuts,
    fail_on_requests=st.booleans(),
    failure=st.sampled_from(["reset", "close", "goaway", "trailers", "end_stream", "http_503"]),
    pick=st.integers(min_value=0),
)
def test_a_server_that_breaks_off_fails_the_call(
    requests: list[bytes],
    replies: list[bytes],
    window: int,
    grant_fraction: float,
    cuts: list[int],
    fail_on_requests: bool,
    failure: str,
    pick: int,
) -> None:
    """A reset, a lost connection, a GOAWAY with an error, a non-200 answer, or a stream
    that ends in the middle of a message fails the call with a status, whether the client is
    writing (perhaps waiting for window) or reading; the whole messages before it arrive."""
    if fail_on_requests and failure in ("trailers", "end_stream", "http_503"):
        failure = "reset"
    window = in_steps(window, len(framed(requests)), 64, 65_535)
    case = Case(
        requests,
        replies,
        window=window,
        grant_at=max(1, int(window * grant_fraction)),
        cuts=cuts,
        reply_after=len(requests),
        failure=failure,
        fail_on_requests=fail_on_requests,
        fail_at=inside_a_message(requests if fail_on_requests else replies, pick),
    )
    seen, outcome = _run(case)
    _check_request_side(seen, case)
    assert outcome.error is not None, "the call ended as if nothing had gone wrong"
    expected = grpc.StatusCode.UNAVAILABLE
    if failure in ("trailers", "end_stream"):
        expected = grpc.StatusCode.INTERNAL
    assert outcome.error.code() is expected, outcome.error
    if not fail_on_requests and not outcome.in_write and failure != "http_503":
        assert outcome.replies == whole_messages(framed(replies)[: case.fail_at])


def test_a_reply_past_the_callers_receive_window() -> None:
    """A reply larger than the window the client grants at first (16 MiB): it must grant
    more as it reads, or the call stalls."""
    big = bytes(range(256)) * ((ours.RECEIVE_WINDOW + (1 << 20)) // 256)
    seen, outcome = _run(Case([b"go"], [big, b"after"], reply_after=1))
    assert whole_messages(bytes(seen.body)) == [b"go"]
    assert outcome.error is None and outcome.replies == [big, b"after"]
