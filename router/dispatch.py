"""One request's worker calls: colocated (the request on the worker's decode session) or
disaggregated (on the decode worker's session and a ``Prefill.Prefill`` call at once, sharing
a transfer id).

Both are async generators of ``WorkerEvent``s that end after ``Finished``. Whatever ends them
early (an error, ``aclose``, cancellation of the consuming task) aborts the request on the
decode session, cancels the prefill call and asks the prefill worker to ``Abort`` it, so its
KV pages are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any

import grpc

from protos import prefill_pb2, prefill_pb2_grpc
from protos.decode_pb2 import DecodeRequest
from router.events import (
    Finished,
    WorkerError,
    WorkerEvent,
    WorkerRequest,
    event_from_proto,
    request_to_proto,
)
from router.session import Session

log = logging.getLogger(__name__)

AbortFn = Callable[[str], None]  # fire-and-forget Abort of a request id on the workers


# Transfer ids need to be unique, not secret: a generator seeded once from the OS.
_TRANSFER_IDS = random.Random(secrets.randbits(128))


def new_transfer_id() -> int:
    """A random non-zero 63-bit id (0 means "colocated")."""
    while True:
        tid = _TRANSFER_IDS.getrandbits(63)
        if tid:
            return tid


def rpc_error(exc: BaseException, endpoint: str) -> WorkerError:
    if isinstance(exc, grpc.aio.AioRpcError):
        return WorkerError(exc.code(), exc.details() or "", endpoint)
    if isinstance(exc, WorkerError):
        return exc
    return WorkerError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", endpoint)


def decode_request(
    request: WorkerRequest, transfer_id: int = 0, prefill: str = ""
) -> DecodeRequest:
    return DecodeRequest(
        request=request_to_proto(request),
        transfer_id=transfer_id,
        prefill_endpoint=prefill,
        deliver_at_end=not request.stream,
    )


async def colocated(
    session: Session, request: WorkerRequest, on_end: Callable[[], None]
) -> AsyncGenerator[WorkerEvent, None]:
    """The request on a colocated worker's session; closing early aborts it there.
    ``on_end`` runs once the request is over on the worker, however it ended."""
    try:
        stream = session.open(decode_request(request))
    except BaseException:
        on_end()
        raise
    endpoint = session.endpoint
    try:
        while True:
            event = event_from_proto(await stream.next(), endpoint)
            yield event
            if isinstance(event, Finished):
                return
    finally:
        stream.close()
        on_end()


async def disaggregated(
    prefill_stub: prefill_pb2_grpc.PrefillStub,
    prefill_endpoint: str,
    session: Session,
    request: WorkerRequest,
    abort_prefill: AbortFn,
    on_prefill_done: Callable[[], None],
    on_decode_done: Callable[[], None],
) -> AsyncGenerator[WorkerEvent, None]:
    """The decode session carries every token, the first included; the prefill call only
    reports success (or the error that dooms the request). Once a token arrived the pages are
    on the decode worker, so a later prefill failure is ignored. ``on_prefill_done`` runs when
    the prefill call ends and ``on_decode_done`` when the decode side does, however they end.
    """
    try:
        tid = new_transfer_id()
        decode_endpoint = session.endpoint
        stream = session.open(decode_request(request, tid, prefill_endpoint))
        prefill_call = prefill_stub.Prefill(
            prefill_pb2.PrefillRequest(request=request_to_proto(request), transfer_id=tid)
        )
    except BaseException:
        on_prefill_done()
        on_decode_done()
        raise
    prefill_done: asyncio.Future[prefill_pb2.PrefillResponse] = asyncio.ensure_future(prefill_call)
    prefill_done.add_done_callback(lambda _: on_prefill_done())
    read: asyncio.Future[Any] | None = None  # the next message, while racing the prefill call
    finished = decoding = False
    try:
        while True:
            if not (decoding or prefill_done.done()):
                if read is None:
                    read = asyncio.ensure_future(stream.next())
                await asyncio.wait({read, prefill_done}, return_when=asyncio.FIRST_COMPLETED)
            failure = _exception(prefill_done) if prefill_done.done() and not decoding else None
            if failure is not None:
                raise rpc_error(failure, prefill_endpoint) from None
            try:
                if read is None:
                    reply = await stream.next()
                else:
                    pending, read = read, None
                    reply = await pending
            except WorkerError as exc:
                # A failed prefill usually fails the decode side too; its error says why.
                cause = _exception(prefill_done) if prefill_done.done() and not decoding else None
                if cause is not None:
                    raise rpc_error(cause, prefill_endpoint) from None
                raise exc from None
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
        stream.close()
        on_decode_done()
        if not finished:
            prefill_call.cancel()
            abort_prefill(request.request_id)
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
