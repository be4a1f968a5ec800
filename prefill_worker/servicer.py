"""The Prefill gRPC service: compute the prompt, sample its first token, write the KV pages
into the decode worker that attached under the same transfer id, then tell it so.

On a session, a request that asks for it (``stream_first_token``) gets its first token in a
``first`` reply as soon as it is sampled: the router streams it to the client while the pages
are still on their way, so the hand-off is not part of the time to the first token.

The prefill request and the decode worker's AttachDestination may arrive in either order;
a `KVSender` per transfer id meets them, with a timeout on each waiting state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace

import grpc

from engine.engine import StepOutput
from kv_transfer import (
    Destination,
    KVPoolDescriptor,
    KVSender,
    LayoutMismatchError,
    PageWriter,
    TransferError,
    TransferRevoked,
    TransferState,
    TransferTable,
    WriteBatch,
    WriteFence,
    build_write_batch,
    check_compatible,
)
from protos import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.contract import PREFILL
from worker.convert import (
    layout_from_proto,
    logprobs_to_proto,
    sampling_from_proto,
    status_for,
    stream_chunk,
)
from worker.metrics import handoff, handoff_failed, observe_phases, prefill_phases
from worker.runtime import WorkerRuntime
from worker.service import WorkerService

log = logging.getLogger(__name__)

# An attached destination whose prefill request never comes is dropped after this long.
_SENDER_MAX_AGE_FACTOR = 2.0


def _failure(request_id: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a prefill failed with (logged when it is our bug)."""
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("prefill of %s failed", request_id, exc_info=exc)
    return code, str(exc)


