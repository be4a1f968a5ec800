"""The Decode gRPC service: reserve pages, have the prefill worker write them, stream tokens.

A request without a transfer id (colocated mode) is computed here from its prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc

from engine.async_engine import EngineDeadError, RequestAborted
from engine.engine import StepOutput
from engine.sampling import SamplingParams
from kv_transfer import (
    KVReceiver,
    LayoutMismatchError,
    TransferError,
    TransferFailed,
    TransferState,
    TransferTable,
)
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.contract import DECODE, finish_to_proto
from worker.convert import (
    PeerFailure,
    layout_to_proto,
    logprobs_from_proto,
    sampling_from_proto,
    status_for,
    stream_chunk,
)
from worker.metrics import handoff, handoff_failed, observe_phases, prefill_phases
from worker.runtime import WorkerRuntime
from worker.service import WorkerService

log = logging.getLogger(__name__)

# AttachDestination answers that say the prefill worker kept no destination.
_REFUSED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
_ABORTED = "aborted"
_AWAITING_KV = frozenset({TransferState.BOOTSTRAPPING, TransferState.WAITING_FOR_INPUT})


@dataclass(frozen=True)
class _KVArrived:
    """A transfer's completion as its waiter gets it: the message, and when it came
    (time.monotonic()), for the TTFT phase metrics."""

    message: decode_pb2.TransferDoneRequest
    at: float


def _failure(request_id: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a request failed with (logged when it is our bug)."""
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("request %s failed", request_id, exc_info=exc)
    return code, str(exc)


def chunk(outs: list[StepOutput]) -> common_pb2.GenerateResponse:
    """One message for the tokens at hand (logprobs parallel to them, when asked for)."""
    return common_pb2.GenerateResponse(request_id=outs[0].request_id, chunk=stream_chunk(outs))


def complete(out: StepOutput) -> common_pb2.GenerateResponse:
    return common_pb2.GenerateResponse(
        request_id=out.request_id,
        complete=common_pb2.Complete(
            finish_reason=finish_to_proto(out.finish_reason),
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_output_tokens,
            cached_tokens=out.num_cached_tokens,
        ),
    )


async def refuses_connections(endpoint: str, timeout_s: float = 1.0) -> bool:
    """Whether nothing listens at `endpoint` ("host:port"): a TCP connect is refused. False
    when the connect succeeds or does not answer (a stopped process's kernel still accepts)."""
    host, _, port = endpoint.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout_s
        )
    except ConnectionRefusedError:
        return True
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    writer.close()
    return False


# A write the sender saw end (done, failed on its progress timeout, or stopped by a revocation)
# may still have bytes in this host's socket buffers, which this process's transfer engine
# lands in the pages as soon as it runs: after this worker was itself stopped (SIGSTOP, a
# long pause) those land only once it resumes. So pages are freed only after this much time
# awake, counted in short sleeps so that a pause in between does not count.
DRAIN_STEPS = 10
DRAIN_STEP_S = 0.05


async def _drain_inbound_writes() -> None:
    for _ in range(DRAIN_STEPS):
        await asyncio.sleep(DRAIN_STEP_S)


