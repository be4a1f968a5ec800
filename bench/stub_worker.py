"""Benchmark stubs: workers that answer at once, with no model, so a router is measured alone.

Two kinds, one per router under test:

- ``grpc``: a colocated pdserve worker (``--disaggregation-mode null``). ``Decode.Session``
  (the router's path, the real worker's session code) and ``Decode.Generate`` send
  ``--tokens`` tokens, ``--chunk-tokens`` per message (1: a real worker's one per step, a
  step being one event-loop turn) and a ``Complete``; a request that asks ``deliver_at_end``
  gets them all in one message, as the real worker sends them. ``--role prefill`` serves
  ``Prefill.Prefill`` instead (an answer at once; on a session, after the first token when
  asked) and ``--role decode`` answers like a colocated one: a pair measures the router's
  disaggregated path, without the KV transfer that happens between workers. ``GetInfo``,
  ``GetLoad``, ``Abort`` and ``grpc.health.v1`` answer as a real worker's do.
- ``http``: an SGLang-style HTTP worker for sglang-router: ``POST /v1/completions`` (and
  ``/generate``) get one fixed non-streamed JSON reply; ``/health``, ``/get_server_info``,
  ``/get_model_info``, ``/v1/models`` and anything else GET get a small JSON ``200``. A raw
  asyncio HTTP/1.1 server (keep-alive, ``Content-Length`` bodies), so that the stub is not
  the bottleneck.

    python -m bench.stub_worker --kind grpc [--port 0] [--tokens 8] [--chunk-tokens 1] \
        [--role null|prefill|decode]
    python -m bench.stub_worker --kind http [--port 0]

Prints ``{"event": "ready", "endpoint": "127.0.0.1:PORT"}`` once serving. Not a test double
for correctness (see ``tests/router/fake_worker.py``): it checks nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.contract import DECODE, PREFILL
from worker import session
from worker.service import WorkerService, add_service
from worker.session_server import SessionServer

MODEL = "stub"
CONTEXT_LENGTH = 4096
VOCAB_SIZE = 512  # the tiny tokenizer's, which the bench gives the pdserve router
TOTAL_PAGES = 1024
TOKEN_ID = 65  # one printable token of the tiny tokenizer
FIRST = common_pb2.StreamChunk(token_ids=[TOKEN_ID])  # a prefill's early first token


def _failure(request_id: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.INTERNAL, repr(exc)


class StubCommon:
    """``Abort``, ``GetLoad`` and ``GetInfo`` as a real worker's runtime answers them, for a
    worker with no model (``worker.service.Common``)."""

    def __init__(self, role: str, session_port: int) -> None:
        self.role = role
        self.session_port = session_port

    async def abort(self, request: common_pb2.AbortRequest) -> common_pb2.AbortResponse:
        return common_pb2.AbortResponse(request_id=request.request_id, found=False)

    async def load(self, request: common_pb2.LoadRequest) -> common_pb2.LoadReport:
        return common_pb2.LoadReport(
            request_id=request.request_id, num_free_pages=TOTAL_PAGES, num_total_pages=TOTAL_PAGES
        )

    def info(self, request: common_pb2.WorkerInfoRequest) -> common_pb2.WorkerInfo:
        layout = common_pb2.KVLayout(
            model=MODEL, dtype="bfloat16", page_size=16, num_layers=1, num_kv_heads=1,
            head_dim=64, fingerprint="stub",
        )  # fmt: skip
        return common_pb2.WorkerInfo(
            request_id=request.request_id,
            role=self.role,
            model=MODEL,
            context_length=CONTEXT_LENGTH,
            vocab_size=VOCAB_SIZE,
            layout=layout,
            dp_size=1,
            session_port=self.session_port,
        )


class StubDecode(WorkerService, decode_pb2_grpc.DecodeServicer):
    """A colocated worker that streams ``tokens`` tokens per request, whatever it asks,
    ``chunk_tokens`` per message; its sessions are the real worker's
    (``worker.service``)."""

    def __init__(
        self, tokens: int, chunk_tokens: int = 1, role: str = "null", session_port: int = 0
    ) -> None:
        super().__init__(StubCommon(role, session_port), DECODE, self._respond, _failure)
        if tokens < 1 or chunk_tokens < 1:
            raise ValueError(f"tokens and chunk_tokens must be >= 1, got {tokens}, {chunk_tokens}")
        self.tokens = tokens
        sizes = [chunk_tokens] * (tokens // chunk_tokens)
        if tokens % chunk_tokens:
            sizes.append(tokens % chunk_tokens)
        self.chunks = [common_pb2.StreamChunk(token_ids=[TOKEN_ID] * n) for n in sizes]
        self.whole = common_pb2.StreamChunk(token_ids=[TOKEN_ID] * tokens)

    async def Generate(
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        async for msg in self._respond(request):
            yield msg

    async def _respond(
        self, request: decode_pb2.DecodeRequest
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """As a worker sends: a chunk per step, or per ``stream_interval`` steps (another
        request's tokens may share the frame), or every token with the ``Complete`` when the
        request asks ``deliver_at_end``."""
        rid = request.request.request_id
        if request.deliver_at_end:
            yield common_pb2.GenerateResponse(request_id=rid, chunk=self.whole)
        else:
            every = max(1, request.stream_interval)
            held: list[int] = []
            for i, chunk in enumerate(self.chunks):
                held += chunk.token_ids
                if len(held) >= every or i == len(self.chunks) - 1:
                    out = common_pb2.StreamChunk(token_ids=held)
                    yield common_pb2.GenerateResponse(request_id=rid, chunk=out)
                    held = []
                await asyncio.sleep(0)  # the next decode step
        yield common_pb2.GenerateResponse(
            request_id=rid,
            complete=common_pb2.Complete(
                finish_reason=common_pb2.FINISH_REASON_LENGTH,
                prompt_tokens=len(request.request.token_ids),
                completion_tokens=self.tokens,
                cached_tokens=0,
            ),
        )


class StubPrefill(WorkerService, prefill_pb2_grpc.PrefillServicer):
    """A prefill worker that answers at once, as if the pages were written (no transfer: the
    decode stub's answer does not wait for one); on a session, with the first token before
    the answer when the router asks for it, as a real prefill worker sends it."""

    def __init__(self, session_port: int = 0) -> None:
        super().__init__(StubCommon("prefill", session_port), PREFILL, self._replies, _failure)

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        return await self._prefill(request)

    @staticmethod
    async def _prefill(request: prefill_pb2.PrefillRequest) -> prefill_pb2.PrefillResponse:
        return prefill_pb2.PrefillResponse(
            request_id=request.request.request_id, first_token_id=TOKEN_ID
        )

    @classmethod
    async def _replies(
        cls, request: prefill_pb2.PrefillRequest
    ) -> AsyncIterator[prefill_pb2.PrefillReply]:
        rid = request.request.request_id
        if request.stream_first_token:
            yield prefill_pb2.PrefillReply(request_id=rid, first=FIRST)
        yield prefill_pb2.PrefillReply(request_id=rid, done=await cls._prefill(request))


async def serve_grpc(
    host: str, port: int, tokens: int, chunk_tokens: int = 1, role: str = "null",
    session_port: int = 0,
) -> tuple[grpc.aio.Server, SessionServer, int]:  # fmt: skip
    """The stub's grpcio server and session listener (``session_port`` -1: none), as a real
    worker serves them."""
    server = grpc.aio.server(options=session.SERVER_OPTIONS)
    sessions = SessionServer()
    bound_sessions = 0 if session_port < 0 else await sessions.bind(host, session_port)
    if role == "prefill":
        service: WorkerService = StubPrefill(bound_sessions)
    else:
        service = StubDecode(tokens, chunk_tokens, role, bound_sessions)
    add_service(service, server, sessions)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    if bound_sessions:
        await sessions.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, sessions, bound


# ---- HTTP ------------------------------------------------------------------------------------

COMPLETION = json.dumps(
    {
        "id": "cmpl-stub",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "text": "A" * 8, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12},
    }
).encode()
INFO = json.dumps(
    {
        "model_path": MODEL,
        "tokenizer_path": MODEL,
        "is_generation": True,
        "served_model_name": MODEL,
        "max_total_num_tokens": CONTEXT_LENGTH * 64,
        "context_length": CONTEXT_LENGTH,
        "data": [{"id": MODEL, "object": "model"}],
    }
).encode()


def _response(body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


COMPLETION_RESPONSE = _response(COMPLETION)
INFO_RESPONSE = _response(INFO)


class StubHTTP(asyncio.Protocol):
    """Keep-alive HTTP/1.1: one fixed reply per request, pipelining tolerated."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : line_end if line_end >= 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            post = head.startswith(b"post ")
            if self.transport is not None:
                self.transport.write(COMPLETION_RESPONSE if post else INFO_RESPONSE)


async def serve_http(host: str, port: int) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StubHTTP, host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    return server, bound


# ---- main ------------------------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> None:
    if args.kind == "grpc":
        grpc_server, sessions, port = await serve_grpc(
            args.host, args.port, args.tokens, args.chunk_tokens, args.role, args.session_port
        )
    else:
        http_server, port = await serve_http(args.host, args.port)
    print(json.dumps({"event": "ready", "endpoint": f"{args.host}:{port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if args.kind == "grpc":
        await asyncio.gather(grpc_server.stop(0), sessions.stop(0))
    else:
        http_server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stub_worker", description=__doc__)
    p.add_argument("--kind", choices=("grpc", "http"), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tokens", type=int, default=8, help="grpc: tokens per request")
    p.add_argument("--chunk-tokens", type=int, default=1, help="grpc: tokens per message")
    p.add_argument(
        "--session-port", type=int, default=0,
        help="grpc: the session listener's port, as a worker's (0: any; -1: none)",
    )  # fmt: skip
    p.add_argument(
        "--role", choices=("null", "prefill", "decode"), default="null",
        help="grpc: a colocated worker, or one side of a disaggregated pair",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(args))
    else:
        uvloop.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
