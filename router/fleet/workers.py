"""The workers the router knows: their gRPC clients, their state, and the pool they form.

One ``WorkerClient`` (one ``grpc.aio`` channel, reused by every request) per worker. Besides
its stubs it carries what routing needs: ``healthy`` (the last ``grpc.health.v1`` check), a
``CircuitBreaker`` fed by health checks and request outcomes, ``draining``, the requests in
flight, and the last ``GetLoad`` report (``load``, the policies' view; see ``router.load``).

The ``WorkerPool`` holds the members, which come and go at run time: static ones from the
command line (they stay), ones the Redis registry announces (``router.registry``), ones the
admin API adds (``router.admin``). Every member passed ``GetInfo`` and the compatibility
checks (one model and vocabulary; one KV layout fingerprint across prefill and decode
workers; a context at least the router's). ``route`` picks the workers of one attempt with
the policies, among usable members only; ``generate`` runs a whole request with retries and
migration (``router.resilience``) over such routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence, Set
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import cluster_token, common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.contract import DECODE, PREFILL, ROLE_COLOCATED, ROLE_DECODE, ROLE_PREFILL, ROLES
from router.app.prompts import ModelInfo
from router.client import dispatch, resilience
from router.client.errors import NoUsableWorker, WorkerError
from router.client.events import WorkerEvent, WorkerRequest
from router.client.grpc_stream import StreamCall
from router.client.resilience import RetryConfig
from router.client.session import Session
from router.fleet.health import BREAKER_FAILURES, CircuitBreaker, CircuitState, HealthConfig
from router.fleet.load import WorkerLoad
from router.fleet.policy import Policy, RoundRobin
from router.metrics import RouterMetrics, WorkerSample

log = logging.getLogger(__name__)

SOURCE_STATIC = "static"  # --worker / --prefill / --decode
SOURCE_REGISTRY = "registry"  # a record under --registry-prefix in Redis
SOURCE_ADMIN = "admin"  # POST /admin/workers


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


class WorkerUnreachable(RuntimeError):
    """The worker did not answer ``GetInfo`` in time."""


class WorkerRefused(RuntimeError):
    """The worker answered but cannot join: wrong role, other model, other KV layout..."""


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's GetInfo answer, as discovery uses it."""

    endpoint: str
    role: str
    model: str
    context_length: int
    vocab_size: int
    fingerprint: str
    session_port: int = 0  # its session listener's; 0: sessions on the main port
    weights: str = ""  # the weights' identity (part of the fingerprint too); "": not stated
    instance_id: str = ""  # random per worker process; "": not stated


