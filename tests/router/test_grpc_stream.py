"""The router's own gRPC stream client (``router.client.grpc_stream``) against a grpcio server and
against the workers' session listener (``worker.session_server``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import pytest

from protos import common_pb2, decode_pb2, h2
from router.client.grpc_stream import StreamCall
from tests.router.conftest import run
from worker.session_server import Method, SessionServer

PATH = "/pdserve.Decode/Session"


async def _echo(
    frames: AsyncIterator[decode_pb2.SessionRequest],
) -> AsyncGenerator[decode_pb2.SessionResponse, None]:
    """Each submit comes back as a chunk of its token ids; a submit whose id is "fail" ends
    the call with INVALID_ARGUMENT, one whose id is "end" ends it OK."""
    async for frame in frames:
        for submit in frame.submit:
            rid = submit.request.request_id
            if rid == "fail":
                raise h2.StreamError(grpc.StatusCode.INVALID_ARGUMENT, "bad request: 100% wrong")
            if rid == "end":
                return
            chunk = common_pb2.StreamChunk(token_ids=submit.request.token_ids)
            yield decode_pb2.SessionResponse(
                responses=[common_pb2.GenerateResponse(request_id=rid, chunk=chunk)]
            )


async def _grpcio_echo(
    frames: AsyncIterator[decode_pb2.SessionRequest], context: grpc.aio.ServicerContext
) -> AsyncIterator[decode_pb2.SessionResponse]:
    try:
        async for reply in _echo(frames):
            yield reply
    except h2.StreamError as exc:
        await context.abort(exc.code, exc.details)


class _Server:
    """``_echo`` served by grpcio, or by the workers' session listener."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._grpcio: grpc.aio.Server | None = None
        self._listener: SessionServer | None = None

    async def start(self) -> str:
        if self.kind == "listener":
            self._listener = SessionServer()
            port = await self._listener.bind("127.0.0.1", 0)
            self._listener.add(PATH, Method(decode_pb2.SessionRequest.FromString, _echo))
            await self._listener.start()
            return f"127.0.0.1:{port}"
        self._grpcio = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "pdserve.Decode",
            {
                "Session": grpc.stream_stream_rpc_method_handler(
                    _grpcio_echo,
                    request_deserializer=decode_pb2.SessionRequest.FromString,
                    response_serializer=decode_pb2.SessionResponse.SerializeToString,
                )
            },
        )
        self._grpcio.add_generic_rpc_handlers((handler,))
        port = self._grpcio.add_insecure_port("127.0.0.1:0")
        await self._grpcio.start()
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._grpcio is not None:
            await self._grpcio.stop(None)
        if self._listener is not None:
            await self._listener.stop(None)


SERVERS = pytest.mark.parametrize("server_kind", ["grpcio", "listener"])


def _submit(rid: str, token_ids: list[int]) -> decode_pb2.SessionRequest:
    request = common_pb2.GenerateRequest(request_id=rid, token_ids=token_ids)
    return decode_pb2.SessionRequest(submit=[decode_pb2.DecodeRequest(request=request)])


def _call(endpoint: str, path: str = PATH) -> StreamCall:
    return StreamCall(endpoint, path, decode_pb2.SessionResponse.FromString, keepalive_s=5)


@SERVERS
def test_messages_past_the_windows_and_frame_size_both_ways(server_kind: str) -> None:
    async def body() -> None:
        server = _Server(server_kind)
        endpoint = await server.start()
        try:
            call = _call(endpoint)
            big = list(range(200_000))  # ~1 MB each way: many frames, many window updates
            await call.write(_submit("big", big))
            for i in range(300):  # and many small ones back to back
                await call.write(_submit(f"r{i}", [i]))
            reply = await call.read()
            assert reply.responses[0].request_id == "big"
            assert list(reply.responses[0].chunk.token_ids) == big
            for i in range(300):
                reply = await call.read()
                assert list(reply.responses[0].chunk.token_ids) == [i]
            await call.write(_submit("end", []))
            assert await call.read() is grpc.aio.EOF
            assert call.done() and call.code() is grpc.StatusCode.OK
        finally:
            await server.stop()

    run(body())


@SERVERS
def test_failures_carry_their_grpc_status(server_kind: str) -> None:
    async def body() -> None:
        server = _Server(server_kind)
        endpoint = await server.start()
        try:
            call = _call(endpoint)
            await call.write(_submit("fail", []))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "bad request: 100% wrong"
            # A method the server lacks: a trailers-only answer.
            call = _call(endpoint, "/pdserve.Decode/Nothing")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.write(_submit("x", []))  # the answer may beat the write
                await call.read()
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
            # Cancelled by us: reads fail with CANCELLED, the server sees the reset.
            call = _call(endpoint)
            await call.write(_submit("a", [1]))
            assert (await call.read()).responses[0].request_id == "a"
            assert call.cancel() and not call.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() is grpc.StatusCode.CANCELLED
        finally:
            await server.stop()
        # Nobody listening: UNAVAILABLE, for writes and reads alike.
        call = _call(endpoint)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.write(_submit("x", []))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()

    run(body())


@SERVERS
def test_a_server_that_stops_fails_the_call(server_kind: str) -> None:
    async def body() -> None:
        server = _Server(server_kind)
        endpoint = await server.start()
        call = _call(endpoint)
        await call.write(_submit("a", [1]))
        assert (await call.read()).responses[0].request_id == "a"
        await server.stop()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE

    run(body())
