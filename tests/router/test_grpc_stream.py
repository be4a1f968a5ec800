"""The router's own gRPC stream client (``router.grpc_stream``) against a grpcio server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from protos import common_pb2, decode_pb2
from router.grpc_stream import StreamCall
from tests.router.conftest import run

PATH = "/pdserve.Decode/Session"


async def _echo(
    frames: AsyncIterator[decode_pb2.SessionRequest], context: grpc.aio.ServicerContext
) -> AsyncIterator[decode_pb2.SessionResponse]:
    """Each submit comes back as a chunk of its token ids; a submit whose id is "fail" ends
    the call with INVALID_ARGUMENT, one whose id is "end" ends it OK."""
    async for frame in frames:
        for submit in frame.submit:
            rid = submit.request.request_id
            if rid == "fail":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request: 100% wrong")
            if rid == "end":
                return
            chunk = common_pb2.StreamChunk(token_ids=submit.request.token_ids)
            yield decode_pb2.SessionResponse(
                responses=[common_pb2.GenerateResponse(request_id=rid, chunk=chunk)]
            )


async def _server() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "pdserve.Decode",
        {
            "Session": grpc.stream_stream_rpc_method_handler(
                _echo,
                request_deserializer=decode_pb2.SessionRequest.FromString,
                response_serializer=decode_pb2.SessionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _submit(rid: str, token_ids: list[int]) -> decode_pb2.SessionRequest:
    request = common_pb2.GenerateRequest(request_id=rid, token_ids=token_ids)
    return decode_pb2.SessionRequest(submit=[decode_pb2.DecodeRequest(request=request)])


def _call(endpoint: str, path: str = PATH) -> StreamCall:
    return StreamCall(endpoint, path, decode_pb2.SessionResponse.FromString, keepalive_s=5)


def test_messages_past_the_windows_and_frame_size_both_ways() -> None:
    async def body() -> None:
        server, endpoint = await _server()
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
            await server.stop(None)

    run(body())


def test_failures_carry_their_grpc_status() -> None:
    async def body() -> None:
        server, endpoint = await _server()
        try:
            call = _call(endpoint)
            await call.write(_submit("fail", []))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "bad request: 100% wrong"
            # A method the server lacks: a trailers-only answer.
            call = _call(endpoint, "/pdserve.Decode/Nothing")
            await call.write(_submit("x", []))
            with pytest.raises(grpc.aio.AioRpcError) as err:
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
            await server.stop(None)
        # Nobody listening: UNAVAILABLE, for writes and reads alike.
        call = _call(endpoint)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.write(_submit("x", []))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()

    run(body())


def test_a_server_that_stops_fails_the_call() -> None:
    async def body() -> None:
        server, endpoint = await _server()
        call = _call(endpoint)
        await call.write(_submit("a", [1]))
        assert (await call.read()).responses[0].request_id == "a"
        await server.stop(None)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE

    run(body())
