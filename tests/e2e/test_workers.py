"""Prefill and decode workers as real processes over gRPC and Mooncake, without the router."""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.local import Child
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.e2e.procs import worker, workers
from tests.engine.reference import make_prompts
from worker.metrics import PHASES

MODEL = "qwen3-moe"
MAX_NEW = 10


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models[MODEL]


@pytest.fixture(scope="module")
def pair(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    logs = tmp_path_factory.mktemp("logs")
    with workers(model_dir, ("prefill",), ("decode",), log_dir=logs) as [(_, p), (_, d)]:
        yield p, d


@pytest.fixture(scope="module")
def colocated(model_dir: Path) -> Iterator[str]:
    with worker("null", model_dir) as (_, endpoint):
        yield endpoint


def sampling(max_new: int = MAX_NEW) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=0, top_p=1, top_k=-1, max_new_tokens=max_new, ignore_eos=True
    )


def request(rid: str, tokens: list[int], max_new: int = MAX_NEW) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(request_id=rid, token_ids=tokens, sampling=sampling(max_new))


async def run_colocated(endpoint: str, req: common_pb2.GenerateRequest) -> list[int]:
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stream = decode_pb2_grpc.DecodeStub(ch).Generate(decode_pb2.DecodeRequest(request=req))
        return [t async for r in stream if r.HasField("chunk") for t in r.chunk.token_ids]


async def disaggregated_responses(
    prefill: str, decode: str, req: common_pb2.GenerateRequest
) -> list[common_pb2.GenerateResponse]:
    """Call Decode.Generate and Prefill.Prefill together, as the router does."""
    tid = secrets.randbits(63) or 1
    async with (
        grpc.aio.insecure_channel(prefill) as pch,
        grpc.aio.insecure_channel(decode) as dch,
    ):
        stream = decode_pb2_grpc.DecodeStub(dch).Generate(
            decode_pb2.DecodeRequest(request=req, transfer_id=tid, prefill_endpoint=prefill)
        )
        prefill_call = prefill_pb2_grpc.PrefillStub(pch).Prefill(
            prefill_pb2.PrefillRequest(request=req, transfer_id=tid)
        )
        responses = [r async for r in stream]
        await prefill_call
        return responses


async def run_disaggregated(
    prefill: str, decode: str, req: common_pb2.GenerateRequest
) -> list[int]:
    responses = await disaggregated_responses(prefill, decode, req)
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


async def load(endpoint: str, prefill: bool = False) -> common_pb2.LoadReport:
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stub = prefill_pb2_grpc.PrefillStub(ch) if prefill else decode_pb2_grpc.DecodeStub(ch)
        return await stub.GetLoad(common_pb2.LoadRequest())


async def wait_pages_free(endpoint: str, prefill: bool = False, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        report = await load(endpoint, prefill)
        idle = report.num_running == report.num_waiting == report.num_transferring == 0
        if idle and report.num_free_pages == report.num_total_pages:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"pages did not balance on {endpoint}: {report}")
        await asyncio.sleep(0.1)


def offline(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """The offline engine's greedy outputs: what every serving mode must reproduce."""
    engine = Engine(EngineConfig(model_path=str(model_dir), num_pages=256))
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)
    return [r.output_ids for r in engine.generate(prompts, params)]


def test_disaggregated_equals_colocated_and_offline(
    model_dir: Path, pair: tuple[str, str], colocated: str
) -> None:
    prompts = make_prompts(vocab_size=512)
    expected = offline(model_dir, prompts)

    async def main() -> tuple[list[list[int]], list[list[int]]]:
        reqs = [request(f"r{i}", p) for i, p in enumerate(prompts)]
        col = await asyncio.gather(*(run_colocated(colocated, r) for r in reqs))
        dis = await asyncio.gather(*(run_disaggregated(*pair, r) for r in reqs))
        await wait_pages_free(pair[0], prefill=True)
        await wait_pages_free(pair[1])
        await wait_pages_free(colocated)
        return list(col), list(dis)

    col, dis = asyncio.run(main())
    assert col == expected
    assert dis == expected


