"""The shared cluster token (protos.cluster_token) with real workers and a real router: calls
without it are refused on both of a worker's ports, health checks stay open, and the whole
disaggregated path (router -> workers, decode -> prefill -> decode) works with it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import cluster_token, common_pb2, decode_pb2, decode_pb2_grpc
from tests.e2e.procs import worker
from tests.e2e.test_workers import request
from tests.router.procs import call, router_process

TOKEN = "t0ken-for-the-tests"


@pytest.fixture(scope="module")
def cluster(tiny_models: dict[str, Path]) -> Iterator[tuple[dict[str, object], str, str]]:
    """(decode worker's ready line, prefill endpoint, decode endpoint), token set on both."""
    model_dir = tiny_models["qwen3-moe"]
    old = os.environ.get(cluster_token.ENV)
    os.environ[cluster_token.ENV] = TOKEN  # the worker processes inherit it
    try:
        with (
            worker("prefill", model_dir) as (_, prefill),
            worker("decode", model_dir) as (decode_child, decode),
        ):
            yield decode_child.ready, prefill, decode
    finally:
        if old is None:
            os.environ.pop(cluster_token.ENV, None)
        else:
            os.environ[cluster_token.ENV] = old


def test_calls_without_the_token_are_refused(
    cluster: tuple[dict[str, object], str, str],
) -> None:
    ready, _, decode = cluster
    session_endpoint = f"127.0.0.1:{ready['session_port']}"

    async def main() -> None:
        async with grpc.aio.insecure_channel(decode) as ch:
            stub = decode_pb2_grpc.DecodeStub(ch)
            for rpc in (
                stub.GetInfo(common_pb2.WorkerInfoRequest()),
                stub.Abort(common_pb2.AbortRequest(request_id="someone-else")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await rpc
                assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert cluster_token.ENV in (info.value.details() or "")
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        for endpoint in (decode, session_endpoint):  # the grpcio server and the listener
            async with grpc.aio.insecure_channel(endpoint) as ch:
                stream = decode_pb2_grpc.DecodeStub(ch).Session()
                # The refusal comes with the call's headers, so it can already be there when
                # the write goes out (the write raises) or only when the read comes back.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stream.write(
                        decode_pb2.SessionRequest(
                            submit=[decode_pb2.DecodeRequest(request=request("x", [1, 2, 3]))]
                        )
                    )
                    await stream.read()
                # A write that races the refusal fails in grpc's own core on the client (the
                # server already closed the stream), which grpc.aio reports as INTERNAL "Internal
                # error from Core" in place of the server's status. Either way nothing ran.
                err = info.value
                raced = err.code() is grpc.StatusCode.INTERNAL
                assert (raced and err.details() == "Internal error from Core") or (
                    err.code() is grpc.StatusCode.UNAUTHENTICATED
                ), (endpoint, err)
            async with cluster_token.channel(endpoint, TOKEN) as ch:
                stream = decode_pb2_grpc.DecodeStub(ch).Session()
                await stream.write(
                    decode_pb2.SessionRequest(
                        submit=[decode_pb2.DecodeRequest(request=request("ok", [1, 2, 3]))]
                    )
                )
                assert (await stream.read()).responses, endpoint
                stream.cancel()

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_router_and_workers_with_the_token(
    tiny_models: dict[str, Path], cluster: tuple[dict[str, object], str, str], transport: str
) -> None:
    _, prefill, decode = cluster
    flags = ("--prefill", prefill, "--decode", decode, "--worker-transport", transport)
    with router_process(tiny_models["qwen3-moe"], *flags) as (_, url):
        body = {"model": "qwen3-moe", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
        status, reply = call(url + "/v1/completions", "POST", body)
        assert status == 200, reply
        assert reply["usage"]["completion_tokens"] == 4
