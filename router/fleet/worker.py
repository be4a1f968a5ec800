"""One worker the router knows: its gRPC client and its routing state.

One ``WorkerClient`` (one ``grpc.aio`` channel, reused by every request) per worker. Besides
its stubs it carries what routing needs: ``healthy`` (the last ``grpc.health.v1`` check), a
``CircuitBreaker`` fed by health checks and request outcomes, ``draining``, the requests in
flight, and the last ``GetLoad`` report (``load``, the policies' view; see
``router.fleet.load``), and the session every request to it rides.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import cluster_token, common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.contract import DECODE, PREFILL, ROLE_PREFILL, ROLES
from router.client.errors import WorkerError
from router.client.session import Session
from router.client.transport import SessionOpener
from router.fleet.breaker import CircuitBreaker
from router.fleet.health import HealthConfig
from router.fleet.load import WorkerLoad
from router.metrics import WorkerSample

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


class Health(enum.Enum):
    """What one health check found."""

    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"  # answered, but draining or not ready
    SILENT = "no answer"  # timed out: the worker, or this router, may be paused
    UNREACHABLE = "unreachable"  # refused or reset: nothing serves at the address


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
        kind = PREFILL if role == ROLE_PREFILL else DECODE
        self._opener = SessionOpener(
            self.endpoint, kind, health.session_transport, health.keepalive_s, self._token,
            self._tls, self.prefill.Session if kind is PREFILL else self.decode.Session,
            self._listener_port,
        )  # fmt: skip
        self.healthy = True  # the last health check said SERVING (members passed GetInfo)
        # Health checks in a row that got no answer. One is not enough to take a worker out:
        # a router that stalls for a moment (CPU, a pause) misses every worker's answer at
        # once, and would otherwise turn them all away together.
        self.silent_checks = 0
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
        self._info: WorkerInfo | None = None
        self._session: Session[Any, Any] | None = None

    @property
    def info(self) -> WorkerInfo | None:
        """Its GetInfo answer, as last read and checked (None before it joins)."""
        return self._info

    @info.setter
    def info(self, info: WorkerInfo | None) -> None:
        self._info = info
        self._opener.session_port = info.session_port if info is not None else 0

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

    async def check_health(self, timeout_s: float = 1.0) -> Health:
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            # Refused or reset: nothing serves there. Timed out: maybe a pause, there or here.
            silent = exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            return Health.SILENT if silent else Health.UNREACHABLE
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return Health.SERVING
        return Health.NOT_SERVING

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

    def reverified(self, info: WorkerInfo) -> None:
        """Its identity, read again, passed the pool's checks: it takes requests again. A
        session that broke before is accounted for by that check (else the first request
        after it would start another)."""
        self.info = info
        self.verified = True
        if self._session is not None and self._session.broken:
            self._broken_seen = self._session

    @property
    def session_endpoint(self) -> str:
        """Where the next session opens (``router.client.transport``)."""
        return self._opener.session_endpoint

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
            session = Session(self._opener.open(), self.endpoint, self._opener.kind)
            self._session = session
        return session

    async def _listener_port(self, timeout_s: float) -> int:
        return (await self.get_info(timeout_s)).session_port

    async def close(self) -> None:
        self._opener.close()
        if self._session is not None:
            await self._session.close()
        await self.channel.close()

    def __repr__(self) -> str:
        return f"WorkerClient({self.endpoint!r}, role={self.role!r}, source={self.source!r})"


def load_of(worker: WorkerClient) -> WorkerLoad:
    """The ``LoadFn`` policies get: the worker's ``load`` (never blocks)."""
    return worker.load
