"""The workers' session listener (``worker.session_server``) called by a grpcio client:
it is plain gRPC, whoever calls it. (The router's own client against it is in
``tests/router/test_grpc_stream.py``; real workers behind a router use it in every router
end-to-end test.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import grpc
import pytest

from protos import common_pb2, decode_pb2, h2
from worker.session_server import Method, SessionServer

PATH = "/pdserve.Decode/Session"


def _submit(rid: str, token_ids: Sequence[int] = ()) -> decode_pb2.SessionRequest:
    request = common_pb2.GenerateRequest(request_id=rid, token_ids=token_ids)
    return decode_pb2.SessionRequest(submit=[decode_pb2.DecodeRequest(request=request)])


class Echo:
    """Each submit comes back as a chunk of its token ids. Id "raise" raises, "abort" ends the
    call with FAILED_PRECONDITION, "hang" waits forever; ``ended`` counts handlers that
    finished, however they finished."""

    def __init__(self) -> None:
        self.ended = 0
        self.started = asyncio.Event()

    async def __call__(
        self, frames: AsyncIterator[decode_pb2.SessionRequest]
    ) -> AsyncGenerator[decode_pb2.SessionResponse, None]:
        self.started.set()
        try:
            async for frame in frames:
                for submit in frame.submit:
                    rid = submit.request.request_id
                    if rid == "raise":
                        raise RuntimeError("the handler broke")
                    if rid == "abort":
                        raise h2.StreamError(grpc.StatusCode.FAILED_PRECONDITION, "not now: 50%")
                    if rid == "hang":
                        await asyncio.Event().wait()
                    chunk = common_pb2.StreamChunk(token_ids=submit.request.token_ids)
                    yield decode_pb2.SessionResponse(
                        responses=[common_pb2.GenerateResponse(request_id=rid, chunk=chunk)]
                    )
        finally:
            self.ended += 1


async def _listener(echo: Echo) -> tuple[SessionServer, str]:
    server = SessionServer()
    port = await server.bind("127.0.0.1", 0)
    server.add(PATH, Method(decode_pb2.SessionRequest.FromString, echo))
    await server.start()
    return server, f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def _listening(echo: Echo) -> AsyncIterator[str]:
    """A listener serving ``echo`` for the block: its endpoint."""
    server, endpoint = await _listener(echo)
    try:
        yield endpoint
    finally:
        await server.stop()


def _method(channel: grpc.aio.Channel, path: str = PATH) -> grpc.aio.StreamStreamMultiCallable:
    return channel.stream_stream(
        path,
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=decode_pb2.SessionResponse.FromString,
    )


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_a_grpcio_client_streams_both_ways() -> None:
    async def body() -> None:
        echo = Echo()
        async with _listening(echo) as endpoint:
            async with grpc.aio.insecure_channel(endpoint) as channel:
                session = _method(channel)
                big = list(range(300_000))  # past every window and frame size, both ways

                async def requests() -> AsyncIterator[decode_pb2.SessionRequest]:
                    yield _submit("big", big)
                    for i in range(300):
                        yield _submit(f"r{i}", [i])

                replies = [r async for r in session(requests())]
                assert list(replies[0].responses[0].chunk.token_ids) == big
                assert [r.responses[0].request_id for r in replies[1:]] == [
                    f"r{i}" for i in range(300)
                ]
                # Two calls at once on one connection, interleaved.
                a, b = session(), session()
                for i in range(20):
                    await a.write(_submit(f"a{i}", [i]))
                    await b.write(_submit(f"b{i}", [i]))
                    assert (await a.read()).responses[0].request_id == f"a{i}"
                    assert (await b.read()).responses[0].request_id == f"b{i}"
                await a.done_writing()
                await b.done_writing()
                assert await a.code() is grpc.StatusCode.OK
                assert await b.code() is grpc.StatusCode.OK
            assert echo.ended == 3

    run(body())


@pytest.mark.parametrize(
    ("rid", "code", "details"),
    [
        ("raise", grpc.StatusCode.INTERNAL, "RuntimeError('the handler broke')"),
        ("abort", grpc.StatusCode.FAILED_PRECONDITION, "not now: 50%"),
    ],
)
def test_a_failing_handler_ends_its_call_with_a_status(
    rid: str, code: grpc.StatusCode, details: str
) -> None:
    async def body() -> None:
        echo = Echo()
        async with (
            _listening(echo) as endpoint,
            grpc.aio.insecure_channel(endpoint) as channel,
        ):
            call = _method(channel)()
            await call.write(_submit("ok", [1]))
            assert (await call.read()).responses[0].request_id == "ok"
            await call.write(_submit(rid))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() is code
            assert err.value.details() == details
            # The connection serves the next call.
            replies = [r async for r in _method(channel)(iter([_submit("next", [2])]))]
            assert replies[0].responses[0].request_id == "next"

    run(body())


def test_bad_requests_get_their_status_and_the_listener_stays_up() -> None:
    async def body() -> None:
        echo = Echo()
        async with _listening(echo) as endpoint:
            async with grpc.aio.insecure_channel(endpoint) as channel:
                call = _method(channel)(iter([b"\xff\xff\xff"]))  # not a SessionRequest
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert "cannot parse" in (err.value.details() or "")
                call = _method(channel, "/pdserve.Decode/Generate")(iter([]))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
            # Not HTTP/2 at all: that connection is closed, nothing else is touched.
            host, _, port = endpoint.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            sent = await asyncio.wait_for(reader.read(), 5)  # until the listener closes
            assert _frame_kinds(sent) == [h2.SETTINGS, h2.WINDOW_UPDATE, h2.GOAWAY]
            writer.close()
            async with grpc.aio.insecure_channel(endpoint) as channel:
                replies = [r async for r in _method(channel)(iter([_submit("after", [3])]))]
                assert replies[0].responses[0].request_id == "after"

    run(body())


def test_a_cancelled_call_cancels_its_handler() -> None:
    async def body() -> None:
        echo = Echo()
        async with (
            _listening(echo) as endpoint,
            grpc.aio.insecure_channel(endpoint) as channel,
        ):
            call = _method(channel)()
            await call.write(_submit("hang"))
            await echo.started.wait()
            call.cancel()
            for _ in range(100):
                if echo.ended:
                    break
                await asyncio.sleep(0.02)
            assert echo.ended == 1

    run(body())


def test_stopping_the_listener_ends_open_calls_unavailable() -> None:
    async def body() -> None:
        echo = Echo()
        server, endpoint = await _listener(echo)
        async with grpc.aio.insecure_channel(endpoint) as channel:
            call = _method(channel)()
            await call.write(_submit("hang"))
            await echo.started.wait()
            await server.stop(grace_s=0.1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert echo.ended == 1

    run(body())


def test_a_frame_past_the_size_it_accepts_closes_that_connection() -> None:
    async def body() -> None:
        async with _listening(Echo()) as endpoint:
            host, _, port = endpoint.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            # Preface, then a DATA frame header announcing 1 MiB (the default limit is 16 KiB):
            # refused at once, without waiting for (or buffering) its payload.
            writer.write(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0) + (1 << 20).to_bytes(3, "big")
                         + bytes((h2.DATA, 0)) + h2.U32.pack(1))  # fmt: skip
            await writer.drain()
            sent = await asyncio.wait_for(reader.read(), 5)
            assert sent and h2.GOAWAY in _frame_kinds(sent)
            writer.close()

    run(body())


def _frame_kinds(data: bytes) -> list[int]:
    kinds = []
    while len(data) >= 9:
        kinds.append(data[3])
        data = data[9 + int.from_bytes(data[:3], "big") :]
    return kinds
