"""One request's worker calls: colocated (the request on the worker's decode session) or
disaggregated (on the decode worker's session and the prefill worker's session at once,
sharing a transfer id).

Both are async generators of ``WorkerEvent``s that end after ``Finished``. Whatever ends them
early (an error, ``aclose``, cancellation of the consuming task) aborts the request on every
session it is still running on, so its KV pages are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any

from protos.common_pb2 import GenerateRequest, GenerateResponse
from protos.decode_pb2 import DecodeRequest
from protos.prefill_pb2 import PrefillReply, PrefillRequest, PrefillResponse
from router.client.errors import WorkerError, status_code_from_int
from router.client.events import (
    Finished,
    WorkerEvent,
    WorkerRequest,
    event_from_proto,
    request_to_proto,
)
from router.client.session import RequestStream, Session

log = logging.getLogger(__name__)


def new_transfer_id() -> int:
    """A random non-zero 63-bit id (0 means "colocated"), drawn from the OS each time: no
    generator state shared by everything in the process."""
    while True:
        tid = secrets.randbits(63)
        if tid:
            return tid


def decode_request(
    request: WorkerRequest,
    transfer_id: int = 0,
    prefill: str = "",
    msg: GenerateRequest | None = None,
) -> DecodeRequest:
    return DecodeRequest(
        request=request_to_proto(request) if msg is None else msg,
        transfer_id=transfer_id,
        prefill_endpoint=prefill,
        deliver_at_end=not request.stream,
        stream_interval=request.stream_interval,
    )


async def colocated(
    session: Session[DecodeRequest, GenerateResponse],
    request: WorkerRequest,
    on_end: Callable[[], None],
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
    prefill: Session[PrefillRequest, PrefillReply],
    decode: Session[DecodeRequest, GenerateResponse],
    request: WorkerRequest,
    on_prefill_done: Callable[[], None],
    on_decode_done: Callable[[], None],
) -> AsyncGenerator[WorkerEvent, None]:
    """The decode session carries every token, the first included; the prefill reply only
    reports success (or the error that dooms the request). Once a token arrived the pages are
    on the decode worker, so a later prefill failure is ignored. ``on_prefill_done`` runs when
    the prefill side ends and ``on_decode_done`` when the decode side does, however they end.
    """
    try:
        tid = new_transfer_id()
        msg = request_to_proto(request)
        stream = decode.open(decode_request(request, tid, prefill.endpoint, msg))
        prefill_stream = prefill.open(PrefillRequest(request=msg, transfer_id=tid))
    except BaseException:
        on_prefill_done()
        on_decode_done()
        raise
    prefill_done = asyncio.ensure_future(_prefill_reply(prefill_stream))

    def prefill_ended(_: object) -> None:
        prefill_stream.close()  # aborts the prefill unless its reply came
        on_prefill_done()

    prefill_done.add_done_callback(prefill_ended)
    read: asyncio.Future[Any] | None = None  # the next message, while racing the prefill reply
    finished = decoding = False
    try:
        while True:
            if not (decoding or prefill_done.done()):
                if read is None:
                    read = asyncio.ensure_future(stream.next())
                await asyncio.wait({read, prefill_done}, return_when=asyncio.FIRST_COMPLETED)
            failure = _exception(prefill_done) if prefill_done.done() and not decoding else None
            if failure is not None:
                raise failure
            try:
                if read is None:
                    reply = await stream.next()
                else:
                    pending, read = read, None
                    reply = await pending
            except WorkerError:
                # A failed prefill usually fails the decode side too; its error says why.
                cause = _exception(prefill_done) if prefill_done.done() and not decoding else None
                if cause is not None:
                    raise cause from None
                raise
            event = event_from_proto(reply, decode.endpoint)
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
            prefill_done.cancel()  # its stream closes unanswered: the prefill is aborted
        # The prefill reply may trail the last token; let it land without a warning.
        prefill_done.add_done_callback(_drain)


async def _prefill_reply(stream: RequestStream[PrefillReply]) -> PrefillResponse:
    """The prefill's answer; raises ``WorkerError`` with the status it failed with."""
    reply = await stream.next()
    if reply.HasField("error"):
        code = status_code_from_int(reply.error.code)
        raise WorkerError(code, reply.error.message, stream.endpoint)
    return reply.done


def _with_prefill_cache(event: Finished, prefill: asyncio.Future[PrefillResponse]) -> Finished:
    """The prefix-cache hit happened on the prefill worker: report it if decode did not."""
    if _exception(prefill) is not None or prefill.cancelled():
        return event
    cached = prefill.result().cached_tokens
    return replace(event, cached_tokens=cached) if cached > event.cached_tokens else event


def _exception(future: asyncio.Future[Any]) -> BaseException | None:
    if future.cancelled():
        return None
    return future.exception()


def _drain(future: asyncio.Future[PrefillResponse]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        exc = future.exception()
        if exc is not None:
            log.debug("prefill ended with %r", exc)
