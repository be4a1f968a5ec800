"""The pool: the live set of workers, and how one request reaches them.

The ``WorkerPool`` holds the members (``router.fleet.worker.WorkerClient``), which come and go
at run time: static ones from the command line (they stay), ones the Redis registry announces
(``router.fleet.registry``), ones the admin API adds. Every member passed ``GetInfo`` and the
compatibility checks (``router.fleet.compat``). ``route`` picks the workers of one attempt with
the policies, among usable members only; ``generate`` runs a whole request with retries and
migration (``router.client.dispatch``) over such routes, counting it in flight on each
worker. Health, load and identity checks run in ``router.fleet.monitor``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence, Set
from dataclasses import dataclass
from typing import Any

from protos.contract import ROLE_COLOCATED, ROLE_DECODE, ROLE_PREFILL, ROLES
from router.client import dispatch
from router.client.dispatch import RetryConfig
from router.client.errors import NoUsableWorker, WorkerError
from router.client.session import WorkerEvent, WorkerRequest
from router.fleet.breaker import BREAKER_FAILURES
from router.fleet.compat import Compatibility, ModelInfo, WorkerInfo, read_info
from router.fleet.health import HealthConfig
from router.fleet.monitor import HealthMonitor, record_failure
from router.fleet.policies import Policy, RoundRobin
from router.fleet.worker import SOURCE_STATIC, WorkerClient, endpoint_of
from router.metrics import RouterMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PoolRoute:
    """The workers of one attempt: ``(colocated,)`` or ``(prefill, decode)``."""

    pool: WorkerPool
    workers: tuple[WorkerClient, ...]

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(w.endpoint for w in self.workers)

    def stream(self, request: WorkerRequest) -> AsyncGenerator[WorkerEvent, None]:
        return self.pool._stream(self.workers, request)


@functools.cache
def _policy_name(policy: Policy) -> str:
    """``LeastLoad`` → ``least_load``: the name the policy has on the command line."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(policy).__name__).lower()