class PrefillServicer(WorkerService, prefill_pb2_grpc.PrefillServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(runtime, PREFILL, self._replies, _failure)
        if runtime.transfer is None or len(runtime.pools) != 1:
            raise ValueError(
                "a prefill worker needs a transfer engine and one registered KV pool "
                "(expert parallelism on the prefill side is not supported yet)"
            )
        self.rt = runtime
        # Transfers the decode side gave up on: never written (see kv_transfer.fence).
        self.fence = WriteFence()
        self.writer = PageWriter(runtime.transfer, fence=self.fence)
        self.pool = runtime.pools[0]
        self.senders: TransferTable[KVSender] = TransferTable()

    def _sender(self, transfer_id: int) -> KVSender:
        max_age = self.rt.settings.transfer_timeout_s * _SENDER_MAX_AGE_FACTOR
        for stale in self.senders.expire(self.senders.clock(), max_age):
            stale.fail("expired before its prefill request arrived")
        return self.senders.get_or_create(transfer_id, lambda: KVSender(transfer_id))

    async def AttachDestination(
        self, request: prefill_pb2.AttachDestinationRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.AttachDestinationResponse:
        remote = layout_from_proto(request.layout)
        if self.fence.is_revoked(request.transfer_id):
            # A destination that reaches us after its revocation (the two calls raced).
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"transfer {request.transfer_id} was revoked by its decode worker",
            )
        try:
            check_compatible(self.rt.layout, remote, local_label="prefill", remote_label="decode")
            pool = KVPoolDescriptor(
                layout=remote,
                k_base_addrs=tuple(request.k_base_addrs),
                v_base_addrs=tuple(request.v_base_addrs),
                num_pages=request.num_pages,
            )
            dest = Destination(
                request_id=request.request_id,
                transfer_id=request.transfer_id,
                decode_endpoint=request.decode_endpoint,
                session_id=request.session_id,
                page_ids=tuple(request.page_ids),
                pool=pool,
                dp_rank=request.dp_rank,
            )
            self._sender(request.transfer_id).attach(dest)
        except LayoutMismatchError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return prefill_pb2.AttachDestinationResponse(request_id=request.request_id)

    async def RevokeDestination(
        self, request: prefill_pb2.RevokeDestinationRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.RevokeDestinationResponse:
        """The decode worker gave up on the transfer: write nothing more for it, and say
        whether a write is still running (the decode worker asks again until none is)."""
        tid = request.transfer_id
        writing = self.fence.revoke(tid)
        sender = self.senders.get(tid)
        if sender is not None and sender.state is not TransferState.SUCCESS:
            sender.fail("revoked by the decode worker")
        idle = not writing or await asyncio.to_thread(
            self.fence.wait_idle, tid, self.rt.settings.rpc_timeout_s / 2
        )
        return prefill_pb2.RevokeDestinationResponse(request_id=request.request_id, idle=idle)

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        try:
            async with contextlib.aclosing(self._prefill(request)) as outputs:
                async for out in outputs:
                    if isinstance(out, prefill_pb2.PrefillResponse):
                        return out
            raise RuntimeError(f"prefill of {request.request.request_id} gave no answer")
        except Exception as exc:
            await context.abort(*_failure(request.request.request_id, exc))
            raise  # context.abort raises; this is for type checkers

    async def _replies(
        self, request: prefill_pb2.PrefillRequest
    ) -> AsyncIterator[prefill_pb2.PrefillReply]:
        """A request's replies on a session: its first token when it asked for it, then the
        answer (``done``); raises what failed it (the session sends that as ``error``)."""
        rid = request.request.request_id
        async with contextlib.aclosing(self._prefill(request)) as outputs:
            async for out in outputs:
                if isinstance(out, prefill_pb2.PrefillResponse):
                    yield prefill_pb2.PrefillReply(request_id=rid, done=out)
                elif request.stream_first_token:
                    yield prefill_pb2.PrefillReply(request_id=rid, first=stream_chunk([out]))

    async def _prefill(
        self, request: prefill_pb2.PrefillRequest
    ) -> AsyncGenerator[StepOutput | prefill_pb2.PrefillResponse, None]:
        """Prefill and sample the first token (yielded at once, before the hand-off), write
        the pages, then yield the answer; raises what failed it. The answer comes after the
        held pages are released, as the last thing."""
        received = time.monotonic()
        req, tid = request.request, request.transfer_id
        rid = req.request_id
        if self.fence.is_revoked(tid):
            raise TransferRevoked(tid)  # its decode worker gave up on it: compute nothing
        sender = self._sender(tid)
        dest: Destination | None = None
        write: asyncio.Future[None] | None = None
        try:
            # The prefill worker samples only the first token; the decode worker the rest.
            sampling = replace(sampling_from_proto(req.sampling), max_new_tokens=1)
            first: StepOutput | None = None
            async for outs in self.rt.engine.generate(
                rid, list(req.token_ids), sampling, hold_pages=True
            ):
                first = outs[-1]
            if first is None:
                raise RuntimeError(f"request {rid} finished without a token")
            sampled = time.monotonic()
            handoff(self.rt.metrics, rid, "bootstrap")
            # The consumer takes it without waiting (a reply queued, or nothing); closing this
            # generator here runs the finally below as cancellation would.
            yield first
            dest = await sender.wait_for_destination(self.rt.settings.transfer_timeout_s)
            sender.begin()
            handoff(self.rt.metrics, rid, "inflight")
            # The last output names the held pages; asking the engine loop again would wait
            # for the step it is running (a whole prefill of another request, often).
            if first.held_pages is not None:
                src_pages = list(first.held_pages)
            else:
                src_pages = await self.rt.engine.held_pages(rid)
            batch = self._write_batch(rid, src_pages, dest)
            start = time.monotonic()
            # The write runs in a thread that a cancelled coroutine cannot stop: it is awaited
            # again below before the source pages are released.
            write = asyncio.ensure_future(
                asyncio.to_thread(self.writer.write, dest.session_id, batch, tid)
            )
            await asyncio.shield(write)
            written = time.monotonic()
            nbytes = batch.total_bytes
            if self.rt.metrics is not None:
                self.rt.metrics.transferred(nbytes, written - start)
            sender.succeed()
            await self._notify(dest, first=first)
            phases = prefill_phases(received, first.prefill_started_at, sampled)
            phases.update(handoff_wait=start - sampled, transfer_done=time.monotonic() - written)
            observe_phases(self.rt.metrics, phases)
            answer = prefill_pb2.PrefillResponse(
                request_id=rid,
                first_token_id=first.token_id,
                cached_tokens=first.num_cached_tokens,
                transferred_bytes=nbytes,
            )
        except Exception as exc:
            if sender.state is not TransferState.SUCCESS:  # the pages may be written already
                sender.fail(str(exc))
            handoff_failed(self.rt.metrics, rid)
            if dest is not None:
                await self._notify(dest, error=f"prefill worker failed: {exc}")
            raise
        finally:
            handoff(self.rt.metrics, rid, None)
            self.senders.pop(tid)
            if write is not None and not write.done():
                # Cancelled mid-write: stop after the call in flight, and keep the source
                # pages until it has ended.
                self.fence.revoke(tid)
                await asyncio.wait([write])
            if self.rt.engine.alive:
                await asyncio.shield(self.rt.engine.release_held(rid))
        yield answer

    def _write_batch(self, request_id: str, src_pages: list[int], dest: Destination) -> WriteBatch:
        """The writes of one hand-off. No timeout wraps them: the pages must stay held until
        the write has really ended; Mooncake's own progress timeout (set by the server below
        the transfer timeout) bounds a write to a peer that stopped answering."""
        if len(src_pages) != len(dest.page_ids):
            raise ValueError(
                f"request {request_id}: {len(src_pages)} prompt pages here but the decode "
                f"worker reserved {len(dest.page_ids)}"
            )
        return build_write_batch(self.pool, dest.pool, src_pages, dest.page_ids)

    async def _notify(
        self, dest: Destination, first: StepOutput | None = None, error: str = ""
    ) -> None:
        """Tell the decode worker the pages are written (or that they never will be)."""
        msg = decode_pb2.TransferDoneRequest(
            request_id=dest.request_id, transfer_id=dest.transfer_id, error=error
        )
        if first is not None:
            msg.first_token_id = first.token_id
            msg.cached_tokens = first.num_cached_tokens
            lp = logprobs_to_proto(first.logprobs)
            if lp is not None:
                msg.first_logprobs.CopyFrom(lp)
        stub = decode_pb2_grpc.DecodeStub(self.rt.channel(dest.decode_endpoint))
        try:
            await stub.TransferDone(msg, timeout=self.rt.settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if first is not None:
                raise TransferError(
                    f"decode worker {dest.decode_endpoint} did not take transfer "
                    f"{dest.transfer_id}: {exc.code().name} {exc.details()}"
                ) from exc
            log.warning("could not tell %s that transfer %s failed", dest.decode_endpoint, dest)
