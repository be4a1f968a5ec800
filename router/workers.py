"""gRPC clients of the workers, the static pool built from flags, and startup discovery.

One ``WorkerClient`` (one ``grpc.aio`` channel, reused by every request) per worker URL. The
``WorkerPool`` knows the workers' roles: colocated workers (``--worker``) serve ``Generate``
alone; disaggregated pairs (``--prefill`` + ``--decode``) are chosen per request by the
policies. ``generate`` hides which of the two modes is running (see ``router.dispatch``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from router import dispatch
from router.events import WorkerError, WorkerEvent, WorkerRequest
from router.policy import Policy, RoundRobin
from router.prompts import ModelInfo

log = logging.getLogger(__name__)

ROLE_COLOCATED = "null"
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"


def endpoint_of(url: str) -> str:
    """``host:port`` of a worker URL: ``host:port``, ``grpc://host:port`` or ``http://...``."""
    split = urlsplit(url if "://" in url else f"grpc://{url}")
    try:
        port = split.port
    except ValueError:
        port = None
    if not split.hostname or port is None or split.path not in ("", "/"):
        raise ValueError(f"worker URL must be host:port or grpc://host:port, got {url!r}")
    host = f"[{split.hostname}]" if ":" in split.hostname else split.hostname
    return f"{host}:{port}"


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's GetInfo answer, as discovery uses it."""

    endpoint: str
    role: str
    model: str
    context_length: int
    vocab_size: int
    fingerprint: str


