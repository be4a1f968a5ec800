"""An in-process fake of the worker gRPC contract, for router tests without an engine.

A ``FakeWorker`` serves Decode (roles "null" and "decode") or Prefill ("prefill") plus the
standard health service on 127.0.0.1, answers each request with a scripted token sequence
(``stream_interval`` tokens a chunk, as a real decode worker sends them), and records what the
router did: the requests it sent, Aborts, and cancelled streams. Disaggregated fakes in one
process meet through ``TRANSFERS``: decode waits for the prefill call of the same transfer id,
as the real decode waits for the KV pages. A prefill fake sends its script's first tokens early
(a ``first`` reply) only when told to (``send_first``): by default it is a prefill worker that
predates them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.contract import DECODE, PREFILL, SessionMethod
from worker import session
from worker.session_server import Method, SessionServer

EOS = 2  # the tiny tokenizer's <|im_end|>
TRANSFERS: dict[int, asyncio.Event] = {}
PAGES = 64  # what GetLoad reports: one page per running request


@dataclass
class Failure:
    """Fail a call with ``code`` after ``after_tokens`` tokens (decode; -1: before waiting for
    the transfer), or (prefill) at once, or with ``after_tokens`` > 0 after its ``first``
    reply (a hand-off that fails once the first token went out)."""

    code: grpc.StatusCode
    message: str = "injected failure"
    after_tokens: int = 0


@dataclass
class FakeWorker:
    role: str = "null"
    reply: Callable[[list[int]], list[int]] = lambda prompt: [65, 66, 67]
    token_delay_s: float = 0.0  # decode: before each token; prefill: before answering
    # Prefill: this many of the script's tokens in a `first` reply when the router asks for
    # it (0: never, as a prefill worker that predates it; a real one sends 1).
    send_first: int = 0
    handoff_delay_s: float = 0.0  # prefill: from the `first` reply to the pages "landing"
    transfer_timeout_s: float = 5.0  # decode: how long to wait for the prefill's transfer
    fail: Failure | None = None
    model: str = "tiny"
    context_length: int = 64
    vocab_size: int = 512
    fingerprint: str = "fp-1"
    weights: str = "w-1"
    instance_id: str = "fake-1"
    port: int = 0  # the gRPC port to bind (0: pick one); a restart at the same address
    requests: list[common_pb2.GenerateRequest] = field(default_factory=list)
    transfer_ids: list[int] = field(default_factory=list)
    first_asked: list[bool] = field(default_factory=list)  # prefill: stream_first_token
    prefill_endpoints: list[str] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    running: int = 0  # requests being served now (GetLoad's num_running)
    endpoint: str = ""
    session_listener: bool = True  # serve sessions on a listener of their own, as workers do
    session_port: int = 0
    _server: grpc.aio.Server | None = None
    _sessions: SessionServer | None = None
    # Health checks left to answer late (after `late_health_s`), as a paused worker would.
    late_health_checks: int = 0
    late_health_s: float = 1.0
    _health: HealthServicer | None = None

    async def start(self) -> FakeWorker:
        server = grpc.aio.server(options=session.SERVER_OPTIONS)
        if self.role == "prefill":
            prefill_pb2_grpc.add_PrefillServicer_to_server(_Prefill(self), server)
        else:
            decode_pb2_grpc.add_DecodeServicer_to_server(_Decode(self), server)
        self._health = _LateHealth(self)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        if self.session_listener:
            await self.start_listener()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self.endpoint = f"127.0.0.1:{port}"
        return self

    async def start_listener(self) -> None:
        """Serve sessions on a new port (``session_port``), as a worker does."""
        kind: SessionMethod[Any, Any]
        respond: Callable[[Any], AsyncIterator[Any]]
        if self.role == "prefill":
            kind, respond = PREFILL, _Prefill(self)._replies
        else:
            kind, respond = DECODE, _Decode(self)._respond

        def serve(frames: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
            return _recorded(self, frames, respond, kind)

        self._sessions = SessionServer()
        self.session_port = await self._sessions.bind("127.0.0.1", 0)
        self._sessions.add(kind.path, Method(kind.parse_request, serve))
        await self._sessions.start()

    async def stop_listener(self) -> None:
        if self._sessions is not None:
            await self._sessions.stop()
            self._sessions = None

    async def set_serving(self, serving: bool) -> None:
        assert self._health is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        await self._health.set("", status)

    async def stop(self) -> None:
        await self.stop_listener()
        if self._server is not None:
            await self._server.stop(grace=None)

    def info(self) -> common_pb2.WorkerInfo:
        return common_pb2.WorkerInfo(
            role=self.role,
            model=self.model,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            layout=common_pb2.KVLayout(
                model=self.model, fingerprint=self.fingerprint, weights=self.weights
            ),
            session_port=self.session_port,
            instance_id=self.instance_id,
        )

    def load(self) -> common_pb2.LoadReport:
        return common_pb2.LoadReport(
            num_running=self.running,
            num_free_pages=PAGES - self.running,
            num_total_pages=PAGES,
            instance_id=self.instance_id,
        )

    def script(self, req: common_pb2.GenerateRequest) -> tuple[list[int], common_pb2.FinishReason]:
        """The tokens to send and the finish reason, as the engine would stop."""
        s = req.sampling
        out: list[int] = []
        for token in [*self.reply(list(req.token_ids)), EOS]:
            out.append(token)
            if token in s.stop_token_ids or (token == EOS and not s.ignore_eos):
                return out, common_pb2.FINISH_REASON_STOP
            if len(out) >= s.max_new_tokens:
                return out, common_pb2.FINISH_REASON_LENGTH
        return out, common_pb2.FINISH_REASON_LENGTH


def _logprobs(token: int, s: common_pb2.SamplingParams) -> list[common_pb2.TokenLogprobs]:
    if not s.logprobs:
        return []
    top = [common_pb2.TokenLogprob(token_id=token + i, logprob=-0.5 - i) for i in range(20)]
    return [common_pb2.TokenLogprobs(logprob=-0.5, top=top[: s.top_logprobs])]


class _LateHealth(HealthServicer):
    """The standard health service, answering late while the worker has late checks left."""

    def __init__(self, w: FakeWorker) -> None:
        super().__init__()
        self.w = w

    async def Check(self, request: Any, context: Any) -> Any:
        if self.w.late_health_checks > 0:
            self.w.late_health_checks -= 1
            await asyncio.sleep(self.w.late_health_s)
        return await super().Check(request, context)


class Injected(Exception):
    """A scripted failure: the request ends with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str, peer: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.peer = peer  # the worker to blame, as worker.convert.PeerFailure


