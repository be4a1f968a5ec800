"""One request's worker calls: colocated (one ``Generate`` stream) or disaggregated
(``Decode.Generate`` stream and ``Prefill.Prefill`` call at once, sharing a transfer id).

Both are async generators of ``WorkerEvent``s that end after ``Finished``. Whatever ends them
early (an error, ``aclose``, cancellation of the consuming task) cancels every call still
running and asks the workers to ``Abort`` the request, so its KV pages are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any

import grpc

from protos import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from router.events import (
    Finished,
    WorkerError,
    WorkerEvent,
    WorkerRequest,
    event_from_proto,
    request_to_proto,
)

log = logging.getLogger(__name__)

AbortFn = Callable[[str], None]  # fire-and-forget Abort of a request id on the workers


def new_transfer_id() -> int:
    """A random non-zero 63-bit id (0 means "colocated")."""
    while True:
        tid = secrets.randbits(63)
        if tid:
            return tid


def rpc_error(exc: BaseException, endpoint: str) -> WorkerError:
    if isinstance(exc, grpc.aio.AioRpcError):
        return WorkerError(exc.code(), exc.details() or "", endpoint)
    if isinstance(exc, WorkerError):
        return exc
    return WorkerError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", endpoint)


async def colocated(
    stub: decode_pb2_grpc.DecodeStub, endpoint: str, request: WorkerRequest, abort: AbortFn
) -> AsyncGenerator[WorkerEvent, None]:
    call = stub.Generate(decode_pb2.DecodeRequest(request=request_to_proto(request)))
    finished = False
    try:
        while True:
            try:
                msg = await call.read()
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, endpoint) from None
            if msg is grpc.aio.EOF:
                raise WorkerError(
                    grpc.StatusCode.INTERNAL, "stream ended without a complete message", endpoint
                )
            event = event_from_proto(msg, endpoint)
            finished = isinstance(event, Finished)
            yield event
            if finished:
                return
    finally:
        if not call.done():
            call.cancel()
        if not finished:
            abort(request.request_id)


async def disaggregated(
    prefill_stub: prefill_pb2_grpc.PrefillStub,
    prefill_endpoint: str,
    decode_stub: decode_pb2_grpc.DecodeStub,
    decode_endpoint: str,
    request: WorkerRequest,
    abort: AbortFn,
    on_prefill_done: Callable[[], None] | None = None,
) -> AsyncGenerator[WorkerEvent, None]:
    """The decode stream carries every token, the first included; the prefill call only
    reports success (or the error that dooms the request). Once a token arrived the pages are
    on the decode worker, so a later prefill failure is ignored. ``on_prefill_done`` runs when
    the prefill call ends, however it ends."""
    tid = new_transfer_id()
    msg = request_to_proto(request)
    decode_call = decode_stub.Generate(
        decode_pb2.DecodeRequest(request=msg, transfer_id=tid, prefill_endpoint=prefill_endpoint)
    )
    prefill_call = prefill_stub.Prefill(prefill_pb2.PrefillRequest(request=msg, transfer_id=tid))
    prefill_done: asyncio.Future[prefill_pb2.PrefillResponse] = asyncio.ensure_future(prefill_call)
    if on_prefill_done is not None:
        prefill_done.add_done_callback(lambda _: on_prefill_done())
    read: asyncio.Future[Any] | None = None
    finished = decoding = False
    try:
        while True:
            if read is None:
                read = asyncio.ensure_future(decode_call.read())
            waiting: set[asyncio.Future[Any]] = {read}
            if not (prefill_done.done() or decoding):
                waiting.add(prefill_done)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            failure = _exception(prefill_done) if prefill_done.done() and not decoding else None
            if failure is not None:
                raise rpc_error(failure, prefill_endpoint) from None
            if not read.done():
                continue
            try:
                reply = read.result()
            except grpc.aio.AioRpcError as exc:
                # A failed prefill usually fails the decode side too; its error says why.
                cause = _exception(prefill_done) if prefill_done.done() and not decoding else None
                if cause is not None:
                    raise rpc_error(cause, prefill_endpoint) from None
                raise rpc_error(exc, decode_endpoint) from None
            read = None
            if reply is grpc.aio.EOF:
                raise WorkerError(
                    grpc.StatusCode.INTERNAL,
                    "stream ended without a complete message",
                    decode_endpoint,
                )
            event = event_from_proto(reply, decode_endpoint)
            decoding = True
            finished = isinstance(event, Finished)
            if isinstance(event, Finished) and prefill_done.done():
                event = _with_prefill_cache(event, prefill_done)
            yield event
            if finished:
                return
    finally:
        if read is not None and not read.done():
            read.cancel()
        if not decode_call.done():
            decode_call.cancel()
        if not finished:
            prefill_call.cancel()
            abort(request.request_id)
        # The prefill reply may trail the last token; let it land without a warning.
        prefill_done.add_done_callback(_drain)


def _with_prefill_cache(
    event: Finished, prefill: asyncio.Future[prefill_pb2.PrefillResponse]
) -> Finished:
    """The prefix-cache hit happened on the prefill worker: report it if decode did not."""
    if _exception(prefill) is not None or prefill.cancelled():
        return event
    cached = prefill.result().cached_tokens
    return replace(event, cached_tokens=cached) if cached > event.cached_tokens else event


def _exception(future: asyncio.Future[Any]) -> BaseException | None:
    if future.cancelled():
        return None
    return future.exception()


def _drain(future: asyncio.Future[prefill_pb2.PrefillResponse]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        exc = future.exception()
        if exc is not None and not (
            isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.CANCELLED
        ):
            log.debug("prefill call ended with %r", exc)