class WorkerClient:
    """One worker: its channel and stubs. Cheap to share between requests."""

    def __init__(self, url: str, role: str) -> None:
        self.endpoint = endpoint_of(url)
        self.role = role
        self.channel = grpc.aio.insecure_channel(self.endpoint)
        self.decode = decode_pb2_grpc.DecodeStub(self.channel)
        self.prefill = prefill_pb2_grpc.PrefillStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def info(self, timeout_s: float) -> WorkerInfo:
        """GetInfo, waiting up to ``timeout_s`` for the worker to come up."""
        stub = self.prefill if self.role == ROLE_PREFILL else self.decode
        msg = await stub.GetInfo(
            common_pb2.WorkerInfoRequest(request_id="router-discovery"),
            timeout=timeout_s,
            wait_for_ready=True,
        )
        return WorkerInfo(
            endpoint=self.endpoint,
            role=msg.role,
            model=msg.model,
            context_length=msg.context_length,
            vocab_size=msg.vocab_size,
            fingerprint=msg.layout.fingerprint,
        )

    async def healthy(self, timeout_s: float = 1.0) -> bool:
        """Whether the worker's grpc.health.v1 service says SERVING."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def abort(self, request_id: str, timeout_s: float = 2.0) -> None:
        """Best-effort Abort; errors are logged and ignored (the stream's cancel also aborts)."""
        stub = self.prefill if self.role == ROLE_PREFILL else self.decode
        try:
            await stub.Abort(common_pb2.AbortRequest(request_id=request_id), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.debug("Abort(%s) on %s: %s", request_id, self.endpoint, exc.code().name)

    async def close(self) -> None:
        await self.channel.close()

    def __repr__(self) -> str:
        return f"WorkerClient({self.endpoint!r}, role={self.role!r})"


class WorkerPool:
    """The static workers from the command line, and how a request reaches them."""

    def __init__(
        self,
        workers: Sequence[str] = (),
        prefill: Sequence[str] = (),
        decode: Sequence[str] = (),
        prefill_policy: Policy | None = None,
        decode_policy: Policy | None = None,
    ) -> None:
        if bool(workers) == bool(prefill or decode):
            raise ValueError("give either --worker URLs or --prefill and --decode URLs")
        if not workers and not (prefill and decode):
            raise ValueError("disaggregated mode needs at least one --prefill and one --decode")
        self.colocated = [WorkerClient(u, ROLE_COLOCATED) for u in workers]
        self.prefill = [WorkerClient(u, ROLE_PREFILL) for u in prefill]
        self.decode = [WorkerClient(u, ROLE_DECODE) for u in decode]
        self.prefill_policy = prefill_policy or RoundRobin()
        self.decode_policy = decode_policy or RoundRobin()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill)

    @property
    def all_workers(self) -> list[WorkerClient]:
        return [*self.colocated, *self.prefill, *self.decode]

    async def discover(self, timeout_s: float, served_model_name: str | None = None) -> ModelInfo:
        """Ask every worker for GetInfo and check they can serve together.

        Raises RuntimeError naming the worker when one does not answer in ``timeout_s``, has
        the wrong role, serves a different model or vocabulary, or (disaggregated) has a KV
        layout fingerprint that differs from another's (both values named).
        """
        infos = await asyncio.gather(*(self._info(w, timeout_s) for w in self.all_workers))
        first = infos[0]
        for info in infos[1:]:
            if info.model != first.model or info.vocab_size != first.vocab_size:
                raise RuntimeError(
                    f"workers serve different models: {first.endpoint} has {first.model!r} "
                    f"(vocab {first.vocab_size}) but {info.endpoint} has {info.model!r} "
                    f"(vocab {info.vocab_size})"
                )
        if self.disaggregated:
            prefill_infos = [i for i in infos if i.role == ROLE_PREFILL]
            for p in prefill_infos:
                for d in (i for i in infos if i.role == ROLE_DECODE):
                    if p.fingerprint != d.fingerprint:
                        raise RuntimeError(
                            f"prefill worker {p.endpoint} and decode worker {d.endpoint} cannot "
                            f"pair: KV layout fingerprint {p.fingerprint!r} != {d.fingerprint!r}"
                        )
        return ModelInfo(
            name=served_model_name or first.model,
            context_length=min(i.context_length for i in infos),
            vocab_size=first.vocab_size,
        )

    async def _info(self, worker: WorkerClient, timeout_s: float) -> WorkerInfo:
        try:
            info = await worker.info(timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise RuntimeError(
                f"worker {worker.endpoint} did not answer GetInfo within {timeout_s:g}s: "
                f"{exc.code().name} {exc.details()}"
            ) from exc
        if info.role != worker.role:
            raise RuntimeError(
                f"worker {worker.endpoint} has role {info.role!r} but was given as "
                f"{'--worker' if worker.role == ROLE_COLOCATED else '--' + worker.role} "
                f"(role {worker.role!r})"
            )
        return info

    def generate(self, request: WorkerRequest) -> AsyncGenerator[WorkerEvent, None]:
        """Stream one request's tokens, then its ``Finished``; raises ``WorkerError``.

        Closing the iterator early (``aclose``, or cancelling the task iterating it) cancels
        the gRPC calls and sends ``Abort`` to every worker involved.
        """
        if not self.disaggregated:
            worker = self.decode_policy.pick(self.colocated, request.token_ids)
            return dispatch.colocated(
                worker.decode, worker.endpoint, request, self._aborter([worker])
            )
        prefill = self.prefill_policy.pick(self.prefill, request.token_ids)
        decode = self.decode_policy.pick(self.decode, request.token_ids)
        return dispatch.disaggregated(
            prefill.prefill,
            prefill.endpoint,
            decode.decode,
            decode.endpoint,
            request,
            self._aborter([prefill, decode]),
        )

    def _aborter(self, workers: list[WorkerClient]) -> dispatch.AbortFn:
        def abort(request_id: str) -> None:
            for worker in workers:
                self.spawn(worker.abort(request_id))

        return abort

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a fire-and-forget coroutine, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def health(self) -> dict[str, bool]:
        """``{endpoint: serving}`` for every worker, checked concurrently."""
        workers = self.all_workers
        states = await asyncio.gather(*(w.healthy() for w in workers))
        return {w.endpoint: s for w, s in zip(workers, states, strict=True)}

    def usable(self, health: dict[str, bool]) -> bool:
        """Whether at least one worker (colocated) or one prefill and one decode are healthy."""
        if not self.disaggregated:
            return any(health[w.endpoint] for w in self.colocated)
        return any(health[w.endpoint] for w in self.prefill) and any(
            health[w.endpoint] for w in self.decode
        )

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=2.0)
        await asyncio.gather(*(w.close() for w in self.all_workers))


__all__ = ["WorkerClient", "WorkerError", "WorkerEvent", "WorkerPool", "WorkerRequest"]