class WorkerClient:
    """One worker: its channel, stubs and routing state. Cheap to share between requests.

    Compared by identity (policies key their per-worker state on it).
    """

    def __init__(
        self, url: str, role: str, source: str = SOURCE_STATIC, health: HealthConfig | None = None
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"worker role must be one of {ROLES}, got {role!r}")
        self.endpoint = endpoint_of(url)
        self.role = role
        self.source = source
        health = health or HealthConfig()
        self._token = health.cluster_token
        self._tls = health.cluster_tls
        self.channel = cluster_token.channel(
            self.endpoint, self._token, health.channel_options, self._tls
        )
        self.decode = decode_pb2_grpc.DecodeStub(self.channel)
        self.prefill = prefill_pb2_grpc.PrefillStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.breaker = CircuitBreaker(health)
        self._transport = health.session_transport
        self._keepalive_s = health.keepalive_s
        self.healthy = True  # the last health check said SERVING (members passed GetInfo)
        self.answered = True  # the last health check got an answer
        # False from a sign that the process at this address may have changed (its session
        # broke, it came back from no answer, another instance id) until GetInfo and the
        # pool's checks pass again: a restarted worker is not trusted blindly.
        self.verified = True
        self.on_reconnect: Callable[[WorkerClient], None] | None = None  # set by the pool
        self._broken_seen: Session[Any, Any] | None = None  # the broken session reported
        self.draining = False  # takes no new requests
        self.leave_when_idle = False  # drained by the admin API: leaves at in_flight == 0
        self.in_flight = 0
        self.report: common_pb2.LoadReport | None = None  # the last GetLoad answer
        self.reported_at: float | None = None
        self.info: WorkerInfo | None = None
        self._session: Session[Any, Any] | None = None
        self._call: Any = None  # the session's call
        self._listener_unreachable = False  # open sessions on the main port until GetInfo
        self._refresh: asyncio.Future[None] | None = None  # that GetInfo

    @property
    def usable(self) -> bool:
        """Whether new requests may go here: healthy, verified, circuit not open, not
        draining."""
        return self.healthy and self.verified and not self.draining and self.breaker.allows()

    @property
    def load(self) -> WorkerLoad:
        """The policies' view: in-flight count now, plus the last GetLoad report if any."""
        r = self.report
        if r is None:
            return WorkerLoad(in_flight=self.in_flight)
        return WorkerLoad(
            in_flight=self.in_flight,
            num_running=r.num_running,
            num_waiting=r.num_waiting,
            num_free_pages=r.num_free_pages,
            num_total_pages=r.num_total_pages,
        )

    async def get_info(self, timeout_s: float) -> WorkerInfo:
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
            session_port=msg.session_port,
            weights=msg.layout.weights,
            instance_id=msg.instance_id,
        )

    async def check_health(self, timeout_s: float = 1.0) -> bool | None:
        """True: SERVING; False: answered, but not SERVING; None: no answer."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return None
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def poll_load(self, timeout_s: float = 1.0) -> None:
        """Refresh ``report`` from GetLoad; a worker that cannot answer keeps the old one."""
        stub = self.prefill if self.role == ROLE_PREFILL else self.decode
        try:
            self.report = await stub.GetLoad(common_pb2.LoadRequest(), timeout=timeout_s)
            self.reported_at = time.monotonic()
        except grpc.aio.AioRpcError as exc:
            log.debug("GetLoad on %s: %s", self.endpoint, exc.code().name)

    def sample(self) -> WorkerSample:
        r = self.report
        return WorkerSample(
            endpoint=self.endpoint,
            role=self.role,
            healthy=self.healthy,
            circuit_state=self.breaker.state.gauge,
            draining=self.draining,
            in_flight=self.in_flight,
            num_running=r.num_running if r else None,
            num_waiting=r.num_waiting if r else None,
            num_free_pages=r.num_free_pages if r else None,
            num_total_pages=r.num_total_pages if r else None,
        )

    def describe(self) -> dict[str, Any]:
        """The admin API's view of this worker (JSON-ready)."""
        r = self.report
        last_load = None
        if r is not None and self.reported_at is not None:
            last_load = {
                "num_running": r.num_running,
                "num_waiting": r.num_waiting,
                "num_free_pages": r.num_free_pages,
                "num_total_pages": r.num_total_pages,
                "age_s": round(time.monotonic() - self.reported_at, 3),
            }
        return {
            "endpoint": self.endpoint,
            "role": self.role,
            "source": self.source,
            "model": self.info.model if self.info else None,
            "health": "healthy" if self.healthy else "unhealthy",
            "verified": self.verified,
            "circuit": self.breaker.state.value,
            "usable": self.usable,
            "in_flight": self.in_flight,
            "draining": self.draining,
            "last_load": last_load,
        }

    @property
    def session_endpoint(self) -> str:
        """Where the native transport opens sessions: the worker's session listener, on the
        host the router knows the worker by; or its main port, which serves sessions too,
        when it has none or the listener could not be reached."""
        port = self.info.session_port if self.info is not None else 0
        if not port or self._listener_unreachable:
            return self.endpoint
        return f"{self.endpoint.rpartition(':')[0]}:{port}"

    def session(self) -> Session[Any, Any]:
        """The session every request to this worker rides (a new one once broken):
        ``Prefill.Session`` for a prefill worker, else ``Decode.Session``."""
        session = self._session
        if session is not None and session.broken and self.on_reconnect is not None:
            if self._broken_seen is not session:
                # The worker may come back as another process: nothing goes to it before
                # the pool has read and checked its identity again.
                self._broken_seen = session
                self.verified = False
                self.on_reconnect(self)
            if not self.verified:
                raise WorkerError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"worker {self.endpoint} is reconnecting; its identity is being re-checked",
                    self.endpoint,
                )
        if session is None or session.broken:
            call = self._call
            if isinstance(call, StreamCall) and not call.reached and self._refresh is None:
                # The worker may have restarted with its listener on another port: carry on
                # over the main port and ask GetInfo where the listener is now.
                self._listener_unreachable = call.endpoint != self.endpoint
                self._refresh = asyncio.ensure_future(self._find_listener())
            kind = PREFILL if self.role == ROLE_PREFILL else DECODE
            if self._transport == "native":
                call = StreamCall(
                    self.session_endpoint, kind.path, kind.parse_reply, self._keepalive_s,
                    token=self._token, tls=self._tls,
                )  # fmt: skip
            elif kind is PREFILL:
                call = self.prefill.Session()
            else:
                call = self.decode.Session()
            session = Session(call, self.endpoint, kind)
            self._session, self._call = session, call
        return session

    async def _find_listener(self) -> None:
        try:
            info = await self.get_info(timeout_s=5.0)
        except grpc.aio.AioRpcError as exc:
            log.debug("GetInfo on %s: %s", self.endpoint, exc.code().name)
        else:
            if self.info is not None and info.session_port != self.info.session_port:
                log.info("worker %s: session listener now on port %d", self.endpoint,
                         info.session_port)  # fmt: skip
                self.info = replace(self.info, session_port=info.session_port)
            self._listener_unreachable = False
        finally:
            self._refresh = None

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self._session is not None:
            await self._session.close()
        await self.channel.close()

    def __repr__(self) -> str:
        return f"WorkerClient({self.endpoint!r}, role={self.role!r}, source={self.source!r})"