def test_client_cancel_and_abort_free_pages(pair: tuple[str, str], colocated: str) -> None:
    prefill, decode = pair

    async def main() -> None:
        # A client that goes away mid-stream: cancelling the stream aborts the request.
        tid = secrets.randbits(63) or 1
        req = request("cancel-me", list(range(3, 40)), max_new=400)
        async with (
            grpc.aio.insecure_channel(prefill) as pch,
            grpc.aio.insecure_channel(decode) as dch,
        ):
            stream = decode_pb2_grpc.DecodeStub(dch).Generate(
                decode_pb2.DecodeRequest(request=req, transfer_id=tid, prefill_endpoint=prefill)
            )
            call = prefill_pb2_grpc.PrefillStub(pch).Prefill(
                prefill_pb2.PrefillRequest(request=req, transfer_id=tid)
            )
            seen = 0
            async for r in stream:
                seen += len(r.chunk.token_ids)
                if seen >= 3:
                    break
            stream.cancel()
            await call
        await wait_pages_free(decode)
        await wait_pages_free(prefill, prefill=True)

        # An explicit Abort ends the stream with finish reason ABORT.
        async with grpc.aio.insecure_channel(colocated) as ch:
            stub = decode_pb2_grpc.DecodeStub(ch)
            stream = stub.Generate(
                decode_pb2.DecodeRequest(request=request("abort-me", [5, 6, 7], max_new=1000))
            )
            last = None
            async for r in stream:
                if r.HasField("chunk") and last is None:
                    last = await stub.Abort(common_pb2.AbortRequest(request_id="abort-me"))
                    assert last.found
                if r.HasField("complete"):
                    assert r.complete.finish_reason == common_pb2.FINISH_REASON_ABORT
                    break
            else:
                raise AssertionError("stream ended without a complete message")
        await wait_pages_free(colocated)

    asyncio.run(main())


def test_bad_input_is_invalid_argument_and_worker_survives(colocated: str) -> None:
    async def main() -> None:
        cases = {
            "empty": request("e", []),
            "vocab": request("v", [1, 2, 512]),
            "context": request("c", [1] * 2048),
        }
        bad_sampling = request("s", [1, 2])
        bad_sampling.sampling.top_p = 0
        cases["top_p"] = bad_sampling
        for name, req in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await run_colocated(colocated, req)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, name
            assert info.value.details(), name
        assert await run_colocated(colocated, request("ok", [1, 2, 3]))
        await wait_pages_free(colocated)

    asyncio.run(main())


def test_prefill_refuses_bad_sampling_with_invalid_argument(pair: tuple[str, str]) -> None:
    """A prefill request whose sampling parameters are invalid is refused as such (not as an
    internal error of the failure accounting), and the worker serves on."""
    prefill, decode = pair

    async def main() -> None:
        req = request("bad-temp", [1, 2, 3])
        req.sampling.temperature = -1.0
        async with grpc.aio.insecure_channel(prefill) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await prefill_pb2_grpc.PrefillStub(ch).Prefill(
                    prefill_pb2.PrefillRequest(request=req, transfer_id=11)
                )
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert await run_disaggregated(prefill, decode, request("ok", [1, 2, 3]))

    asyncio.run(main())


def test_layout_mismatch_refuses_to_pair(model_dir: Path, pair: tuple[str, str]) -> None:
    prefill, _ = pair
    with worker("decode", model_dir, "--page-size", "4") as (_, decode):

        async def main() -> None:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await run_disaggregated(prefill, decode, request("m", [1, 2, 3]))
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            message = info.value.details() or ""
            assert "page_size" in message and "16" in message and "4" in message, message
            await wait_pages_free(decode)

        asyncio.run(main())