def _failure(request_id: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, Injected):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, repr(exc)


async def _recorded(
    w: FakeWorker,
    frames: AsyncIterator[Any],
    respond: Callable[[Any], AsyncIterator[Any]],
    kind: SessionMethod[Any, Any],
) -> AsyncGenerator[Any, None]:
    """The worker's real session over the fake's replies, recording the aborts it gets."""

    async def recording() -> AsyncIterator[Any]:
        async for frame in frames:
            w.aborts.extend(frame.abort)
            yield frame

    async for out in session.serve(recording(), respond, _failure, kind):
        yield out


class _Decode(decode_pb2_grpc.DecodeServicer):
    def __init__(self, w: FakeWorker) -> None:
        self.w = w

    async def Generate(
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        try:
            async for msg in self._respond(request):
                yield msg
        except Injected as exc:
            await context.abort(exc.code, str(exc))

    async def Session(
        self,
        request_iterator: AsyncIterator[decode_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[decode_pb2.SessionResponse]:
        async for out in _recorded(self.w, request_iterator, self._respond, DECODE):
            yield out

    async def _respond(
        self, request: decode_pb2.DecodeRequest
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        w, req = self.w, request.request
        w.requests.append(req)
        w.transfer_ids.append(request.transfer_id)
        w.prefill_endpoints.append(request.prefill_endpoint)
        rid = req.request_id
        w.running += 1
        try:
            if w.fail is not None and w.fail.after_tokens < 0:
                raise Injected(w.fail.code, w.fail.message)
            if request.transfer_id:
                event = TRANSFERS.setdefault(request.transfer_id, asyncio.Event())
                try:
                    await asyncio.wait_for(event.wait(), w.transfer_timeout_s)
                except TimeoutError:
                    # As the real decode worker: the prefill worker that never delivered is
                    # to blame.
                    raise Injected(
                        grpc.StatusCode.UNAVAILABLE, "transfer timed out", request.prefill_endpoint
                    ) from None
            tokens, reason = w.script(req)
            every = max(1, request.stream_interval)
            held = common_pb2.StreamChunk()
            for i, token in enumerate(tokens):
                if w.fail is not None and i == w.fail.after_tokens:
                    raise Injected(w.fail.code, w.fail.message)
                if w.token_delay_s:
                    await asyncio.sleep(w.token_delay_s)
                held.token_ids.append(token)
                held.logprobs.extend(_logprobs(token, req.sampling))
                if len(held.token_ids) >= every or i == len(tokens) - 1:
                    yield common_pb2.GenerateResponse(request_id=rid, chunk=held)
                    held = common_pb2.StreamChunk()
            w.completed.append(rid)
            yield common_pb2.GenerateResponse(
                request_id=rid,
                complete=common_pb2.Complete(
                    finish_reason=reason,
                    prompt_tokens=len(req.token_ids),
                    completion_tokens=len(tokens),
                    cached_tokens=1,
                ),
            )
        except asyncio.CancelledError:
            w.cancelled.append(rid)
            raise
        finally:
            w.running -= 1

    async def Abort(
        self, request: common_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.AbortResponse:
        self.w.aborts.append(request.request_id)
        return common_pb2.AbortResponse(request_id=request.request_id, found=False)

    async def GetLoad(
        self, request: common_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.LoadReport:
        return self.w.load()

    async def GetInfo(
        self, request: common_pb2.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.WorkerInfo:
        return self.w.info()


class _Prefill(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, w: FakeWorker) -> None:
        self.w = w

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        try:
            return await self._prefill(request)
        except Injected as exc:
            await context.abort(exc.code, str(exc))
            raise

    async def Session(
        self,
        request_iterator: AsyncIterator[prefill_pb2.PrefillSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[prefill_pb2.PrefillSessionResponse]:
        async for out in _recorded(self.w, request_iterator, self._replies, PREFILL):
            yield out

    async def _prefill(self, request: prefill_pb2.PrefillRequest) -> prefill_pb2.PrefillResponse:
        async for reply in self._replies(request, unary=True):
            if reply.HasField("done"):
                return reply.done
        raise AssertionError("the fake prefill gave no answer")

    async def _replies(
        self, request: prefill_pb2.PrefillRequest, unary: bool = False
    ) -> AsyncIterator[prefill_pb2.PrefillReply]:
        """A session's replies to one request (the unary call takes only the answer): the
        early tokens when asked and ``send_first`` says so, then the answer."""
        w, req = self.w, request.request
        rid = req.request_id
        w.requests.append(req)
        w.transfer_ids.append(request.transfer_id)
        w.first_asked.append(request.stream_first_token)
        try:
            if w.token_delay_s:
                await asyncio.sleep(w.token_delay_s)
            if w.fail is not None and w.fail.after_tokens <= 0:
                raise Injected(w.fail.code, w.fail.message)
            if not unary and request.stream_first_token and w.send_first:
                early = w.script(req)[0][: w.send_first]
                lps = [lp for t in early for lp in _logprobs(t, req.sampling)]
                first = common_pb2.StreamChunk(token_ids=early, logprobs=lps)
                yield prefill_pb2.PrefillReply(request_id=rid, first=first)
            if w.handoff_delay_s:
                await asyncio.sleep(w.handoff_delay_s)
            if w.fail is not None:  # after_tokens > 0: the hand-off fails after `first`
                raise Injected(w.fail.code, w.fail.message)
            TRANSFERS.setdefault(request.transfer_id, asyncio.Event()).set()
            w.completed.append(rid)
            done = prefill_pb2.PrefillResponse(request_id=rid, cached_tokens=4)
            yield prefill_pb2.PrefillReply(request_id=rid, done=done)
        except asyncio.CancelledError:
            w.cancelled.append(rid)
            raise

    async def Abort(
        self, request: common_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.AbortResponse:
        self.w.aborts.append(request.request_id)
        return common_pb2.AbortResponse(request_id=request.request_id, found=False)

    async def GetLoad(
        self, request: common_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.LoadReport:
        return self.w.load()

    async def GetInfo(
        self, request: common_pb2.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.WorkerInfo:
        return self.w.info()
