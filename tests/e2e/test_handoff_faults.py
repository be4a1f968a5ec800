"""The KV hand-off under faults, with real workers over gRPC and Mooncake: a destination the
decode worker gave up on is never written, and a completion that overtakes the destination's
reply is still taken."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.local import Child
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from protos import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.e2e.procs import workers
from tests.e2e.test_expert_parallel_workers import scrape
from tests.e2e.test_workers import load, request, wait_pages_free

MODEL = "qwen3-moe"


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models[MODEL]


@pytest.fixture(scope="module")
def pair(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Child, str, str]]:
    """(prefill child, prefill endpoint, decode endpoint)."""
    logs = tmp_path_factory.mktemp("logs")
    with workers(model_dir, ("prefill",), ("decode",), log_dir=logs) as started:
        [(prefill_child, prefill), (_, decode)] = started
        yield prefill_child, prefill, decode


def sent_bytes(child: Child) -> float:
    samples = scrape(child.ready)
    return next(
        (v for k, v in samples.items() if k.startswith("pdserve:kv_transfer_bytes_total")), 0
    )


async def wait_transferring(decode: str, count: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while (await load(decode)).num_transferring != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the decode worker never had {count} transfers waiting")
        await asyncio.sleep(0.02)


def test_prefill_after_decode_gave_up_writes_nothing(
    model_dir: Path, pair: tuple[Child, str, str]
) -> None:
    """Bug 1 of issue 20: the decode worker gives up on request A (its client left) after its
    destination reached the prefill worker; request B then reserves pages (the pool hands out
    the most recently freed first); A's Prefill arrives late. A's KV must not land anywhere:
    B's greedy tokens stay those of the offline engine, and the prefill worker writes no byte
    for A."""
    prefill_child, prefill, decode = pair
    a_prompt = list(range(3, 35))
    b_prompt = list(range(300, 332))  # as many pages as A's
    max_new = 160
    engine = Engine(EngineConfig(model_path=str(model_dir), num_pages=64))
    params = SamplingParams(temperature=0, max_new_tokens=max_new, ignore_eos=True)
    [expected] = [r.output_ids for r in engine.generate([b_prompt], params)]

    async def main() -> list[int]:
        req_a = request("given-up", a_prompt, max_new=8)
        req_b = request("after", b_prompt, max_new=max_new)
        tid_a, tid_b = secrets.randbits(63) or 1, secrets.randbits(63) or 2
        async with (
            grpc.aio.insecure_channel(prefill) as pch,
            grpc.aio.insecure_channel(decode) as dch,
        ):
            dstub, pstub = decode_pb2_grpc.DecodeStub(dch), prefill_pb2_grpc.PrefillStub(pch)
            stream_a = dstub.Generate(
                decode_pb2.DecodeRequest(request=req_a, transfer_id=tid_a, prefill_endpoint=prefill)
            )
            await wait_transferring(decode, 1)
            await asyncio.sleep(0.3)  # the destination reaches the prefill worker
            stream_a.cancel()  # the client leaves: the decode worker gives up on A
            await wait_transferring(decode, 0)
            await asyncio.sleep(0.3)
            before = sent_bytes(prefill_child)

            stream_b = dstub.Generate(
                decode_pb2.DecodeRequest(request=req_b, transfer_id=tid_b, prefill_endpoint=prefill)
            )
            call_b = pstub.Prefill(prefill_pb2.PrefillRequest(request=req_b, transfer_id=tid_b))
            tokens: list[int] = []
            late: asyncio.Future[prefill_pb2.PrefillResponse] | None = None
            async for r in stream_b:
                tokens.extend(r.chunk.token_ids)
                if late is None and tokens:
                    await call_b
                    after_b = sent_bytes(prefill_child)
                    # A's prefill request arrives now, while B decodes from its pages.
                    late = asyncio.ensure_future(
                        pstub.Prefill(prefill_pb2.PrefillRequest(request=req_a, transfer_id=tid_a))
                    )
            assert late is not None
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await late
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert after_b > before
            assert sent_bytes(prefill_child) == after_b, "KV written for a transfer given up on"
        await wait_pages_free(decode)
        await wait_pages_free(prefill, prefill=True)
        return tokens

    assert asyncio.run(main()) == expected


class OvertakingPrefill(prefill_pb2_grpc.PrefillServicer):
    """A prefill worker whose completion reaches the decode worker before its answer to
    AttachDestination does: the order a fast prefill and a slow reply give, forced here."""

    def __init__(self, decode: str) -> None:
        self.decode = decode
        self.done_status: grpc.StatusCode | None = None

    async def AttachDestination(
        self, request: prefill_pb2.AttachDestinationRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.AttachDestinationResponse:
        done = decode_pb2.TransferDoneRequest(
            request_id=request.request_id, transfer_id=request.transfer_id, first_token_id=7
        )
        async with grpc.aio.insecure_channel(self.decode) as ch:
            try:
                await decode_pb2_grpc.DecodeStub(ch).TransferDone(done, timeout=10)
                self.done_status = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                self.done_status = exc.code()
        return prefill_pb2.AttachDestinationResponse(request_id=request.request_id)


def test_transfer_done_before_the_attach_reply_is_taken(pair: tuple[Child, str, str]) -> None:
    """Bug 3 of issue 20: TransferDone overtaking the AttachDestination reply used to hit
    "illegal transition from bootstrapping to success" and fail the request."""
    _, _, decode = pair

    async def main() -> tuple[list[int], grpc.StatusCode | None]:
        fake = OvertakingPrefill(decode)
        server = grpc.aio.server()
        prefill_pb2_grpc.add_PrefillServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            req = request("overtaken", list(range(3, 20)), max_new=4)
            async with grpc.aio.insecure_channel(decode) as dch:
                stream = decode_pb2_grpc.DecodeStub(dch).Generate(
                    decode_pb2.DecodeRequest(
                        request=req,
                        transfer_id=secrets.randbits(63) or 1,
                        prefill_endpoint=f"127.0.0.1:{port}",
                    )
                )
                tokens = [t async for r in stream for t in r.chunk.token_ids]
        finally:
            await server.stop(None)
        await wait_pages_free(decode)
        return tokens, fake.done_status

    tokens, status = asyncio.run(main())
    assert status is grpc.StatusCode.OK
    assert len(tokens) == 4 and tokens[0] == 7


def test_kv_that_never_comes_is_blamed_on_the_prefill_worker(
    pair: tuple[Child, str, str],
) -> None:
    """Issue 20, bug 2: when the prefill worker never delivers (stopped, dead, or here never
    sent the request), the decode worker's error names it, so the router charges it."""
    _, prefill, decode = pair

    async def main() -> None:
        req = request("no-kv", list(range(3, 20)), max_new=4)
        submit = decode_pb2.DecodeRequest(
            request=req, transfer_id=secrets.randbits(63) or 1, prefill_endpoint=prefill
        )
        async with grpc.aio.insecure_channel(decode) as ch:
            call = decode_pb2_grpc.DecodeStub(ch).Session()
            await call.write(decode_pb2.SessionRequest(submit=[submit]))
            frame = await call.read()
            (reply,) = frame.responses
            assert reply.HasField("error"), reply
            assert reply.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert reply.error.peer == prefill
            assert "timed out" in reply.error.message
            await call.done_writing()
        await wait_pages_free(decode)

    asyncio.run(main())


def test_weights_identity(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Same files, same identity; another checkpoint, a resized shard or dummy weights, not."""
    import shutil

    from worker.convert import weights_identity

    qwen = tiny_models[MODEL]
    same = weights_identity(str(qwen), "auto", 0)
    assert same == weights_identity(str(qwen), "auto", 0)
    assert same != weights_identity(str(tiny_models["llama"]), "auto", 0)
    assert weights_identity(str(qwen), "dummy", 0).startswith("dummy:")
    assert weights_identity(str(qwen), "dummy", 0) != weights_identity(str(qwen), "dummy", 1)
    copy = tmp_path / "copy"
    shutil.copytree(qwen, copy)
    assert weights_identity(str(copy), "auto", 0) == same
    shard = next(copy.glob("*.safetensors"))
    with shard.open("ab") as f:
        f.write(b"\0")
    assert weights_identity(str(copy), "auto", 0) != same