class WorkerPool:
    """The live set of workers, and how a request reaches them."""

    def __init__(
        self,
        workers: Sequence[str] = (),
        prefill: Sequence[str] = (),
        decode: Sequence[str] = (),
        prefill_policy: Policy | None = None,
        decode_policy: Policy | None = None,
        *,
        health: HealthConfig | None = None,
        retry: RetryConfig | None = None,
        metrics: RouterMetrics | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        """``workers``/``prefill``/``decode``: static URLs, checked by ``discover``."""
        self.static = (
            [(u, ROLE_COLOCATED) for u in workers]
            + [(u, ROLE_PREFILL) for u in prefill]
            + [(u, ROLE_DECODE) for u in decode]
        )
        self.prefill_policy = prefill_policy or RoundRobin()
        self.decode_policy = decode_policy or RoundRobin()
        self.health_config = health or HealthConfig()
        self.retry = retry or RetryConfig()
        self.metrics = metrics
        # The policy_decisions counter of (policy, role, worker), labelled once.
        self._decisions = (
            None if metrics is None else functools.cache(metrics.policy_decisions.labels)
        )
        self.eos_token_ids = eos_token_ids
        self.evicted: set[str] = set()  # removed or drained by the admin: registry skips them
        self._members: dict[str, WorkerClient] = {}
        self.compat = Compatibility()  # the model, and what newcomers are checked against
        self._background: set[asyncio.Task[None]] = set()
        self.monitor = HealthMonitor(self, self.health_config)
        self._admitting: set[str] = set()
        if metrics is not None:
            metrics.watch_workers(lambda: [w.sample() for w in self._members.values()])

    # -- membership ----------------------------------------------------------------------------

    @property
    def all_workers(self) -> list[WorkerClient]:
        return list(self._members.values())

    def members(self, role: str) -> list[WorkerClient]:
        """The members of one role, in the order they joined."""
        return [w for w in self._members.values() if w.role == role]

    @property
    def colocated(self) -> list[WorkerClient]:
        return self.members(ROLE_COLOCATED)

    @property
    def prefill(self) -> list[WorkerClient]:
        return self.members(ROLE_PREFILL)

    @property
    def decode(self) -> list[WorkerClient]:
        return self.members(ROLE_DECODE)

    def get(self, endpoint: str) -> WorkerClient | None:
        return self._members.get(endpoint)

    async def discover(
        self, timeout_s: float, served_model_name: str | None = None
    ) -> ModelInfo | None:
        """Ask every static worker for GetInfo, check they can serve together, and add them.

        Raises RuntimeError naming the worker when one does not answer in ``timeout_s``, has
        the wrong role, serves a different model or vocabulary, or (disaggregated) has a KV
        layout fingerprint that differs from another's (both values named). With no static
        workers it returns None: the model comes from the first worker ``admit`` adds
        (``set_model``).
        """
        clients = [WorkerClient(u, r, SOURCE_STATIC, self.health_config) for u, r in self.static]
        try:
            infos = await asyncio.gather(*(read_info(c, timeout_s) for c in clients))
            for info in infos:
                self.compat.check(info)
        except BaseException:
            await asyncio.gather(*(c.close() for c in clients))
            raise
        for client, info in zip(clients, infos, strict=True):
            self._add(client, info)
        return self.set_model(served_model_name) if infos else None

    def set_model(self, served_model_name: str | None) -> ModelInfo:
        """Fix the model the router serves from the members it has (at least one)."""
        if not self.compat.known:
            raise RuntimeError("no worker is known yet")
        context_length = min(w.info.context_length for w in self.all_workers if w.info)
        return self.compat.set_model(served_model_name, context_length)

    async def admit(self, url: str, role: str, source: str, timeout_s: float = 5.0) -> WorkerClient:
        """GetInfo from a new worker, check it against the pool, and add it.

        Raises ValueError (bad URL or role, or already a member), WorkerUnreachable, or
        WorkerRefused naming the worker and both mismatching values.
        """
        endpoint = endpoint_of(url)
        if endpoint in self._members or endpoint in self._admitting:
            raise ValueError(f"worker {endpoint} is already in the pool")
        client = WorkerClient(url, role, source, self.health_config)
        self._admitting.add(endpoint)
        try:
            info = await read_info(client, timeout_s)
            self.compat.check(info)
        except BaseException:
            await client.close()
            raise
        finally:
            self._admitting.discard(endpoint)
        self._add(client, info)
        return client

    def _add(self, client: WorkerClient, info: WorkerInfo) -> None:
        client.info = info
        client.on_reconnect = self.monitor.unverified
        self._members[client.endpoint] = client
        if self.metrics is not None:
            self.metrics.membership.labels(client.source, "added").inc()
        log.info("worker %s (%s, from %s) joined the pool", client.endpoint, client.role,
                 client.source)  # fmt: skip

    def remove(self, endpoint: str, reason: str) -> WorkerClient | None:
        """Take a worker out of the pool now. Its requests in flight go on; its channel closes
        when the last one ends."""
        client = self._members.pop(endpoint, None)
        if client is None:
            return None
        for policy in (self.prefill_policy, self.decode_policy):
            policy.remove_worker(client)
        if self.metrics is not None:
            self.metrics.membership.labels(client.source, "removed").inc()
        log.info("worker %s (%s) left the pool: %s", endpoint, client.role, reason)
        if client.in_flight == 0:
            self.spawn(client.close())
        return client

    def drain(self, endpoint: str) -> WorkerClient | None:
        """No new requests; the worker leaves the pool when its last request ends."""
        client = self._members.get(endpoint)
        if client is None:
            return None
        client.draining = client.leave_when_idle = True
        log.info("worker %s draining (%d in flight)", endpoint, client.in_flight)
        if client.in_flight == 0:
            self.remove(endpoint, "drained")
        return client

    # -- routing -------------------------------------------------------------------------------

    def generate(self, request: WorkerRequest) -> AsyncGenerator[WorkerEvent, None]:
        """Stream one request's tokens, then its ``Finished``; raises ``WorkerError`` (or
        ``NoUsableWorker``) when retries and migrations cannot save it.

        Closing the iterator early (``aclose``, or cancelling the task iterating it) cancels
        the gRPC calls and sends ``Abort`` to every worker involved.
        """
        return dispatch.generate(self, request, self.retry, self.eos_token_ids, self.metrics)

    def route(self, token_ids: tuple[int, ...], avoid: Set[str] = frozenset()) -> PoolRoute:
        """A prefill and a decode worker when both roles have a usable member, else a usable
        colocated worker; members in ``avoid`` only when no other is usable."""
        usable: dict[str, list[WorkerClient]] = {role: [] for role in ROLES}
        for w in self._members.values():
            if w.usable:
                usable[w.role].append(w)
        if avoid:
            for role, members in usable.items():
                usable[role] = [w for w in members if w.endpoint not in avoid] or members
        prefill, decode = usable[ROLE_PREFILL], usable[ROLE_DECODE]
        if prefill and decode:
            p = self._pick(self.prefill_policy, prefill, token_ids)
            d = self._pick(self.decode_policy, decode, token_ids)
            return PoolRoute(self, (p, d))
        colocated = usable[ROLE_COLOCATED]
        if colocated:
            return PoolRoute(self, (self._pick(self.decode_policy, colocated, token_ids),))
        raise NoUsableWorker(self._why_none())

    def _pick(
        self, policy: Policy, candidates: list[WorkerClient], token_ids: Sequence[int]
    ) -> WorkerClient:
        worker = policy.pick(candidates, token_ids)
        if self._decisions is not None:
            self._decisions(_policy_name(policy), worker.role, worker.endpoint).inc()
        return worker

    def _why_none(self) -> str:
        if not self._members:
            return "the pool is empty"
        states = []
        for w in self._members.values():
            why = [
                s
                for s, bad in (
                    ("unhealthy", not w.healthy),
                    ("draining", w.draining),
                    (f"circuit {w.breaker.state.value}", not w.breaker.allows()),
                )
                if bad
            ]
            states.append(f"{w.role} {w.endpoint}: {', '.join(why) or 'usable'}")
        return "; ".join(states)

    def report(self, route: dispatch.Route, error: WorkerError | None) -> None:
        """Feed an attempt's outcome to the breakers of its workers."""
        if not isinstance(route, PoolRoute):
            return
        for worker in route.workers:
            if error is None:
                worker.breaker.record_success()
            elif worker.endpoint == error.endpoint:
                if self.metrics is not None:
                    self.metrics.worker_errors.labels(
                        worker.endpoint, worker.role, error.grpc_code.name
                    ).inc()
                # A worker being re-checked takes nothing (its attempts fail on purpose): the
                # check decides about it, not its breaker.
                if error.grpc_code in BREAKER_FAILURES and worker.verified:
                    record_failure(worker, f"{error.grpc_code.name}: {error.details}")

    def _stream(
        self, workers: tuple[WorkerClient, ...], request: WorkerRequest
    ) -> AsyncGenerator[WorkerEvent, None]:
        """The attempt's events; the workers count it in flight until its calls end (the
        stream must be iterated, as ``dispatch.generate`` does at once)."""
        if len(workers) == 1:
            return dispatch.colocated(workers[0].session(), request, self._track(workers[0]))
        p, d = workers
        return dispatch.disaggregated(
            p.session(), d.session(), request, self._track(p), self._track(d)
        )

    def _track(self, worker: WorkerClient) -> Callable[[], None]:
        """Count a request on ``worker``; the returned function (idempotent) uncounts it."""
        worker.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            worker.in_flight -= 1
            if worker.in_flight == 0:
                if self._members.get(worker.endpoint) is not worker:
                    self.spawn(worker.close())  # it left the pool while busy
                elif worker.leave_when_idle:
                    self.remove(worker.endpoint, "drained")

        return release

    # -- health (router.fleet.monitor) -----------------------------------------------------------

    @property
    def model(self) -> ModelInfo | None:
        """The served model: set by ``discover`` / ``set_model``, fixed after."""
        return self.compat.model

    def start_health_checks(self) -> None:
        """Check every member's health and load every ``check_interval_s`` until ``close``."""
        self.monitor.start()

    async def check_all(self) -> None:
        """One round of health and load checks on every member."""
        await self.monitor.check_all()

    async def health(self) -> dict[str, bool]:
        """``{endpoint: serving}`` for every member, checked now, concurrently."""
        return await self.monitor.health()

    def usable(self, health: dict[str, bool]) -> bool:
        """Whether a route exists among the members ``health`` says are serving."""

        def any_of(role: str) -> bool:
            # Serving is not enough: a worker whose circuit is open, or that is being
            # re-checked, takes no requests either, and /health must say so.
            return any(
                health.get(w.endpoint) and w.breaker.allows() and w.verified
                for w in self.members(role)
                if not w.draining
            )

        return (any_of(ROLE_PREFILL) and any_of(ROLE_DECODE)) or any_of(ROLE_COLOCATED)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a fire-and-forget coroutine, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        await self.monitor.close()
        if self._background:
            await asyncio.wait(set(self._background), timeout=2.0)
        await asyncio.gather(*(w.close() for w in self.all_workers))