def load_of(worker: WorkerClient) -> WorkerLoad:
    """The ``LoadFn`` policies get: the worker's ``load`` (never blocks)."""
    return worker.load


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
        self.model: ModelInfo | None = None  # set by discover / set_model; fixed after
        self.evicted: set[str] = set()  # removed or drained by the admin: registry skips them
        self._members: dict[str, WorkerClient] = {}
        self._reference: WorkerInfo | None = None  # the first member: its model and vocab
        self._layout: WorkerInfo | None = None  # the first prefill/decode member: its layout
        self._background: set[asyncio.Task[None]] = set()
        self._checker: asyncio.Task[None] | None = None
        self._admitting: set[str] = set()
        self._verifying: set[str] = set()  # members whose identity is being re-read
        self._refusals: dict[str, str] = {}  # why a reconnected member stays out (logged once)
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
            infos = await asyncio.gather(*(self._get_info(c, timeout_s) for c in clients))
            for info in infos:
                self._check_compatible(info)
        except BaseException:
            await asyncio.gather(*(c.close() for c in clients))
            raise
        for client, info in zip(clients, infos, strict=True):
            self._add(client, info)
        return self.set_model(served_model_name) if infos else None

    def set_model(self, served_model_name: str | None) -> ModelInfo:
        """Fix the model the router serves from the members it has (at least one)."""
        if self._reference is None:
            raise RuntimeError("no worker is known yet")
        self.model = ModelInfo(
            name=served_model_name or self._reference.model,
            context_length=min(w.info.context_length for w in self.all_workers if w.info),
            vocab_size=self._reference.vocab_size,
        )
        return self.model

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
            info = await self._get_info(client, timeout_s)
            self._check_compatible(info)
        except BaseException:
            await client.close()
            raise
        finally:
            self._admitting.discard(endpoint)
        self._add(client, info)
        return client

    def _add(self, client: WorkerClient, info: WorkerInfo) -> None:
        client.info = info
        client.on_reconnect = self._unverified
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

    async def _get_info(self, worker: WorkerClient, timeout_s: float) -> WorkerInfo:
        try:
            info = await worker.get_info(timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise WorkerUnreachable(
                f"worker {worker.endpoint} did not answer GetInfo within {timeout_s:g}s: "
                f"{exc.code().name} {exc.details()}"
            ) from exc
        if info.role != worker.role:
            flag = "--worker" if worker.role == ROLE_COLOCATED else f"--{worker.role}"
            raise WorkerRefused(
                f"worker {worker.endpoint} has role {info.role!r} but was given as {flag} "
                f"(role {worker.role!r})"
            )
        return info

    def _unverified(self, worker: WorkerClient) -> None:
        worker.verified = False
        self.spawn(self._reverify(worker))

    async def _reverify(self, worker: WorkerClient) -> None:
        """Read a member's identity again and check it as at admission: model, weights,
        context length, layout fingerprint. It takes requests again only if all still hold;
        otherwise it stays out (logged once per reason) and the next health round tries
        again."""
        if worker.endpoint in self._verifying:
            return
        self._verifying.add(worker.endpoint)
        try:
            info = await self._get_info(worker, self.health_config.check_timeout_s * 5)
            self._check_compatible(info)
        except WorkerUnreachable:
            return  # not back yet
        except WorkerRefused as exc:
            reason = str(exc)
            if self._refusals.get(worker.endpoint) != reason:
                self._refusals[worker.endpoint] = reason
                log.warning("worker %s stays out of the pool after reconnecting: %s",
                            worker.endpoint, reason)  # fmt: skip
            return
        finally:
            self._verifying.discard(worker.endpoint)
        if worker.info is not None and info.instance_id != worker.info.instance_id:
            log.info("worker %s restarted (instance %s); identity re-checked", worker.endpoint,
                     info.instance_id or "?")  # fmt: skip
        self._refusals.pop(worker.endpoint, None)
        worker.info = info
        worker.verified = True

    def _check_compatible(self, info: WorkerInfo) -> None:
        """WorkerRefused naming both values when ``info`` cannot serve beside the members."""
        ref = self._reference
        if ref is not None and (info.model != ref.model or info.vocab_size != ref.vocab_size):
            raise WorkerRefused(
                f"workers serve different models: {ref.endpoint} has {ref.model!r} "
                f"(vocab {ref.vocab_size}) but {info.endpoint} has {info.model!r} "
                f"(vocab {info.vocab_size})"
            )
        if ref is not None and ref.weights and info.weights and info.weights != ref.weights:
            raise WorkerRefused(
                f"workers serve different weights: {ref.endpoint} has {ref.weights!r} but "
                f"{info.endpoint} has {info.weights!r}"
            )
        layout = self._layout
        if (
            layout is not None
            and info.role in (ROLE_PREFILL, ROLE_DECODE)
            and info.fingerprint != layout.fingerprint
        ):
            raise WorkerRefused(
                f"{info.role} worker {info.endpoint} and {layout.role} worker "
                f"{layout.endpoint} cannot pair: KV layout fingerprint "
                f"{info.fingerprint!r} != {layout.fingerprint!r}"
            )
        if self.model is not None and info.context_length < self.model.context_length:
            raise WorkerRefused(
                f"worker {info.endpoint} has context length {info.context_length} but the "
                f"router serves {self.model.context_length}"
            )
        # The first worker checked sets the model; the first prefill or decode the layout.
        if self._reference is None:
            self._reference = info
        if self._layout is None and info.role in (ROLE_PREFILL, ROLE_DECODE):
            self._layout = info

    # -- routing -------------------------------------------------------------------------------

    def generate(self, request: WorkerRequest) -> AsyncGenerator[WorkerEvent, None]:
        """Stream one request's tokens, then its ``Finished``; raises ``WorkerError`` (or
        ``NoUsableWorker``) when retries and migrations cannot save it.

        Closing the iterator early (``aclose``, or cancelling the task iterating it) cancels
        the gRPC calls and sends ``Abort`` to every worker involved.
        """
        return resilience.generate(self, request, self.retry, self.eos_token_ids, self.metrics)

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

    def report(self, route: resilience.Route, error: WorkerError | None) -> None:
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
                    self._failed(worker, f"{error.grpc_code.name}: {error.details}")

    def _failed(self, worker: WorkerClient, why: str) -> None:
        before = worker.breaker.state
        worker.breaker.record_failure()
        if before is not CircuitState.OPEN and worker.breaker.state is CircuitState.OPEN:
            log.warning("circuit of worker %s opened (%s)", worker.endpoint, why)

    def _stream(
        self, workers: tuple[WorkerClient, ...], request: WorkerRequest
    ) -> AsyncGenerator[WorkerEvent, None]:
        """The attempt's events; the workers count it in flight until its calls end (the
        stream must be iterated, as ``resilience.generate`` does at once)."""
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

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a fire-and-forget coroutine, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- health ----------------------------------------------------------------------------------

    def start_health_checks(self) -> None:
        """Check every member's health and load every ``check_interval_s`` until ``close``."""
        if self._checker is None:
            self._checker = asyncio.create_task(self._check_forever())

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.health_config.check_interval_s)
            try:
                await self.check_all()
            except Exception:
                log.exception("health check round failed")

    async def check_all(self) -> None:
        """One round: ``grpc.health.v1`` then ``GetLoad`` on every member, concurrently."""
        await asyncio.gather(*(self._check(w) for w in self.all_workers))

    async def _check(self, worker: WorkerClient) -> None:
        timeout = self.health_config.check_timeout_s
        serving = await worker.check_health(timeout)
        was = worker.healthy
        answered_before = worker.answered
        worker.answered = serving is not None
        worker.healthy = bool(serving)
        if serving is not None and not answered_before:
            self._unverified(worker)  # back from silence: perhaps another process
        if serving is None:
            self._failed(worker, "health check got no answer")
        elif serving:
            worker.breaker.record_success(probe=True)
        if was != worker.healthy:
            state = {None: "no answer", False: "NOT_SERVING", True: "SERVING"}[serving]
            log.warning("worker %s is now %s (%s)",
                        worker.endpoint, "healthy" if serving else "unhealthy", state)  # fmt: skip
        if serving is not None:
            await worker.poll_load(timeout)
            known = worker.info.instance_id if worker.info is not None else ""
            seen = worker.report.instance_id if worker.report is not None else ""
            if known and seen and seen != known and worker.verified:
                self._unverified(worker)
        if not worker.verified and serving:
            self.spawn(self._reverify(worker))

    async def health(self) -> dict[str, bool]:
        """``{endpoint: serving}`` for every member, checked now, concurrently."""
        workers = self.all_workers
        states = await asyncio.gather(*(w.check_health() for w in workers))
        return {w.endpoint: bool(s) for w, s in zip(workers, states, strict=True)}

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

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        if self._background:
            await asyncio.wait(set(self._background), timeout=2.0)
        await asyncio.gather(*(w.close() for w in self.all_workers))


__all__ = [
    "NoUsableWorker",
    "WorkerClient",
    "WorkerError",
    "WorkerEvent",
    "WorkerPool",
    "WorkerRequest",
]