class DecodeServicer(WorkerService, decode_pb2_grpc.DecodeServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(runtime, DECODE, self._responses, _failure)
        self.rt = runtime
        self.receivers: TransferTable[KVReceiver] = TransferTable()
        self.transfer_of: dict[str, int] = {}  # request id -> transfer id, while it waits
        self._releases: set[asyncio.Task[None]] = set()  # quarantines waiting for a revoke

    async def Generate(
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        try:
            async for msg in self._responses(request):
                yield msg
        except Exception as exc:
            await context.abort(*_failure(request.request.request_id, exc))

    async def _responses(
        self, request: decode_pb2.DecodeRequest
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """One request's stream messages: chunks, then a Complete. Raises what failed it."""
        received = time.monotonic()
        req = request.request
        sampling = sampling_from_proto(req.sampling)
        untimed = request.transfer_id == 0  # a colocated prefill, timed at its first token
        if request.transfer_id == 0:
            outputs = self.rt.engine.generate(req.request_id, list(req.token_ids), sampling)
        else:
            outputs = self._disaggregated(request, sampling, received)
        # Outputs held back: all of them until the last (deliver_at_end), or until there are
        # stream_interval of them.
        every = 0 if request.deliver_at_end else max(1, request.stream_interval)
        held: list[StepOutput] = []
        try:
            async for outs in outputs:
                if self.rt.metrics is not None:
                    self.rt.metrics.generated(len(outs))
                if untimed:
                    untimed = False
                    started = outs[0].prefill_started_at
                    observe_phases(
                        self.rt.metrics, prefill_phases(received, started, time.monotonic())
                    )
                if every != 1:
                    held += outs
                    if not outs[-1].finished and (every == 0 or len(held) < every):
                        continue
                    outs, held = held, []
                yield chunk(outs)
                if outs[-1].finished:
                    yield complete(outs[-1])
        except RequestAborted:
            if held:
                yield chunk(held)
            yield common_pb2.GenerateResponse(
                request_id=req.request_id,
                complete=common_pb2.Complete(finish_reason=common_pb2.FINISH_REASON_ABORT),
            )

    async def _disaggregated(
        self, request: decode_pb2.DecodeRequest, sampling: SamplingParams, received: float
    ) -> AsyncIterator[list[StepOutput]]:
        req, rt = request.request, self.rt
        rid, tid = req.request_id, request.transfer_id
        if not rt.pools:
            raise ValueError(f"this worker (role {rt.settings.role}) takes no KV transfers")
        receiver = self.receivers.get_or_create(tid, lambda: KVReceiver(tid))
        self.transfer_of[rid] = tid
        stream = rt.engine.open_stream(rid)
        finished = False
        attach_sent = False  # from then on the prefill worker may write our pages
        prompt = list(req.token_ids)
        try:
            handoff(rt.metrics, rid, "prealloc")
            # The pages live in one data-parallel rank's pool; the prefill worker writes there.
            rank, pages = await rt.engine.reserve_transfer(prompt, sampling, rid)
            pool = rt.pools[rank]
            attach = prefill_pb2.AttachDestinationRequest(
                request_id=rid,
                transfer_id=tid,
                decode_endpoint=rt.settings.endpoint,
                session_id=rt.sessions[rank],
                page_ids=pages,
                k_base_addrs=list(pool.k_base_addrs),
                v_base_addrs=list(pool.v_base_addrs),
                layout=layout_to_proto(rt.layout),
                dp_rank=rank,
                num_pages=pool.num_pages,
            )
            stub = prefill_pb2_grpc.PrefillStub(rt.channel(request.prefill_endpoint))
            # Ready for the completion before the destination leaves: the prefill worker may
            # write and report done before its answer to AttachDestination reaches us.
            receiver.bootstrapped()
            try:
                attach_sent = True
                await stub.AttachDestination(attach, timeout=rt.settings.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                if receiver.state is not TransferState.SUCCESS:  # else only the answer is lost
                    if exc.code() in _REFUSED:
                        attach_sent = False  # the prefill worker took no destination
                    if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                        raise LayoutMismatchError(exc.details()) from exc
                    raise PeerFailure(
                        f"prefill worker {request.prefill_endpoint} refused the destination of "
                        f"transfer {tid}: {exc.code().name} {exc.details()}",
                        request.prefill_endpoint,
                    ) from exc
            attached = time.monotonic()
            handoff(rt.metrics, rid, "transfer")
            try:
                arrived = await receiver.wait(rt.settings.transfer_timeout_s)
            except TransferError as exc:
                if isinstance(exc, TransferFailed) and exc.reason == _ABORTED:
                    raise
                # The KV never came: the prefill worker's failure (stopped, dead, or it
                # reported one), not ours.
                raise PeerFailure(str(exc), request.prefill_endpoint) from exc
            handoff(rt.metrics, rid, None)
            if not isinstance(arrived, _KVArrived):
                raise TypeError(f"transfer {tid} completed with {type(arrived).__name__}")
            done = arrived.message
            first = logprobs_from_proto(done.first_logprobs, done.HasField("first_logprobs"))
            out = await rt.engine.complete_transfer(rid, done.first_token_id, first)
            # The prompt's cache hits happened on the prefill worker: report those.
            cached = done.cached_tokens
            finished = out.finished
            attached = min(attached, arrived.at)  # TransferDone may beat the acknowledgement
            observe_phases(
                rt.metrics,
                {
                    "decode_bootstrap": attached - received,
                    "decode_kv_wait": arrived.at - attached,
                    "decode_pickup": time.monotonic() - arrived.at,
                },
            )
            yield [replace(out, num_cached_tokens=cached)]
            if not finished:
                async for outs in rt.engine.iterate(stream):
                    finished = outs[-1].finished
                    yield [replace(o, num_cached_tokens=cached) for o in outs]
        except (TransferError, LayoutMismatchError) as exc:
            if getattr(exc, "reason", "") != "aborted":  # a client's abort is no failed hand-off
                handoff_failed(rt.metrics, rid)
            raise
        finally:
            handoff(rt.metrics, rid, None)
            self.receivers.pop(tid)
            self.transfer_of.pop(rid, None)
            rt.engine.close_stream(rid)
            if not finished and rt.engine.alive:
                if attach_sent and receiver.state is not TransferState.SUCCESS:
                    await asyncio.shield(
                        self._quarantine(
                            rid, tid, request.prefill_endpoint, revoke=not receiver.sender_done
                        )
                    )
                else:
                    await asyncio.shield(rt.engine.abort(rid))

    async def _quarantine(
        self, rid: str, tid: int, prefill_endpoint: str, revoke: bool = True
    ) -> None:
        """Give up on a request whose pages a write may still reach: keep the pages out of
        use and free them only once it is safe (`_release_when_safe`; without `revoke` the
        prefill worker already said its writes ended, and only the drain is waited for)."""
        if not await self.rt.engine.quarantine_transfer(rid, tid):
            await self.rt.engine.abort(rid)  # its KV had arrived: nothing can write it now
            return
        task = asyncio.create_task(self._release_when_safe(rid, tid, prefill_endpoint, revoke))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_when_safe(
        self, rid: str, tid: int, endpoint: str, revoke_first: bool = True
    ) -> None:
        """Revoke the transfer at the prefill worker until it says no write of it runs or
        will start, then free the quarantined pages. Without an answer the pages stay out of
        use, except when the prefill worker is gone: its port refuses connections for a whole
        transfer timeout (its writes are in its own process, and Mooncake's progress timeout,
        half the transfer timeout, ends any still running), or `--kv-quarantine-timeout`
        passes (a host that stays unreachable)."""
        settings = self.rt.settings
        loop = asyncio.get_running_loop()
        start = loop.time()
        refused_since: float | None = None
        delay = 0.05
        stub = prefill_pb2_grpc.PrefillStub(self.rt.channel(endpoint))
        revoke = prefill_pb2.RevokeDestinationRequest(request_id=rid, transfer_id=tid)
        reason = ""
        while revoke_first and not reason:
            try:
                reply = await stub.RevokeDestination(revoke, timeout=settings.rpc_timeout_s)
                if reply.idle:
                    break
                refused_since = None
            except grpc.aio.AioRpcError:
                if await refuses_connections(endpoint):
                    refused_since = loop.time() if refused_since is None else refused_since
                    if loop.time() - refused_since >= settings.transfer_timeout_s:
                        reason = f"prefill worker {endpoint} is gone"
                else:
                    refused_since = None
            if loop.time() - start >= settings.kv_quarantine_timeout_s:
                reason = (
                    f"no answer from prefill worker {endpoint} in "
                    f"{settings.kv_quarantine_timeout_s:g} s (--kv-quarantine-timeout)"
                )
            if not reason:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if reason:
            log.warning("freeing the quarantined pages of transfer %s: %s", tid, reason)
        await _drain_inbound_writes()
        with contextlib.suppress(EngineDeadError):  # the pool is gone with the engine
            await self.rt.engine.release_quarantine(tid)

    async def TransferDone(
        self, request: decode_pb2.TransferDoneRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.TransferDoneResponse:
        receiver = self.receivers.get(request.transfer_id)
        if receiver is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no request waits for transfer {request.transfer_id}"
            )
            raise AssertionError("unreachable: abort raises")
        if request.error:
            receiver.sender_failed(request.error)
        else:
            receiver.complete(_KVArrived(request, time.monotonic()))
        return decode_pb2.TransferDoneResponse(request_id=request.request_id)

    async def Abort(
        self, request: common_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.AbortResponse:
        tid = self.transfer_of.get(request.request_id)
        receiver = self.receivers.get(tid) if tid is not None else None
        if receiver is not None and receiver.state in _AWAITING_KV:
            # The request's own stream ends it, and keeps its pages until they are safe.
            receiver.fail(_ABORTED)
            return common_pb2.AbortResponse(request_id=request.request_id, found=True)
        return await self.rt.abort(request)