def test_prefill_killed_mid_request(model_dir: Path) -> None:
    """The decode worker ends the request with a clear error, frees its pages, and serves on."""
    with worker("decode", model_dir) as (_, decode):
        with worker("prefill", model_dir) as (prefill_child, prefill):
            child: Child = prefill_child

            async def doomed() -> grpc.StatusCode:
                tid = secrets.randbits(63) or 1
                req = request("doomed", list(range(3, 30)))
                async with grpc.aio.insecure_channel(decode) as dch:
                    stream = decode_pb2_grpc.DecodeStub(dch).Generate(
                        decode_pb2.DecodeRequest(
                            request=req, transfer_id=tid, prefill_endpoint=prefill
                        )
                    )
                    # The prefill request is never sent: kill the worker while the decode
                    # side waits for its pages.
                    await asyncio.sleep(0.5)
                    child.proc.kill()
                    try:
                        async for _ in stream:
                            pass
                    except grpc.aio.AioRpcError as exc:
                        assert "transfer" in (exc.details() or "")
                        return exc.code()
                    raise AssertionError("the stream ended without an error")

            start = time.monotonic()
            code = asyncio.run(doomed())
            assert code is grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - start < 10  # bounded by --transfer-timeout 3

        async def after() -> None:
            await wait_pages_free(decode)
            with worker("prefill", model_dir) as (_, new_prefill):
                try:
                    ok = await run_disaggregated(new_prefill, decode, request("after", [4, 5]))
                except grpc.aio.AioRpcError as exc:
                    # A fresh worker's first prefill on a loaded 2-core host can outlast the
                    # 3 s transfer timeout (seen once in the full suite): the decode side gives
                    # the request up cleanly, and serves the retry.
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                    assert "timed out" in (exc.details() or ""), exc
                    await wait_pages_free(decode)
                    ok = await run_disaggregated(new_prefill, decode, request("again", [4, 5]))
                assert ok
            await wait_pages_free(decode)

        asyncio.run(after())


def test_mla_compressed_pages_transfer(tiny_models: dict[str, Path]) -> None:
    """DeepSeek-V3's pool holds the latent and the rotary key (K and V pages of different
    sizes); disaggregated greedy output still equals the offline engine's."""
    model_dir = tiny_models["deepseek-v3"]
    prompts = make_prompts(vocab_size=512)[2:5]
    engine = Engine(EngineConfig(model_path=str(model_dir), num_pages=256))
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)
    expected = [r.output_ids for r in engine.generate(prompts, params)]
    with (
        worker("prefill", model_dir) as (_, prefill),
        worker("decode", model_dir) as (_, decode),
    ):

        async def main() -> list[list[int]]:
            reqs = [request(f"mla{i}", p) for i, p in enumerate(prompts)]
            out = await asyncio.gather(*(run_disaggregated(prefill, decode, r) for r in reqs))
            await wait_pages_free(decode)
            await wait_pages_free(prefill, prefill=True)
            return list(out)

        assert asyncio.run(main()) == expected


def test_transfer_metrics(model_dir: Path) -> None:
    """Both workers export the hand-off's metrics on /metrics, labelled by model, role and
    worker: bytes, latency and speed of the KV write, the phases of the time to first token
    (once per request; none for a failed one), the generated tokens, hand-off queues back at
    zero, and a destination the prefill worker never takes counted as a failed bootstrap."""
    from tests.e2e.test_expert_parallel_workers import scrape

    def value(samples: dict[str, float], name: str) -> float:
        return next(v for k, v in samples.items() if k.startswith(name + "{"))

    with (
        worker("prefill", model_dir) as (prefill_child, prefill),
        worker("decode", model_dir) as (decode_child, decode),
    ):
        tokens = asyncio.run(run_disaggregated(prefill, decode, request("m1", [1, 2, 3, 4])))
        assert tokens
        # The decode side may stream its last token before the prefill side has taken the
        # answer to TransferDone (and left its in-flight queue): wait for that, briefly.
        deadline = time.monotonic() + 5
        while True:
            samples = scrape(prefill_child.ready)
            if value(samples, "pdserve:prefill_inflight_queue_requests") == 0:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        labels = f'model_name="{model_dir.name}",role="prefill",worker="{prefill}"'
        assert f"pdserve:kv_transfer_bytes_total{{{labels}}}" in samples
        assert value(samples, "pdserve:kv_transfer_bytes_total") > 0
        assert value(samples, "pdserve:kv_transfer_latency_seconds_count") == 1
        assert value(samples, "pdserve:kv_transfer_speed_gb_s") > 0
        for name in ("prefill_bootstrap_queue_requests", "prefill_inflight_queue_requests",
                     "kv_transfer_failures_total", "kv_bootstrap_failures_total"):  # fmt: skip
            assert value(samples, "pdserve:" + name) == 0, name
        prefill_phases = phase_sums(samples, PREFILL_PHASES)
        decode_phases = phase_sums(scrape(decode_child.ready), DECODE_PHASES)
        assert all(s > 0 for s in prefill_phases.values()), prefill_phases
        assert decode_phases["decode_bootstrap"] > 0 and decode_phases["decode_pickup"] > 0
        # The write lies between the decode worker's arrival and TransferDone's.
        write = value(samples, "pdserve:kv_transfer_latency_seconds_sum")
        assert decode_phases["decode_bootstrap"] + decode_phases["decode_kv_wait"] >= write

        # A destination handed to a prefill worker that is not there: a failed bootstrap.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            nobody = f"127.0.0.1:{s.getsockname()[1]}"

        async def orphan() -> None:
            async with grpc.aio.insecure_channel(decode) as ch:
                req = decode_pb2.DecodeRequest(
                    request=request("m2", [5, 6, 7]), transfer_id=7, prefill_endpoint=nobody
                )
                with pytest.raises(grpc.aio.AioRpcError):
                    _ = [r async for r in decode_pb2_grpc.DecodeStub(ch).Generate(req)]
            await wait_pages_free(decode)

        asyncio.run(orphan())
        deadline = time.monotonic() + 5  # engine gauges refresh once a second
        while True:
            decode_samples = scrape(decode_child.ready)
            generated = value(decode_samples, "pdserve:worker_generated_tokens_total")
            usage = value(decode_samples, "pdserve:kv_page_usage_ratio")
            if (generated == len(tokens) and usage == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert generated == len(tokens)
        assert value(decode_samples, "pdserve:kv_pages_total") > 0
        assert value(decode_samples, "pdserve:kv_page_usage_ratio") == 0
        assert value(decode_samples, "pdserve:kv_bootstrap_failures_total") == 1
        assert value(decode_samples, "pdserve:decode_prealloc_queue_requests") == 0
        assert value(decode_samples, "pdserve:decode_transfer_queue_requests") == 0
        assert value(decode_samples, "pdserve:num_preemptions_total") == 0
        assert phase_sums(decode_samples, DECODE_PHASES) == decode_phases  # none for m2


PREFILL_PHASES = ("prefill_queue", "prefill_compute", "handoff_wait", "transfer_done")
DECODE_PHASES = ("decode_bootstrap", "decode_kv_wait", "decode_pickup")


def phase_sums(
    samples: dict[str, float], phases: tuple[str, ...], count: int = 1
) -> dict[str, float]:
    """The `_sum` of each TTFT phase histogram in a worker's samples, having checked that each
    observed `count` requests."""

    def one(suffix: str, phase: str) -> float:
        name = PHASES[phase][0] + suffix + "{"
        return next(v for k, v in samples.items() if k.startswith(name))

    for phase in phases:
        assert one("_count", phase) == count, phase
    return {phase: one("_sum", phase) for phase in phases}


def test_colocated_worker_times_each_prefill(model_dir: Path) -> None:
    """A colocated worker observes the queue and compute phases once per request, at its
    first token."""
    from tests.e2e.test_expert_parallel_workers import scrape

    with worker("null", model_dir) as (child, endpoint):
        for n in (1, 2):
            assert asyncio.run(run_colocated(endpoint, request(f"t{n}", [1, 2, 3, 4], max_new=3)))
            sums = phase_sums(scrape(child.ready), ("prefill_queue", "prefill_compute"), n)
            assert all(s > 0 for s in sums.values()), sums


def test_sigterm_drains_in_flight_requests(model_dir: Path) -> None:
    """A worker told to stop finishes what it is serving before it exits."""
    with worker("null", model_dir) as (child, endpoint):

        async def main() -> list[int]:
            async with grpc.aio.insecure_channel(endpoint) as ch:
                stream = decode_pb2_grpc.DecodeStub(ch).Generate(
                    decode_pb2.DecodeRequest(request=request("drain", [5, 6, 7], max_new=300))
                )
                tokens: list[int] = []
                async for r in stream:
                    tokens.extend(r.chunk.token_ids)
                    if len(tokens) == 3:
                        child.proc.send_signal(signal.SIGTERM)
                return tokens

        tokens = asyncio.run(main())
        assert len(tokens) == 300
        assert child.proc.wait(timeout=30) == 0


def test_sigterm_with_idle_streams_open_ends_them_without_the_grace(
    model_dir: Path, tmp_path: Path
) -> None:
    """With nothing in flight, what a router leaves open on a worker (its session streams on
    both listeners, a health watch) is idle: the stop ends those calls after a flush's grace,
    not the grace that in-flight requests get (it held every worker's stop for 5 s)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from worker.server import IDLE_STOP_GRACE_S, STOP_GRACE_S

    with worker("null", model_dir, log_dir=tmp_path) as (child, endpoint):

        async def main() -> list[grpc.StatusCode]:
            async with grpc.aio.insecure_channel(endpoint) as ch:
                stub = decode_pb2_grpc.DecodeStub(ch)
                info = await stub.GetInfo(common_pb2.WorkerInfoRequest(request_id="i"))
                assert info.session_port
                host = endpoint.rpartition(":")[0]
                async with grpc.aio.insecure_channel(f"{host}:{info.session_port}") as lch:
                    calls = [
                        stub.Session(),
                        decode_pb2_grpc.DecodeStub(lch).Session(),
                        health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest()),
                    ]
                    # A request ended on each session: the streams are open, and idle now.
                    for i, call in enumerate(calls[:2]):
                        r = decode_pb2.DecodeRequest(request=request(f"idle{i}", [5, 6], 2))
                        await call.write(decode_pb2.SessionRequest(submit=[r]))
                        done = False
                        while not done:
                            frame = await call.read()
                            done = any(x.HasField("complete") for x in frame.responses)
                    child.proc.send_signal(signal.SIGTERM)
                    codes = []
                    for call in calls:
                        with pytest.raises(grpc.aio.AioRpcError) as err:
                            while True:
                                if await call.read() is grpc.aio.EOF:
                                    raise AssertionError("an idle call ended with OK")
                        codes.append(err.value.code())
                    return codes

        codes = asyncio.run(main())
        assert child.proc.wait(timeout=30) == 0
    assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
    assert child.log_path is not None
    [line] = [x for x in child.log_path.read_text().splitlines() if "listeners closed" in x]
    assert "timed out" not in line, line
    closed_s = float(line.rsplit("listeners closed in ", 1)[1].split()[0])
    assert IDLE_STOP_GRACE_S - 0.05 <= closed_s < STOP_GRACE_S, line


def test_decode_stream_reports_prefill_cache_hits(pair: tuple[str, str]) -> None:
    """The prompt's prefix-cache hits happen on the prefill worker; the decode worker's
    Complete message carries them to the router."""
    prefill, decode = pair
    prompt = list(range(100, 140))

    async def cached_of(rid: str) -> int:
        responses = await disaggregated_responses(prefill, decode, request(rid, prompt, max_new=2))
        (done,) = [r.complete for r in responses if r.HasField("complete")]
        return done.cached_tokens

    assert asyncio.run(cached_of("cold")) == 0
    assert asyncio.run(cached_of("warm")) >= 32  # two full 16-token pages of the 40


async def session_responses(
    endpoint: str, frames: list[decode_pb2.SessionRequest], expect: int
) -> tuple[dict[str, list[common_pb2.GenerateResponse]], list[int]]:
    """Send ``frames`` on one Decode.Session; collect responses until ``expect`` requests
    ended. Returns each request's messages and each response frame's size."""
    by_request: dict[str, list[common_pb2.GenerateResponse]] = {}
    sizes: list[int] = []
    ended = 0
    async with grpc.aio.insecure_channel(endpoint) as ch:
        call = decode_pb2_grpc.DecodeStub(ch).Session()
        for frame in frames:
            await call.write(frame)
        while ended < expect:
            frame = await call.read()
            assert frame is not grpc.aio.EOF
            sizes.append(len(frame.responses))
            for r in frame.responses:
                by_request.setdefault(r.request_id, []).append(r)
                ended += r.WhichOneof("response") != "chunk"
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF  # nothing left running: the worker ends it
    return by_request, sizes


def test_session_carries_many_requests_token_exact(
    model_dir: Path, pair: tuple[str, str], colocated: str
) -> None:
    """One Decode.Session: every request's tokens equal the offline engine's, whether sent
    as produced, 4 at a time or all at the end; frames batch several requests' messages; a
    duplicate id is refused; disaggregated requests ride the decode worker's session too."""
    prompts = make_prompts(vocab_size=512)
    expected = offline(model_dir, prompts)
    # Odd requests ask for their tokens at the end; every fourth, 4 tokens per message.
    submits = [
        decode_pb2.DecodeRequest(
            request=request(f"s{i}", p),
            deliver_at_end=i % 2 == 1,
            stream_interval=4 if i % 4 == 2 else 0,
        )
        for i, p in enumerate(prompts)
    ]
    # The duplicate in the same frame, after s0: refused whatever the timing (in a frame of its
    # own it could arrive after s0 has ended, when its id is free again and it would run).
    duplicate = decode_pb2.DecodeRequest(request=request("s0", prompts[0]))
    frames = [decode_pb2.SessionRequest(submit=[*submits, duplicate])]

    async def main() -> None:
        by_request, sizes = await session_responses(colocated, frames, len(prompts))
        for i, want in enumerate(expected):
            msgs = by_request[f"s{i}"]
            kinds = [m.WhichOneof("response") for m in msgs]
            if i == 0:  # the duplicate's refusal shares s0's id: it comes first
                error = msgs.pop(next(j for j, k in enumerate(kinds) if k == "error"))
                assert error.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert "already running" in error.error.message
                kinds = [m.WhichOneof("response") for m in msgs]
            assert kinds[-1] == "complete" and msgs[-1].complete.completion_tokens == MAX_NEW
            if i % 2 == 1:
                assert kinds == ["chunk", "complete"]  # deliver_at_end: one message
            if i % 4 == 2:
                sizes_i = [len(m.chunk.token_ids) for m in msgs if m.HasField("chunk")]
                assert min(sizes_i[:-1]) >= 4 and len(sizes_i) <= 3, sizes_i  # 10 tokens
            got = [t for m in msgs if m.HasField("chunk") for t in m.chunk.token_ids]
            assert got == want, f"request s{i}"
        assert max(sizes) > 1, f"no frame batched two requests: {sizes}"

        # Disaggregated: the request on the decode worker's session and on the prefill
        # worker's session, as the router sends a streamed one: the prefill worker's first
        # reply is the first token, then its answer.
        prefill, decode = pair
        tid = secrets.randbits(63) or 1
        submit = decode_pb2.DecodeRequest(
            request=request("d0", prompts[0]), transfer_id=tid, prefill_endpoint=prefill
        )
        async with grpc.aio.insecure_channel(prefill) as pch:
            call = prefill_pb2_grpc.PrefillStub(pch).Session()
            await call.write(
                prefill_pb2.PrefillSessionRequest(
                    submit=[
                        prefill_pb2.PrefillRequest(
                            request=request("d0", prompts[0]),
                            transfer_id=tid,
                            stream_first_token=True,
                        )
                    ]
                )
            )
            by_request, _ = await session_responses(
                decode, [decode_pb2.SessionRequest(submit=[submit])], 1
            )
            replies = list((await call.read()).replies)
            if len(replies) == 1:  # the answer came in a frame of its own
                replies += (await call.read()).replies
            assert [r.request_id for r in replies] == ["d0", "d0"]
            assert [r.WhichOneof("reply") for r in replies] == ["first", "done"]
            assert list(replies[0].first.token_ids) == expected[0][:1]
            assert not replies[0].first.logprobs  # none asked for
            assert replies[1].done.first_token_id == expected[0][0]
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
        got = [t for m in by_request["d0"] if m.HasField("chunk") for t in m.chunk.token_ids]
        assert got == expected[0]
        await wait_pages_free(colocated)
        await wait_pages_free(decode)
        await wait_pages_free(prefill, prefill=True)

    asyncio.run(main())


def test_session_abort_and_broken_session_free_pages(colocated: str) -> None:
    """An abort in a frame ends that request alone; the session ending (the router gone)
    aborts everything still on it. Either way every page comes back."""

    async def main() -> None:
        async with grpc.aio.insecure_channel(colocated) as ch:
            call = decode_pb2_grpc.DecodeStub(ch).Session()
            long_ = [request(f"long{i}", [5, 6, 7, i + 8], max_new=1000) for i in range(3)]
            short = request("short", [9, 10, 11])
            await call.write(
                decode_pb2.SessionRequest(
                    submit=[decode_pb2.DecodeRequest(request=r) for r in [*long_, short]]
                )
            )
            seen: dict[str, int] = {}
            short_done = False
            at_abort: dict[str, int] | None = None  # token counts when the abort went out
            while not short_done or at_abort is None or seen["long1"] < at_abort["long1"] + 30:
                frame = await call.read()
                for r in frame.responses:
                    seen[r.request_id] = seen.get(r.request_id, 0) + len(r.chunk.token_ids)
                    short_done |= r.request_id == "short" and r.HasField("complete")
                if at_abort is None and seen.get("long0", 0) >= 2:
                    await call.write(decode_pb2.SessionRequest(abort=["long0"]))
                    at_abort = dict(seen)
            assert seen["short"] == MAX_NEW
            # long0 stops: a window of 30 long1 tokens passes with none of long0's (a busy
            # machine may take many steps to read the abort: the window starts again while
            # long0's tokens still land), long1 going on without it, and long0 far from its
            # 1,000 tokens.
            settled = dict(seen)
            while seen["long1"] < settled["long1"] + 30:
                for r in (await call.read()).responses:
                    seen[r.request_id] = seen.get(r.request_id, 0) + len(r.chunk.token_ids)
                if seen["long0"] != settled["long0"]:
                    settled = dict(seen)
                assert seen["long1"] < 900, f"long0 still ran at {seen['long0']} tokens"
            assert seen["long0"] == settled["long0"] < 500
            load_now = await load(colocated)
            assert load_now.num_running >= 1  # long1 and long2 still run
            call.cancel()  # the router goes away with long1 and long2 in flight
        await wait_pages_free(colocated)

    asyncio.run(main())
